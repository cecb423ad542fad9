"""Libra's text side (docs/model.md §10): the LLaMA SentencePiece tokenizer, templates, image splicing by ids,
``vision_indices``, label construction and truncation.

A sample is first written as a list of :class:`Part` (BOS, text pieces, images, EOS), each marked as a training
target or not; :func:`build_sample` turns the parts into ids. Images are spliced by ids, never by tokenising
placeholder strings: an image is ``P + 2`` positions (BOI, P codes in raster order, EOI) with ``vision_indices``
0..P+1; code positions hold ``-1`` until the image tokenizer fills them (the codes come from CLIP, which runs on the
accelerator, while this runs in data loaders). Text between images is tokenised as one string per run, so it gets
exactly the ids the whole string would get; a run that follows an image or EOS gets no SentencePiece dummy prefix
(the string continues, so "\\n" right after EOI is the single newline id 13 that generation forces after EOI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
# Text-to-image: the marker starts an image (BOI, vision index 0) that generation then continues.
IMAGE_GENERATION_MARKER = "<img_gen>"
CODE_PLACEHOLDER = -1  # input id of a code position before the image tokenizer fills it
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
V1_ROLES = ("USER", "ASSISTANT")
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant"}


def clean_caption(caption: str, max_words: int = 64) -> str:
    """Pretraining caption cleaning (docs/model.md §10): ``*#~`` become spaces, whitespace runs collapse to one space,
    strip, lowercase, keep the first ``max_words`` words."""
    if not isinstance(caption, str):
        raise TypeError(f"clean_caption: caption must be a str, got {type(caption).__name__}")
    words = re.sub(r"[*#~]", " ", caption).lower().split()
    return " ".join(words[:max_words])


# ------------------------------------------------------------------------------------------------- tokenizer
class TextTokenizer:
    """The LLaMA SentencePiece tokenizer (an HF fast tokenizer) with Libra's id conventions.

    ``encode(text, at_start)`` returns ids and character offsets: ``at_start=True`` tokenises like the start of a
    sequence (with SentencePiece's dummy "▁" prefix), ``False`` like the continuation of one (no prefix). Special ids
    come from the Libra config (pad 0, bos 1, eos 2, newline 13 for LLaMA-2); the constructor checks that the
    tokenizer agrees with them and that its base vocabulary fits ``vocab_size``.
    """

    def __init__(self, tokenizer, *, vocab_size: int = 32000, bos_token_id: int = 1, eos_token_id: int = 2,
                 pad_token_id: int = 0, newline_token_id: int = 13):
        from tokenizers import Tokenizer, pre_tokenizers

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"TextTokenizer: tokenizer must be an HF fast tokenizer, got {type(tokenizer).__name__}")
        self.hf = tokenizer
        self.vocab_size, self.bos_token_id, self.eos_token_id = vocab_size, bos_token_id, eos_token_id
        self.pad_token_id, self.newline_token_id = pad_token_id, newline_token_id
        self._first = backend
        self._continue = Tokenizer.from_str(backend.to_str())
        pre = self._continue.pre_tokenizer
        if isinstance(pre, pre_tokenizers.Metaspace):
            self._continue.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement,
                                                                    prepend_scheme="never", split=pre.split)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"TextTokenizer: the tokenizer has {tokenizer.vocab_size} base ids, more than "
                             f"vocab_size={vocab_size}")
        for name, token in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
            found = getattr(tokenizer, name, None)
            if found is not None and found != getattr(self, name):
                raise ValueError(f"TextTokenizer: the tokenizer's {token} has id {found}, the config says "
                                 f"{name}={getattr(self, name)}")
        newline = self.encode("\n", at_start=False)[0]
        if newline != [newline_token_id]:
            raise ValueError(f"TextTokenizer: '\\n' continuing a sequence encodes to {newline}, not "
                             f"[newline_token_id={newline_token_id}]")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **ids) -> TextTokenizer:
        """Load ``transformers.LlamaTokenizer`` from a directory (``tokenizer.json`` and/or ``tokenizer.model``);
        ``ids`` are the keyword arguments of the constructor."""
        from transformers import LlamaTokenizer

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"TextTokenizer.from_pretrained: {directory!r} is not a directory")
        return cls(LlamaTokenizer.from_pretrained(directory), **ids)

    @classmethod
    def from_config(cls, tokenizer, config) -> TextTokenizer:
        """Wrap an HF tokenizer with the special ids and vocab size of a ``LibraConfig``."""
        return cls(tokenizer, vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                   eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                   newline_token_id=config.newline_token_id)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the HF tokenizer files to ``directory``."""
        self.hf.save_pretrained(directory)

    def encode(self, text: str, *, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """text -> (ids, character offsets (start, end) of each id in ``text``); no BOS/EOS is added.
        Ids at or above ``vocab_size`` (added placeholder tokens such as ``<img_ph>``) raise ValueError: images are
        spliced by ids, not by strings."""
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode: text must be a str, got {type(text).__name__}")
        if not text:
            return [], []
        encoding = (self._first if at_start else self._continue).encode(text, add_special_tokens=False)
        bad = [i for i in encoding.ids if i >= self.vocab_size]
        if bad:
            raise ValueError(f"TextTokenizer.encode: {text!r} holds ids {bad} outside the text vocabulary "
                             f"[0, {self.vocab_size}) (placeholder tokens are not spliced by string)")
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int], *, at_start: bool = True, skip_special_tokens: bool = True) -> str:
        """Text ids -> string. ``at_start=False`` decodes a run that continues a sequence (after an image): its
        leading space is kept instead of being taken for SentencePiece's dummy prefix."""
        ids = [int(i) for i in ids]
        if at_start:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # A leading newline keeps the decoder from stripping the run's own leading space; it is removed after.
        text = self.hf.decode([self.newline_token_id, *ids], skip_special_tokens=skip_special_tokens)
        return text[1:] if text.startswith("\n") else text


