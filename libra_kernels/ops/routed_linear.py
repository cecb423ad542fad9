"""Routed linear projection on the sorted layout: text rows through the LLaMA weight, vision rows through the
low-rank expert (A then B) or a dense vision weight.

Parts: the reference ``routed_linear_ref``; the "torch" kernel and the "cpp" kernel (``torch.ops.libra.
routed_linear_fwd/_bwd``, csrc/routed_linear.cpp), both GEMMs on the two contiguous row slices written into one
output buffer; the registered operator ``torch.ops.libra.routed_linear`` (+ ``_backward``) with fake
implementations and autograd; the public ``routed_linear``.

The grouped form runs G routed projections with dense vision weights at once (attention's k and v bridge B
factors): x [G, T, in], one text and one vision weight [out, in] per group, y [G, T, out]. Its registered operator
``torch.ops.libra.routed_linear_grouped`` (+ ``_backward``; "cpp": ``routed_linear_grouped_fwd/_bwd``) takes the
weights as lists, so that each stays its own parameter; when :func:`~libra_kernels.pack_rows` has put a list in one
buffer, every product (forward, dX, dW) is one batched GEMM per modality, else one GEMM per group. The weight
gradients of a list come out of one batched GEMM as one [G, out, in] tensor, handed to autograd as its row blocks.

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
    w_vision_a [out, in] alone. Returns [T, out] in x's dtype. Grouped form: x [G, T, in], w_text and w_vision_a
    G weights [out, in] each (a list or a [G, out, in] tensor); returns [G, T, out]."""
    if x.dim() == 3:
        return torch.stack([routed_linear_ref(x[g], n_text, w_text[g], w_vision_a[g]) for g in range(x.shape[0])])
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


def _stacked(weights):
    """The G weights [out, in] as one [G, out, in] view when they are consecutive blocks of one buffer, else None."""
    first = weights[0]
    offset = first.storage_offset()
    for w in weights:
        if (not w.is_contiguous() or w.shape != first.shape or w.storage_offset() != offset
                or w.untyped_storage()._cdata != first.untyped_storage()._cdata):
            return None
        offset += w.numel()
    return first.as_strided((len(weights), *first.shape), (first.numel(), first.shape[1], 1))


def _grouped_mm_into(out, a, weights, transpose):
    """out[g] = a[g] @ w_g.T (transpose) or a[g] @ w_g: one bmm on packed weights, else one mm per group."""
    if a.shape[1] == 0:
        return
    packed = _stacked(weights)
    if packed is not None:
        torch.bmm(a, packed.mT if transpose else packed, out=out)
        return
    for g, w in enumerate(weights):
        torch.mm(a[g], w.T if transpose else w, out=out[g])


def _grouped_weight_grad(dy, inputs):
    """dW[g] = dy[g].T @ inputs[g] for every group, one bmm (zeros for a slice without rows)."""
    if dy.shape[1] == 0:
        return inputs.new_zeros(dy.shape[0], dy.shape[2], inputs.shape[2])
    return torch.bmm(dy.mT, inputs)


def _torch_grouped_forward(x, n_text, w_text, w_vision):
    y = x.new_empty(x.shape[0], x.shape[1], w_text[0].shape[0])
    _grouped_mm_into(y[:, :n_text], x[:, :n_text], w_text, True)
    _grouped_mm_into(y[:, n_text:], x[:, n_text:], w_vision, True)
    return y


def _torch_grouped_backward(grad_y, x, n_text, w_text, w_vision, needs):
    """needs = (x, w_text, w_vision) flags; returns (dx with x's strides, d_w_text, d_w_vision), [0] where not
    needed."""
    need_x, need_w_text, need_w_vision = needs
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    if need_x:
        _grouped_mm_into(dx[:, :n_text], grad_y[:, :n_text], w_text, False)
        _grouped_mm_into(dx[:, n_text:], grad_y[:, n_text:], w_vision, False)
    d_w_text = _grouped_weight_grad(grad_y[:, :n_text], x[:, :n_text]) if need_w_text else x.new_empty(0)
    d_w_vision = _grouped_weight_grad(grad_y[:, n_text:], x[:, n_text:]) if need_w_vision else x.new_empty(0)
    return dx, d_w_text, d_w_vision


TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
TABLE.register("cpp", Kernel(lambda *a: torch.ops.libra.routed_linear_fwd(*a),
                             lambda *a: torch.ops.libra.routed_linear_bwd(*a[:7], list(a[7])),
                             _ext.cpp_kernel_unavailable("routed_linear_fwd")))
# The grouped form's kernels, under the same backend names.
GROUPED_TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
GROUPED_TABLE.register("torch", Kernel(_torch_grouped_forward, _torch_grouped_backward, always_available))
GROUPED_TABLE.register("cpp", Kernel(lambda *a: torch.ops.libra.routed_linear_grouped_fwd(*a),
                                     lambda *a: torch.ops.libra.routed_linear_grouped_bwd(*a[:5], list(a[5])),
                                     _ext.cpp_kernel_unavailable("routed_linear_grouped_fwd")))


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


@torch.library.custom_op("libra::routed_linear_grouped", mutates_args=())
def routed_linear_grouped_op(x: torch.Tensor, n_text: int, w_text: list[torch.Tensor], w_vision: list[torch.Tensor],
                             backend: str) -> torch.Tensor:
    """Registered grouped operator: y [G, T, out] computed by the named backend."""
    return GROUPED_TABLE.get(backend).forward(x, n_text, w_text, w_vision)


@torch.library.custom_op("libra::routed_linear_grouped_backward", mutates_args=())
def routed_linear_grouped_backward_op(grad_y: torch.Tensor, x: torch.Tensor, n_text: int, w_text: list[torch.Tensor],
                                      w_vision: list[torch.Tensor], needs: list[bool], backend: str
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered grouped backward: (dx with x's strides, d_w_text [G, out, in], d_w_vision [G, out, in]); each one
    whose ``needs`` flag is not set is an empty [0] tensor."""
    return GROUPED_TABLE.get(backend).backward(grad_y, x, n_text, w_text, w_vision, tuple(needs))


def _fake_grouped_forward(x, n_text, w_text, w_vision, *backend):
    return x.new_empty(x.shape[0], x.shape[1], w_text[0].shape[0])


def _fake_grouped_backward(grad_y, x, n_text, w_text, w_vision, needs, *backend):
    dx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    weights = [x.new_empty(len(w), *w[0].shape) if need else x.new_empty(0)
               for w, need in ((w_text, needs[1]), (w_vision, needs[2]))]
    return dx, *weights


torch.library.register_fake("libra::routed_linear_grouped")(_fake_grouped_forward)
torch.library.register_fake("libra::routed_linear_grouped_backward")(_fake_grouped_backward)
if _ext.cpp_extension_loaded() and hasattr(torch.ops.libra, "routed_linear_grouped_fwd"):
    torch.library.register_fake("libra::routed_linear_grouped_fwd")(_fake_grouped_forward)
    torch.library.register_fake("libra::routed_linear_grouped_bwd")(_fake_grouped_backward)


def _setup_grouped_context(ctx, inputs, output):
    x, n_text, w_text, w_vision, backend = inputs
    ctx.save_for_backward(x, *w_text, *w_vision)
    ctx.n_text, ctx.backend, ctx.groups = n_text, backend, len(w_text)


def _grouped_backward(ctx, grad_y):
    x, *weights = ctx.saved_tensors
    w_text, w_vision = weights[:ctx.groups], weights[ctx.groups:]
    need = ctx.needs_input_grad  # a list of flags for each list input
    need_text, need_vision = list(need[2]), list(need[3])
    needs = [need[0], any(need_text), any(need_vision)]
    dx, d_w_text, d_w_vision = routed_linear_grouped_backward_op(grad_y.contiguous(), x, ctx.n_text, w_text, w_vision,
                                                                 needs, ctx.backend)

    def blocks(grad, flags):  # each group's gradient: a row block of the batched one, None where not asked for
        return [grad[g] if flag else None for g, flag in enumerate(flags)]

    return (dx if needs[0] else None), None, blocks(d_w_text, need_text), blocks(d_w_vision, need_vision), None


routed_linear_grouped_op.register_autograd(_grouped_backward, setup_context=_setup_grouped_context)


def _validate(x, n_text, w_text, w_vision_a, w_vision_b) -> None:
    check_tensor(OP, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{OP}: x must have 2 dimensions ([T, in]; or 3, [G, T, in], for the grouped form), got "
                         f"shape {tuple(x.shape)}")
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


def _group_weights(name, weights, groups: int, x: torch.Tensor) -> list[torch.Tensor]:
    """The grouped form's ``weights`` (a [G, out, in] tensor or G tensors [out, in]) as a checked list."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 3:
            raise ValueError(f"{OP}: with a 3-D x, {name} must be a [G, out, in] tensor or a list of G [out, in] "
                             f"tensors, got shape {tuple(weights.shape)}")
        weights = list(weights.unbind(0))
    elif isinstance(weights, (list, tuple)):
        weights = list(weights)
    else:
        raise TypeError(f"{OP}: with a 3-D x, {name} must be a [G, out, in] tensor or a list of G [out, in] tensors, "
                        f"got {type(weights).__name__}")
    if len(weights) != groups:
        raise ValueError(f"{OP}: {name} must hold one weight per group (G = x.shape[0] = {groups}), got "
                         f"{len(weights)}")
    for g, w in enumerate(weights):
        check_tensor(OP, f"{name}[{g}]", w, ndim=2)
        check_like(OP, "x", x, **{f"{name}[{g}]": w})
    return weights


def _validate_grouped(x, n_text, w_text, w_vision_a, w_vision_b) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    check_floating(OP, "x", x)
    check_n_text(OP, n_text, x.shape[1])
    if w_vision_b is not None:
        raise ValueError(f"{OP}: the grouped form (x [G, T, in]) takes a dense vision weight per group: w_vision_b "
                         f"must be None (apply a low-rank expert's factors as two calls)")
    groups = x.shape[0]
    w_text, w_vision = _group_weights("w_text", w_text, groups, x), _group_weights("w_vision_a", w_vision_a, groups, x)
    if groups == 0:
        raise ValueError(f"{OP}: the grouped form needs at least one group, got x of shape {tuple(x.shape)}")
    out_features = w_text[0].shape[0]
    for name, weights in (("w_text", w_text), ("w_vision_a", w_vision)):
        for g, w in enumerate(weights):
            check_shape(OP, f"{name}[{g}]", w, (out_features, x.shape[2]),
                        "[out, in] with in = x.shape[2] and the out of w_text[0]")
    return w_text, w_vision


def routed_linear(x: torch.Tensor, n_text: int, w_text, w_vision_a, w_vision_b: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """Routed projection of a sorted residual stream (no bias, as in LLaMA and Libra).

    Args:
        x: [T, in] float16/bfloat16/float32/float64; rows [0, n_text) text, [n_text, T) vision. Or the grouped
            form, [G, T, in] (any strides): G inputs with the same row split, each through its own weights.
        n_text: number of text rows.
        w_text: [out, in]. w_vision_a: [r, in] with w_vision_b [out, r] (low-rank expert, y = (x Aᵀ) Bᵀ),
            or w_vision_a [out, in] alone (dense vision weight). All of x's dtype and device.
            Grouped form: w_text and w_vision_a are each a [G, out, in] tensor or a list of G [out, in] tensors
            (group g's text and dense vision weight; :func:`~libra_kernels.pack_rows` a list once for one batched
            GEMM per modality and product), w_vision_b is None.
        backend: "auto" (the C++ op when built, else PyTorch), "torch" or "cpp".
    Returns:
        y [T, out] in x's dtype; grouped: y [G, T, out] (contiguous). Weight gradients are computed only for weights
        that require grad (grouped: one batched GEMM per list in which any weight requires grad).
    """
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        w_text, w_vision = _validate_grouped(x, n_text, w_text, w_vision_a, w_vision_b)
        name = GROUPED_TABLE.resolve(backend, x.device)
        return routed_linear_grouped_op(x, n_text, w_text, w_vision, name)
    _validate(x, n_text, w_text, w_vision_a, w_vision_b)
    name = TABLE.resolve(backend, x.device)
    return routed_linear_op(x, n_text, w_text, w_vision_a, w_vision_b, name)[0]
