"""Inputs of the codebook heads in Libra's "2d" vision prediction mode (docs/model.md §7).

The vector placed at the position of vision index k predicts the token at index k+1: for the code at grid cell
j = k (row r = j // R, column c = j % R) it is [h(up neighbour (r-1, c)) ; h(left neighbour (r, c-1))], with the
learned placeholder for a missing neighbour, except that the left neighbour of cell (0, 0) is the BOI state. The
last code position gets [h(last code) ; placeholder] (it predicts EOI), the EOI position [h(EOI) ; placeholder].
In sequence order the left neighbour of cell j is the current position and the up neighbour is R-1 positions back,
so the construction only looks at earlier positions of the same image: it works the same on a full sequence, on a
truncated image and on a cache of final hidden states during decoding.
"""

from __future__ import annotations

import torch


def vision_predictors_2d(hidden: torch.Tensor, vision_indices: torch.Tensor, placeholder: torch.Tensor,
                         resolution: int) -> torch.Tensor:
    """Head inputs [B, n, 2·D] for the last n positions of ``hidden``.

    Args:
        hidden: [B, L, D] final (vision-normed) hidden states in sequence order; the n new positions are the last.
        vision_indices: int64 [B, n] of those n positions (R² + 2 or more = text).
        placeholder: [D], ``vision_hidden_placeholder``. resolution: R (image_feature_resolution).
    Returns:
        [B, n, 2·D] in hidden's dtype: the 2d predictors at vision positions and [h ; 0] at text positions (so a
        zero-padded text head gives the ordinary text logits).
    """
    batch, total, width = hidden.shape
    n = vision_indices.shape[1]
    codes = resolution * resolution
    current = hidden[:, total - n:]
    positions = torch.arange(total - n, total, device=hidden.device)
    up_positions = (positions - (resolution - 1)).clamp(min=0)
    up = hidden.index_select(1, up_positions)
    k = vision_indices[..., None]
    inner = (k >= 1) & (k < codes)  # predicting code cell j = k with 1 <= j < R²
    is_text = k > codes + 1
    filler = placeholder.to(hidden.dtype).expand_as(current)
    first = torch.where(k == 0, filler, torch.where(inner, torch.where(k // resolution >= 1, up, filler), current))
    second = torch.where(k == 0, current, torch.where(inner & (k % resolution >= 1), current, filler))
    second = torch.where(is_text, torch.zeros((), dtype=hidden.dtype, device=hidden.device), second)
    return torch.cat([first, second], dim=-1)
