"""From a data source to model inputs: encode each sample on the host with the ``LibraProcessor`` (template, text
tokens, image positions, target mask, pixel values), pad a micro-batch and compute its ``ModalityLayout`` on the
host (the collator knows where the images are, so no operator needs a device-to-host sync), then run the image
tokenizer (CLIP + LFQ) on the device to fill the codes, the contiguous signal and the labels.

Sources and their templates: caption sets (generated shapes, webdataset tars, COCO JSON) use the pretraining
caption template ``<s>`` + image + "\\n" + caption; LLaVA records use the "v1" conversation template.
"""

from __future__ import annotations

import torch

from libra_kernels import ModalityLayout
from libra_model.data.json_sources import CocoCaptions, LlavaInstructions
from libra_model.data.loader import ResumableLoader, SampleError, SkipStats
from libra_model.data.sampler import ResumableSampler
from libra_model.data.shapes import ShapesCaptions
from libra_model.data.webdataset import WebDatasetCaptions

DATASETS = ("shapes", "webdataset", "coco", "llava")


def build_source(kind: str, *, shards=None, annotation_file: str | None = None, image_root: str | None = None,
                 num_samples: int = 4096, image_size: int = 64, seed: int = 0, split: str = "train",
                 stats: SkipStats | None = None):
    """The indexable source of dataset ``kind`` ("shapes", "webdataset", "coco", "llava"); the keyword arguments
    each kind needs are checked with a message naming them."""
    if kind == "shapes":
        return ShapesCaptions(num_samples, image_size=image_size, seed=seed, split=split)
    if kind == "webdataset":
        if not shards:
            raise ValueError("build_source: dataset 'webdataset' needs data_shards (a brace pattern or a list)")
        return WebDatasetCaptions(shards, stats=stats)
    if kind in ("coco", "llava"):
        if not annotation_file or image_root is None:
            raise ValueError(f"build_source: dataset {kind!r} needs data_annotation_file and data_image_root")
        cls = CocoCaptions if kind == "coco" else LlavaInstructions
        return cls(annotation_file, image_root, stats=stats)
    raise ValueError(f"build_source: dataset must be one of {DATASETS}, got {kind!r}")


def encode_caption_with_eos(processor, caption: str, image, max_length: int | None = None):
    """The pretraining caption template followed by a target EOS: ``<s>`` + image + "\n" + caption + ``</s>``.
    Libra's pretraining appends no EOS, so a base model never learns to stop; with it, generation
    ends after the caption. Returns an ``EncodedSample`` with pixel values."""
    from libra_model.text import Part, build_sample, caption_parts

    config = processor.config
    parts = caption_parts(caption, image is not None) + [Part("eos", target=True)]
    sample = build_sample(parts, processor.text_tokenizer, image_length=config.max_vision_token_length,
                          vision_vocab_size=config.vision_vocab_size, max_length=max_length)
    if image is not None and bool((sample.image_index >= 0).any()):
        sample.pixel_values = processor.image_tokenizer.preprocess([image])
    return sample


class EncodedSource:
    """``source[i]`` encoded by the processor: an ``EncodedSample`` (or :class:`SampleError`). Caption samples use
    the "caption" template (plus a target EOS when ``caption_eos``), conversation samples the "v1" template;
    ``max_length`` truncates after splicing."""

    def __init__(self, source, processor, max_length: int | None = None, caption_eos: bool = False):
        self.source, self.processor, self.max_length = source, processor, max_length
        self.caption_eos = caption_eos
        self.stats = getattr(source, "stats", None) or SkipStats()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        sample = self.source[index]
        try:
            if "conversations" in sample:
                encoded = self.processor.encode_sample(sample["conversations"], sample["image"], template="v1",
                                                       max_length=self.max_length)
            elif self.caption_eos:
                encoded = encode_caption_with_eos(self.processor, sample["caption"], sample["image"],
                                                  self.max_length)
            else:
                encoded = self.processor.encode_sample(sample["caption"], sample["image"], template="caption",
                                                       max_length=self.max_length)
        except (ValueError, TypeError) as error:
            # A sample the templates cannot encode (an empty caption after cleaning, say): skip, do not stop.
            raise SampleError("unencodable", f"{sample.get('key', index)}: {error}") from error
        # Position 0 has no predecessor, so a target there is never trained on. A sample without any other target
        # (a conversation ending with a human turn, a caption cut away by max_length) would add tokens and no loss.
        if not bool(encoded.target_mask[1:].any()):
            raise SampleError("no_target", f"{sample.get('key', index)}: no target token"
                                           + (f" within max_length={self.max_length}" if self.max_length else ""))
        return encoded


