"""One optimizer step under TP × DP with gradient accumulation (PARALLEL.md §1(h)).

backward of each micro-batch (float32 gradient buffers) → the deferred reduction (TP-partial grads over DP×TP, the
rest over DP) → global grad norm (no double counting of replicated parameters) → clip → AdamW → zero the buffers.
The loss normalisation is chosen explicitly (``libra_model.parallel.loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from libra_model.parallel.comm import tp_world_size
from libra_model.parallel.loss import NORMALIZATIONS, global_target_counts, libra_loss

BATCH_KEYS = ("input_ids", "vision_indices", "labels")


@dataclass
class StepResult:
    """What a step reports: ``loss`` (the step's loss over the global batch, a float equal on every rank),
    ``grad_norm`` (before clipping), ``tokens`` (real tokens of the global batch), ``skipped`` (True when the norm
    was not finite and no update was made)."""

    loss: float
    grad_norm: float
    tokens: int
    skipped: bool = False


def move_batch(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """The batch's tensors on ``device``; the floating contiguous signal in ``dtype`` (the model's compute dtype)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
        elif hasattr(value, "to") and key == "layout":
            value = value.to(device)
        out[key] = value
    return out


def _real_tokens(batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.tensor(float(batch["vision_indices"].numel()), dtype=torch.float64)
    return (mask != 0).sum().to(torch.float64)


def forward_loss(model, batch: dict, target_counts: torch.Tensor | None) -> torch.Tensor:
    """The loss of one micro-batch (a dict with input_ids [C, B, N], vision_indices [B, N], labels [C, B, N] and
    optionally attention_mask, contiguous_signal, layout); ``target_counts`` as in ``libra_loss``."""
    for key in BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"forward_loss: the batch has no {key!r}")
    out = model(batch["input_ids"], batch["vision_indices"], attention_mask=batch.get("attention_mask"),
                contiguous_signal=batch.get("contiguous_signal"), return_logits=False, layout=batch.get("layout"))
    # The heads read ``head_inputs`` where the model provides them ("2d" vision prediction), else the hidden states.
    head_inputs = getattr(out, "head_inputs", None)
    head_inputs = out.hidden_states if head_inputs is None else head_inputs
    return libra_loss(model, head_inputs, out.layout, batch["labels"], target_counts=target_counts)


def train_step(model, optimizer, micro_batches: list[dict], parallel, *, lr: float, max_grad_norm: float | None = 1.0,
               normalization: str = "global_tokens") -> StepResult:
    """Forward/backward every micro-batch (already on the device), reduce, clip, step (see the module docstring).

    Args:
        model: the (TP-sharded) model.  optimizer: a ``MasterAdamW`` over it.
        micro_batches: this DP replica's micro-batches of the step (the same on all its TP ranks).
        parallel: the ``ParallelState``.  lr: learning rate of this step.
        max_grad_norm: clip the global norm to this (None = no clipping).
        normalization: "global_tokens" or "mean_of_microbatches" (``libra_model.parallel.loss``).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"train_step: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not micro_batches:
        raise ValueError("train_step: micro_batches is empty")
    dp = tp_world_size(parallel.dp_group)
    counts = None
    if normalization == "global_tokens":
        counts = global_target_counts([b["labels"] for b in micro_batches], parallel.dp_group)
    weight = 1.0 / (len(micro_batches) * dp)
    # Loss and token count stay on the device until one transfer at the end of the step (no per-micro-batch sync).
    totals = torch.zeros(2, dtype=torch.float64, device=parallel.device)
    for batch in micro_batches:
        loss = forward_loss(model, batch, counts)
        if normalization == "mean_of_microbatches":
            loss = loss * weight
        loss.backward()
        totals[0] += loss.detach().to(torch.float64)
        totals[1] += _real_tokens(batch).to(totals.device)
    optimizer.reduce(parallel)
    norm = optimizer.clip_(parallel, max_grad_norm)
    if dp > 1:
        # The step's loss and token count over all replicas, for logging only (they do not touch the gradients).
        dist.all_reduce(totals, group=parallel.dp_group)
    tokens = totals.cpu()
    grad_norm = float(norm)
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step(lr)
    optimizer.zero_grad()
    return StepResult(loss=float(tokens[0]), grad_norm=grad_norm, tokens=int(tokens[1]), skipped=skipped)
