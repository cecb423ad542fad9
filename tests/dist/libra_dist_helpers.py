"""Shared pieces of the distributed tests: a tiny model with every factor non-zero, and batches with images."""

import copy

import torch

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> LibraForCausalLM:
    """A tiny Libra whose bridge B factors are random too (zero at init would hide bridge sharding errors)."""
    torch.manual_seed(seed)
    model = LibraForCausalLM(LibraConfig.tiny(**overrides), backend="torch").to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # not all ones, so a norm gradient mix-up would show
            elif name.endswith("weight_B"):
                param.normal_(0.0, 0.1)
    return model


def make_batch(config: LibraConfig, batch: int, length: int, images: list[tuple[int, int]], seed: int,
               dtype=torch.float64):
    """A batch as the collator makes it: images (sample, start) of max_vision_token_length positions, text
    elsewhere, labels = ids with -100 at the first position, at every BOI and after every EOI, a contiguous
    signal at code rows."""
    g = torch.Generator().manual_seed(seed)
    image_len, text_vision = config.max_vision_token_length, config.text_vision_index
    vision_indices = torch.full((batch, length), text_vision, dtype=torch.int64)
    for b, start in images:
        end = min(start + image_len, length)
        vision_indices[b, start:end] = torch.arange(end - start)
    codebooks = config.vision_codebook_num
    text = torch.randint(3, config.vocab_size, (batch, length), generator=g)
    codes = torch.randint(0, config.num_codes, (codebooks, batch, length), generator=g) + config.vocab_size
    ids = text.expand(codebooks, batch, length).clone()
    is_vision = vision_indices < text_vision
    ids = torch.where(is_vision[None], codes, ids)
    ids[:, vision_indices == 0] = config.boi_token_id
    ids[:, vision_indices == config.eoi_vision_index] = config.eoi_token_id
    labels = ids.clone()
    labels[:, :, 0] = -100
    labels[:, vision_indices == 0] = -100
    # The token after an EOI is text predicted from a vision row: masked, as Libra masks that newline.
    after_eoi = torch.zeros_like(is_vision)
    after_eoi[:, 1:] = vision_indices[:, :-1] == config.eoi_vision_index
    labels[:, after_eoi] = -100
    signal = torch.randn(batch, length, config.contiguous_signal_size, generator=g).to(dtype)
    code_rows = is_vision & (vision_indices > 0) & (vision_indices < config.eoi_vision_index)
    signal = signal * code_rows[..., None]
    return {"input_ids": ids, "vision_indices": vision_indices, "labels": labels, "contiguous_signal": signal}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Samples [start, stop) of a batch made by make_batch."""
    return {"input_ids": batch["input_ids"][:, start:stop], "vision_indices": batch["vision_indices"][start:stop],
            "labels": batch["labels"][:, start:stop], "contiguous_signal": batch["contiguous_signal"][start:stop]}


def clone(model):
    return copy.deepcopy(model)
