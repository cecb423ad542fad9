"""Rotary position embedding (LLaMA's rotate-half form) of attention's q, k and key bridge term in one operator.

For x [B, N, h, d] and tables cos, sin [B, N, 1|h, d] (halves x1, x2 of the last dimension):
    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1].
The backward is the transposed map, dx = dy * cos - rotate_half(dy * sin) (exact for any tables; with LLaMA's
tables, whose two halves are equal, it is the rotation by the opposite angle).

Parts: the reference ``rotary_ref``; the "torch" kernel (ATen ops, one tensor at a time); the "triton" kernel (the
three tensors in one launch forward and one backward, a program per token reading its table row once; unverified
on GPU); the registered operator ``torch.ops.libra.rotary`` (+ ``_backward``) with fakes and autograd; the public
``rotary``.
"""

from __future__ import annotations

import torch

from libra_kernels.backend import Kernel, KernelTable, always_available, load_triton_kernels
from libra_kernels.validation import check_floating, check_like, check_tensor

OP = "rotary"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_ref(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    """Pure-PyTorch reference: ``[x * cos + rotate_half(x) * sin for x in xs]`` in each x's dtype."""
    return [x * cos + _rotate_half(x) * sin for x in xs]


def _torch_forward(xs, cos, sin):
    return [x * cos + _rotate_half(x) * sin for x in xs]


def _torch_backward(grads, cos, sin):
    return [g * cos - _rotate_half(g * sin) for g in grads]


_triton, _triton_unavailable = load_triton_kernels("libra_kernels.ops.rotary_triton")


def _triton_rotate(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> list[torch.Tensor]:
    # The kernel computes in float32 and takes at most MAX_TENSORS tensors: float64 and longer lists use ATen.
    if xs[0].dtype == torch.float64 or len(xs) > _triton.MAX_TENSORS:
        return (_torch_backward if inverse else _torch_forward)(xs, cos, sin)
    return _triton.rotate(xs, cos, sin, inverse)


TABLE = KernelTable(OP, auto_order={"cuda": ("triton",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
if _triton is not None:
    TABLE.register("triton", Kernel(lambda xs, cos, sin: _triton_rotate(xs, cos, sin, inverse=False),
                                    lambda grads, cos, sin: _triton_rotate(grads, cos, sin, inverse=True),
                                    _triton_unavailable))


@torch.library.custom_op("libra::rotary", mutates_args=())
def rotary_op(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, backend: str) -> list[torch.Tensor]:
    """Registered operator: the rotated tensors (contiguous, each x's shape and dtype)."""
    return TABLE.get(backend).forward(xs, cos, sin)


@torch.library.custom_op("libra::rotary_backward", mutates_args=())
def rotary_backward_op(grads: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, backend: str
                       ) -> list[torch.Tensor]:
    """Registered backward: the gradient of each input from the gradient of its output."""
    return TABLE.get(backend).backward(grads, cos, sin)


@rotary_op.register_fake
def _fake_forward(xs, cos, sin, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


@rotary_backward_op.register_fake
def _fake_backward(grads, cos, sin, backend):
    return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]


def _setup_context(ctx, inputs, output):
    xs, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)  # the map is linear in x: only the tables are kept
    ctx.backend, ctx.count = backend, len(xs)


def _backward(ctx, grads):
    cos, sin = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[0])
    wanted = [g for g, need in zip(grads, needs) if need and g is not None]
    if not wanted:
        return [None] * ctx.count, None, None, None
    computed = iter(rotary_backward_op([g.contiguous() for g in wanted], cos, sin, ctx.backend))
    return [next(computed) if need and g is not None else None for g, need in zip(grads, needs)], None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)


def rotary(xs: list[torch.Tensor] | tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, *,
           backend: str = "auto") -> list[torch.Tensor]:
    """Rotate every tensor of ``xs`` by the RoPE tables, in one operator.

    Args:
        xs: tensors [B, N, h_i, d] of one dtype and device (attention's q, k and k_bridge; h_i may differ).
        cos, sin: [B, N, 1, d] (shared by the heads) or [B, N, h, d] with h equal to every h_i (Libra's 2d RoPE),
            d even; the dtype of xs.
        backend: "auto" ("triton" on CUDA, else "torch"), "torch" or "triton".
    Returns:
        The rotated tensors, contiguous, in xs's dtype (products in that dtype for "torch", float32 arithmetic
        rounded once for "triton"). The backward keeps only the tables.
    """
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"{OP}: xs must be a non-empty list or tuple of tensors")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(OP, name, t, ndim=4)
    if cos.shape != sin.shape or cos.shape[-1] % 2:
        raise ValueError(f"{OP}: cos and sin must have one shape [B, N, 1|h, d] with d even, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    for i, x in enumerate(xs):
        check_tensor(OP, f"xs[{i}]", x, ndim=4)
        check_floating(OP, f"xs[{i}]", x)
        check_like(OP, "xs[0]", xs[0], **{f"xs[{i}]": x, "cos": cos, "sin": sin})
        batch, length, heads, dim = x.shape
        if (cos.shape[0], cos.shape[1], cos.shape[3]) != (batch, length, dim) or cos.shape[2] not in (1, heads):
            raise ValueError(f"{OP}: xs[{i}] {tuple(x.shape)} does not match the tables {tuple(cos.shape)}: they "
                             f"must be [B, N, 1, d] or [B, N, h, d] with x's B, N, d (and h)")
    name = TABLE.resolve(backend, xs[0].device)
    return rotary_op(list(xs), cos, sin, name)
