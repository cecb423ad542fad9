"""Discrete-token softmax: Libra's next-token cross-entropy over the text vocabulary (text rows) and over each
visual codebook (vision rows), on the sorted final hidden states (docs/model.md, the loss; docs/operators.md).

Labels live in Libra's combined id space: text ids in [0, V), codebook ids in [V, V + Vv), or ignore_index.
Text row r uses the text head with target labels[0, r] (equal in every codebook row); vision row r of codebook c
uses head c with target labels[c, r] - V. Per-element losses form a [C, T] grid in which a text row's loss
appears once per codebook (as in the reference's [C, B, N, V + Vv] logits with -inf padding).
    "mean": (1/C) Σ_c (Σ valid losses of codebook row c) / (number of valid targets of row c)  (Libra's loss;
            a codebook row with no valid target contributes 0)
    "sum":  Σ over the whole valid grid;   "none": the [C, T] grid, 0 at ignored targets.
Options, on both groups: ``label_smoothing`` eps spreads eps of the target mass uniformly over the row's own
vocabulary (V for text rows, Vv for vision rows: the -inf entries of the concatenated logits get none), and
``z_loss_weight`` w adds w·logsumexp² per valid target (returned separately, detached, by ``return_z_loss``).

The "cpp" backend is the fused C++/CUDA operator ``torch.ops.libra.linear_cross_entropy``
(csrc/linear_cross_entropy.cpp), called once for the text head and once for all codebook heads side by side, so text
rows are computed once however many codebooks there are. It never materialises the logits: row chunks of logits by
GEMM, a row kernel for the loss and the logit gradient (written in place), dh and dW by GEMM; the chunk budget is
documented in that file. The gradients are produced in the forward pass for grad_output = 1 and the backward only
scales them by grad_output, in place unless the graph is retained for another backward. For reduction="none"
grad_output is one weight per element, which the forward cannot know: that forward computes only the loss and the
log-sum-exp, and the backward runs the kernel again with the saved log-sum-exp (one more logits GEMM, no second
softmax pass).

Vocab parallelism (``process_group``): w_text is this rank's shard, rows [rank·V/tp, (rank+1)·V/tp) of the text
head; vision heads are replicated. The protocol (two all-reduces of the text rows' statistics, the kernel again with
the global log-sum-exp for the gradients, an all-reduce of the text rows' partial dh; the "torch" backend
all-gathers the text head) is in libra_kernels/ops/vocab_parallel.py. Every rank gets the full loss, the full dh,
its shard's dW and the full (identical) vision dW.

Parts: the reference ``discrete_token_cross_entropy_ref``; the "torch" and "cpp" kernels; the registered operator
``torch.ops.libra.discrete_token_cross_entropy`` (+ ``_backward``) with fake implementations and autograd; the
public ``discrete_token_cross_entropy``.

Non-finite values and layouts: as in ``torch.nn.functional.cross_entropy``, a row whose target is ignore_index
contributes nothing to the loss, NaN or inf in its logits or not, and its logits get an exact 0 gradient (so the
row's dh is 0); dW = dlogitsᵀ·h is a GEMM, so a NaN in h still reaches dW there, on every backend alike. Every
backend takes strided (non-contiguous) inputs; an empty h (T = 0) gives a 0 loss ("mean"/"sum"), an empty
[C, 0] grid ("none") and zero gradients.

Unrequested gradients: the registered ops (the operator's gradients for grad_output = 1, ``_backward``, and the
C++ ``linear_cross_entropy``'s dW) return an empty [0] tensor, its own, for each gradient not asked for; the
autograd formula hands autograd None for it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from libra_kernels import _ext
from libra_kernels.backend import Kernel, KernelTable, always_available
from libra_kernels.ops import vocab_parallel as vp
from libra_kernels.validation import check_floating, check_like, check_n_text, check_shape, check_tensor

OP = "discrete_token_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


class _Options(NamedTuple):
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss_weight: float
    chunk_elements: int  # 0: the C++ default budget
    group_name: str  # "": no vocab parallelism


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ---- reference


def _ref_head(logits, target, valid, label_smoothing, z_loss_weight, stat):
    """Loss (with z-loss) and z-loss of each row of one head; 0 at invalid rows."""
    logits = logits.to(stat)
    loss = F.cross_entropy(logits, target.where(valid, 0), reduction="none", label_smoothing=label_smoothing)
    z = z_loss_weight * logits.logsumexp(-1).square()
    # torch.where, not a product: an ignored row adds nothing even when its logits are NaN or inf.
    return torch.where(valid, loss + z, 0), torch.where(valid, z, 0)


def discrete_token_cross_entropy_ref(h, n_text, w_text, w_vision, labels, *, ignore_index=-100, reduction="mean",
                                     label_smoothing=0.0, z_loss_weight=0.0, return_z_loss=False):
    """Pure-PyTorch reference (differentiable by autograd). h [T, hidden]; w_text [V, hidden];
    w_vision [C, Vv, hidden]; labels int64 [C, T]. Logits are computed in h's dtype and soft-maxed in float32
    (float64 for float64 input); the loss has that statistics dtype. With ``return_z_loss`` returns
    (loss, z_loss), z_loss being the z-loss part of loss under the same reduction."""
    stat = _loss_dtype(h.dtype)
    vocab = w_text.shape[0]
    valid = labels != ignore_index
    text_loss, text_z = _ref_head(h[:n_text] @ w_text.T, labels[0, :n_text], valid[0, :n_text], label_smoothing,
                                  z_loss_weight, stat)
    losses, zs = [], []
    for c in range(w_vision.shape[0]):
        loss, z = _ref_head(h[n_text:] @ w_vision[c].T, labels[c, n_text:] - vocab, valid[c, n_text:],
                            label_smoothing, z_loss_weight, stat)
        losses.append(torch.cat([text_loss, loss]))
        zs.append(torch.cat([text_z, z]))
    loss = _reduce(torch.stack(losses), valid, reduction)
    return (loss, _reduce(torch.stack(zs), valid, reduction)) if return_z_loss else loss


def _reduce(grid, valid, reduction):
    if reduction == "none":
        return grid
    if reduction == "sum":
        return grid.sum()
    return (grid.sum(1) / valid.sum(1).clamp(min=1)).mean()


def _codebook_weights(valid, reduction, stat):
    """d loss / d element of each codebook row of the grid for grad_output = 1 ("mean" / "sum"), [C]."""
    codebooks = valid.shape[0]
    if reduction == "sum":
        return torch.ones(codebooks, dtype=stat, device=valid.device)
    return 1 / (codebooks * valid.sum(1).clamp(min=1).to(stat))


# ---- "torch" backend: the reference formulas with an explicit backward


def _torch_logit_grad(logits, target, valid, weight, opts, stat):
    """Gradient of Σ_r weight[r]·loss[r] with respect to the logits [n, K] of one head."""
    z = logits.to(stat)
    lse = z.logsumexp(-1, keepdim=True)
    grad = (z - lse).exp() * (1 + 2 * opts.z_loss_weight * lse) - opts.label_smoothing / z.shape[-1]
    grad[torch.arange(len(target), device=z.device), target.where(valid, 0)] -= 1 - opts.label_smoothing
    # An ignored row's gradient is an exact 0, also when its logits are NaN or inf (a product would give NaN).
    return torch.where(valid[:, None], grad * weight[:, None], 0)


def _torch_grads(h, n_text, w_text, w_vision, labels, weights, needs, opts):
    """Gradients of Σ weights·grid (weights [C, T]) for the full (unsharded) text head: (dh, dw_text, dw_vision),
    [0] tensors where not needed."""
    need_h, need_w_text, need_w_vision = needs
    stat = _loss_dtype(h.dtype)
    vocab = w_text.shape[0]
    valid = labels != opts.ignore_index
    h_text, h_vision = h[:n_text].to(stat), h[n_text:].to(stat)
    dh = torch.zeros(h.shape, dtype=stat, device=h.device)
    # A text row's loss appears in every codebook row of the grid: its logits gradient sums their weights.
    d_text = _torch_logit_grad(h[:n_text] @ w_text.T, labels[0, :n_text], valid[0, :n_text],
                               weights[:, :n_text].sum(0), opts, stat)
    dh[:n_text] = d_text @ w_text.to(stat)
    d_w_text = (d_text.T @ h_text).to(w_text.dtype) if need_w_text else h.new_empty(0)
    d_w_vision = torch.zeros(w_vision.shape, dtype=stat, device=h.device)
    for c in range(w_vision.shape[0]):
        d_vision = _torch_logit_grad(h[n_text:] @ w_vision[c].T, labels[c, n_text:] - vocab, valid[c, n_text:],
                                     weights[c, n_text:], opts, stat)
        dh[n_text:] += d_vision @ w_vision[c].to(stat)
        d_w_vision[c] = d_vision.T @ h_vision
    return (dh.to(h.dtype) if need_h else h.new_empty(0), d_w_text,
            d_w_vision.to(w_vision.dtype) if need_w_vision else h.new_empty(0))


def _torch_lse(h, n_text, w_text, w_vision, stat):
    codebooks = w_vision.shape[0]
    text = (h[:n_text] @ w_text.T).to(stat).logsumexp(-1).expand(codebooks, -1)
    vision = torch.einsum("td,cvd->ctv", h[n_text:], w_vision).to(stat).logsumexp(-1)
    return torch.cat([text, vision], 1)


def _torch_forward(h, n_text, w_text, w_vision, labels, needs, opts):
    group = vp.resolve_group(opts.group_name)
    w_full = vp.gather_rows(w_text, group)
    stat = _loss_dtype(h.dtype)
    with torch.no_grad():
        loss, z_loss = discrete_token_cross_entropy_ref(
            h, n_text, w_full, w_vision, labels, ignore_index=opts.ignore_index, reduction=opts.reduction,
            label_smoothing=opts.label_smoothing, z_loss_weight=opts.z_loss_weight, return_z_loss=True)
        lse = _torch_lse(h, n_text, w_full, w_vision, stat)
        grads = (h.new_empty(0), h.new_empty(0), h.new_empty(0))
        if opts.reduction != "none" and any(needs):
            valid = labels != opts.ignore_index
            weights = _codebook_weights(valid, opts.reduction, stat)[:, None].expand(labels.shape)
            dh, d_w_text, d_w_vision = _torch_grads(h, n_text, w_full, w_vision, labels, weights, needs, opts)
            grads = (dh, vp.own_rows(d_w_text, w_text.shape[0], group), d_w_vision)
    return (loss, z_loss, *grads, lse)


def _torch_backward(grad_out, h, n_text, w_text, w_vision, labels, lse, needs, opts):
    group = vp.resolve_group(opts.group_name)
    with torch.no_grad():
        dh, d_w_text, d_w_vision = _torch_grads(h, n_text, vp.gather_rows(w_text, group), w_vision, labels,
                                                grad_out.to(_loss_dtype(h.dtype)), needs, opts)
    return dh, vp.own_rows(d_w_text, w_text.shape[0], group), d_w_vision


# ---- "cpp" backend: the fused C++/CUDA operator, once per head


def _cpp_head(h, weight, labels, row_weights, lse, dh, label_offset, vocab, need_dw, opts):
    """torch.ops.libra.linear_cross_entropy on one head: (loss [S, n], stats [3, S, n], dW [S, K, hidden] or [0])."""
    return torch.ops.libra.linear_cross_entropy(h, weight, labels, row_weights, lse, dh, label_offset,
                                                opts.ignore_index, vocab, opts.label_smoothing, opts.z_loss_weight,
                                                need_dw, opts.chunk_elements)


def _cpp_text_head(h, w_text, labels, row_weights, dh, need_dw, opts):
    """The text head, vocab-parallel when opts names a group: (loss [1, n], lse [1, n], dW [1, V/tp, hidden])."""
    group = vp.resolve_group(opts.group_name)
    if group is None:
        loss, stats, d_w = _cpp_head(h, w_text[None], labels, row_weights, None, dh, 0, w_text.shape[0], need_dw,
                                     opts)
        return loss, stats[0], d_w
    vocab, start = vp.full_vocab(w_text, group), vp.shard_start(w_text, group)
    no = h.new_empty(0)
    _, stats, _ = _cpp_head(h, w_text[None], labels, no, None, no, start, vocab, False, opts)
    loss, lse = vp.combine_text_statistics(stats[:, 0], labels[0] != opts.ignore_index, vocab, opts.label_smoothing,
                                           opts.z_loss_weight, group)
    d_w = no
    if dh.dim() == 2 or need_dw:
        _, _, d_w = _cpp_head(h, w_text[None], labels, row_weights, lse[None], dh, start, vocab, need_dw, opts)
        if dh.dim() == 2:
            vp.all_reduce_partial(dh, group)
    return loss[None], lse[None], d_w


def _combine(text, vision, valid, reduction):
    """Reduce the text part [1, n_text] (one value per text row, counted once per codebook) and the vision part
    [C, n_vision] of the grid like ``_reduce`` does with the whole grid."""
    codebooks = vision.shape[0]
    if reduction == "none":
        return torch.cat([text.expand(codebooks, -1), vision], 1)
    if reduction == "sum":
        return text.sum() * codebooks + vision.sum()
    return ((text.sum() + vision.sum(1)) / valid.sum(1).clamp(min=1)).mean()


def _cpp_forward(h, n_text, w_text, w_vision, labels, needs, opts):
    # The kernel writes dh in h's layout and needs it dense: a strided h (a transpose, a slice) is copied once.
    h = h.contiguous()
    stat = _loss_dtype(h.dtype)
    group = vp.resolve_group(opts.group_name)
    codebooks, vision_vocab = w_vision.shape[:2]
    vocab = vp.full_vocab(w_text, group)
    valid = labels != opts.ignore_index
    no = h.new_empty(0)
    grads_now = opts.reduction != "none" and any(needs)
    need_h, need_w_text, need_w_vision = needs if grads_now else (False, False, False)
    text_weights = vision_weights = no.to(stat)
    if grads_now:
        per_codebook = _codebook_weights(valid, opts.reduction, stat)
        text_weights = per_codebook.sum().expand(1, n_text)
        vision_weights = per_codebook[:, None].expand(codebooks, h.shape[0] - n_text)
    dh = torch.empty_like(h) if need_h else no
    vision_loss, vision_stats, d_w_vision = _cpp_head(
        h[n_text:], w_vision, labels[:, n_text:], vision_weights, None, dh[n_text:] if need_h else no, vocab,
        vision_vocab, need_w_vision, opts)
    text_loss, text_lse, d_w_text = _cpp_text_head(h[:n_text], w_text, labels[:1, :n_text], text_weights,
                                                   dh[:n_text] if need_h else no, need_w_text, opts)
    loss = _combine(text_loss, vision_loss, valid, opts.reduction)
    vision_lse = vision_stats[0]
    if opts.z_loss_weight:
        z = lambda lse, ok: torch.where(ok, opts.z_loss_weight * lse.square(), 0)
        z_loss = _combine(z(text_lse, valid[:1, :n_text]), z(vision_lse, valid[:, n_text:]), valid, opts.reduction)
    else:
        z_loss = torch.zeros_like(loss)
    lse = torch.cat([text_lse.expand(codebooks, -1), vision_lse], 1)
    return loss, z_loss, dh, d_w_text.view(w_text.shape) if need_w_text else h.new_empty(0), d_w_vision, lse


def _cpp_backward(grad_out, h, n_text, w_text, w_vision, labels, lse, needs, opts):
    h = h.contiguous()
    stat = _loss_dtype(h.dtype)
    group = vp.resolve_group(opts.group_name)
    need_h, need_w_text, need_w_vision = needs
    vocab = vp.full_vocab(w_text, group)
    weights = grad_out.to(stat)
    no = h.new_empty(0)
    dh = torch.empty_like(h) if need_h else no
    d_w_vision = d_w_text = no
    if need_h or need_w_vision:
        _, _, d_w_vision = _cpp_head(h[n_text:], w_vision, labels[:, n_text:], weights[:, n_text:], lse[:, n_text:],
                                     dh[n_text:] if need_h else no, vocab, w_vision.shape[1], need_w_vision, opts)
    if need_h or need_w_text:
        shard_start = vp.shard_start(w_text, group)
        dh_text = dh[:n_text] if need_h else no
        _, _, d_w_text = _cpp_head(h[:n_text], w_text[None], labels[:1, :n_text],
                                   weights[:, :n_text].sum(0, keepdim=True), lse[:1, :n_text], dh_text, shard_start,
                                   vocab, need_w_text, opts)
        if group is not None and need_h:
            vp.all_reduce_partial(dh_text, group)
    d_w_text = d_w_text.view(w_text.shape) if need_w_text else h.new_empty(0)
    return dh, d_w_text, d_w_vision if need_w_vision else h.new_empty(0)


TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))
TABLE.register("cpp", Kernel(_cpp_forward, _cpp_backward, _ext.cpp_kernel_unavailable("linear_cross_entropy")))


# ---- registered operators, fakes and autograd


@torch.library.custom_op("libra::discrete_token_cross_entropy", mutates_args=())
def discrete_token_cross_entropy_op(h: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                                    labels: torch.Tensor, ignore_index: int, reduction: str, label_smoothing: float,
                                    z_loss_weight: float, needs: list[bool], chunk_elements: int, group_name: str,
                                    backend: str, check_labels: bool = True
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """Registered operator. Returns (loss, z_loss, dh, dw_text, dw_vision, lse): loss and z_loss are [] for
    "mean"/"sum" and [C, T] for "none" (float32, float64 for float64 h); dh [T, hidden], dw_text [V/tp, hidden],
    dw_vision [C, Vv, hidden] are the gradients for grad_output = 1 of the inputs flagged in ``needs`` (h, w_text,
    w_vision) when reduction is "mean"/"sum", else [0]; lse [C, T] is each element's log-sum-exp."""
    opts = _Options(ignore_index, reduction, label_smoothing, z_loss_weight, chunk_elements, group_name)
    # Label values are checked here, inside the operator, so a compiled graph checks them too (one host read);
    # ``check_labels=False`` skips that read for callers that validated the labels on the host already.
    if check_labels:
        vocab = vp.full_vocab(w_text, vp.resolve_group(group_name))
        validate_labels(labels, n_text, vocab, w_vision.shape[1], ignore_index)
    return TABLE.get(backend).forward(h, n_text, w_text, w_vision, labels, tuple(needs), opts)


