"""Triton kernels of the SwiGLU product of ``routed_swiglu``: ``silu(gate) * up`` in one pass forward, and its two
gradients from (d_inner, gate, up) in one pass backward (silu recomputed in float32, nothing extra kept).

gate and up may be column views of one [T, 2·inner] buffer (any row stride, unit column stride). Unverified on
GPU; on the CPU they run under ``TRITON_INTERPRET=1`` only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 1024


@triton.jit
def _product_kernel(gate_ptr, up_ptr, out_ptr, cols, gate_stride, up_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < cols
    g = tl.load(gate_ptr + row * gate_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + offsets, mask=mask, other=0.0)
    # silu rounded to the input dtype before the product, as the eager F.silu(gate) * up does
    s = (g * tl.sigmoid(g)).to(u.dtype)
    tl.store(out_ptr + row * out_stride + offsets, s * u, mask=mask)


@triton.jit
def _product_backward_kernel(d_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, cols, d_stride, gate_stride, up_stride,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < cols
    d = tl.load(d_ptr + row * d_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    d_up = d * (g * sig)
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(d_up_ptr + row * cols + offsets, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gate_ptr + row * cols + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(1) != 1:
            raise ValueError("routed_swiglu (triton): gate, up and the gradient must have unit column stride")


def _interpreter_upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The interpreter runs on numpy, which has no bfloat16: 16-bit tensors go through it as float32 copies."""
    if INTERPRETED and tensors[0].dtype in (torch.float16, torch.bfloat16):
        return tuple(t.float() for t in tensors)
    return tensors


def swiglu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, [T, inner] contiguous in gate's dtype (float64 inputs take the ATen path: the kernel
    computes in float32)."""
    if gate.dtype == torch.float64:
        return torch.nn.functional.silu(gate) * up
    dtype = gate.dtype
    gate, up = _interpreter_upcast(gate, up)
    _check_rows(gate, up)
    rows, cols = gate.shape
    out = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid = (rows, triton.cdiv(cols, BLOCK))
        _product_kernel[grid](gate, up, out, cols, gate.stride(0), up.stride(0), out.stride(0), BLOCK=BLOCK)
    return out.to(dtype)


def swiglu_product_backward(d_inner: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool,
                            need_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up) [T, inner] contiguous of inner = silu(gate) * up (both computed in one pass; a [0] tensor
    for one not needed). float64 inputs take the ATen path."""
    if gate.dtype == torch.float64:
        empty = gate.new_empty(0)
        d_up = d_inner * torch.nn.functional.silu(gate) if need_up else empty
        d_gate = torch.ops.aten.silu_backward(d_inner * up, gate) if need_gate else empty
        return d_gate, d_up
    dtype = gate.dtype
    d_inner, gate, up = _interpreter_upcast(d_inner, gate, up)
    d_inner = d_inner if d_inner.stride(1) == 1 else d_inner.contiguous()
    _check_rows(d_inner, gate, up)
    rows, cols = gate.shape
    d_gate = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    if d_gate.numel():
        grid = (rows, triton.cdiv(cols, BLOCK))
        _product_backward_kernel[grid](d_inner, gate, up, d_gate, d_up, cols, d_inner.stride(0), gate.stride(0),
                                       up.stride(0), BLOCK=BLOCK)
    empty = gate.new_empty(0, dtype=dtype)
    return (d_gate.to(dtype) if need_gate else empty), (d_up.to(dtype) if need_up else empty)