def check_host_batch(batch: dict, config) -> None:
    """Validate a collated host batch once, on the host, so the device step can skip every value check
    (``check_input_values=False`` and the loss operator's label check): text positions hold text ids in [0, V),
    vision positions hold code placeholders or the BOI/EOI ids, text ids are equal in every codebook row, and
    every target (``target_mask`` at a real position) has the modality of the head that predicts it (the head of
    the position before it). The codes filled in on the device by the image tokenizer are in range by
    construction. Raises ValueError naming the first problem."""
    from libra_model.text import CODE_PLACEHOLDER, IGNORE_INDEX, check_no_cross_modal_targets

    ids, vision = batch["input_ids"], batch["vision_indices"]
    is_vision = vision < config.max_vision_token_length
    row = ids[0]
    if (ids != row).any():
        raise ValueError("check_host_batch: input_ids must hold the same ids in every codebook row before the image "
                         "tokenizer fills the codes")
    text_ok = (row >= 0) & (row < config.vocab_size)
    vision_ok = (row == CODE_PLACEHOLDER) | (row == config.boi_token_id) | (row == config.eoi_token_id)
    bad = torch.where(is_vision, ~vision_ok, ~text_ok)
    if bad.any():
        b, n = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"check_host_batch: input id {int(row[b, n])} at (batch {b}, position {n}) is not a "
                         f"{'vision' if is_vision[b, n] else 'text'} id (text ids are in [0, {config.vocab_size}))")
    targets = batch["target_mask"].bool() & batch["attention_mask"].bool()
    labels = torch.where(targets, torch.where(row == CODE_PLACEHOLDER, config.boi_token_id, row), IGNORE_INDEX)
    check_no_cross_modal_targets(labels, vision, vocab_size=config.vocab_size,
                                 max_vision_token_length=config.max_vision_token_length)


class HostCollate:
    """List of ``EncodedSample`` -> the processor's padded host batch, validated on the host
    (:func:`check_host_batch`), plus its ``layout`` (ModalityLayout)."""

    def __init__(self, processor, pad_to_multiple_of: int | None = None):
        self.processor, self.pad_to_multiple_of = processor, pad_to_multiple_of

    def __call__(self, samples) -> dict:
        """Pad (right), validate, and attach the host-side modality layout."""
        batch = self.processor.collate(samples, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        check_host_batch(batch, self.processor.config)
        batch["layout"] = ModalityLayout.from_vision_indices(batch["vision_indices"],
                                                             self.processor.config.max_vision_token_length)
        return batch


def model_inputs(processor, host_batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Host batch -> the dict ``train_step`` takes: input_ids/labels [C, B, N], vision_indices and attention_mask
    [B, N], contiguous_signal [B, N, cs] in ``dtype`` (zeros when the batch has no image), layout on ``device``."""
    batch = processor.tokenize_images(host_batch, return_labels=True)
    out = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    if batch.get("contiguous_signal") is not None:
        out["contiguous_signal"] = out["contiguous_signal"].to(dtype)
    out["layout"] = host_batch["layout"].to(device)
    if host_batch.get("document_ids") is not None:  # packed rows (PackedCollate)
        out["document_ids"] = host_batch["document_ids"].to(device)
    return out


def build_loader(source, processor, *, micro_batch_size: int, seed: int, dp_rank: int, dp_size: int,
                 max_length: int | None = None, prefetch: int = 0, pad_to_multiple_of: int | None = None,
                 shuffle: bool = True, caption_eos: bool = False, pack_sequences: bool = False,
                 pack_buffer: int = 256):
    """The resumable loader of one DP replica: sampler seeded by (seed, epoch) and split by ``dp_rank`` (so the TP
    ranks of a replica read the same batches), encoding with the processor, host collation with the layout.

    With ``pack_sequences`` (needs ``max_length``; no prefetch): a :class:`~libra_model.data.packing.PackedLoader`
    whose batches are ``micro_batch_size`` rows of ``max_length`` tokens, each holding several samples packed by
    ``pack_documents`` within buffers of ``pack_buffer`` samples, with ``document_ids``."""
    encoded = EncodedSource(source, processor, max_length, caption_eos)
    sampler = ResumableSampler(len(source), seed=seed, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle)
    if pack_sequences:
        from libra_model.data.packing import PackedCollate, PackedLoader

        if max_length is None:
            raise ValueError("build_loader: pack_sequences needs max_length (the row length samples are packed into)")
        if prefetch:
            raise ValueError("build_loader: pack_sequences does not prefetch; set prefetch=0")
        return PackedLoader(encoded, sampler, micro_batch_size, max_length,
                            PackedCollate(HostCollate(processor, pad_to_multiple_of)), buffer_size=pack_buffer,
                            stats=encoded.stats)
    return ResumableLoader(encoded, sampler, micro_batch_size, collate=HostCollate(processor, pad_to_multiple_of),
                           stats=encoded.stats, prefetch=prefetch)
