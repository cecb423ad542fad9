"""Routed linear projection on the sorted layout: text rows through the LLaMA weight, vision rows through the
low-rank expert (A then B) or a dense vision weight.

Parts: the reference ``routed_linear_ref``; the "torch" kernel and the "cpp" kernel (``torch.ops.libra.
routed_linear_fwd/_bwd``, csrc/routed_linear.cpp), both GEMMs on the two contiguous row slices written into one
output buffer; the registered operator ``torch.ops.libra.routed_linear`` (+ ``_backward``) with fake
implementations and autograd; the public ``routed_linear``.

The forward returns the rank-r activation ``low = x[n_text:] @ w_vision_a.T`` beside y, so the gradient of
w_vision_b needs no recomputation (the same GEMM count as autograd over plain matmuls).

Unrequested gradients: every registered backward op (``_backward`` here, the C++ ``*_bwd``) returns an empty
[0] tensor, its own, for each gradient not asked for; the autograd formula hands autograd None for it.
"""

from __future__ import annotations

import torch

from libra_kernels import _ext
from libra_kernels.backend import Kernel, KernelTable, always_available
from libra_kernels.validation import check_floating, check_like, check_n_text, check_shape, check_tensor

OP = "routed_linear"


def routed_linear_ref(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision_a: torch.Tensor,
                      w_vision_b: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference. x [T, in]; w_text [out, in]; w_vision_a [r, in] and w_vision_b [out, r], or
    w_vision_a [out, in] alone. Returns [T, out] in x's dtype."""
    vision = x[n_text:] @ w_vision_a.T
    if w_vision_b is not None:
        vision = vision @ w_vision_b.T
    return torch.cat([x[:n_text] @ w_text.T, vision])


def _torch_forward(x, n_text, w_text, w_vision_a, w_vision_b):
    y = x.new_empty(x.shape[0], w_text.shape[0])
    torch.mm(x[:n_text], w_text.T, out=y[:n_text])
    if w_vision_b is None:
        torch.mm(x[n_text:], w_vision_a.T, out=y[n_text:])
        return y, x.new_empty(0)
    low = x[n_text:] @ w_vision_a.T
    torch.mm(low, w_vision_b.T, out=y[n_text:])
    return y, low


def _torch_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, needs):
    """needs = (x, w_text, w_vision_a, w_vision_b) flags; returns the four gradients, a fresh [0] tensor for each one
    not needed."""
    need_x, need_w_text, need_a, need_b = needs
    dy_text, dy_vision = grad_y[:n_text], grad_y[n_text:]
    x_text, x_vision = x[:n_text], x[n_text:]
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    if need_x:
        torch.mm(dy_text, w_text, out=dx[:n_text])
    d_w_text = dy_text.T @ x_text if need_w_text else x.new_empty(0)
    if w_vision_b is None:
        if need_x:
            torch.mm(dy_vision, w_vision_a, out=dx[n_text:])
        d_a = dy_vision.T @ x_vision if need_a else x.new_empty(0)
        return dx, d_w_text, d_a, x.new_empty(0)
    d_b = dy_vision.T @ low if need_b else x.new_empty(0)
    if not (need_x or need_a):
        return dx, d_w_text, x.new_empty(0), d_b
    d_low = dy_vision @ w_vision_b  # gradient of the rank-r activation
    if need_x:
        torch.mm(d_low, w_vision_a, out=dx[n_text:])
    d_a = d_low.T @ x_vision if need_a else x.new_empty(0)
    return dx, d_w_text, d_a, d_b


TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
TABLE.register("cpp", Kernel(lambda *a: torch.ops.libra.routed_linear_fwd(*a),
                             lambda *a: torch.ops.libra.routed_linear_bwd(*a[:7], list(a[7])),
                             _ext.cpp_kernel_unavailable("routed_linear_fwd")))


