"""Several routed projections of one input in one operator: attention's q, k and v and the two bridge A factors,
each text weight and each vision A factor of the maps side by side in one GEMM per modality.

Map i has ``w_text[i]`` [out_i, in], ``w_vision_a[i]`` [r_i, in] and ``w_vision_b[i]`` [out_i, r_i], or None: then
r_i = out_i and the vision rows output ``x @ w_vision_a[i].T`` (a bridge's A factor, whose B factor the caller
applies to the rank-8 result). The weights stay separate tensors (their own requires_grad, their own checkpoint
names); :func:`pack_rows`, called once after the weights are on their device, moves them into one buffer so the
C++ kernel finds them packed and runs one GEMM per modality. Unpacked weights give the same result with one GEMM
per weight (each still written straight into its column slice). The registered operators take the B factors as a
list of the present ones plus ``has_b`` flags: autograd of a registered op only tracks lists of tensors.

Parts: the reference ``routed_projections_ref``; the "torch" and "cpp" kernels (``torch.ops.libra.
routed_projections_fwd/_bwd``, csrc/routed_projections.cpp); the registered operator ``torch.ops.libra.
routed_projections`` (+ ``_backward``) with fakes and autograd; the public ``routed_projections``; ``pack_rows``.

Unrequested gradients: every registered backward op (``_backward`` here, the C++ ``*_bwd``) returns an empty
[0] tensor, its own, for each gradient not asked for; the autograd formula hands autograd None for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from libra_kernels import _ext
from libra_kernels.backend import Kernel, KernelTable, always_available
from libra_kernels.ops import routed_linear as linear

OP = "routed_projections"


def routed_projections_ref(x: torch.Tensor, n_text: int, w_text: Sequence[torch.Tensor],
                           w_vision_a: Sequence[torch.Tensor], w_vision_b: Sequence[torch.Tensor | None]
                           ) -> list[torch.Tensor]:
    """Pure-PyTorch reference: ``[routed_linear_ref(x, n_text, w_text[i], w_vision_a[i], w_vision_b[i]) ...]``,
    each [T, out_i] in x's dtype."""
    return [linear.routed_linear_ref(x, n_text, t, a, b) for t, a, b in zip(w_text, w_vision_a, w_vision_b)]


def _columns(widths):
    starts = [0]
    for width in widths:
        starts.append(starts[-1] + width)
    return [slice(starts[i], starts[i + 1]) for i in range(len(widths))], starts[-1]


def _with_none(w_vision_b, has_b):
    """The per-map B factors (None where absent) from the listed ones and the has_b flags."""
    given = iter(w_vision_b)
    return [next(given) if has else None for has in has_b]


def _torch_forward(x, n_text, w_text, w_vision_a, w_vision_b, has_b):
    w_vision_b = _with_none(w_vision_b, has_b)
    out_cols, out_total = _columns([w.shape[0] for w in w_text])
    low_cols, low_total = _columns([a.shape[0] for a in w_vision_a])
    y = x.new_empty(x.shape[0], out_total)
    low = x.new_empty(x.shape[0] - n_text, low_total)
    x_text, x_vision = x[:n_text], x[n_text:]
    for t, a, b, oc, lc in zip(w_text, w_vision_a, w_vision_b, out_cols, low_cols):
        torch.mm(x_text, t.T, out=y[:n_text, oc])
        torch.mm(x_vision, a.T, out=low[:, lc])
        if b is None:
            y[n_text:, oc] = low[:, lc]
        else:
            torch.mm(low[:, lc], b.T, out=y[n_text:, oc])
    return y, low


def _torch_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, has_b, need_x, need_w_text, need_a,
                    need_b):
    need_b = _with_none(need_b, has_b)
    w_vision_b = _with_none(w_vision_b, has_b)
    out_cols, _ = _columns([w.shape[0] for w in w_text])
    low_cols, _ = _columns([a.shape[0] for a in w_vision_a])
    dx = torch.zeros_like(x) if need_x else x.new_empty(0)
    d_w_text, d_a, d_b = [], [], []
    for i, (t, a, b) in enumerate(zip(w_text, w_vision_a, w_vision_b)):
        needs = (need_x, need_w_text[i], need_a[i], b is not None and need_b[i])
        low_i = low[:, low_cols[i]] if b is not None else x.new_empty(0)
        grads = linear._torch_backward(grad_y[:, out_cols[i]], x, low_i, n_text, t, a, b, needs)
        if need_x:
            dx += grads[0]
        d_w_text.append(grads[1])
        d_a.append(grads[2])
        if b is not None:
            d_b.append(grads[3])
    return dx, d_w_text, d_a, d_b


TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
TABLE.register("cpp", Kernel(lambda *a: torch.ops.libra.routed_projections_fwd(*a),
                             lambda *a: torch.ops.libra.routed_projections_bwd(*a),
                             _ext.cpp_kernel_unavailable("routed_projections_fwd")))


@torch.library.custom_op("libra::routed_projections", mutates_args=())
def routed_projections_op(x: torch.Tensor, n_text: int, w_text: list[torch.Tensor], w_vision_a: list[torch.Tensor],
                          w_vision_b: list[torch.Tensor], has_b: list[int], backend: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered operator: (y [T, sum out_i], low [T - n_text, sum r_i]) computed by the named backend.
    w_vision_b lists the B factors of the maps with has_b[i] = 1, in map order."""
    return TABLE.get(backend).forward(x, n_text, w_text, w_vision_a, w_vision_b, has_b)


@torch.library.custom_op("libra::routed_projections_backward", mutates_args=())
def routed_projections_backward_op(grad_y: torch.Tensor, x: torch.Tensor, low: torch.Tensor, n_text: int,
                                   w_text: list[torch.Tensor], w_vision_a: list[torch.Tensor],
                                   w_vision_b: list[torch.Tensor], has_b: list[int], need_x: bool,
                                   need_w_text: list[bool], need_w_vision_a: list[bool], need_w_vision_b: list[bool],
                                   backend: str) -> list[torch.Tensor]:
    """Registered backward: [dx, dw_text_i..., dw_vision_a_i..., dw_vision_b_j...] (one per listed B factor); each
    gradient not asked for is an empty [0] tensor (its own: outputs of a registered op may not alias each other)."""
    dx, d_w_text, d_a, d_b = TABLE.get(backend).backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, has_b,
                                                         need_x, need_w_text, need_w_vision_a, need_w_vision_b)
    return [dx, *d_w_text, *d_a, *d_b]


def _fake_forward(x, n_text, w_text, w_vision_a, w_vision_b, has_b, *backend):
    return (x.new_empty(x.shape[0], sum(w.shape[0] for w in w_text)),
            x.new_empty(x.shape[0] - n_text, sum(a.shape[0] for a in w_vision_a)))


def _fake_cpp_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, has_b, need_x, need_w_text, need_a,
                       need_b):
    def grads(weights, needs):
        return [torch.empty_like(w) if n else x.new_empty(0) for w, n in zip(weights, needs)]

    return (torch.empty_like(x) if need_x else x.new_empty(0), grads(w_text, need_w_text), grads(w_vision_a, need_a),
            grads(w_vision_b, need_b))


def _fake_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, has_b, need_x, need_w_text, need_a,
                   need_b, *backend):
    dx, d_w_text, d_a, d_b = _fake_cpp_backward(grad_y, x, low, n_text, w_text, w_vision_a, w_vision_b, has_b, need_x,
                                                need_w_text, need_a, need_b)
    return [dx, *d_w_text, *d_a, *d_b]


torch.library.register_fake("libra::routed_projections")(_fake_forward)
torch.library.register_fake("libra::routed_projections_backward")(_fake_backward)
if _ext.cpp_extension_loaded():
    torch.library.register_fake("libra::routed_projections_fwd")(_fake_forward)
    torch.library.register_fake("libra::routed_projections_bwd")(_fake_cpp_backward)


def _setup_context(ctx, inputs, output):
    x, n_text, w_text, w_vision_a, w_vision_b, has_b, backend = inputs
    ctx.save_for_backward(x, output[1], *w_text, *w_vision_a, *w_vision_b)
    ctx.n_text, ctx.backend, ctx.has_b = n_text, backend, has_b
    ctx.set_materialize_grads(False)  # low never gets a gradient: no zeros for it


def _backward(ctx, grad_y, _grad_low):
    x, low, *weights = ctx.saved_tensors
    maps = len(ctx.has_b)
    w_text, w_vision_a, w_vision_b = weights[:maps], weights[maps:2 * maps], weights[2 * maps:]
    need = ctx.needs_input_grad  # in the backward, a list of flags for each list input
    need_x, need_w_text, need_a, need_b = need[0], list(need[2]), list(need[3]), list(need[4])
    if grad_y is None:
        return None, None, [None] * maps, [None] * maps, [None] * len(w_vision_b), None, None
    grads = iter(routed_projections_backward_op(grad_y.contiguous(), x, low, ctx.n_text, w_text, w_vision_a,
                                                w_vision_b, ctx.has_b, need_x, need_w_text, need_a, need_b,
                                                ctx.backend))

    def take(needs):  # the next len(needs) gradients, None where not asked for (their [0] placeholders)
        return [g if n else None for g, n in zip([next(grads) for _ in needs], needs)]

    dx = take([need_x])[0]
    d_w_text, d_a, d_b = take(need_w_text), take(need_a), take(need_b)
    return dx, None, d_w_text, d_a, d_b, None, None


routed_projections_op.register_autograd(_backward, setup_context=_setup_context)


def routed_projections(x: torch.Tensor, n_text: int, w_text: Sequence[torch.Tensor],
                       w_vision_a: Sequence[torch.Tensor], w_vision_b: Sequence[torch.Tensor | None], *,
                       backend: str = "auto") -> list[torch.Tensor]:
    """Several routed projections of one sorted input, one GEMM per modality for all of them (when packed).

    Args:
        x: [T, in] float16/bfloat16/float32/float64; rows [0, n_text) text, [n_text, T) vision.
        n_text: number of text rows.
        w_text: maps' text weights [out_i, in]. w_vision_a: their vision A factors [r_i, in]. w_vision_b: their
            vision B factors [out_i, r_i], or None for a map whose vision rows output x @ w_vision_a[i].T (then
            r_i = out_i). All of x's dtype and device; :func:`pack_rows` them once for the one-GEMM path.
        backend: "auto" (the C++ op when built, else PyTorch), "torch" or "cpp".
    Returns:
        One [T, out_i] tensor per map in x's dtype: column views of one [T, sum out_i] buffer. Weight gradients are
        computed only for weights that require grad.
    """
    for name, value in (("w_text", w_text), ("w_vision_a", w_vision_a), ("w_vision_b", w_vision_b)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{OP}: {name} must be a list or tuple, got {type(value).__name__}")
    if not w_text or not len(w_text) == len(w_vision_a) == len(w_vision_b):
        raise ValueError(f"{OP}: w_text, w_vision_a and w_vision_b must be non-empty and of one length, got "
                         f"{len(w_text)}, {len(w_vision_a)}, {len(w_vision_b)}")
    for t, a, b in zip(w_text, w_vision_a, w_vision_b):
        linear._validate(x, n_text, t, a, b)
    name = TABLE.resolve(backend, x.device)
    has_b = [int(b is not None) for b in w_vision_b]
    y, _ = routed_projections_op(x, n_text, list(w_text), list(w_vision_a), [b for b in w_vision_b if b is not None],
                                 has_b, name)
    return list(y.split([w.shape[0] for w in w_text], dim=1))


def pack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Move 2-D tensors with one column count (typically parameters) into one contiguous buffer, in place.

    Each tensor's ``.data`` becomes a row block of the returned [sum of rows, columns] buffer, in the given order, so
    :func:`routed_projections` runs one GEMM for all of them. Call it once, after the tensors reached their device
    and dtype (``Module.to`` gives parameters fresh storage, which only costs the fusion, never correctness).
    """
    if not tensors:
        raise ValueError("pack_rows: tensors must not be empty")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise TypeError(f"pack_rows: tensors[{i}] must be a 2-D torch.Tensor")
        if t.shape[1] != first.shape[1] or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"pack_rows: tensors[{i}] must have the columns, dtype and device of tensors[0] "
                             f"({first.shape[1]}, {first.dtype}, {first.device}), got {t.shape[1]}, {t.dtype}, "
                             f"{t.device}")
    with torch.no_grad():
        buffer = torch.cat([t.detach() for t in tensors])
        start = 0
        for t in tensors:
            t.data = buffer[start:start + t.shape[0]]
            start += t.shape[0]
    return buffer
