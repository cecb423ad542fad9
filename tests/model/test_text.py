"""The text side (docs/model.md §10, §14 items 12-13): the LLaMA tokenizer conventions, templates, splicing by ids,
labels and truncation, checked against whole-string tokenisation by transformers."""

import pytest
import torch
from transformers import LlamaTokenizer

from libra_model.text import (
    CODE_PLACEHOLDER,
    IGNORE_INDEX,
    V1_SYSTEM,
    Part,
    TextTokenizer,
    build_sample,
    caption_parts,
    check_no_cross_modal_targets,
    clean_caption,
    labels_from_targets,
    normalize_conversation,
    raw_parts,
    v1_parts,
)
from libra_model.tiny import build_tiny_text_tokenizer

VOCAB, IMAGE_LEN, VISION_VOCAB = 320, 11, 18  # 3x3 codes + BOI + EOI, 16 codes per codebook
BOI, EOI = VOCAB + 16, VOCAB + 17
CORPUS = ["a red circle on the left", "what is in the picture? describe it.", "a small dog runs on the grass",
          "yes, it is a cat"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_text_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return LlamaTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TextTokenizer.from_pretrained(tok_dir, vocab_size=VOCAB)


def whole(hf, text):
    """Oracle: transformers' tokenisation of the full string after a BOS (no prefix after it, "</s>" is EOS)."""
    return hf("<s>" + text, add_special_tokens=False).input_ids


def from_start(hf, text):
    """Oracle: a sequence that starts with this text, as transformers tokenises it after BOS (with the prefix)."""
    return [1] + hf(text, add_special_tokens=False).input_ids


def build(parts, tok, max_length=None):
    return build_sample(parts, tok, image_length=IMAGE_LEN, vision_vocab_size=VISION_VOCAB, max_length=max_length)


def continuation(hf, text):
    return whole(hf, text)[1:]


# ------------------------------------------------------------------------------------------------- tokenizer
def test_llama_id_conventions(hf, tok):
    assert hf.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x0A>"]) == [0, 1, 2, 13]
    assert tok.encode("\n", at_start=False)[0] == [13]
    # Byte fallback: a character never seen in training becomes its UTF-8 bytes (ids 3 + byte).
    assert tok.encode("é", at_start=False)[0] == [3 + 0xC3, 3 + 0xA9]


def test_encode_matches_transformers(hf, tok):
    for text in ["a red circle", " yes, it is", "\nwhat is it?", "two  spaces"]:
        assert tok.encode(text, at_start=True)[0] == hf(text, add_special_tokens=False).input_ids
        ids, offsets = tok.encode(text, at_start=False)
        assert ids == continuation(hf, text)
        assert offsets[-1][1] == len(text) and all(a <= b for a, b in offsets)
    assert tok.decode(tok.encode(" a cat", at_start=False)[0], at_start=False) == " a cat"
    assert tok.decode(tok.encode("a cat", at_start=True)[0]) == "a cat"


def test_tokenizer_disagreeing_with_the_config_is_an_error(tok_dir, hf):
    with pytest.raises(ValueError, match="newline_token_id"):
        TextTokenizer(hf, vocab_size=VOCAB, newline_token_id=14)
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer(hf, vocab_size=100)
    with pytest.raises(ValueError, match="bos_token_id"):
        TextTokenizer(hf, vocab_size=VOCAB, bos_token_id=3)
    with pytest.raises(TypeError, match="fast tokenizer"):
        TextTokenizer(object())


def test_placeholder_strings_are_not_spliced(tok_dir):
    hf = LlamaTokenizer.from_pretrained(tok_dir)
    hf.add_tokens(["<img_ph>"])  # the released tokenizer's added placeholder, id = vocab size
    tok = TextTokenizer(hf, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        tok.encode("look <img_ph>", at_start=True)


# ------------------------------------------------------------------------------------------------- templates
def test_clean_caption():
    assert clean_caption("  A *Red*~circle\ton  #the LEFT \n") == "a red circle on the left"
    assert clean_caption(" ".join(f"w{i}" for i in range(80))) == " ".join(f"w{i}" for i in range(64))
    with pytest.raises(TypeError, match="caption"):
        clean_caption(3)


def test_pretraining_caption_sample(hf, tok):
    sample = build(caption_parts("A *Red* circle  on the LEFT", has_image=True), tok)
    caption = continuation(hf, "\na red circle on the left")
    assert caption[0] == 13
    expected = [1, BOI] + [CODE_PLACEHOLDER] * 9 + [EOI] + caption
    assert sample.ids.tolist() == expected
    assert sample.vision_indices.tolist() == [IMAGE_LEN] + list(range(IMAGE_LEN)) + [IMAGE_LEN] * len(caption)
    assert sample.image_index.tolist() == [-1] + [0] * IMAGE_LEN + [-1] * len(caption)
    # docs/model.md §14, item 13: <s>, BOI and "\n" are -100; the codes, EOI and caption tokens are targets.
    targets = [False, False] + [True] * 10 + [False] + [True] * (len(caption) - 1)
    assert sample.target_mask.tolist() == targets
    codes = torch.randint(VOCAB, VOCAB + 16, (2, 9))
    ids = sample.ids.repeat(2, 1)
    ids[:, 2:11] = codes
    labels = labels_from_targets(ids[:, None], sample.target_mask[None])[:, 0]
    assert labels[:, :2].eq(IGNORE_INDEX).all() and labels[:, 12].eq(IGNORE_INDEX).all()
    assert torch.equal(labels[:, 2:11], codes) and labels[:, 11].eq(EOI).all()
    assert labels[0, 13:].tolist() == caption[1:] == labels[1, 13:].tolist()
    check_no_cross_modal_targets(labels[:, None], sample.vision_indices[None], vocab_size=VOCAB,
                                 max_vision_token_length=IMAGE_LEN)


def test_caption_instruction_span_is_masked(hf, tok):
    sample = build(caption_parts("a cat", has_image=True, instruction="describe it."), tok)
    text = continuation(hf, "\ndescribe it.\na cat")
    assert sample.ids[12:].tolist() == text
    caption = continuation(hf, "\na cat")[1:]
    assert sample.ids[sample.target_mask][10:].tolist() == caption  # after the 9 codes and EOI
    with_eos = build(caption_parts("a cat", has_image=True, eos=True), tok)
    without = build(caption_parts("a cat", has_image=True), tok)
    assert with_eos.ids[-1] == 2 and with_eos.target_mask[-1] and torch.equal(with_eos.ids[:-1], without.ids)
    text_only = build(caption_parts("a cat", has_image=False), tok)
    assert text_only.ids.tolist() == [1] + hf("a cat", add_special_tokens=False).input_ids
    assert text_only.target_mask.tolist() == [False] + [True] * (len(text_only) - 1)


def test_v1_conversation_matches_the_whole_string_and_targets_answers(hf, tok):
    conversation = [{"from": "human", "value": "what is in the picture?"}, {"from": "gpt", "value": "a small dog"},
                    {"from": "human", "value": "describe it."}, {"from": "gpt", "value": "it runs on the grass"}]
    sample = build(v1_parts(conversation, has_image=False), tok)
    string = (f"{V1_SYSTEM} USER: what is in the picture? ASSISTANT: a small dog</s>"
              f"USER: describe it. ASSISTANT: it runs on the grass</s>")
    assert sample.ids.tolist() == from_start(hf, string)
    # Targets: exactly the answers (with the space that starts them) and their EOS.
    answers = continuation(hf, " a small dog") + [2] + continuation(hf, " it runs on the grass") + [2]
    assert sample.ids[sample.target_mask].tolist() == answers


def test_v1_image_goes_first_in_its_human_turn(hf, tok):
    conversation = [("human", "what is in the picture?\n<image>"), ("gpt", "yes")]
    sample = build(v1_parts(conversation, has_image=True), tok)
    head = from_start(hf, f"{V1_SYSTEM} USER: ")
    tail = continuation(hf, "\nwhat is in the picture? ASSISTANT: yes")
    assert sample.ids.tolist() == head + [BOI] + [CODE_PLACEHOLDER] * 9 + [EOI] + tail + [2]
    start = len(head)
    assert sample.vision_indices[start:start + IMAGE_LEN].tolist() == list(range(IMAGE_LEN))
    assert not sample.target_mask[start:start + IMAGE_LEN].any()  # the image is not predicted in SFT
    assert sample.ids[sample.target_mask].tolist() == continuation(hf, " yes") + [2]
    # With no marker the image still goes first in the first human turn.
    unmarked = build(v1_parts([("human", "what is in the picture?"), ("gpt", "yes")], has_image=True), tok)
    assert torch.equal(unmarked.ids, sample.ids)


def test_v1_generation_prompt(hf, tok):
    sample = build(v1_parts("describe it.", has_image=False), tok)
    assert sample.ids.tolist() == from_start(hf, f"{V1_SYSTEM} USER: describe it. ASSISTANT:")
    assert not sample.target_mask.any()
    open_turn = build(v1_parts([("human", "hi"), ("gpt", "yes"), ("human", "why?"), ("gpt", None)], False), tok)
    assert open_turn.ids.tolist() == from_start(hf, f"{V1_SYSTEM} USER: hi ASSISTANT: yes</s>USER: why? ASSISTANT:")


def test_conversation_errors():
    with pytest.raises(ValueError, match="alternate"):
        normalize_conversation([("human", "a"), ("human", "b")])
    with pytest.raises(ValueError, match="must be a gpt turn|must be a human turn"):
        normalize_conversation([("gpt", "a")])
    with pytest.raises(ValueError, match="text must be a str"):
        normalize_conversation([("human", None)])
    with pytest.raises(ValueError, match="no image"):
        v1_parts([("human", "<image> what?")], has_image=False)
    with pytest.raises(ValueError, match="one image"):
        v1_parts([("human", "<image> a"), ("gpt", "b"), ("human", "<image> c")], has_image=True)


def test_raw_template_and_cross_modal_masking(hf, tok):
    sample = build(raw_parts("a red<image> circle<image>", 2), tok)
    first = hf("a red", add_special_tokens=False).input_ids
    mid = continuation(hf, " circle")
    image = [BOI] + [CODE_PLACEHOLDER] * 9 + [EOI]
    assert sample.ids.tolist() == [1] + first + image + mid + image
    assert sample.image_index.tolist() == [-1] * (1 + len(first)) + [0] * 11 + [-1] * len(mid) + [1] * 11
    mask = sample.target_mask.tolist()
    start = 1 + len(first)
    assert mask[:start] == [False] + [True] * len(first)
    assert mask[start:start + 11] == [False] + [True] * 10  # BOI follows text: never a target
    assert mask[start + 11] is False  # the first text token after EOI follows a vision token
    assert mask[start + 12:start + 11 + len(mid)] == [True] * (len(mid) - 1)
    no_marker = build(raw_parts("a cat", 1), tok)
    assert no_marker.ids.tolist() == [1] + image + continuation(hf, "\na cat")
    with pytest.raises(ValueError, match="markers"):
        raw_parts("a <image> b <image>", 1)
    with pytest.raises(ValueError, match="no <image> marker"):
        raw_parts("a b", 2)


def test_cross_modal_check_catches_both_directions():
    vision = torch.tensor([[11, 0, 1, 2, 11, 11]])
    ids = torch.tensor([[1, BOI, VOCAB + 3, EOI, 13, 40]])
    fine = ids.clone()
    fine[0, [0, 1, 4]] = IGNORE_INDEX
    check_no_cross_modal_targets(fine, vision, vocab_size=VOCAB, max_vision_token_length=IMAGE_LEN)
    boi_target = fine.clone()
    boi_target[0, 1] = BOI
    with pytest.raises(ValueError, match="position 1"):
        check_no_cross_modal_targets(boi_target, vision, vocab_size=VOCAB, max_vision_token_length=IMAGE_LEN)
    newline_target = fine.clone()
    newline_target[0, 4] = 13
    with pytest.raises(ValueError, match="position 4"):
        check_no_cross_modal_targets(newline_target[None].repeat(2, 1, 1), vision, vocab_size=VOCAB,
                                     max_vision_token_length=IMAGE_LEN)
    with pytest.raises(ValueError, match="do not match"):
        check_no_cross_modal_targets(fine[:, :3], vision, vocab_size=VOCAB, max_vision_token_length=IMAGE_LEN)


def test_truncation_after_splicing_may_cut_an_image(hf, tok):
    parts = caption_parts("a cat", has_image=True)
    full = build(parts, tok)
    cut = build(parts, tok, max_length=5)
    assert len(cut) == 5 and torch.equal(cut.ids, full.ids[:5])
    assert cut.vision_indices.tolist() == [IMAGE_LEN, 0, 1, 2, 3]
    assert cut.target_mask.tolist() == [False, False, True, True, True]
    assert len(build(parts, tok, max_length=1000)) == len(full)
    with pytest.raises(ValueError, match="max_length"):
        build(parts, tok, max_length=0)
    with pytest.raises(ValueError, match="unknown part kind"):
        build([Part("video")], tok)


def test_labels_from_targets_masks_padding():
    ids = torch.arange(12).view(2, 1, 6)
    target = torch.tensor([[True, True, False, True, True, True]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0]])
    labels = labels_from_targets(ids, target, attention)
    assert labels[:, 0].tolist() == [[0, 1, -100, 3, -100, -100], [6, 7, -100, 9, -100, -100]]
