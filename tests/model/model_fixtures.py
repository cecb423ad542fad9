"""Builders of valid Libra batches for the model tests: images spliced as BOI, codes, EOI with their
vision_indices, contiguous signals at code positions, labels following docs/model.md §10 (BOI, BOS, the first text
token after each image and padding are -100), right or left padding."""

import torch

from libra_model.config import LibraConfig


def make_batch(config: LibraConfig, batch: int, length: int, images=None, padding=None, signal: bool = True,
               generator: torch.Generator | None = None) -> dict:
    """A random batch. ``images``: per row, a list of start positions of whole or truncated images (default: one
    image at a random place, none in the last row when batch > 1). ``padding``: per row, the number of padded
    positions (right padding; use :func:`left_pad` to move it left). Returns input_ids [C,B,N], vision_indices [B,N],
    attention_mask [B,N], contiguous_signal [B,N,cs] (or None), labels [C,B,N]."""
    C, V, L = config.vision_codebook_num, config.vocab_size, config.max_vision_token_length
    if images is None:
        images = []
        for b in range(batch):
            if batch > 1 and b == batch - 1:
                images.append([])
            else:
                images.append([int(torch.randint(1, max(2, length - L + 1), (), generator=generator))])
    padding = padding or [0] * batch
    text = torch.randint(3, V, (batch, length), generator=generator)
    ids = text[None].repeat(C, 1, 1)
    vision_indices = torch.full((batch, length), L, dtype=torch.long)
    labels_mask = torch.zeros(batch, length, dtype=torch.bool)  # True = ignored target
    for b in range(batch):
        ids[:, b, 0] = config.bos_token_id
        labels_mask[b, 0] = True
        for start in images[b]:
            stop = min(length, start + L)
            span = torch.arange(stop - start)
            vision_indices[b, start:stop] = span
            codes = torch.randint(V, V + config.num_codes, (C, stop - start), generator=generator)
            codes[:, span == 0] = config.boi_token_id
            codes[:, span == L - 1] = config.eoi_token_id
            ids[:, b, start:stop] = codes
            labels_mask[b, start] = True  # BOI is never a target
            if stop < length:
                labels_mask[b, stop] = True  # the first text token after the image
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(padding):
        if pad:
            ids[:, b, length - pad:] = config.pad_token_id
            vision_indices[b, length - pad:] = L
            attention_mask[b, length - pad:] = 0
            labels_mask[b, length - pad:] = True
    contiguous_signal = None
    if signal:
        is_code = (vision_indices >= 1) & (vision_indices <= config.image_feature_resolution ** 2)
        contiguous_signal = torch.randn(batch, length, config.contiguous_signal_size, generator=generator)
        contiguous_signal = contiguous_signal * is_code[..., None]
    labels = ids.masked_fill(labels_mask[None], -100)
    return dict(input_ids=ids, vision_indices=vision_indices, attention_mask=attention_mask,
                contiguous_signal=contiguous_signal, labels=labels)


def left_pad(batch: dict) -> dict:
    """Move each row's padding (attention_mask == 0 at the end) to its start."""
    out = {}
    mask = batch["attention_mask"]
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        value = value.clone()
        bdim = 1 if key in ("input_ids", "labels") else 0
        for b in range(mask.shape[0]):
            pad = int((mask[b] == 0).sum())
            if pad:
                row = value.select(bdim, b)
                row.copy_(torch.roll(row, pad, dims=1 if bdim == 1 else 0))
        out[key] = value
    return out


def randomize_parameters(model, std: float = 0.2) -> None:
    """Give every parameter random values (bridges and heads included) so that no test passes by zero weights."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)
