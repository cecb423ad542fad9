"""Routed RMSNorm: LLaMA's RMSNorm with the text weight on rows [0, n_text) and the vision weight on the rest, with
an optional fused residual add (``h = x + residual`` normalised, both returned: what every decoder layer needs).

Parts: the reference ``routed_rms_norm_ref``; the "torch" and "cpp" kernels; the registered operators
``torch.ops.libra.routed_rms_norm`` and ``torch.ops.libra.routed_add_rms_norm`` (+ the shared ``_backward``) with
fake implementations and autograd; the public ``routed_rms_norm``. The C++ kernels are
``torch.ops.libra.routed_rms_norm_fwd``, ``routed_add_rms_norm_fwd`` and ``routed_rms_norm_bwd`` (driver
csrc/routed_rms_norm.cpp: a CPU kernel and one CUDA launch for both groups).

Unrequested gradients: every registered backward op (``_backward`` here, the C++ ``*_bwd``) returns an empty
[0] tensor, its own, for each gradient not asked for; the autograd formula hands autograd None for it.
"""

from __future__ import annotations

import torch

from libra_kernels import _ext
from libra_kernels.backend import Kernel, KernelTable, always_available
from libra_kernels.validation import check_floating, check_like, check_n_text, check_shape, check_tensor

OP = "routed_rms_norm"


def routed_rms_norm_ref(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                        eps: float = 1e-6, residual: torch.Tensor | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference, exactly LLaMA's RMSNorm per group.

    x [T, D], w_text/w_vision [D], residual [T, D] or None, all of one floating dtype. Returns y [T, D] in x's
    dtype, or (y, h) with h = x + residual (an eager add in x's dtype) and y the norm of h when residual is given.
    The mean of squares is taken in float32 (float64 for float64 input), and the normalised row is cast to x's
    dtype before the weight.
    """
    h = x if residual is None else x + residual
    stat = h.to(torch.promote_types(h.dtype, torch.float32))
    normed = (stat * torch.rsqrt(stat.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    y = torch.cat([w_text * normed[:n_text], w_vision * normed[n_text:]])
    return y if residual is None else (y, h)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_forward(x, n_text, w_text, w_vision, eps):
    stat = x.to(_stat_dtype(x.dtype))
    rstd = torch.rsqrt(stat.pow(2).mean(-1) + eps)
    normed = (stat * rstd[:, None]).to(x.dtype)
    y = torch.empty_like(x)
    torch.mul(normed[:n_text], w_text, out=y[:n_text])
    torch.mul(normed[n_text:], w_vision, out=y[n_text:])
    return y, rstd


def _torch_add_forward(x, residual, n_text, w_text, w_vision, eps):
    h = x + residual
    y, rstd = _torch_forward(h, n_text, w_text, w_vision, eps)
    return y, h, rstd


def _torch_backward(grad_y, x, rstd, n_text, w_text, w_vision, need_w_text_grad, need_w_vision_grad, grad_h=None):
    acc = rstd.dtype
    xhat = x.to(acc) * rstd[:, None]
    grad = grad_y.to(acc)
    dxhat = torch.empty_like(grad)
    torch.mul(grad[:n_text], w_text.to(acc), out=dxhat[:n_text])
    torch.mul(grad[n_text:], w_vision.to(acc), out=dxhat[n_text:])
    mean_dot = (dxhat * xhat).mean(-1, keepdim=True)
    dx = rstd[:, None] * (dxhat - xhat * mean_dot)
    if grad_h is not None:
        dx = dx + grad_h.to(acc)
    dw_text = (grad[:n_text] * xhat[:n_text]).sum(0).to(x.dtype) if need_w_text_grad else x.new_empty(0)
    dw_vision = (grad[n_text:] * xhat[n_text:]).sum(0).to(x.dtype) if need_w_vision_grad else x.new_empty(0)
    return dx.to(x.dtype), dw_text, dw_vision


class _Backends(KernelTable):
    """The kernel table, plus the fused-add forward of each backend (``add_forward[name]``)."""

    def __init__(self):
        super().__init__(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
        self.add_forward = {}


TABLE = _Backends()
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
TABLE.add_forward["torch"] = _torch_add_forward
TABLE.register("cpp", Kernel(lambda *a: torch.ops.libra.routed_rms_norm_fwd(*a),
                             lambda *a: torch.ops.libra.routed_rms_norm_bwd(*a),
                             _ext.cpp_kernel_unavailable("routed_add_rms_norm_fwd")))
TABLE.add_forward["cpp"] = lambda *a: torch.ops.libra.routed_add_rms_norm_fwd(*a)


@torch.library.custom_op("libra::routed_rms_norm", mutates_args=())
def routed_rms_norm_op(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor, eps: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered operator: returns (y [T, D], rstd [T] float32/float64) computed by the named backend."""
    return TABLE.get(backend).forward(x, n_text, w_text, w_vision, eps)


@torch.library.custom_op("libra::routed_add_rms_norm", mutates_args=())
def routed_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, n_text: int, w_text: torch.Tensor,
                           w_vision: torch.Tensor, eps: float, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered operator: (y [T, D], h = x + residual [T, D], rstd [T]) computed by the named backend."""
    TABLE.get(backend)  # a clear error for an unknown backend
    return TABLE.add_forward[backend](x, residual, n_text, w_text, w_vision, eps)


@torch.library.custom_op("libra::routed_rms_norm_backward", mutates_args=())
def routed_rms_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, n_text: int,
                                w_text: torch.Tensor, w_vision: torch.Tensor, need_w_text_grad: bool,
                                need_w_vision_grad: bool, backend: str, grad_h: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered backward: (dx [T, D], dw_text [D], dw_vision [D]); a weight gradient not asked for is an empty [0]
    tensor (its own: outputs of a registered op may not alias each other). grad_h [T, D] (the gradient that reached
    the fused sum directly) is added to dx when given."""
    return TABLE.get(backend).backward(grad_y, x, rstd, n_text, w_text, w_vision, need_w_text_grad,
                                       need_w_vision_grad, grad_h)


def _fake_forward(x, n_text, w_text, w_vision, eps, *backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_stat_dtype(x.dtype))


def _fake_add_forward(x, residual, n_text, w_text, w_vision, eps, *backend):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0], dtype=_stat_dtype(x.dtype))


