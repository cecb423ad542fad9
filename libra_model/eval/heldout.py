"""Evaluation during training: Libra's loss on held-out samples and, for caption data, generated captions scored
with the caption metrics (:mod:`libra_model.eval.caption_metrics`).

The held-out split: the generated shapes set's "heldout" stream; for the other datasets the ``eval_data`` setting
(an annotation file for "coco"/"llava", with images under ``data_image_root``; shards for "webdataset"). Every
rank runs the forward passes and generation (tensor-parallel ranks issue the same collectives); the main rank
scores. Returns a row of ``val_*`` values for ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import torch

from libra_model.data.loader import SampleError

CAPTION_DATASETS = ("shapes", "coco", "webdataset")


def heldout_source(cfg, image_size: int):
    """The held-out source of the run's dataset, or None when the run names none (``eval_data`` unset)."""
    from libra_model.data.pipeline import build_source

    if cfg.dataset == "shapes":
        return build_source("shapes", num_samples=cfg.eval_samples, image_size=image_size, seed=cfg.seed,
                            split="heldout")
    if not cfg.eval_data:
        return None
    if cfg.dataset == "webdataset":
        return build_source("webdataset", shards=cfg.eval_data)
    return build_source(cfg.dataset, annotation_file=cfg.eval_data, image_root=cfg.data_image_root)


@torch.no_grad()
def validation_loss(model, processor, source, *, count: int, batch_size: int, device: torch.device,
                    dtype: torch.dtype, caption_eos: bool, max_length: int | None = None) -> float:
    """Libra's loss over the first ``count`` readable samples of ``source``, encoded as in training (the mean of
    the batch losses weighted by their sample counts)."""
    from libra_model.data.pipeline import EncodedSource, HostCollate, model_inputs

    encoded = EncodedSource(source, processor, max_length, caption_eos)
    collate = HostCollate(processor)
    total, weight, samples = 0.0, 0, []

    def flush():
        batch = model_inputs(processor, collate(samples), device, dtype)
        out = model(batch["input_ids"], batch["vision_indices"], batch["attention_mask"],
                    batch.get("contiguous_signal"), labels=batch["labels"], layout=batch["layout"])
        return float(out.loss) * len(samples), len(samples)

    for index in range(len(source)):
        if weight + len(samples) == count:
            break
        try:
            samples.append(encoded[index])
        except SampleError:
            continue
        if len(samples) == batch_size:
            loss, n = flush()
            total, weight, samples = total + loss, weight + n, []
    if samples:
        loss, n = flush()
        total, weight = total + loss, weight + n
    if not weight:
        raise ValueError("validation_loss: no readable held-out sample")
    return total / weight


def caption_items(source, count: int) -> tuple[list, dict]:
    """The first ``count`` images of a caption source as (EvalItems, {key: [reference captions]}); consecutive
    samples with the same key (one record with several captions) add references to one image."""
    from libra_model.eval.predict import EvalItem

    items, references = [], {}
    for index in range(len(source)):
        try:
            sample = source[index]
        except SampleError:
            continue
        key = sample.get("key", index)
        if key in references:
            references[key].append(sample["caption"])
            continue
        if len(items) == count:
            break
        if sample.get("image") is None:
            continue
        items.append(EvalItem(key, lambda image=sample["image"]: image))
        references[key] = [sample["caption"]]
    return items, references


def evaluate_heldout(cfg, model, processor, parallel, dtype: torch.dtype, say=print) -> dict:
    """The held-out evaluation of a run (see the module docstring): {"val_loss": float, "val_Bleu_1": ...,
    "val_CIDEr": ...} (caption metrics only for caption datasets, on the main rank, when Java is available; a
    line says why they are missing otherwise). {} when the run has no held-out data."""
    from libra_model.eval.caption_metrics import ScorerUnavailable, check_scorer_available, score_captions
    from libra_model.eval.predict import predict

    image_size = processor.image_tokenizer.clip.config.image_size if processor.image_tokenizer is not None else 64
    source = heldout_source(cfg, image_size)
    if source is None:
        say(f"evaluation: dataset {cfg.dataset!r} has no held-out split; set eval_data to evaluate")
        return {}
    was_training = model.training
    model.eval()
    try:
        row = {"val_loss": validation_loss(model, processor, source, count=cfg.eval_samples,
                                           batch_size=cfg.micro_batch_size, device=parallel.device, dtype=dtype,
                                           caption_eos=cfg.caption_eos, max_length=cfg.max_length)}
        if cfg.dataset not in CAPTION_DATASETS or processor.image_tokenizer is None:
            return row
        try:
            check_scorer_available()
        except ScorerUnavailable as error:
            say(f"evaluation: caption metrics skipped: {error}")
            return row
        items, references = caption_items(source, cfg.eval_samples)
        captions = predict(model, processor, "caption", items, batch_size=cfg.micro_batch_size,
                           max_new_tokens=cfg.caption_max_new_tokens, dtype=dtype)
        if parallel.is_main and captions:
            scores = score_captions({k: references[k] for k in captions}, captions)
            row.update({f"val_{name}": value for name, value in scores.items()})
            row["val_caption_images"] = len(captions)
        return row
    finally:
        model.train(was_training)