@torch.library.custom_op("libra::routed_linear", mutates_args=())
def routed_linear_op(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision_a: torch.Tensor,
                     w_vision_b: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered operator: (y [T, out], low [T - n_text, r] or [0]) computed by the named backend."""
    return TABLE.get(backend).forward(x, n_text, w_text, w_vision_a, w_vision_b)


@torch.library.custom_op("libra::routed_linear_backward", mutates_args=())
def routed_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, low: torch.Tensor, n_text: int,
                              w_text: torch.Tensor, w_vision_a: torch.Tensor, w_vision_b: torch.Tensor | None,
                              needs: list[bool], backend: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered backward: the gradients of (x, w_text, w_vision_a, w_vision_b); each one whose ``needs`` flag is
    not set is an empty [0] tensor (its own: outputs of a registered op may not alias each other)."""
    return TABLE.get(backend).backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, tuple(needs))


def _fake_forward(x, n_text, w_text, w_vision_a, w_vision_b, *backend):
    low = x.new_empty(0) if w_vision_b is None else x.new_empty(x.shape[0] - n_text, w_vision_a.shape[0])
    return x.new_empty(x.shape[0], w_text.shape[0]), low


def _fake_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, needs, *backend):
    like = (x, w_text, w_vision_a, w_vision_b)
    return tuple(torch.empty_like(t) if need and t is not None else x.new_empty(0) for t, need in zip(like, needs))


torch.library.register_fake("libra::routed_linear")(_fake_forward)
torch.library.register_fake("libra::routed_linear_backward")(_fake_backward)
if _ext.cpp_extension_loaded():
    torch.library.register_fake("libra::routed_linear_fwd")(_fake_forward)
    torch.library.register_fake("libra::routed_linear_bwd")(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, n_text, w_text, w_vision_a, w_vision_b, backend = inputs
    ctx.save_for_backward(x, output[1], w_text, w_vision_a, w_vision_b)
    ctx.n_text, ctx.backend = n_text, backend
    # The rank-r activation is an internal output that never gets a gradient: do not allocate zeros for it.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_low):
    x, low, w_text, w_vision_a, w_vision_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[2], need[3], w_vision_b is not None and need[4]]
    if grad_y is None:
        return None, None, None, None, None, None
    grads = routed_linear_backward_op(grad_y.contiguous(), x, low, ctx.n_text, w_text, w_vision_a, w_vision_b, needs,
                                      ctx.backend)
    dx, d_w_text, d_a, d_b = (g if n else None for g, n in zip(grads, needs))
    return dx, None, d_w_text, d_a, d_b, None


routed_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, n_text, w_text, w_vision_a, w_vision_b) -> None:
    check_tensor(OP, "x", x, ndim=2)
    check_floating(OP, "x", x)
    check_n_text(OP, n_text, x.shape[0])
    check_tensor(OP, "w_text", w_text, ndim=2)
    check_shape(OP, "w_text", w_text, (None, x.shape[1]), "[out, in] with in = x.shape[1]")
    check_tensor(OP, "w_vision_a", w_vision_a, ndim=2)
    out_features = w_text.shape[0]
    if w_vision_b is None:
        check_shape(OP, "w_vision_a", w_vision_a, (out_features, x.shape[1]), "[out, in] when w_vision_b is None")
    else:
        check_tensor(OP, "w_vision_b", w_vision_b, ndim=2)
        check_shape(OP, "w_vision_a", w_vision_a, (None, x.shape[1]), "[r, in]")
        check_shape(OP, "w_vision_b", w_vision_b, (out_features, w_vision_a.shape[0]), "[out, r]")
    check_like(OP, "x", x, w_text=w_text, w_vision_a=w_vision_a, w_vision_b=w_vision_b)


def routed_linear(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision_a: torch.Tensor,
                  w_vision_b: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Routed projection of a sorted residual stream (no bias, as in LLaMA and Libra).

    Args:
        x: [T, in] float16/bfloat16/float32/float64; rows [0, n_text) text, [n_text, T) vision.
        n_text: number of text rows.
        w_text: [out, in]. w_vision_a: [r, in] with w_vision_b [out, r] (low-rank expert, y = (x Aᵀ) Bᵀ),
            or w_vision_a [out, in] alone (dense vision weight). All of x's dtype and device.
        backend: "auto" (the C++ op when built, else PyTorch), "torch" or "cpp".
    Returns:
        y [T, out] in x's dtype. Weight gradients are computed only for weights that require grad.
    """
    _validate(x, n_text, w_text, w_vision_a, w_vision_b)
    name = TABLE.resolve(backend, x.device)
    return routed_linear_op(x, n_text, w_text, w_vision_a, w_vision_b, name)[0]