# ------------------------------------------------------------------------------------------------ sample parts
@dataclass(frozen=True)
class Part:
    """One piece of a sample: ``kind`` is "bos", "eos", "text" (``text`` holds the string), "image" or "boi" (a
    lone BOI that opens an image to generate); ``target`` marks it as a training target (an image target keeps its
    codes and EOI, never BOI)."""

    kind: str
    text: str = ""
    target: bool = False


def caption_parts(caption: str, has_image: bool, *, instruction: str | None = None, clean: bool = True,
                  eos: bool = False) -> list[Part]:
    """Pretraining image→text template (docs/model.md §10): ``<s>`` + image + "\\n" + caption, or with an
    instruction ``<s>`` + image + "\\n{instruction}\\n" + caption. Targets: the image's codes and EOI and the caption;
    the "\\n"/instruction span is masked. Without an image: ``<s>`` + caption. ``eos`` appends a target EOS (the
    release appends none, so its base model never learns to stop, docs/model.md §8)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption_parts: caption must be a str, got {type(caption).__name__}")
    caption = clean_caption(caption) if clean else caption
    parts = [Part("bos")]
    if has_image:
        parts.append(Part("image", target=True))
        parts.append(Part("text", f"\n{instruction}\n" if instruction else "\n"))
    parts.append(Part("text", caption, target=True))
    if eos:
        parts.append(Part("eos", target=True))
    return parts


def raw_parts(text: str, num_images: int) -> list[Part]:
    """No template: ``<s>`` + text, each ``<image>`` marker replaced by an image (or, with images and no marker,
    ``<s>`` + image + "\\n" + text, the base-model prompt). Every token is a target (the cross-modal rule of
    :func:`build_sample` still masks BOI and the first text token after each image). A final ``<img_gen>`` ends
    the parts with a lone BOI (see :func:`split_image_generation`)."""
    if not isinstance(text, str):
        raise TypeError(f"raw_parts: text must be a str, got {type(text).__name__}")
    text, generate_image = split_image_generation(text)
    parts = _raw_parts(text, num_images)
    return parts + [Part("boi")] if generate_image else parts


def split_image_generation(text: str) -> tuple[str, bool]:
    """Text-to-image prompts (docs/model.md): a final ``<img_gen>`` asks for an image. Returns (the text before
    it, with the spaces that separate it removed, True), or (text, False) without a marker. A marker anywhere else
    raises ValueError: the image must be the last thing of the prompt, e.g. ``"a red circle\n <img_gen>"``."""
    count = text.count(IMAGE_GENERATION_MARKER)
    if not count:
        return text, False
    head = text.rstrip()
    if count > 1 or not head.endswith(IMAGE_GENERATION_MARKER):
        raise ValueError(f"{IMAGE_GENERATION_MARKER} must appear once, at the end of the prompt (generation "
                         f"continues the image it opens), got {text!r:.120}")
    # The separating spaces belong to the marker, as the released tokenizer absorbed them into the added token.
    return head[:-len(IMAGE_GENERATION_MARKER)].rstrip(" "), True


def _raw_parts(text: str, num_images: int) -> list[Part]:
    pieces = text.split(IMAGE_MARKER)
    parts = [Part("bos")]
    if len(pieces) == 1 and num_images:
        if num_images != 1:
            raise ValueError(f"raw_parts: {num_images} images but no {IMAGE_MARKER} marker in the text")
        return parts + [Part("image", target=True), Part("text", "\n" + text, target=True)]
    if len(pieces) - 1 != num_images:
        raise ValueError(f"raw_parts: the text has {len(pieces) - 1} {IMAGE_MARKER} markers but {num_images} images "
                         "were given")
    for index, piece in enumerate(pieces):
        if index:
            parts.append(Part("image", target=True))
        if piece:
            parts.append(Part("text", piece, target=True))
    return parts


def normalize_conversation(conversation) -> list[tuple[str, str | None]]:
    """A question string, or LLaVA turns ``[{"from": "human"|"gpt", "value": str}, ...]`` (also
    ``{"role": "user"|"assistant", "content": ...}`` or ``(role, text)`` pairs) -> [(role, text)] with roles
    "human"/"gpt", alternating from "human". A final gpt turn with text None asks for a generation prompt."""
    if isinstance(conversation, str):
        return [("human", conversation)]
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("conversation must be a str or a non-empty list of turns")
    turns = []
    for index, turn in enumerate(conversation):
        if isinstance(turn, dict):
            role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"conversation[{index}] must be a dict with from/value or a (role, text) pair")
        role = "human" if role in _HUMAN else "gpt" if role in _ASSISTANT else None
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"conversation[{index}] must be a {expected} turn (turns alternate from human), "
                             f"got {turn!r}")
        if not (isinstance(text, str) or (text is None and role == "gpt" and index == len(conversation) - 1)):
            raise ValueError(f"conversation[{index}] text must be a str (None only for a final gpt turn)")
        turns.append((role, text))
    return turns


def v1_parts(conversation, has_image: bool, *, system: str = V1_SYSTEM) -> list[Part]:
    """The "v1" (Vicuna-v1) chat template of docs/model.md §10:
    ``system + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + " </s>" + "USER: " + q2 ...``; the EOS id stands for
    " </s>". The image goes first in the first human turn holding ``<image>`` (or the first human turn): its marker is
    removed and the turn becomes image + "\\n" + question. Targets: the answers (with the space that opens
    them) and their EOS. A conversation that ends with a human turn (or a gpt turn of text None) ends with the
    generation prompt "ASSISTANT:"."""
    turns = normalize_conversation(conversation)
    if any(text and IMAGE_GENERATION_MARKER in text for _, text in turns):
        raise ValueError(f"v1_parts: {IMAGE_GENERATION_MARKER} is for raw text-to-image prompts (template None, "
                         f"e.g. 'a red circle\\n <img_gen>'), not the v1 chat template")
    marked = [i for i, (role, text) in enumerate(turns) if role == "human" and IMAGE_MARKER in text]
    if marked and not has_image:
        raise ValueError(f"v1_parts: turn {marked[0]} holds {IMAGE_MARKER} but no image was given")
    if len(marked) > 1:
        raise ValueError(f"v1_parts: turns {marked} all hold {IMAGE_MARKER}; the v1 template has one image")
    image_turn = (marked[0] if marked else 0) if has_image else None
    parts = [Part("bos"), Part("text", system + " ")]
    for index, (role, text) in enumerate(turns):
        if role == "human":
            parts.append(Part("text", f"{V1_ROLES[0]}: "))
            if index == image_turn:
                parts += [Part("image"), Part("text", "\n" + text.replace(IMAGE_MARKER, "").strip() + " ")]
            else:
                parts.append(Part("text", text + " "))
        elif text is None:
            break
        else:
            # The space after "ASSISTANT:" belongs to the answer: inference prompts end with "ASSISTANT:", so the
            # model must predict " answer" (one "▁answer" token, or "▁" then "answer") from the colon.
            parts += [Part("text", f"{V1_ROLES[1]}:"), Part("text", " " + text, target=True), Part("eos", target=True)]
    if turns[-1][0] == "human" or turns[-1][1] is None:
        parts.append(Part("text", f"{V1_ROLES[1]}:"))
    return parts


# ----------------------------------------------------------------------------------------------- id sequences
@dataclass
class EncodedSample:
    """One tokenised sample before batching.

    ids: int64 [n]: the row-0 ids (text ids, BOI/EOI ids, ``CODE_PLACEHOLDER`` at code positions).
    vision_indices: int64 [n]: 0..P+1 inside an image (BOI = 0, EOI = P+1), ``P + 2`` elsewhere.
    target_mask: bool [n]: positions whose id is a training target (labels keep the id there, -100 elsewhere).
    image_index: int64 [n]: which of the sample's images a position belongs to, -1 at text.
    pixel_values: float32 [k, 3, S, S] of the k images that kept at least one position, or None.
    """

    ids: torch.Tensor
    vision_indices: torch.Tensor
    target_mask: torch.Tensor
    image_index: torch.Tensor
    pixel_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_images(self) -> int:
        """Images with at least one position in the (possibly truncated) sample."""
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def build_sample(parts: Sequence[Part], tokenizer: TextTokenizer, *, image_length: int, vision_vocab_size: int,
                 max_length: int | None = None) -> EncodedSample:
    """Parts -> an :class:`EncodedSample` without pixel values (``image_length`` = P + 2 positions per image,
    ``vision_vocab_size`` = 2^K + 2 ids per codebook).

    Label rules (docs/model.md §10, §14 item 12): BOS and BOI are never targets, and neither is any position whose
    modality differs from the previous position's (the model predicts a token from the previous hidden state with that
    state's modality head, so such a target would be cross-modal); padding is masked at batching. The sequence is
    truncated to ``max_length`` after splicing (docs/model.md §10; an image may be cut)."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"build_sample: max_length must be a positive int or None, got {max_length!r}")
    boi = tokenizer.vocab_size + vision_vocab_size - 2
    text_index = image_length
    ids, vision, target, image = [], [], [], []
    chunk: list[tuple[str, bool]] = []
    images_seen = 0

    def flush() -> None:
        if not chunk:
            return
        text = "".join(piece for piece, _ in chunk)
        spans, start = [], 0
        for piece, is_target in chunk:
            spans.append((start, start + len(piece), is_target))
            start += len(piece)
        at_start = all(i == tokenizer.bos_token_id for i in ids)
        token_ids, offsets = tokenizer.encode(text, at_start=at_start)
        for token, (_, end) in zip(token_ids, offsets):
            # A token belongs to the span of its last character ("▁a" holds a space and the answer's "a").
            last = max(end - 1, 0)
            ids.append(token)
            target.append(any(lo <= last < hi and t for lo, hi, t in spans))
        vision.extend([text_index] * len(token_ids))
        image.extend([-1] * len(token_ids))
        chunk.clear()

    for part in parts:
        if not isinstance(part, Part):
            raise TypeError(f"build_sample: parts must be Part objects, got {type(part).__name__}")
        if part.kind == "text":
            chunk.append((part.text, part.target))
            continue
        flush()
        if part.kind in ("bos", "eos"):
            ids.append(tokenizer.bos_token_id if part.kind == "bos" else tokenizer.eos_token_id)
            vision.append(text_index)
            target.append(part.target and part.kind == "eos")
            image.append(-1)
        elif part.kind == "boi":
            ids.append(boi)
            vision.append(0)
            target.append(False)
            image.append(-1)
        elif part.kind == "image":
            ids.extend([boi] + [CODE_PLACEHOLDER] * (image_length - 2) + [boi + 1])
            vision.extend(range(image_length))
            target.extend([False] + [part.target] * (image_length - 1))
            image.extend([images_seen] * image_length)
            images_seen += 1
        else:
            raise ValueError(f"build_sample: unknown part kind {part.kind!r}")
    flush()
    if max_length is not None:
        ids, vision, target, image = ids[:max_length], vision[:max_length], target[:max_length], image[:max_length]
    vision_t = torch.tensor(vision, dtype=torch.int64)
    target_t = torch.tensor(target, dtype=torch.bool)
    is_vision = vision_t < text_index
    if len(ids) > 1:
        target_t[1:] &= is_vision[1:] == is_vision[:-1]
    return EncodedSample(torch.tensor(ids, dtype=torch.int64), vision_t, target_t,
                         torch.tensor(image, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------- labels
def labels_from_targets(input_ids: torch.Tensor, target_mask: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """labels int64 [C, B, N]: ``input_ids`` [C, B, N] where ``target_mask`` [B, N] (and ``attention_mask`` [B, N],
    when given) is set, -100 elsewhere. Labels are unshifted, as HF's: the model shifts them."""
    keep = target_mask.to(torch.bool)
    if attention_mask is not None:
        keep = keep & attention_mask.to(torch.bool)
    return torch.where(keep.unsqueeze(0), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def check_no_cross_modal_targets(labels: torch.Tensor, vision_indices: torch.Tensor, *, vocab_size: int,
                                 max_vision_token_length: int) -> None:
    """docs/model.md §14, item 12: a label at position t is predicted from position t-1, with t-1's modality head; so
    every label after a text position must be a text id or -100 and every label after a vision position a vision id or
    -100. ``labels`` int [C, B, N] (or [B, N]), ``vision_indices`` int [B, N]. Raises ValueError naming the first
    offending (batch, position); labels at position 0 are never used and are not checked."""
    if labels.dim() == 2:
        labels = labels.unsqueeze(0)
    if labels.dim() != 3 or labels.shape[1:] != vision_indices.shape:
        raise ValueError(f"check_no_cross_modal_targets: labels {tuple(labels.shape)} do not match vision_indices "
                         f"{tuple(vision_indices.shape)}")
    previous_vision = (vision_indices[:, :-1] < max_vision_token_length).unsqueeze(0)
    following = labels[:, :, 1:]
    valid = following != IGNORE_INDEX
    bad = valid & ((following >= vocab_size) != previous_vision)
    if bool(bad.any()):
        codebook, batch, position = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"check_no_cross_modal_targets: label {int(following[codebook, batch, position])} at "
                         f"(codebook {codebook}, batch {batch}, position {position + 1}) follows a "
                         f"{'vision' if previous_vision[0, batch, position] else 'text'} position")