def _fake_backward(grad_y, x, rstd, n_text, w_text, w_vision, need_w_text_grad, need_w_vision_grad, *rest):
    width = x.shape[1]
    return (torch.empty_like(x), x.new_empty(width if need_w_text_grad else 0),
            x.new_empty(width if need_w_vision_grad else 0))


torch.library.register_fake("libra::routed_rms_norm")(_fake_forward)
torch.library.register_fake("libra::routed_add_rms_norm")(_fake_add_forward)
torch.library.register_fake("libra::routed_rms_norm_backward")(_fake_backward)
if _ext.cpp_extension_loaded():
    torch.library.register_fake("libra::routed_rms_norm_fwd")(_fake_forward)
    torch.library.register_fake("libra::routed_add_rms_norm_fwd")(_fake_add_forward)
    torch.library.register_fake("libra::routed_rms_norm_bwd")(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, n_text, w_text, w_vision, _eps, backend = inputs
    ctx.save_for_backward(x, output[1], w_text, w_vision)
    ctx.n_text, ctx.backend = n_text, backend


def _backward(ctx, grad_y, _grad_rstd):
    x, rstd, w_text, w_vision = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw_text, dw_vision = routed_rms_norm_backward_op(grad_y, x, rstd, ctx.n_text, w_text, w_vision, need[2],
                                                         need[3], ctx.backend)
    dw_text, dw_vision = (g if n else None for g, n in ((dw_text, need[2]), (dw_vision, need[3])))
    return dx, None, dw_text, dw_vision, None, None


routed_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _add_setup_context(ctx, inputs, output):
    _x, _residual, n_text, w_text, w_vision, _eps, backend = inputs
    _y, h, rstd = output
    # h is what was normalised; it is also the new residual stream, so saving it costs no extra memory.
    ctx.save_for_backward(h, rstd, w_text, w_vision)
    ctx.n_text, ctx.backend = n_text, backend
    # Either output may reach the loss alone; a missing gradient is skipped instead of materialised as zeros.
    ctx.set_materialize_grads(False)


def _add_backward(ctx, grad_y, grad_h, _grad_rstd):
    h, rstd, w_text, w_vision = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w_text, need_w_vision = need[3], need[4]
    if grad_y is None:
        if grad_h is None:
            return (None,) * 7
        grad_y = torch.zeros_like(h)
    dh, dw_text, dw_vision = routed_rms_norm_backward_op(grad_y, h, rstd, ctx.n_text, w_text, w_vision, need_w_text,
                                                         need_w_vision, ctx.backend, grad_h)
    dw_text, dw_vision = (g if n else None for g, n in ((dw_text, need_w_text), (dw_vision, need_w_vision)))
    # d(x + residual)/dx = d/d(residual) = identity: both inputs receive dh.
    return dh if need[0] else None, dh if need[1] else None, None, dw_text, dw_vision, None, None


routed_add_rms_norm_op.register_autograd(_add_backward, setup_context=_add_setup_context)


def _validate(x, n_text, w_text, w_vision, eps, residual) -> None:
    check_tensor(OP, "x", x, ndim=2)
    check_floating(OP, "x", x)
    check_n_text(OP, n_text, x.shape[0])
    for name, weight in (("w_text", w_text), ("w_vision", w_vision)):
        check_tensor(OP, name, weight)
        check_shape(OP, name, weight, (x.shape[1],), "the hidden size of x")
    if residual is not None:
        check_tensor(OP, "residual", residual)
        check_shape(OP, "residual", residual, tuple(x.shape), "the shape of x")
    check_like(OP, "x", x, w_text=w_text, w_vision=w_vision, residual=residual)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{OP}: eps must be a positive number, got {eps!r}")


def routed_rms_norm(x: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor, eps: float = 1e-6,
                    residual: torch.Tensor | None = None, *, backend: str = "auto"
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed RMSNorm of a sorted residual stream, optionally fused with the residual add before it.

    Args:
        x: [T, D] float16/bfloat16/float32/float64; rows [0, n_text) are text, [n_text, T) vision.
        n_text: number of text rows.
        w_text, w_vision: [D], the dtype of x.
        eps: added to the mean of squares (LLaMA-2 / Libra use 1e-6).
        residual: None, or [T, D] of x's dtype: then h = x + residual is normalised.
        backend: "auto" (C++ kernel when built, else PyTorch), "torch" or "cpp".
    Returns:
        y [T, D] in x's dtype without residual; (y, h) with h = x + residual [T, D] (the new residual stream) with
        it. Statistics are float32 (float64 for float64 input).
    """
    _validate(x, n_text, w_text, w_vision, eps, residual)
    name = TABLE.resolve(backend, x.device)
    if residual is None:
        return routed_rms_norm_op(x, n_text, w_text, w_vision, float(eps), name)[0]
    y, h, _ = routed_add_rms_norm_op(x, residual, n_text, w_text, w_vision, float(eps), name)
    return y, h