@torch.library.custom_op("libra::discrete_token_cross_entropy_backward", mutates_args=())
def discrete_token_cross_entropy_backward_op(grad_out: torch.Tensor, h: torch.Tensor, n_text: int,
                                             w_text: torch.Tensor, w_vision: torch.Tensor, labels: torch.Tensor,
                                             lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                                             z_loss_weight: float, needs: list[bool], chunk_elements: int,
                                             group_name: str, backend: str
                                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered backward of reduction="none": grad_out [C, T] -> (dh, dw_text, dw_vision), [0] where not needed."""
    opts = _Options(ignore_index, "none", label_smoothing, z_loss_weight, chunk_elements, group_name)
    return TABLE.get(backend).backward(grad_out, h, n_text, w_text, w_vision, labels, lse, tuple(needs), opts)


def _fake_grads(h, w_text, w_vision, needs):
    return tuple(torch.empty_like(t) if need else h.new_empty(0) for t, need in zip((h, w_text, w_vision), needs))


@discrete_token_cross_entropy_op.register_fake
def _fake_forward(h, n_text, w_text, w_vision, labels, ignore_index, reduction, label_smoothing, z_loss_weight,
                  needs, chunk_elements, group_name, backend, check_labels=True):
    stat = _loss_dtype(h.dtype)
    shape = tuple(labels.shape) if reduction == "none" else ()
    grads = _fake_grads(h, w_text, w_vision, needs if reduction != "none" else (False, False, False))
    return (h.new_empty(shape, dtype=stat), h.new_empty(shape, dtype=stat), *grads,
            h.new_empty(labels.shape, dtype=stat))


@discrete_token_cross_entropy_backward_op.register_fake
def _fake_backward(grad_out, h, n_text, w_text, w_vision, labels, lse, ignore_index, label_smoothing, z_loss_weight,
                   needs, chunk_elements, group_name, backend):
    return _fake_grads(h, w_text, w_vision, needs)


def _fake_linear_cross_entropy(h, weight, labels, row_weights, lse, dh, label_offset, ignore_index, vocab,
                               label_smoothing, z_loss_weight, need_dw, chunk_elements):
    stat = _loss_dtype(h.dtype)
    segments, rows = weight.shape[0], h.shape[0]
    loss = h.new_empty((segments, rows) if lse is None else (0,), dtype=stat)
    stats = h.new_empty((3, segments, rows) if lse is None else (0,), dtype=stat)
    return loss, stats, torch.empty_like(weight) if need_dw else weight.new_empty(0)


if _ext.cpp_extension_loaded():
    torch.library.register_fake("libra::linear_cross_entropy")(_fake_linear_cross_entropy)


def _setup_context(ctx, inputs, output):
    h, n_text, w_text, w_vision, labels, ignore_index, reduction, eps, z_weight, needs, chunk, group, backend = (
        inputs[:13])
    _, _, dh, d_w_text, d_w_vision, lse = output
    ctx.save_for_backward(h, w_text, w_vision, labels, lse, dh, d_w_text, d_w_vision)
    ctx.args = (n_text, ignore_index, reduction, eps, z_weight, needs, chunk, group, backend)
    ctx.set_materialize_grads(False)
    # Only the loss is differentiable: z_loss is for logging (its gradient is part of the loss's), and the rest are
    # the gradients and statistics handed to the backward.
    ctx.mark_non_differentiable(*output[1:])


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (True when unknown, which is always safe)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _backward(ctx, grad_loss, *_unused):
    h, w_text, w_vision, labels, lse, *computed = ctx.saved_tensors
    n_text, ignore_index, reduction, eps, z_weight, needs, chunk, group, backend = ctx.args
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    if grad_loss is None or not any(wanted):
        return (None,) * 14
    if reduction == "none":
        grads = discrete_token_cross_entropy_backward_op(grad_loss.contiguous(), h, n_text, w_text, w_vision, labels,
                                                         lse, ignore_index, eps, z_weight, wanted, chunk, group,
                                                         backend)
    else:
        if any(want and not had for want, had in zip(wanted, needs)):
            raise RuntimeError(f"{OP}: a gradient is asked for that the forward was told not to compute "
                               f"(needs={needs})")
        # The forward computed the gradients for grad_loss = 1. In an eager backward that does not keep the graph
        # the saved tensors are dead after this call: scale them in place, so no second copy of dW (250 MiB for
        # the 7B text head in bf16) is allocated. A kept graph (retain_graph, gradcheck) or a traced backward
        # (tensor subclasses: functionalisation would turn the mutation into an output) gets scaled copies.
        in_place = type(grad_loss) is torch.Tensor and not _graph_is_kept()
        scale = torch.Tensor.mul_ if in_place else torch.mul
        grads = [scale(g, grad_loss) if want else None for g, want in zip(computed, wanted)]
    dh, d_w_text, d_w_vision = (g if want else None for g, want in zip(grads, wanted))
    return (dh, None, d_w_text, d_w_vision) + (None,) * 10


discrete_token_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---- validation and the public function


def validate_labels(labels: torch.Tensor, n_text: int, vocab: int, vision_vocab: int, ignore_index: int) -> None:
    """Raise ValueError if a label has the wrong modality for its row, is out of range, or if text labels differ
    across codebook rows. labels int64 [C, T]; one device-to-host read per call."""
    text, vision = labels[:, :n_text], labels[:, n_text:]
    ignored_text, ignored_vision = text == ignore_index, vision == ignore_index
    problems = torch.stack([
        ((text >= vocab) & (text < vocab + vision_vocab) & ~ignored_text).any(),
        (((text < 0) | (text >= vocab + vision_vocab)) & ~ignored_text).any(),
        (text != text[:1]).any(),
        ((vision >= 0) & (vision < vocab) & ~ignored_vision).any(),
        (((vision < 0) | (vision >= vocab + vision_vocab)) & ~ignored_vision).any(),
    ]).tolist()
    messages = (
        f"a text row has a vision label (ids in [{vocab}, {vocab + vision_vocab}))",
        f"a text row has a label outside [0, {vocab}) that is not ignore_index ({ignore_index})",
        "text rows must have the same label in every codebook row",
        f"a vision row has a text label (ids in [0, {vocab}))",
        f"a vision row has a label outside [{vocab}, {vocab + vision_vocab}) that is not ignore_index "
        f"({ignore_index})",
    )
    for bad, message in zip(problems, messages):
        if bad:
            raise ValueError(f"{OP}: labels: {message}")


def _check_number(name, value, low, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{OP}: {name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{OP}: {name} must be in [{low}, {high}], got {value}")


def _validate(h, n_text, w_text, w_vision, labels, ignore_index, reduction, label_smoothing, z_loss_weight,
              chunk_elements) -> None:
    check_tensor(OP, "h", h, ndim=2)
    check_floating(OP, "h", h)
    check_n_text(OP, n_text, h.shape[0])
    check_tensor(OP, "w_text", w_text, ndim=2)
    check_shape(OP, "w_text", w_text, (None, h.shape[1]), "[V, hidden]")
    check_tensor(OP, "w_vision", w_vision, ndim=3)
    check_shape(OP, "w_vision", w_vision, (None, None, h.shape[1]), "[C, Vv, hidden]")
    check_like(OP, "h", h, w_text=w_text, w_vision=w_vision)
    if w_vision.shape[0] == 0 or w_vision.shape[1] == 0 or w_text.shape[0] == 0:
        raise ValueError(f"{OP}: w_text and w_vision need at least one codebook and one id each")
    check_tensor(OP, "labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"{OP}: labels must be int64, got {labels.dtype}")
    check_shape(OP, "labels", labels, (w_vision.shape[0], h.shape[0]), "[C, T]")
    if labels.device != h.device:
        raise ValueError(f"{OP}: labels is on {labels.device} but h is on {h.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    _check_number("z_loss_weight", z_loss_weight, 0.0)
    if chunk_elements is not None:
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise TypeError(f"{OP}: chunk_elements must be an int or None, got {type(chunk_elements).__name__}")
        if chunk_elements < 1:
            raise ValueError(f"{OP}: chunk_elements must be positive, got {chunk_elements}")


def discrete_token_cross_entropy(h: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                                 labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                                 return_z_loss: bool = False, process_group=None, chunk_elements: int | None = None,
                                 check_label_values: bool = True, backend: str = "auto"):
    """Libra's loss over the text vocabulary and the visual codebooks on sorted hidden states.

    Args:
        h: [T, hidden] float16/bfloat16/float32/float64; rows [0, n_text) text, [n_text, T) vision.
        n_text: number of text rows.
        w_text: [V, hidden] text head (with process_group: this rank's [V/tp, hidden] shard, rows
            [rank·V/tp, (rank+1)·V/tp)). w_vision: [C, Vv, hidden] codebook heads. Both of h's dtype and device.
        labels: int64 [C, T] in the combined id space (text ids [0, V), codebook ids [V, V + Vv)) or ignore_index.
        reduction: "mean" (Libra's loss), "sum" or "none" ([C, T], 0 at ignored targets).
        label_smoothing: in [0, 1], spread over the row's own vocabulary (V for text rows, Vv for vision rows).
        z_loss_weight: >= 0; adds z_loss_weight·logsumexp² per valid target.
        return_z_loss: also return the z-loss part of the loss (same reduction, detached, for logging).
        process_group: a torch.distributed group over which the text head is sharded (vocab-parallel loss). Every
            rank gets the full loss and gradient of h; the text rows' partial gradients of h are all-reduced here,
            so h must not pass through another gradient all-reduce for this loss.
        chunk_elements: most elements of the "cpp" backend's logits buffer (None: 2^23).
        check_label_values: check the label values (modality, range, equal text rows) with one device-to-host read;
            pass False only when the caller guarantees them (a collator that validated them on the host), to keep
            a training step free of host syncs.
        backend: "auto", "torch" or "cpp".
    Returns:
        the loss in float32 (float64 for float64 h): [] or [C, T] for "none"; with return_z_loss, (loss, z_loss).
    Raises:
        ValueError on a label of the wrong modality or out of range, or text labels that differ across rows.
    """
    group_name = vp.group_name(OP, process_group)
    _validate(h, n_text, w_text, w_vision, labels, ignore_index, reduction, label_smoothing, z_loss_weight,
              chunk_elements)
    name = TABLE.resolve(backend, h.device)
    needs = [torch.is_grad_enabled() and t.requires_grad for t in (h, w_text, w_vision)]
    loss, z_loss, *_ = discrete_token_cross_entropy_op(h, n_text, w_text, w_vision, labels, ignore_index, reduction,
                                                       float(label_smoothing), float(z_loss_weight), needs,
                                                       chunk_elements or 0, group_name, name,
                                                       bool(check_label_values))
    return (loss, z_loss.detach()) if return_z_loss else loss
