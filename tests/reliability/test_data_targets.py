"""Data faults: a sample with no target token is skipped and counted in every format (conversations, captions,
after truncation); file-level errors (malformed JSON, truncated tar) name the file and the position."""

import io
import json
import tarfile

import pytest
from PIL import Image

from libra_model.data import CocoCaptions, LlavaInstructions, WebDatasetCaptions
from libra_model.data.loader import SampleError, SkipStats
from libra_model.data.pipeline import EncodedSource, build_loader
from libra_model.processor import LibraProcessor


def _turn(who, text):
    return {"from": who, "value": text}


@pytest.fixture(scope="module")
def processor(processor_dir):
    return LibraProcessor.from_pretrained(processor_dir)


def _llava(tmp_path, records):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return LlavaInstructions(str(path), str(tmp_path))


def test_conversation_without_an_answer_is_skipped_and_counted(processor, tmp_path):
    source = _llava(tmp_path, [
        {"id": "human_only", "conversations": [_turn("human", "a red square?")]},
        {"id": "good", "conversations": [_turn("human", "a red square?"), _turn("gpt", "a blue circle")]},
        {"id": "empty_answer", "conversations": [_turn("human", "a red square?"), _turn("gpt", "")]},
    ])
    encoded = EncodedSource(source, processor)
    with pytest.raises(SampleError) as caught:
        encoded[0]
    assert caught.value.reason == "no_target" and "human_only" in caught.value.detail
    assert int(encoded[1].target_mask[1:].sum()) > 0
    loader = build_loader(source, processor, micro_batch_size=2, seed=0, dp_rank=0, dp_size=1, shuffle=False)
    batch = next(loader)
    assert batch["input_ids"].shape[0] == 2
    counts = loader.stats.counts
    assert counts["no_target"] >= 1 and sum(counts.values()) == counts["no_target"]
    # Every sample handed out has at least one target after the first position.
    targets = batch["target_mask"].bool() & batch["attention_mask"].bool()
    assert targets[:, 1:].any(1).all()


@pytest.mark.parametrize("caption_eos", [False, True])
def test_caption_cut_away_by_max_length_is_skipped(processor, tmp_path, caption_eos):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    annotation = tmp_path / "coco.json"
    annotation.write_text(json.dumps([{"image": "a.png", "caption": "a red square"}]))
    source = CocoCaptions(str(annotation), str(tmp_path))
    full = EncodedSource(source, processor, caption_eos=caption_eos)[0]
    first_target = int(full.target_mask.nonzero()[0])
    assert first_target > 1
    with pytest.raises(SampleError, match=f"no target token within max_length={first_target}") as caught:
        EncodedSource(source, processor, max_length=first_target, caption_eos=caption_eos)[0]
    assert caught.value.reason == "no_target"
    kept = EncodedSource(source, processor, max_length=first_target + 1, caption_eos=caption_eos)[0]
    assert int(kept.target_mask[1:].sum()) == 1


def test_malformed_annotation_json_names_the_file_and_the_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "1", "conversations": []},\n {"id": 2 "x"}]')
    for cls in (LlavaInstructions, CocoCaptions):
        with pytest.raises(ValueError, match=rf"{path} is not valid JSON: .* line 2, column 11 "):
            cls(str(path), str(tmp_path))
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8"):
        LlavaInstructions(str(path), str(tmp_path))


@pytest.mark.parametrize("cut", ["at_a_header", "mid_data", "in_the_end_blocks"])
def test_truncated_tar_names_the_shard_and_keeps_what_precedes(tmp_path, cut, caplog):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
            for ext, data in (("png", buffer.getvalue()), ("txt", b"a red square")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    # Each member is one header block and one data block: sample i starts at byte 2048·i.
    keep = {"at_a_header": 2 * 2048, "mid_data": 2 * 2048 + 512 + 100, "in_the_end_blocks": 4 * 2048 + 512}[cut]
    path.write_bytes(data[:keep])
    stats = SkipStats()
    with caplog.at_level("WARNING"):
        source = WebDatasetCaptions([str(path)], stats=stats)
    assert len(source) == (2 if cut != "in_the_end_blocks" else 4)
    assert stats.counts["broken_tar_member"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "broken_tar_member" in r.getMessage()]
    assert str(path) in line and ("byte" in line or "runs past the end" in line), line
