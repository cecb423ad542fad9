"""LibraProcessor: batches of (image, text) -> model inputs (docs/model.md §1, §10, §14 items 9-13), checked against
the image tokenizer run on each image alone and against the model that consumes the batch."""

import copy
import dataclasses
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from libra_kernels.testing import assert_close_to_ref
from libra_model.config import LibraConfig
from libra_model.processor import LibraProcessor
from libra_model.text import CODE_PLACEHOLDER, IGNORE_INDEX, check_no_cross_modal_targets, clean_caption
from libra_model.tiny import build_tiny_processor_dir

CORPUS = ["a red circle on the left", "a blue square in the middle", "what is in the picture? describe it.",
          "it is a small green triangle", "yes"]


@pytest.fixture(scope="module")
def config():
    return LibraConfig.tiny()


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory, config):
    return build_tiny_processor_dir(tmp_path_factory.mktemp("processor"), config, texts=CORPUS)


@pytest.fixture(scope="module")
def processor(proc_dir):
    return LibraProcessor.from_pretrained(proc_dir)


def image(seed, size=(40, 28)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def real_positions(batch, row):
    return batch["attention_mask"][row].bool()


_FLOAT64_TOKENIZERS = {}


def check_image_positions(processor, batch, row, images):
    """The ids and signal at the image positions of ``row`` equal the image tokenizer's output for each image run
    alone (the signal within float32 rounding of a float64 run: batching changes the CLIP matmul blocking)."""
    config = processor.config
    reference = _FLOAT64_TOKENIZERS.setdefault(id(processor), copy.deepcopy(processor.image_tokenizer).double())
    vision = batch["vision_indices"][row]
    starts = (vision == 0).nonzero().flatten().tolist()
    assert len(starts) == len(images)
    for start, img in zip(starts, images):
        tokens = processor.image_tokenizer.tokenize([img])
        length = min(config.max_vision_token_length, int(vision.shape[0]) - start)
        span = slice(start, start + length)
        assert torch.equal(batch["input_ids"][:, row, span], tokens.ids[:, 0, :length])
        exact = reference.tokenize(reference.preprocess([img]).double()).contiguous_signal[0, :length]
        assert_close_to_ref(batch["contiguous_signal"][row, span], exact, tokens.contiguous_signal[0, :length],
                            torch.float32, "contiguous signal")
        assert vision[span].tolist() == list(range(length))


# ------------------------------------------------------------------------------------------------- pretraining
def test_pretraining_batch(processor, config):
    images = [image(0), None, image(1, (28, 40))]
    captions = ["A Red circle on the LEFT", "a blue square", "it is a small green triangle"]
    batch = processor(images=images, texts=captions, template="caption", return_labels=True)
    C, B, N = batch["input_ids"].shape
    assert (C, B) == (config.vision_codebook_num, 3)
    assert batch["vision_indices"].shape == batch["attention_mask"].shape == (B, N)
    assert batch["contiguous_signal"].shape == (B, N, config.contiguous_signal_size)
    assert batch["labels"].shape == (C, B, N)
    for tensor in ("input_ids", "vision_indices", "attention_mask", "labels"):
        assert batch[tensor].dtype == torch.int64
    # Each image's positions hold that image's own tokens (not the neighbour's), docs/model.md §14 item 9.
    check_image_positions(processor, batch, 0, [images[0]])
    check_image_positions(processor, batch, 2, [images[2]])
    vision = batch["vision_indices"] < config.max_vision_token_length
    assert torch.equal(batch["input_ids"][0] >= config.vocab_size, vision)
    assert torch.equal(batch["input_ids"][0][~vision], batch["input_ids"][1][~vision])
    # The contiguous signal is exactly zero at text, padding, BOI and EOI (docs/model.md §14, item 11).
    signal_rows = batch["contiguous_signal"].abs().sum(-1) != 0
    codes = (batch["vision_indices"] >= 1) & (batch["vision_indices"] <= config.image_feature_resolution ** 2)
    assert torch.equal(signal_rows, codes)
    # Labels (docs/model.md §14, item 13): -100 at <s>, BOI, "\n" and padding; codes, EOI and caption tokens are
    # targets.
    labels = batch["labels"]
    length = int(batch["attention_mask"][0].sum())
    assert labels[:, 0, :2].eq(IGNORE_INDEX).all() and labels[:, 0, 12].eq(IGNORE_INDEX).all()
    assert torch.equal(labels[:, 0, 2:12], batch["input_ids"][:, 0, 2:12])
    assert batch["input_ids"][0, 0, 12] == config.newline_token_id
    assert torch.equal(labels[:, 0, 13:length], batch["input_ids"][:, 0, 13:length])
    assert labels[:, 1][:, ~real_positions(batch, 1)].eq(IGNORE_INDEX).all()
    check_no_cross_modal_targets(labels, batch["vision_indices"], vocab_size=config.vocab_size,
                                 max_vision_token_length=config.max_vision_token_length)
    assert processor.decode(batch["input_ids"][0, 0]) == "<image>\n" + clean_caption(captions[0])
    assert processor.decode(batch["input_ids"][:, 1]) == "a blue square"


def test_left_and_right_padding_hold_the_same_tokens(processor, config):
    images, texts = [image(2), None], ["a red circle", "yes"]
    right = processor(images=images, texts=texts, template="caption", return_labels=True, padding_side="right")
    left = processor(images=images, texts=texts, template="caption", return_labels=True, padding_side="left")
    N = right["attention_mask"].shape[1]
    for row in range(2):
        n = int(right["attention_mask"][row].sum())
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (N - n)
        assert left["attention_mask"][row].tolist() == [0] * (N - n) + [1] * n
        for key in ("input_ids", "labels"):
            assert torch.equal(right[key][:, row, :n], left[key][:, row, N - n:])
            pad_value = config.pad_token_id if key == "input_ids" else IGNORE_INDEX
            assert right[key][:, row, n:].eq(pad_value).all() and left[key][:, row, :N - n].eq(pad_value).all()
        assert torch.equal(right["vision_indices"][row, :n], left["vision_indices"][row, N - n:])
        assert right["vision_indices"][row, n:].eq(config.max_vision_token_length).all()
        assert left["vision_indices"][row, :N - n].eq(config.max_vision_token_length).all()
        assert torch.equal(right["contiguous_signal"][row, :n], left["contiguous_signal"][row, N - n:])
        assert left["contiguous_signal"][row, :N - n].eq(0).all()
    with pytest.raises(ValueError, match="padding_side"):
        processor(images=images, texts=texts, template="caption", padding_side="middle")


def test_text_only_batch_has_no_signal(processor):
    batch = processor(texts=["what is in the picture?", "describe it."], template="v1")
    assert batch["contiguous_signal"] is None
    assert (batch["vision_indices"] == processor.config.max_vision_token_length).all()
    assert "labels" not in batch


# --------------------------------------------------------------------------------------------------------- SFT
def test_sft_labels_are_answers_and_eos(processor, config):
    conversations = [
        [{"from": "human", "value": "<image>\nwhat is in the picture?"}, {"from": "gpt", "value": "a red circle"},
         {"from": "human", "value": "describe it."}, {"from": "gpt", "value": "it is a small green triangle"}],
        [{"from": "human", "value": "what is in the picture?"}, {"from": "gpt", "value": "yes"}],
    ]
    images = [image(3), None]
    batch = processor(images=images, texts=conversations, template="v1", return_labels=True)
    check_image_positions(processor, batch, 0, [images[0]])
    labels = batch["labels"]
    for row, answers in ((0, ["a red circle", "it is a small green triangle"]), (1, ["yes"])):
        kept = labels[0, row][labels[0, row] != IGNORE_INDEX]
        assert torch.equal(labels[1, row][labels[1, row] != IGNORE_INDEX], kept)
        assert (kept == config.eos_token_id).sum() == len(answers)
        assert kept[-1] == config.eos_token_id
        pieces = processor.text_tokenizer.decode(kept.tolist(), at_start=False, skip_special_tokens=False)
        assert pieces == "".join(f" {answer}</s>" for answer in answers)
    assert not (labels >= config.vocab_size).any()  # the image is not predicted in instruction tuning
    check_no_cross_modal_targets(labels, batch["vision_indices"], vocab_size=config.vocab_size,
                                 max_vision_token_length=config.max_vision_token_length)


def test_generation_prompt_round_trips_through_decode(processor):
    batch = processor(images=[image(4)], texts=["what is in the picture?"], template="v1", padding_side="left")
    text = processor.decode(batch["input_ids"][0, 0])
    assert text.endswith("USER: <image>\nwhat is in the picture? ASSISTANT:")
    assert text.startswith("A chat between")


# ------------------------------------------------------------------------------------------ raw, truncation
def test_several_images_in_one_sample(processor):
    images = [image(5), image(6)]
    batch = processor(images=[images], texts=["a red<image> circle<image> yes"], template=None)
    check_image_positions(processor, batch, 0, images)
    assert processor.decode(batch["input_ids"][0, 0]) == "a red<image> circle<image> yes"
    codes = processor.image_codes(batch["input_ids"][:, 0])
    assert len(codes) == 2
    for code, img in zip(codes, images):
        assert torch.equal(code, processor.image_tokenizer.tokenize([img]).codes[:, 0])
    start = int((batch["vision_indices"][0] == 0).nonzero()[0])
    one = batch["input_ids"][0, 0, start:start + processor.config.max_vision_token_length]
    spans = processor.split_spans(torch.cat([one, one]))
    assert [kind for kind, _ in spans] == ["image", "image"]  # EOI closes a span even when BOI follows at once


def test_truncation_cuts_images_after_splicing(processor, config):
    full = processor(images=[image(7)], texts=["a red circle"], template="caption", return_labels=True)
    cut = processor(images=[image(7)], texts=["a red circle"], template="caption", return_labels=True,
                    max_length=6)
    assert cut["input_ids"].shape[-1] == 6
    for key in ("input_ids", "labels"):
        assert torch.equal(cut[key], full[key][..., :6])
    assert torch.equal(cut["contiguous_signal"], full["contiguous_signal"][:, :6])
    assert cut["vision_indices"][0].tolist() == [config.max_vision_token_length, 0, 1, 2, 3, 4]
    gone = processor(images=[image(7)], texts=["a red circle"], template="caption", max_length=1)
    assert gone["contiguous_signal"] is None and gone["input_ids"][:, 0].tolist() == [[1], [1]]


def test_two_stage_host_then_device(processor, config):
    samples = [processor.encode_sample("a red circle", image(8), template="caption"),
               processor.encode_sample("yes", None, template="caption"),
               processor.encode_sample("a blue square", image(9), template="caption")]
    assert samples[0].pixel_values.shape[0] == 1 and samples[1].pixel_values is None
    host = processor.collate(samples, pad_to_multiple_of=8)
    assert host["input_ids"].shape[-1] % 8 == 0
    assert (host["input_ids"][:, 0, 2:11] == CODE_PLACEHOLDER).all()  # codes come from CLIP at the device stage
    assert host["image_index"][2][host["vision_indices"][2] < config.max_vision_token_length].eq(1).all()
    assert host["pixel_values"].shape[0] == 2
    # A weight-free copy (what spawn-started loader workers would receive) encodes and collates identically.
    light = pickle.loads(pickle.dumps(processor.host_copy()))
    assert light.image_tokenizer is None
    again = light.collate([light.encode_sample("a red circle", image(8), template="caption"),
                           light.encode_sample("yes", None, template="caption"),
                           light.encode_sample("a blue square", image(9), template="caption")], pad_to_multiple_of=8)
    for key in host:
        assert torch.equal(host[key], again[key]), key
    batch = processor.tokenize_images(host, return_labels=True)
    check_image_positions(processor, batch, 0, [image(8)])
    check_image_positions(processor, batch, 2, [image(9)])
    assert not (batch["input_ids"] == CODE_PLACEHOLDER).any()


# ---------------------------------------------------------------------------------------------- load / validate
def test_save_and_load_round_trip(tmp_path, processor):
    processor.save_pretrained(tmp_path / "saved")
    again = LibraProcessor.from_pretrained(tmp_path / "saved")
    args = dict(images=[image(10), None], texts=["a red circle", "yes"], template="caption", return_labels=True)
    first, second = processor(**args), again(**args)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    text_only = LibraProcessor.from_pretrained(tmp_path / "saved", clip=None, vision_tokenizer=None)
    assert text_only.image_tokenizer is None
    saved_text_only = text_only.save_pretrained(tmp_path / "text_only")
    assert LibraProcessor.from_pretrained(saved_text_only).image_tokenizer is None
    with pytest.raises(ValueError, match="both"):
        LibraProcessor.from_pretrained(tmp_path / "saved", vision_tokenizer=None)
    with pytest.raises(FileNotFoundError):
        LibraProcessor.from_pretrained(tmp_path / "saved", vision_tokenizer="absent.ckpt")
    # A bare directory (config.json + tokenizer/) loads as a text-only processor with the default layout.
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "saved" / "tokenizer", bare / "tokenizer")
    shutil.copy(tmp_path / "saved" / "config.json", bare / "config.json")
    assert LibraProcessor.from_pretrained(bare).image_tokenizer is None
    with pytest.raises(ValueError, match="no image tokenizer"):
        text_only(images=[image(10)], texts=["a"], template="caption")


