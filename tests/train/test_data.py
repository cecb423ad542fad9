import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from libra_model.data import (
    CocoCaptions,
    LlavaInstructions,
    ResumableLoader,
    ResumableSampler,
    SampleError,
    ShapesCaptions,
    SkipStats,
    WebDatasetCaptions,
    expand_braces,
)


def _jpeg(colour=(200, 10, 10), size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)


def _caption(text):
    return json.dumps({"caption": text}).encode()


# ------------------------------------------------------------------------------------------------ brace patterns
def test_expand_braces():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x.tar::y/{8..10}.tar") == ["x.tar", "y/8.tar", "y/9.tar", "y/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("d/{0..2.tar")
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("{5..2}")


# ------------------------------------------------------------------------------------------------ webdataset tars
def test_webdataset_reads_samples_and_skips_bad_ones(tmp_path):
    _write_shard(tmp_path / "00000.tar", [
        ("a/s0", {"jpg": _jpeg(), "json": _caption("a red box")}),
        ("a/s1", {"jpg": b"not a jpeg at all", "json": _caption("broken image")}),
        ("a/s2", {"json": _caption("no image")}),
        ("a/s3", {"jpg": _jpeg((0, 0, 250)), "txt": b"a blue box"}),
    ])
    (tmp_path / "00001.tar").write_bytes(b"\x00garbage that is not a tar" * 40)  # a corrupt shard
    full = tmp_path / "full.tar"
    _write_shard(full, [("b/s0", {"jpg": _jpeg(), "json": _caption("kept")}),
                        ("b/s1", {"json": _caption("cut"), "jpg": _jpeg((1, 2, 3), (64, 64))})])
    with tarfile.open(full) as tar:
        last = tar.getmember("b/s1.jpg")
    cut = last.offset_data + last.size // 2
    (tmp_path / "00002.tar").write_bytes(full.read_bytes()[:cut])  # truncated inside the last member
    dataset = WebDatasetCaptions(str(tmp_path / "{00000..00003}.tar"))

    assert dataset.stats.counts["missing_shard"] == 1  # 00003 does not exist
    assert dataset.stats.counts["corrupt_shard"] == 1
    assert dataset.stats.counts["broken_tar_member"] == 1
    assert dataset.stats.counts["no_image"] == 2  # a/s2, and b/s1 whose image was cut off
    keys = [dataset.samples[i][1] for i in range(len(dataset))]
    assert keys[:3] == ["a/s0", "a/s1", "a/s3"] and "b/s0" in keys
    first = dataset[0]
    assert first["caption"] == "a red box" and first["image"].mode == "RGB" and first["image"].size == (20, 12)
    assert dataset[2]["caption"] == "a blue box"
    with pytest.raises(SampleError) as error:
        dataset[1]
    assert error.value.reason == "corrupt_image"

    # Through the loader, the corrupt image is skipped and counted, never fatal.
    loader = ResumableLoader(dataset, ResumableSampler(len(dataset), shuffle=False), batch_size=len(dataset) - 1)
    batch = next(loader)
    assert [s["key"] for s in batch] == [k for k in keys if k != "a/s1"]
    assert loader.stats.counts["corrupt_image"] == 1
    assert "corrupt_image 1" in loader.stats.summary() and "corrupt_shard 1" in loader.stats.summary()


def test_webdataset_without_usable_shard_raises(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"nope" * 200)
    with pytest.raises(ValueError, match="no usable sample"):
        WebDatasetCaptions(str(tmp_path / "0.tar"))


