"""Triton kernel of ``rotary``: up to three tensors [B, N, h_i, d] rotated in one launch, one program per (token,
tensor), the token's table row read once for all its heads. The same kernel runs the backward (the transposed
rotation). Unverified on GPU; on the CPU it runs under ``TRITON_INTERPRET=1`` only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_TENSORS = 3


@triton.jit
def _rotate_token(x_ptr, out_ptr, cos_ptr, sin_ptr, token, heads, table_heads, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    dim = 2 * HALF
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (j < HALF)
    base = token * heads * dim + h * dim + j
    # per-head tables (2d RoPE) have one row per head, shared tables one row for all
    table = token * table_heads * dim + tl.where(table_heads > 1, h, 0) * dim + j
    x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # dx = dy * cos - rotate_half(dy * sin)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # y = x * cos + rotate_half(x) * sin
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_ptr + base, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(x0, x1, x2, o0, o1, o2, h0, h1, h2, cos_ptr, sin_ptr, table_heads, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    if which == 0:
        _rotate_token(x0, o0, cos_ptr, sin_ptr, token, h0, table_heads, HALF, BLOCK_H, BLOCK_D, INVERSE)
    elif which == 1:
        _rotate_token(x1, o1, cos_ptr, sin_ptr, token, h1, table_heads, HALF, BLOCK_H, BLOCK_D, INVERSE)
    else:
        _rotate_token(x2, o2, cos_ptr, sin_ptr, token, h2, table_heads, HALF, BLOCK_H, BLOCK_D, INVERSE)


def rotate(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> list[torch.Tensor]:
    """The rotated tensors (``inverse``: the transposed map, for the backward), contiguous, in xs's dtype; at most
    MAX_TENSORS float16/bfloat16/float32 tensors (the kernel computes in float32)."""
    dtype = xs[0].dtype
    upcast = INTERPRETED and dtype in (torch.float16, torch.bfloat16)  # numpy has no bfloat16
    prepare = (lambda t: t.float().contiguous()) if upcast else (lambda t: t.contiguous())
    xs, cos, sin = [prepare(x) for x in xs], prepare(cos), prepare(sin)
    outs = [torch.empty_like(x) for x in xs]
    batch, length, _, dim = xs[0].shape
    tokens = batch * length
    if tokens and dim:
        heads = [x.shape[2] for x in xs]
        padded = lambda items, fill: list(items) + [fill] * (MAX_TENSORS - len(items))  # noqa: E731
        grid = (tokens, len(xs))
        _rotary_kernel[grid](*padded(xs, xs[0]), *padded(outs, outs[0]), *padded(heads, 0), cos, sin, cos.shape[2],
                             HALF=dim // 2, BLOCK_H=triton.next_power_of_2(max(heads)),
                             BLOCK_D=triton.next_power_of_2(max(dim // 2, 1)), INVERSE=inverse)
    return [o.to(dtype) for o in outs]
