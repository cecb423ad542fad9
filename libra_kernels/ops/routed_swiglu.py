"""The second half of a routed SwiGLU MLP in one operator: ``routed_linear(silu(gate) * up, ...)`` whose backward
recomputes ``silu(gate) * up`` from gate and up, so only those two (and the down projection's rank-r activation)
are kept for backward instead of four [T, intermediate] tensors (the silu input and output, up, the product).

gate and up are what one routed projection of the normed input gives (``routed_projections`` over the packed
gate/up weights: one GEMM per modality); they may be column views of one [T, 2·intermediate] buffer.

Parts: the reference ``routed_swiglu_ref``; the "torch" kernel (the down projection's GEMMs of
``routed_linear``'s torch kernel, the elementwise work in ATen ops); the "triton" kernel (the same GEMMs, the
elementwise work fused: one kernel forward, one backward; unverified on GPU); the registered operator
``torch.ops.libra.routed_swiglu`` (+ ``_backward``) with fakes and autograd; the public ``routed_swiglu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from libra_kernels.backend import Kernel, KernelTable, always_available, load_triton_kernels
from libra_kernels.ops import routed_linear as linear
from libra_kernels.validation import check_like, check_shape, check_tensor

OP = "routed_swiglu"


def routed_swiglu_ref(gate: torch.Tensor, up: torch.Tensor, n_text: int, w_text: torch.Tensor,
                      w_vision_a: torch.Tensor, w_vision_b: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference: ``routed_linear_ref(silu(gate) * up, n_text, w_text, w_vision_a, w_vision_b)``.
    gate, up [T, inner]; w_text [out, inner]; w_vision_a [r, inner] + w_vision_b [out, r] or w_vision_a [out, inner].
    Returns [T, out] in gate's dtype."""
    return linear.routed_linear_ref(F.silu(gate) * up, n_text, w_text, w_vision_a, w_vision_b)


def _torch_product(gate, up):
    return F.silu(gate) * up


def _torch_product_backward(d_inner, gate, up, need_gate, need_up):
    """(d_gate, d_up) of inner = silu(gate) * up; silu's derivative in ATen's own kernel (float32 internally)."""
    empty = gate.new_empty(0)
    d_up = d_inner * F.silu(gate) if need_up else empty
    d_gate = torch.ops.aten.silu_backward(d_inner * up, gate) if need_gate else empty
    return d_gate, d_up


def _forward_with(product):
    def forward(gate, up, n_text, w_text, w_vision_a, w_vision_b):
        return linear._torch_forward(product(gate, up), n_text, w_text, w_vision_a, w_vision_b)
    return forward


def _backward_with(product, product_backward):
    def backward(grad_y, gate, up, low, n_text, w_text, w_vision_a, w_vision_b, needs):
        need_gate, need_up, need_w_text, need_a, need_b = needs
        inner = product(gate, up)  # recomputed: never kept between forward and backward
        need_inner = need_gate or need_up
        d_inner, d_w_text, d_a, d_b = linear._torch_backward(grad_y, inner, low, n_text, w_text, w_vision_a,
                                                             w_vision_b, (need_inner, need_w_text, need_a, need_b))
        del inner
        empty = gate.new_empty(0)
        d_gate, d_up = product_backward(d_inner, gate, up, need_gate, need_up) if need_inner else (empty, empty)
        return d_gate, d_up, d_w_text, d_a, d_b
    return backward


_triton, _triton_unavailable = load_triton_kernels("libra_kernels.ops.routed_swiglu_triton")


TABLE = KernelTable(OP, auto_order={"cuda": ("triton",)})
TABLE.register("torch", Kernel(_forward_with(_torch_product), _backward_with(_torch_product, _torch_product_backward),
                               always_available))
if _triton is not None:
    TABLE.register("triton", Kernel(_forward_with(_triton.swiglu_product),
                                    _backward_with(_triton.swiglu_product, _triton.swiglu_product_backward),
                                    _triton_unavailable))