# ------------------------------------------------------------------------------------------------ JSON formats
def test_coco_captions(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.jpg")
    records = [{"image": "x.jpg", "caption": "one", "image_id": 1},
               {"image": "x.jpg", "caption": ["two", "three"]},
               {"image": "missing.jpg", "caption": "gone"},
               {"caption": "no image field"}]
    (tmp_path / "ann.json").write_text(json.dumps(records))
    dataset = CocoCaptions(str(tmp_path / "ann.json"), str(tmp_path))
    assert len(dataset) == 4 and dataset.stats.counts["malformed_record"] == 1
    assert [dataset[i]["caption"] for i in range(3)] == ["one", "two", "three"]
    with pytest.raises(SampleError, match="missing_file"):
        dataset[3]


def test_llava_instructions(tmp_path):
    os.makedirs(tmp_path / "img")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "img" / "a_b.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "img" / "c.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG but broken")
    turn = lambda f, v: {"from": f, "value": v}
    records = [
        {"id": "1", "image": "img/a-b.png", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "blue")]},
        {"id": "2", "conversations": [turn("human", "hi"), turn("gpt", "hello")]},
        {"id": "3", "image": "img/none.png", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
        {"id": "4", "image": "img/bad.png", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
        {"id": "5", "image": "img/c.png", "conversations": [turn("human", "q"), turn("gpt", "<image>")]},
        {"id": "6", "conversations": [turn("robot", "q")]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    dataset = LlavaInstructions(str(tmp_path / "llava.json"), str(tmp_path))
    assert len(dataset) == 4 and dataset.stats.counts["malformed_record"] == 2
    assert dataset[0]["image"].size == (8, 8)  # found through the "-" -> "_" fallback
    assert dataset[1]["image"] is None and dataset[1]["conversations"][1]["value"] == "hello"
    loader = ResumableLoader(dataset, ResumableSampler(len(dataset), shuffle=False), batch_size=2)
    assert [s["key"] for s in next(loader)] == ["1", "2"]
    assert [s["key"] for s in next(loader)] == ["1", "2"]  # 3 and 4 skipped, next epoch
    assert loader.stats.counts == {"malformed_record": 2, "missing_file": 1, "corrupt_image": 1}


# ------------------------------------------------------------------------------------------------ sampling
def test_sampler_splits_replicas_and_resumes():
    a = ResumableSampler(10, seed=3, dp_rank=0, dp_size=2)
    b = ResumableSampler(10, seed=3, dp_rank=1, dp_size=2)
    first_a, first_b = [next(a) for _ in range(5)], [next(b) for _ in range(5)]
    assert sorted(first_a + first_b) == list(range(10))  # one epoch covers the set once across replicas
    assert first_a != sorted(first_a) or first_b != sorted(first_b)  # shuffled
    state = a.state_dict()
    expected = [next(a) for _ in range(7)]  # crosses into epoch 1
    c = ResumableSampler(10, seed=3, dp_rank=0, dp_size=2)
    c.load_state_dict(state)
    assert [next(c) for _ in range(7)] == expected
    assert expected[:5] != first_a  # a new permutation each epoch
    with pytest.raises(ValueError, match="dp_size"):
        ResumableSampler(10, seed=3, dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(0)


class _Flaky:
    """Index i fails when i % 4 == 3."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        if i % 4 == 3:
            raise SampleError("corrupt_image", str(i))
        return i


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_resume_continues_exactly(prefetch):
    def make():
        return ResumableLoader(_Flaky(), ResumableSampler(20, seed=1), batch_size=3, prefetch=prefetch)

    loader = make()
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    loader.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(6)] == expected
    assert resumed.state_dict() == loader.state_dict()
    resumed.close()
    assert all(i % 4 != 3 for batch in expected for i in batch)


def test_loader_gives_up_on_a_broken_dataset():
    class Broken:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            raise SampleError("missing_file", str(i))

    loader = ResumableLoader(Broken(), ResumableSampler(5), batch_size=1, max_consecutive_skips=7)
    with pytest.raises(RuntimeError, match="7 bad samples in a row"):
        next(loader)


def test_skip_stats_summary():
    stats = SkipStats()
    assert stats.summary() == "skipped 0"
    stats.add("b")
    stats.add("a", n=2)
    assert stats.summary() == "skipped 3 (a 2, b 1)"


# ------------------------------------------------------------------------------------------------ generated set
def test_shapes_are_deterministic_and_captions_describe_them():
    train = ShapesCaptions(50, image_size=32, seed=5)
    again = ShapesCaptions(50, image_size=32, seed=5)
    heldout = ShapesCaptions(50, image_size=32, seed=5, split="heldout")
    for i in (0, 17, 49):
        a, b = train[i], again[i]
        assert a["caption"] == b["caption"] and a["image"].tobytes() == b["image"].tobytes()
    assert [train[i]["caption"] for i in range(10)] != [heldout[i]["caption"] for i in range(10)]
    sample = train[3]
    colour, shape, position, _ = train.describe(3)
    assert sample["caption"].startswith(f"a {colour} {shape}")
    pixels = torch.frombuffer(bytearray(sample["image"].tobytes()), dtype=torch.uint8).view(32, 32, 3).float()
    from libra_model.data.shapes import COLOURS

    hit = (pixels - torch.tensor(COLOURS[colour], dtype=torch.float32)).abs().sum(-1) < 1
    ys, xs = hit.nonzero(as_tuple=True)
    assert hit.sum() > 20  # the shape is drawn in its colour
    centre = {"left": (None, 8), "right": (None, 24), "top": (8, None), "bottom": (24, None),
              "middle": (16, 16)}[position]
    if centre[1] is not None:
        assert abs(xs.float().mean().item() - centre[1]) < 6
    if centre[0] is not None:
        assert abs(ys.float().mean().item() - centre[0]) < 6
    assert all(word in ShapesCaptions.vocabulary_text() for word in sample["caption"].split())
    with pytest.raises(ValueError, match="split"):
        ShapesCaptions(split="test")


def test_host_collate_validates_the_batch_once_on_the_host(processor_dir):
    from libra_model.data.pipeline import HostCollate, check_host_batch
    from libra_model.processor import LibraProcessor
    from libra_model.text import CODE_PLACEHOLDER

    processor = LibraProcessor.from_pretrained(processor_dir)
    config = processor.config
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    samples = [processor.encode_sample("a red square", image, template="caption"),
               processor.encode_sample("just text", None, template="caption")]
    batch = HostCollate(processor)(samples)
    assert batch["layout"].n_vision == int((batch["vision_indices"] < config.max_vision_token_length).sum())
    check_host_batch(batch, config)  # a collated batch is valid
    in_image = batch["vision_indices"][0] < config.max_vision_token_length
    first_code = int(in_image.nonzero()[1])  # [0] is the BOI
    # A text id inside an image, a vision id in the text, codebook rows that differ, a cross-modal target.
    cases = []
    bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    bad["input_ids"][:, 0, first_code] = 5
    cases.append((bad, "not a vision id"))
    bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    bad["input_ids"][:, 1, 1] = CODE_PLACEHOLDER
    cases.append((bad, "not a text id"))
    bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    bad["input_ids"][1, 1, 1] += 1
    cases.append((bad, "same ids in every codebook row"))
    bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    eoi = int((batch["vision_indices"][0] == config.eoi_vision_index).nonzero()[0])
    bad["target_mask"][0, eoi + 1] = True  # the text after EOI is predicted by a vision row
    cases.append((bad, "follows a vision position"))
    for case, message in cases:
        with pytest.raises(ValueError, match=message):
            check_host_batch(case, config)
