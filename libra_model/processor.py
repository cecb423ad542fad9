"""``LibraProcessor``: (images, texts) -> Libra model inputs, in two stages so that training can split them.

1. Host, per sample (data loader workers): :meth:`LibraProcessor.encode_sample` applies a template, tokenises the
   text, splices image positions in by ids, builds the target mask and preprocesses the images to pixel values.
   :meth:`LibraProcessor.collate` pads a list of samples into a batch (left or right).
2. Device, per batch: :meth:`LibraProcessor.tokenize_images` runs CLIP and the quantiser on the batch's pixel
   values and fills the code ids, the contiguous signal and the labels, with gathers only (no host sync).

``processor(images=..., texts=...)`` does both at once.

Directory layout read by :meth:`LibraProcessor.from_pretrained` and written by :meth:`LibraProcessor.save_pretrained`::

    DIR/
      processor_config.json   {"tokenizer": "tokenizer", "clip": "clip", "vision_tokenizer": "vision_tokenizer.ckpt",
                               "pixel_decoder_config": "vision_tokenizer_config.yaml",
                               "feature_layers": [2, 10, 18, 22], "codebook_num": 2}
      config.json             the LibraConfig (optional: pass ``config=`` instead; a model directory can hold both)
      tokenizer/              HF LLaMA tokenizer files (tokenizer.json and/or tokenizer.model, tokenizer_config.json)
      clip/                   HF CLIP directory (config.json, weights, preprocessor_config.json)
      vision_tokenizer.ckpt   {"state_dict": {quant_conv.*, quantize.project_in.*, quantize.project_out.*, ...}}
      vision_tokenizer_config.yaml   the released tokenizer YAML (optional): with it, the checkpoint's
                              ``decoder.*`` weights load into a :class:`PixelDecoder` for :meth:`reconstruct`

Paths in ``processor_config.json`` are relative to DIR unless absolute, so it can point at the released
``vqgan.ckpt`` and an ``openai/clip-vit-large-patch14-336`` download without copying them. Without
``processor_config.json`` the defaults above are used; a default pixel decoder YAML that is absent just means no
pixel decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from .config import LibraConfig
from .image_tokenizer import (
    DEFAULT_FEATURE_LAYERS,
    HybridImageTokenizer,
    preprocess_images,
    read_vision_tokenizer_checkpoint,
)
from .pixel_decoder import PixelDecoder
from .text import (
    CODE_PLACEHOLDER,
    IGNORE_INDEX,
    IMAGE_MARKER,
    EncodedSample,
    TextTokenizer,
    build_sample,
    caption_parts,
    check_no_cross_modal_targets,
    labels_from_targets,
    raw_parts,
    v1_parts,
)

PROCESSOR_CONFIG_NAME = "processor_config.json"
DEFAULT_LAYOUT = {"tokenizer": "tokenizer", "clip": "clip", "vision_tokenizer": "vision_tokenizer.ckpt",
                  "pixel_decoder_config": "vision_tokenizer_config.yaml"}
TEMPLATES = ("v1", "caption", None)


def _images_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class LibraProcessor:
    """Turns images and texts into Libra's inputs (docs/model.md §1, §10).

    Args:
        text_tokenizer: a :class:`TextTokenizer` or an HF LLaMA fast tokenizer (wrapped with ``config``'s ids).
        image_tokenizer: a :class:`HybridImageTokenizer`, or None for text-only use.
        config: the model's ``LibraConfig``; the tokenizers must agree with it (vocab sizes, codebooks, image
            length, signal width), else ValueError.
        pixel_decoder: a :class:`PixelDecoder` for :meth:`reconstruct` and decoding generated images, or None;
            its codebooks and code grid must match the config's.
    """

    def __init__(self, text_tokenizer, image_tokenizer: HybridImageTokenizer | None, config: LibraConfig,
                 pixel_decoder: PixelDecoder | None = None):
        if not isinstance(config, LibraConfig):
            raise TypeError(f"LibraProcessor: config must be a LibraConfig, got {type(config).__name__}")
        if not isinstance(text_tokenizer, TextTokenizer):
            text_tokenizer = TextTokenizer.from_config(text_tokenizer, config)
        for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "newline_token_id"):
            if getattr(text_tokenizer, name) != getattr(config, name):
                raise ValueError(f"LibraProcessor: text_tokenizer.{name}={getattr(text_tokenizer, name)} differs "
                                 f"from config.{name}={getattr(config, name)}")
        if image_tokenizer is not None:
            if not isinstance(image_tokenizer, HybridImageTokenizer):
                raise TypeError("LibraProcessor: image_tokenizer must be a HybridImageTokenizer or None")
            checks = (("codebook_num", image_tokenizer.codebook_num, config.vision_codebook_num),
                      ("vision_vocab_size", image_tokenizer.vision_vocab_size, config.vision_vocab_size),
                      ("tokens_per_image (max_vision_token_length)", image_tokenizer.tokens_per_image,
                       config.max_vision_token_length),
                      ("feature_size (contiguous_signal_size)", image_tokenizer.feature_size,
                       config.contiguous_signal_size),
                      ("text_vocab_size (vocab_size)", image_tokenizer.text_vocab_size, config.vocab_size))
            for name, have, want in checks:
                if have != want:
                    raise ValueError(f"LibraProcessor: image_tokenizer {name} is {have}, the config says {want}")
        if pixel_decoder is not None:
            if not isinstance(pixel_decoder, PixelDecoder):
                raise TypeError("LibraProcessor: pixel_decoder must be a PixelDecoder or None")
            dc = pixel_decoder.config
            checks = (("num_codebook", dc.num_codebook, config.vision_codebook_num),
                      ("codebook_size", dc.codebook_size, config.num_codes),
                      ("initial_resolution", dc.initial_resolution, config.image_feature_resolution))
            for name, have, want in checks:
                if have != want:
                    raise ValueError(f"LibraProcessor: pixel_decoder {name} is {have}, the config says {want}")
        self.text_tokenizer, self.image_tokenizer, self.config = text_tokenizer, image_tokenizer, config
        self.pixel_decoder = pixel_decoder
        # Kept apart from the image tokenizer so that host_copy() can drop the weights and still preprocess.
        self.image_processor = None if image_tokenizer is None else image_tokenizer.image_processor

    def host_copy(self) -> LibraProcessor:
        """A copy without the CLIP and quantiser weights, for data-loader workers that receive the processor by
        pickling (spawn): :meth:`encode_sample` and :meth:`collate` work, :meth:`tokenize_images` needs the
        original (on the accelerator)."""
        copy = object.__new__(LibraProcessor)
        copy.__dict__.update(self.__dict__, image_tokenizer=None, pixel_decoder=None)
        return copy

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: LibraConfig | None = None, *,
                        device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        strict: bool = True, weights_only: bool = True, **paths) -> LibraProcessor:
        """Load the layout described in the module docstring. ``paths`` (tokenizer=, clip=, vision_tokenizer=,
        pixel_decoder_config=) override ``processor_config.json``; ``clip=None, vision_tokenizer=None`` (or, without
        a ``processor_config.json``, no ``vision_tokenizer.ckpt`` in ``directory``) gives a text-only processor;
        ``pixel_decoder_config=None`` (or an absent default YAML) gives no pixel decoder.
        ``device``/``torch_dtype`` place the image tokenizer and the pixel decoder."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"LibraProcessor.from_pretrained: {directory!r} is not a directory")
        unknown = set(paths) - set(DEFAULT_LAYOUT)
        if unknown:
            raise TypeError(f"LibraProcessor.from_pretrained: unknown arguments {sorted(unknown)}")
        settings = dict(DEFAULT_LAYOUT, feature_layers=list(DEFAULT_FEATURE_LAYERS))
        config_path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        # Image paths named by processor_config.json or the caller must exist; the defaults may be absent (text-only).
        declared = os.path.isfile(config_path) or "vision_tokenizer" in paths or "clip" in paths
        decoder_declared = "pixel_decoder_config" in paths
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as handle:
                    stored = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"LibraProcessor.from_pretrained: {config_path} is not valid JSON ({error}); "
                                 "restore or rewrite it") from None
            if not isinstance(stored, dict):
                raise ValueError(f"LibraProcessor.from_pretrained: {config_path} must hold a JSON object of paths")
            decoder_declared = decoder_declared or "pixel_decoder_config" in stored
            settings.update(stored)
        settings.update(paths)
        if config is None:
            config = LibraConfig.from_pretrained(directory)
        resolve = lambda p: p if p is None or os.path.isabs(p) else os.path.join(directory, p)
        text = TextTokenizer.from_pretrained(
            resolve(settings["tokenizer"]), vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            newline_token_id=config.newline_token_id)
        image = decoder = None
        clip_dir, checkpoint = resolve(settings["clip"]), resolve(settings["vision_tokenizer"])
        decoder_yaml = resolve(settings.get("pixel_decoder_config"))
        if (clip_dir is None) != (checkpoint is None):
            raise ValueError(f"LibraProcessor.from_pretrained: clip ({clip_dir}) and vision_tokenizer ({checkpoint}) "
                             "must both be given or both be None")
        if checkpoint is not None and not declared and not os.path.exists(checkpoint):
            checkpoint = None
        if checkpoint is not None:
            codebooks = settings.get("codebook_num", config.vision_codebook_num)
            state = read_vision_tokenizer_checkpoint(checkpoint, weights_only=weights_only)  # read once for both
            image = HybridImageTokenizer.from_pretrained(
                clip_dir, state, feature_layers=settings["feature_layers"], codebook_num=codebooks,
                text_vocab_size=config.vocab_size, strict=strict, torch_dtype=torch_dtype)
            if device is not None:
                image.to(device)
            # A YAML that processor_config.json or the caller names must exist; the default one may be absent.
            if decoder_yaml is not None and (decoder_declared or os.path.isfile(decoder_yaml)):
                decoder = PixelDecoder.from_pretrained(decoder_yaml, state, device=device, torch_dtype=torch_dtype)
        return cls(text, image, config, decoder)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the layout of the module docstring (config.json included); returns the directory."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        self.text_tokenizer.save_pretrained(os.path.join(directory, DEFAULT_LAYOUT["tokenizer"]))
        settings = dict(DEFAULT_LAYOUT, codebook_num=self.config.vision_codebook_num)
        if self.image_tokenizer is not None:
            clip_dir = os.path.join(directory, DEFAULT_LAYOUT["clip"])
            self.image_tokenizer.clip.save_pretrained(clip_dir)
            self.image_tokenizer.image_processor.save_pretrained(clip_dir)
            extra = None
            if self.pixel_decoder is not None:
                self.pixel_decoder.config.save_yaml(os.path.join(directory, DEFAULT_LAYOUT["pixel_decoder_config"]))
                extra = self.pixel_decoder.checkpoint_state_dict()
            self.image_tokenizer.save_checkpoint(os.path.join(directory, DEFAULT_LAYOUT["vision_tokenizer"]), extra)
            settings["feature_layers"] = list(self.image_tokenizer.feature_layers)
        else:
            settings.update(clip=None, vision_tokenizer=None)
        if self.pixel_decoder is None or self.image_tokenizer is None:
            settings["pixel_decoder_config"] = None
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)
            handle.write("\n")
        return directory

    # --------------------------------------------------------------------------------------------- one sample
    def encode_sample(self, text=None, images=None, *, template: str | None = "v1", max_length: int | None = None,
                      instruction: str | None = None, clean_caption: bool = True,
                      caption_eos: bool = False) -> EncodedSample:
        """One sample -> :class:`EncodedSample` (host tensors; pixel values preprocessed).

        template "v1": ``text`` is a question (an inference prompt ending in "ASSISTANT:") or LLaVA turns
        (``[{"from": "human"|"gpt", "value": ...}]``, a training sample when it ends with a gpt turn); at most one
        image, put first in its human turn. "caption": ``text`` is a caption (cleaned unless ``clean_caption`` is
        False), ``<s>`` + image + "\\n" (+ ``instruction`` + "\\n") + caption (+ a target EOS with ``caption_eos``;
        the release has none). None: raw text where each ``<image>``
        marker takes the next image (no marker and one image: image + "\\n" + text).
        ``images``: None, a PIL image or a list of them. ``max_length`` truncates after splicing (docs/model.md §10).
        Raises ValueError when a label would be cross-modal (docs/model.md §14, item 12), which the templates never
        produce.
        """
        images = _images_list(images)
        if template not in TEMPLATES:
            raise ValueError(f"LibraProcessor.encode_sample: template must be one of {TEMPLATES}, got {template!r}")
        if images and self.image_processor is None:
            raise ValueError("LibraProcessor.encode_sample: images were given but the processor has no image "
                             "tokenizer")
        if template in ("v1", "caption") and len(images) > 1:
            raise ValueError(f"LibraProcessor.encode_sample: the {template!r} template takes at most one image, "
                             f"got {len(images)}")
        if template == "v1":
            parts = v1_parts(text, bool(images))
        elif template == "caption":
            parts = caption_parts(text, bool(images), instruction=instruction, clean=clean_caption, eos=caption_eos)
        else:
            parts = raw_parts("" if text is None else text, len(images))
        sample = build_sample(parts, self.text_tokenizer, image_length=self.config.max_vision_token_length,
                              vision_vocab_size=self.config.vision_vocab_size, max_length=max_length)
        # Code positions hold a placeholder until CLIP runs; any vision id stands in for them in this check.
        ids = torch.where(sample.ids == CODE_PLACEHOLDER, self.config.boi_token_id, sample.ids)
        check_no_cross_modal_targets(torch.where(sample.target_mask, ids, IGNORE_INDEX)[None],
                                     sample.vision_indices[None], vocab_size=self.config.vocab_size,
                                     max_vision_token_length=self.config.max_vision_token_length)
        kept = int(sample.image_index.max()) + 1 if len(sample) and sample.image_index.max() >= 0 else 0
        if kept:
            sample.pixel_values = preprocess_images(self.image_processor, images[:kept])
        return sample

    # ------------------------------------------------------------------------------------------------ batching
    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right",
                pad_to_multiple_of: int | None = None) -> dict:
        """Pad samples into a host batch: ``input_ids`` int64 [C, B, N] (code positions still
        ``CODE_PLACEHOLDER``), ``vision_indices`` int64 [B, N] (P+2 at text and padding), ``attention_mask`` int64
        [B, N], ``target_mask`` bool [B, N], ``image_index`` int64 [B, N] (index into ``pixel_values``, -1 at text),
        ``pixel_values`` float32 [I, 3, S, S] or None. Pass it (moved to the device) to :meth:`tokenize_images`."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"LibraProcessor.collate: padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(samples, (list, tuple)) or not samples or \
                not all(isinstance(s, EncodedSample) for s in samples):
            raise ValueError("LibraProcessor.collate: samples must be a non-empty list of EncodedSample")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"LibraProcessor.collate: pad_to_multiple_of must be a positive int or None, "
                             f"got {pad_to_multiple_of!r}")
        config = self.config
        batch, length = len(samples), max(len(s) for s in samples)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = torch.full((batch, length), config.pad_token_id, dtype=torch.int64)
        vision = torch.full((batch, length), config.text_vision_index, dtype=torch.int64)
        attention = torch.zeros((batch, length), dtype=torch.int64)
        target = torch.zeros((batch, length), dtype=torch.bool)
        image_index = torch.full((batch, length), -1, dtype=torch.int64)
        pixels, images_before = [], 0
        for row, sample in enumerate(samples):
            n = len(sample)
            cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[row, cols], vision[row, cols], target[row, cols] = sample.ids, sample.vision_indices, \
                sample.target_mask
            attention[row, cols] = 1
            image_index[row, cols] = torch.where(sample.image_index >= 0, sample.image_index + images_before, -1)
            if sample.num_images:
                pixels.append(sample.pixel_values)
                images_before += sample.num_images
        return {"input_ids": ids.unsqueeze(0).repeat(config.vision_codebook_num, 1, 1), "vision_indices": vision,
                "attention_mask": attention, "target_mask": target, "image_index": image_index,
                "pixel_values": torch.cat(pixels) if pixels else None}

    def tokenize_images(self, batch: dict, return_labels: bool = False) -> dict:
        """Collated batch -> model inputs on the image tokenizer's device (or the batch's, when text-only):
        ``input_ids`` [C, B, N] with the code ids filled, ``vision_indices``, ``attention_mask``,
        ``contiguous_signal`` [B, N, cs] (zeros at text, BOI and EOI; None when the batch has no image) and, when
        ``return_labels``, ``labels`` int64 [C, B, N] (ids at targets, -100 elsewhere)."""
        for key in ("input_ids", "vision_indices", "attention_mask", "image_index"):
            if not isinstance(batch.get(key), torch.Tensor):
                raise ValueError(f"LibraProcessor.tokenize_images: batch[{key!r}] must be a tensor (from collate)")
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and self.image_tokenizer is None:
            raise ValueError("LibraProcessor.tokenize_images: the batch has images but there is no image tokenizer")
        device = self.image_tokenizer.device if pixel_values is not None else batch["input_ids"].device
        input_ids = batch["input_ids"].to(device)
        vision = batch["vision_indices"].to(device)
        image_index = batch["image_index"].to(device)
        signal = None
        if pixel_values is not None:
            tokens = self.image_tokenizer.tokenize(pixel_values.to(device))
            in_image = image_index >= 0
            which = image_index.clamp(min=0)
            where = vision.clamp(max=self.config.max_vision_token_length - 1)
            input_ids = torch.where(in_image.unsqueeze(0), tokens.ids[:, which, where], input_ids)
            features = tokens.contiguous_signal[which, where]
            signal = torch.where(in_image.unsqueeze(-1), features, torch.zeros((), dtype=features.dtype,
                                                                               device=device))
        out = {"input_ids": input_ids, "vision_indices": vision,
               "attention_mask": batch["attention_mask"].to(device), "contiguous_signal": signal}
        if return_labels:
            if not isinstance(batch.get("target_mask"), torch.Tensor):
                raise ValueError("LibraProcessor.tokenize_images: return_labels needs batch['target_mask']")
            out["labels"] = labels_from_targets(input_ids, batch["target_mask"].to(device), out["attention_mask"])
        return out

    def __call__(self, images=None, texts=None, *, template: str | None = "v1", padding_side: str = "right",
                 return_labels: bool = False, max_length: int | None = None, **encode_kwargs) -> dict:
        """Batch of (image, text) pairs -> model inputs (see :meth:`tokenize_images`).

        ``texts``: a list of B texts or conversations (see :meth:`encode_sample`); ``images``: None or a list of B
        entries, each None, a PIL image or a list of PIL images (raw template)."""
        if texts is None or isinstance(texts, (str, dict)) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("LibraProcessor: texts must be a non-empty list (one text or conversation per sample)")
        images = [None] * len(texts) if images is None else images
        if not isinstance(images, (list, tuple)) or len(images) != len(texts):
            raise ValueError(f"LibraProcessor: images must be None or a list with one entry per text "
                             f"({len(texts)}), got {images!r:.80}")
        samples = [self.encode_sample(text, image, template=template, max_length=max_length, **encode_kwargs)
                   for text, image in zip(texts, images)]
        return self.tokenize_images(self.collate(samples, padding_side), return_labels=return_labels)

    # ------------------------------------------------------------------------------------------------ decoding
    def split_spans(self, ids) -> list[tuple[str, list[int]]]:
        """A row of combined ids (int [N] tensor or list) -> [("text" | "image", ids)] in order; an image span runs
        from BOI (or the first vision id) to EOI inclusive."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"LibraProcessor.split_spans: ids must be one row [N], got {tuple(ids.shape)}")
            ids = ids.tolist()
        spans: list[tuple[str, list[int]]] = []
        for token in ids:
            kind = "image" if token >= self.config.vocab_size else "text"
            opens = kind == "image" and token == self.config.boi_token_id
            if spans and spans[-1][0] == kind and not opens and not (
                    kind == "image" and spans[-1][1][-1] == self.config.eoi_token_id):
                spans[-1][1].append(int(token))
            else:
                spans.append((kind, [int(token)]))
        return spans

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """A row of combined ids (row 0 of ``input_ids`` or of generated ids) -> text with each image span replaced
        by one ``<image>`` marker."""
        out = []
        for index, (kind, span) in enumerate(self.split_spans(ids)):
            if kind == "image":
                out.append(IMAGE_MARKER)
            else:
                out.append(self.text_tokenizer.decode(span, at_start=index == 0,
                                                      skip_special_tokens=skip_special_tokens))
        return "".join(out)

    def image_codes(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """ids int [C, N] of one sample -> the codes int64 [C, n_i] of each image span in order (BOI/EOI removed),
        ready for the image tokenizer's decode path."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("LibraProcessor.image_codes: ids must be an int tensor [C, N]")
        codes, start = [], 0
        for kind, span in self.split_spans(ids[0]):
            if kind == "image":
                block = ids[:, start:start + len(span)]
                keep = (block[0] != self.config.boi_token_id) & (block[0] != self.config.eoi_token_id)
                codes.append(block[:, keep] - self.config.vocab_size)
            start += len(span)
        return codes

    # -------------------------------------------------------------------------------------------- pixels back
    def _decoder(self, caller: str) -> PixelDecoder:
        if self.pixel_decoder is None:
            raise ValueError(f"LibraProcessor.{caller}: the processor has no pixel decoder; put the released "
                             f"vision_tokenizer_config.yaml in the processor directory (or name it as "
                             f"pixel_decoder_config in processor_config.json) next to a checkpoint with decoder.* "
                             f"weights")
        return self.pixel_decoder

    def decode_images(self, codes: torch.Tensor, batch_size: int | None = None) -> list:
        """codes int [C, B, P] (code values, no vocabulary offset) -> B PIL images of the pixel decoder."""
        decoder = self._decoder("decode_images")
        return decoder.to_images(decoder.decode(codes, batch_size=batch_size))

    @torch.no_grad()
    def reconstruct(self, images, batch_size: int | None = None) -> list:
        """What the model "sees": PIL images (a list, or one image) -> their codes -> the pixel decoder's PIL
        images (``resolution`` × ``resolution``). ``batch_size`` bounds how many images are decoded at once."""
        decoder = self._decoder("reconstruct")
        if self.image_tokenizer is None:
            raise ValueError("LibraProcessor.reconstruct: the processor has no image tokenizer")
        images = _images_list(images)
        if not images:
            raise ValueError("LibraProcessor.reconstruct: images must be a PIL image or a non-empty list of them")
        codes = self.image_tokenizer.tokenize(images).codes
        return decoder.to_images(decoder.decode(codes, batch_size=batch_size))
