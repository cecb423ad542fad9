"""Discrete-token softmax: Libra's next-token cross-entropy over the text vocabulary (text rows) and over each
visual codebook (vision rows), on the sorted final hidden states (LIBRA.md §5, DESIGN.md §3).

Labels live in Libra's combined id space: text ids in [0, V), codebook ids in [V, V + Vv), or ignore_index.
Text row r uses the text head with target labels[0, r] (equal in every codebook row); vision row r of codebook c
uses head c with target labels[c, r] - V. Per-element losses form a [C, T] grid in which a text row's loss
appears once per codebook (as in the reference's [C, B, N, V + Vv] logits with -inf padding).
    "mean": (1/C) Σ_c (Σ valid losses of codebook row c) / (number of valid targets of row c)  (Libra's loss;
            a codebook row with no valid target contributes 0)
    "sum":  Σ over the whole valid grid;   "none": the [C, T] grid, 0 at ignored targets.

Parts: the reference ``discrete_token_cross_entropy_ref``; the "torch" kernel (one logits block per head,
explicit backward); the registered operator ``torch.ops.libra.discrete_token_cross_entropy`` (+ ``_backward``)
with fake implementations and autograd; the public ``discrete_token_cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from libra_kernels.backend import Kernel, KernelTable, always_available
from libra_kernels.validation import check_floating, check_like, check_n_text, check_shape, check_tensor

OP = "discrete_token_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def discrete_token_cross_entropy_ref(h, n_text, w_text, w_vision, labels, *, ignore_index=-100, reduction="mean"):
    """Pure-PyTorch reference (differentiable by autograd). h [T, hidden]; w_text [V, hidden];
    w_vision [C, Vv, hidden]; labels int64 [C, T]. Logits are computed in h's dtype and soft-maxed in float32
    (float64 for float64 input); the loss has that statistics dtype."""
    stat = _loss_dtype(h.dtype)
    vocab = w_text.shape[0]
    text_target = labels[0, :n_text]
    text_valid = text_target != ignore_index
    text_loss = F.cross_entropy((h[:n_text] @ w_text.T).to(stat), text_target.where(text_valid, 0), reduction="none")
    rows = []
    for c in range(w_vision.shape[0]):
        target = labels[c, n_text:]
        valid = target != ignore_index
        logits = (h[n_text:] @ w_vision[c].T).to(stat)
        vision_loss = F.cross_entropy(logits, (target - vocab).where(valid, 0), reduction="none")
        rows.append(torch.cat([text_loss * text_valid, vision_loss * valid]))
    grid = torch.stack(rows)
    return _reduce(grid, labels != ignore_index, reduction)


def _reduce(grid, valid, reduction):
    if reduction == "none":
        return grid
    if reduction == "sum":
        return grid.sum()
    return (grid.sum(1) / valid.sum(1).clamp(min=1)).mean()


def _head_grads(h, weight, target, valid, row_weight, stat):
    """Loss rows of one head and the gradient of its logits scaled by row_weight (0 at invalid rows)."""
    logits = (h @ weight.T).to(stat)
    log_probs = torch.log_softmax(logits, dim=-1)
    safe_target = target.where(valid, 0)
    loss = -log_probs.gather(1, safe_target[:, None])[:, 0] * valid
    dlogits = log_probs.exp()
    dlogits[torch.arange(len(target), device=h.device), safe_target] -= 1
    return loss, dlogits * (row_weight * valid)[:, None]


def _element_weights(grad_out, valid, reduction, stat):
    """d loss / d grid element, [C, T]."""
    if reduction == "none":
        return grad_out.to(stat)
    if reduction == "sum":
        return grad_out.to(stat).expand(valid.shape)
    counts = valid.sum(1, keepdim=True).clamp(min=1).to(stat)
    return (grad_out.to(stat) / (valid.shape[0] * counts)).expand(valid.shape)


def _torch_forward(h, n_text, w_text, w_vision, labels, ignore_index, reduction):
    with torch.no_grad():
        return discrete_token_cross_entropy_ref(h, n_text, w_text, w_vision, labels, ignore_index=ignore_index,
                                                reduction=reduction)


def _torch_backward(grad_out, h, n_text, w_text, w_vision, labels, ignore_index, reduction, needs):
    """needs = (h, w_text, w_vision) flags; returns their gradients ([0] tensors where not needed)."""
    need_h, need_w_text, need_w_vision = needs
    stat = _loss_dtype(h.dtype)
    vocab = w_text.shape[0]
    valid = labels != ignore_index
    weights = _element_weights(grad_out, valid, reduction, stat)
    h_text, h_vision = h[:n_text].to(stat), h[n_text:].to(stat)
    dh = torch.zeros(h.shape, dtype=stat, device=h.device)
    # A text row's loss appears in every codebook row of the grid: its logits gradient sums their weights.
    _, d_text = _head_grads(h[:n_text], w_text, labels[0, :n_text], valid[0, :n_text], weights[:, :n_text].sum(0),
                            stat)
    dh[:n_text] = d_text @ w_text.to(stat)
    d_w_text = (d_text.T @ h_text).to(w_text.dtype) if need_w_text else h.new_empty(0)
    d_w_vision = torch.zeros(w_vision.shape, dtype=stat, device=h.device)
    for c in range(w_vision.shape[0]):
        target = labels[c, n_text:] - vocab
        _, d_vision = _head_grads(h[n_text:], w_vision[c], target, valid[c, n_text:], weights[c, n_text:], stat)
        dh[n_text:] += d_vision @ w_vision[c].to(stat)
        d_w_vision[c] = d_vision.T @ h_vision
    empty = h.new_empty(0)
    return (dh.to(h.dtype) if need_h else empty, d_w_text,
            d_w_vision.to(w_vision.dtype) if need_w_vision else empty)


TABLE = KernelTable(OP, auto_order={"cpu": ("cpp",), "cuda": ("cpp",)})
TABLE.register("torch", Kernel(_torch_forward, _torch_backward, always_available))


@torch.library.custom_op("libra::discrete_token_cross_entropy", mutates_args=())
def discrete_token_cross_entropy_op(h: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                                    labels: torch.Tensor, ignore_index: int, reduction: str,
                                    backend: str) -> torch.Tensor:
    """Registered operator: the loss ([] for "mean"/"sum", [C, T] for "none") by the named backend."""
    return TABLE.get(backend).forward(h, n_text, w_text, w_vision, labels, ignore_index, reduction)


@torch.library.custom_op("libra::discrete_token_cross_entropy_backward", mutates_args=())
def discrete_token_cross_entropy_backward_op(grad_out: torch.Tensor, h: torch.Tensor, n_text: int,
                                             w_text: torch.Tensor, w_vision: torch.Tensor, labels: torch.Tensor,
                                             ignore_index: int, reduction: str, needs: list[bool], backend: str
                                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered backward: (dh, dw_text, dw_vision); a [0] tensor for each one not needed."""
    return TABLE.get(backend).backward(grad_out, h, n_text, w_text, w_vision, labels, ignore_index, reduction,
                                       tuple(needs))