@torch.library.custom_op("libra::routed_swiglu", mutates_args=())
def routed_swiglu_op(gate: torch.Tensor, up: torch.Tensor, n_text: int, w_text: torch.Tensor,
                     w_vision_a: torch.Tensor, w_vision_b: torch.Tensor | None, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered operator: (y [T, out], low [T - n_text, r] or [0]) computed by the named backend."""
    return TABLE.get(backend).forward(gate, up, n_text, w_text, w_vision_a, w_vision_b)


@torch.library.custom_op("libra::routed_swiglu_backward", mutates_args=())
def routed_swiglu_backward_op(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                              n_text: int, w_text: torch.Tensor, w_vision_a: torch.Tensor,
                              w_vision_b: torch.Tensor | None, needs: list[bool], backend: str) -> list[torch.Tensor]:
    """Registered backward: the gradients of (gate, up, w_text, w_vision_a, w_vision_b) whose ``needs`` flag is set,
    in that order (the others are left out: outputs of a registered op may not alias each other)."""
    grads = TABLE.get(backend).backward(grad_y, gate, up, low, n_text, w_text, w_vision_a, w_vision_b, tuple(needs))
    return [g for g, need in zip(grads, needs) if need]


@routed_swiglu_op.register_fake
def _fake_forward(gate, up, n_text, w_text, w_vision_a, w_vision_b, backend):
    low = gate.new_empty(0) if w_vision_b is None else gate.new_empty(gate.shape[0] - n_text, w_vision_a.shape[0])
    return gate.new_empty(gate.shape[0], w_text.shape[0]), low


@routed_swiglu_backward_op.register_fake
def _fake_backward(grad_y, gate, up, low, n_text, w_text, w_vision_a, w_vision_b, needs, backend):
    like = (gate, up, w_text, w_vision_a, w_vision_b)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    gate, up, n_text, w_text, w_vision_a, w_vision_b, backend = inputs
    ctx.save_for_backward(gate, up, output[1], w_text, w_vision_a, w_vision_b)
    ctx.n_text, ctx.backend = n_text, backend
    ctx.set_materialize_grads(False)  # low never gets a gradient: no zeros for it


def _backward(ctx, grad_y, _grad_low):
    gate, up, low, w_text, w_vision_a, w_vision_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[3], need[4], w_vision_b is not None and need[5]]
    if grad_y is None or not any(needs):
        return None, None, None, None, None, None, None
    grads = iter(routed_swiglu_backward_op(grad_y.contiguous(), gate, up, low, ctx.n_text, w_text, w_vision_a,
                                           w_vision_b, needs, ctx.backend))
    d_gate, d_up, d_w_text, d_a, d_b = (next(grads) if n else None for n in needs)
    return d_gate, d_up, None, d_w_text, d_a, d_b, None


routed_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def routed_swiglu(gate: torch.Tensor, up: torch.Tensor, n_text: int, w_text: torch.Tensor,
                  w_vision_a: torch.Tensor, w_vision_b: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """``routed_linear(silu(gate) * up, n_text, w_text, w_vision_a, w_vision_b)`` keeping only gate and up.

    Args:
        gate, up: [T, inner] float16/bfloat16/float32/float64 of one dtype and device, rows [0, n_text) text (column
            views of one buffer are fine: nothing is copied).
        n_text: number of text rows.
        w_text: [out, inner]. w_vision_a: [r, inner] with w_vision_b [out, r] (low-rank expert), or w_vision_a
            [out, inner] alone (dense vision weight). All of gate's dtype and device.
        backend: "auto" ("triton" on CUDA, else "torch"), "torch" or "triton".
    Returns:
        [T, out] in gate's dtype. silu and the product are computed in gate's dtype, as LLaMA's MLP does; the
        backward recomputes them. Gradients are computed only for inputs that require them.
    """
    check_tensor(OP, "gate", gate, ndim=2)
    check_tensor(OP, "up", up, ndim=2)
    check_shape(OP, "up", up, tuple(gate.shape), "the shape of gate")
    check_like(OP, "gate", gate, up=up)
    linear._validate(gate, n_text, w_text, w_vision_a, w_vision_b)
    name = TABLE.resolve(backend, gate.device)
    return routed_swiglu_op(gate, up, n_text, w_text, w_vision_a, w_vision_b, name)[0]