def test_inconsistent_inputs_are_errors(proc_dir, processor, config):
    for field, value in (("contiguous_signal_size", 48), ("vision_vocab_size", 34), ("vocab_size", 128)):
        other = dataclasses.replace(config, **{field: value})
        with pytest.raises(ValueError, match=field):
            LibraProcessor(processor.text_tokenizer.hf, processor.image_tokenizer, other)
    with pytest.raises(ValueError, match="template"):
        processor(texts=["a"], template="chatml")
    with pytest.raises(ValueError, match="one entry per text"):
        processor(images=[None], texts=["a", "b"])
    with pytest.raises(ValueError, match="at most one image"):
        processor(images=[[image(0), image(1)]], texts=["a"], template="caption")
    with pytest.raises(ValueError, match="texts"):
        processor(texts="a single string")
    with pytest.raises(TypeError, match="config"):
        LibraProcessor(processor.text_tokenizer, None, {"vocab_size": 64})


# --------------------------------------------------------------------------------------------------- the model
def test_model_consumes_the_batch(processor, config):
    from libra_model.model import LibraForCausalLM

    torch.manual_seed(0)
    model = LibraForCausalLM(config, backend="torch")
    batch = processor(images=[image(11), None], texts=["a red circle", "yes"], template="caption",
                      return_labels=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    prompt = processor(images=[image(11), None], texts=["what is in the picture?", "describe it."],
                       template="v1", padding_side="left")
    logits = model(**prompt).logits
    assert logits.shape[:3] == prompt["input_ids"].shape and torch.isfinite(logits[..., -1, :].amax(-1)).all()