@discrete_token_cross_entropy_op.register_fake
def _fake_forward(h, n_text, w_text, w_vision, labels, ignore_index, reduction, backend):
    shape = tuple(labels.shape) if reduction == "none" else ()
    return h.new_empty(shape, dtype=_loss_dtype(h.dtype))


@discrete_token_cross_entropy_backward_op.register_fake
def _fake_backward(grad_out, h, n_text, w_text, w_vision, labels, ignore_index, reduction, needs, backend):
    return tuple(torch.empty_like(t) if need else h.new_empty(0) for t, need in zip((h, w_text, w_vision), needs))


def _setup_context(ctx, inputs, output):
    h, n_text, w_text, w_vision, labels, ignore_index, reduction, backend = inputs
    ctx.save_for_backward(h, w_text, w_vision, labels)
    ctx.args = (n_text, ignore_index, reduction, backend)


def _backward(ctx, grad_out):
    h, w_text, w_vision, labels = ctx.saved_tensors
    n_text, ignore_index, reduction, backend = ctx.args
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    grads = discrete_token_cross_entropy_backward_op(grad_out.contiguous(), h, n_text, w_text, w_vision, labels,
                                                     ignore_index, reduction, needs, backend)
    dh, d_w_text, d_w_vision = (g if need else None for g, need in zip(grads, needs))
    return dh, None, d_w_text, d_w_vision, None, None, None, None


discrete_token_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def validate_labels(labels: torch.Tensor, n_text: int, vocab: int, vision_vocab: int, ignore_index: int) -> None:
    """Raise ValueError if a label has the wrong modality for its row, is out of range, or if text labels differ
    across codebook rows. One device-to-host read per call."""
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


def _validate(h, n_text, w_text, w_vision, labels, ignore_index, reduction) -> None:
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
    validate_labels(labels, n_text, w_text.shape[0], w_vision.shape[1], ignore_index)


def discrete_token_cross_entropy(h: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                                 labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                                 process_group=None, backend: str = "auto") -> torch.Tensor:
    """Libra's loss over the text vocabulary and the visual codebooks on sorted hidden states.

    Args:
        h: [T, hidden] float16/bfloat16/float32/float64; rows [0, n_text) text, [n_text, T) vision.
        n_text: number of text rows.
        w_text: [V, hidden] text head. w_vision: [C, Vv, hidden] codebook heads. h's dtype and device.
        labels: int64 [C, T] in the combined id space (text ids [0, V), codebook ids [V, V + Vv)) or ignore_index.
        reduction: "mean" (Libra's loss), "sum" or "none" ([C, T], 0 at ignored targets).
        process_group: a torch.distributed group to make w_text a vocabulary shard (vocab-parallel loss).
        backend: "auto", "torch" or "cpp".
    Returns:
        the loss in float32 (float64 for float64 h).
    Raises:
        ValueError on a label of the wrong modality or out of range, or text labels that differ across rows.
    """
    if process_group is not None:
        raise NotImplementedError(f"{OP}: process_group (the vocab-parallel loss) is not implemented yet")
    _validate(h, n_text, w_text, w_vision, labels, ignore_index, reduction)
    name = TABLE.resolve(backend, h.device)
    return discrete_token_cross_entropy_op(h, n_text, w_text, w_vision, labels, ignore_index, reduction, name)
