"""Rotary position embeddings (LLaMA's rotate-half form) with 1d positions or Libra's optional 2d positions
(docs/model.md §6): the position ids and the cos/sin tables. The rotation itself is the ``libra_kernels.rotary``
operator, applied in sequence order to q, k and the key bridge term alike (RoPE is linear)."""

from __future__ import annotations

import torch


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                   num_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions.

    Args:
        position_ids: int64 [B, N] (1d) or [B, 2, N] (2d: row and column components).
        head_dim: d (even). theta: the RoPE base (10000 for LLaMA-2). dtype: the dtype of the returned tables.
        num_heads: needed for 2d positions: even-indexed heads use the row component, odd-indexed the column one.
    Returns:
        (cos, sin), each [B, N, 1, d] for 1d positions (broadcast over heads) or [B, N, num_heads, d] for 2d.
        The angles are computed in float32 (float64 for a float64 ``dtype``) and cast to ``dtype``.
    """
    device = position_ids.device
    # float32 angles as in HF LLaMA (bit-compatible tables in float32/bfloat16); float64 models get float64 angles.
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(angle_dtype) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if position_ids.dim() == 2:
        freqs = position_ids.to(angle_dtype)[:, :, None, None] * inv_freq  # [B, N, 1, d/2]
    elif position_ids.dim() == 3 and position_ids.shape[1] == 2:
        if num_heads is None:
            raise ValueError("rotary_cos_sin: num_heads is required with 2d position_ids [B, 2, N]")
        component = torch.arange(num_heads, device=device) % 2  # 0 = row for even heads, 1 = column for odd heads
        per_head = position_ids.index_select(1, component).transpose(1, 2)  # [B, N, H]
        freqs = per_head.to(angle_dtype)[..., None] * inv_freq  # [B, N, H, d/2]
    else:
        raise ValueError(f"rotary_cos_sin: position_ids must be [B, N] or [B, 2, N], got {tuple(position_ids.shape)}")
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: for each position of packed rows, the index of the first position of its document.

    ``document_ids`` int [B, N] numbers the documents of each row from 0 (-1 at padding); a document starts where
    the id differs from the previous position's. Computed on the device (a running maximum), no host read.
    """
    length = document_ids.shape[-1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(is_start, index, 0).cummax(-1).values


def libra_2d_position_ids(vision_indices: torch.Tensor, resolution: int, attention_mask: torch.Tensor | None = None,
                          start: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Libra's 2d RoPE positions (docs/model.md §6) from ``vision_indices``.

    Increment per token: 1 for text and BOI, 0 for codes, resolution+1 for EOI, 0 for padding; base = running sum
    - 1 (continuing from ``start``, the running sum before these tokens, for cached decoding); codes at raster
    index 1 + R·row + col add (row+1, col+1). Padding gets position 1 (as the 1d generation path does).

    With ``document_ids`` (packed rows, int [B, N], -1 at padding) the running sum restarts at each document, so
    every document gets the positions it would get alone.

    Args:
        vision_indices: int64 [B, N]. resolution: R (image_feature_resolution).
        attention_mask: [B, N] (nonzero = real token) or None. start: int64 [B] or None (0).
        document_ids: int [B, N] or None (not with ``start``).
    Returns:
        (position_ids int64 [B, 2, N], running_sum int64 [B]: the value of ``start`` for the next tokens).
    """
    text_index = resolution * resolution + 2
    increment = torch.where(vision_indices == text_index - 1, resolution + 1,
                            ((vision_indices == 0) | (vision_indices >= text_index)).long())
    if attention_mask is not None:
        increment = increment * (attention_mask != 0)
    if document_ids is not None:
        if start is not None:
            raise ValueError("libra_2d_position_ids: document_ids (packed rows) cannot continue from a cache start")
        attention_mask = document_ids >= 0 if attention_mask is None else (attention_mask != 0) & (document_ids >= 0)
        increment = increment * attention_mask
    running = increment.cumsum(-1)
    if start is not None:
        running = running + start[:, None]
    base = running - 1
    if document_ids is not None:
        # the running sum before each document's first token, subtracted from all of its tokens
        before = (running - increment).gather(1, document_starts(document_ids))
        base = base - before
    is_code = (vision_indices >= 1) & (vision_indices <= resolution * resolution)
    cell = (vision_indices - 1).clamp(min=0)
    row = torch.where(is_code, cell // resolution + 1, 0)
    col = torch.where(is_code, cell % resolution + 1, 0)
    positions = torch.stack([base + row, base + col], dim=1)
    if attention_mask is not None:
        positions = positions.masked_fill((attention_mask == 0)[:, None, :], 1)
    return positions, running[:, -1] if running.shape[-1] else (start if start is not None else
                                                                 vision_indices.new_zeros(vision_indices.shape[0]))


def libra_1d_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device,
                          start: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """1d positions int64 [B, N]: 0..N-1 (plus ``start`` [B]) without a mask; with a mask (left padding in
    generation) the count of real tokens so far minus one, and 1 at padded slots (docs/model.md §6). With
    ``document_ids`` (packed rows, int [B, N], -1 at padding; not with ``start``) the offset within the document:
    positions restart at 0 at each document, padding gets 1."""
    if document_ids is not None:
        if start is not None:
            raise ValueError("libra_1d_position_ids: document_ids (packed rows) cannot continue from a cache start")
        real = document_ids >= 0
        if attention_mask is not None:
            real = real & (attention_mask != 0)
        positions = torch.arange(length, device=device) - document_starts(document_ids)
        return positions.masked_fill(~real, 1)
    if attention_mask is None:
        positions = torch.arange(length, device=device).expand(batch, length)
        return positions if start is None else positions + start[:, None]
    real = attention_mask != 0
    positions = real.long().cumsum(-1) - 1
    if start is not None:
        positions = positions + start[:, None]
    return positions.masked_fill(~real, 1)
