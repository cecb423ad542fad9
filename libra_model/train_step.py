"""One optimizer step under TP × DP with gradient accumulation (docs/parallel.md).

backward of each micro-batch (float32 gradient buffers, or with sharded gradients a reduce-scatter per bucket
in each backward) → the deferred reduction (TP-partial grads over DP×TP, the
rest over DP) → global grad norm (no double counting of replicated parameters) → clip → AdamW → zero the buffers.

The loss of each micro-batch is the model's own (``LibraForCausalLM.loss``); the step only chooses its
normalisation. Libra's loss of one batch is L = (1/C) Σ_c S_c / N_c, with S_c the summed cross entropy of the valid
targets of codebook row c (text targets appear in every row) and N_c their number. A step sees several
micro-batches on several DP replicas; two definitions are offered:

* ``"global_tokens"`` (the default): L computed as if the whole global batch were one batch, i.e. every micro-batch
  contributes (1/C) Σ_c S_{c,m} / N_c with N_c the counts of the whole step (all micro-batches, all DP ranks; one
  tiny all-reduce per step, :func:`global_target_counts`). Gradients are then summed, never averaged, over
  micro-batches and DP. This makes the step independent of how the batch is split: DP=2 equals one process with the
  doubled batch, and accumulation equals a bigger micro-batch.
* ``"mean_of_microbatches"`` (the reference's HF Trainer + DeepSpeed): each micro-batch's own Libra mean, averaged
  over the micro-batches and DP replicas (weight 1 / (accumulation · dp) each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from libra_model.modules.tensor_parallel import COLLECTIVES, tp_world_size

BATCH_KEYS = ("input_ids", "vision_indices", "labels")
NORMALIZATIONS = ("global_tokens", "mean_of_microbatches")


@dataclass
class StepResult:
    """What a step reports: ``loss`` (the step's loss over the global batch, a float equal on every rank),
    ``grad_norm`` (before clipping), ``tokens`` (real tokens of the global batch), ``skipped`` (True when the loss or
    the norm was not finite and no update was made)."""

    loss: float
    grad_norm: float
    tokens: int
    skipped: bool = False


def _real_tokens(batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.tensor(float(batch["vision_indices"].numel()), dtype=torch.float64)
    return (mask != 0).sum().to(torch.float64)


def global_target_counts(model, label_batches: list[torch.Tensor], dp_group) -> torch.Tensor:
    """int64 [C]: the model's valid-target counts (``model.target_counts``) summed over the step's micro-batches
    (unshifted [C, B, N] labels each) and over the DP group (one all-reduce of C integers, no host read)."""
    counts = sum(model.target_counts(labels) for labels in label_batches)
    if tp_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
        COLLECTIVES[("count_all_reduce", "step")] += 1
    return counts


def forward_loss(model, batch: dict, target_counts: torch.Tensor | None, *, label_smoothing: float = 0.0,
                 z_loss_weight: float = 0.0) -> torch.Tensor:
    """The loss of one micro-batch (a dict with input_ids [C, B, N], vision_indices [B, N], labels [C, B, N] and
    optionally attention_mask, contiguous_signal, layout, document_ids (packed rows)): the model's forward without
    logits, then ``model.loss`` on its head inputs with ``target_counts`` (None: the micro-batch's own Libra mean;
    int [C]: its share of the step's global loss) and the loss options. Float32 scalar (float64 for a float64 model)."""
    for key in BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"forward_loss: the batch has no {key!r}")
    documents = batch.get("document_ids")  # packed rows, or None
    out = model(batch["input_ids"], batch["vision_indices"], attention_mask=batch.get("attention_mask"),
                contiguous_signal=batch.get("contiguous_signal"), return_logits=False, layout=batch.get("layout"),
                document_ids=documents)
    return model.loss(out.head_inputs, out.layout, batch["labels"], target_counts=target_counts,
                      label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, document_ids=documents)


def train_step(model, optimizer, micro_batches: list[dict], parallel, *, lr: float, max_grad_norm: float | None = 1.0,
               normalization: str = "global_tokens", label_smoothing: float = 0.0,
               z_loss_weight: float = 0.0) -> StepResult:
    """Forward/backward every micro-batch (already on the device), reduce, clip, step (see the module docstring).

    Args:
        model: the (TP-sharded) model.  optimizer: a ``MasterAdamW`` or ``DistributedMasterAdamW`` over it.
        micro_batches: this DP replica's micro-batches of the step (the same on all its TP ranks).
        parallel: the ``ParallelState``.  lr: learning rate of this step.
        max_grad_norm: clip the global norm to this (None = no clipping).
        normalization: "global_tokens" or "mean_of_microbatches" (see the module docstring).
        label_smoothing, z_loss_weight: options of the model's loss (``LibraForCausalLM.loss``).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"train_step: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not micro_batches:
        raise ValueError("train_step: micro_batches is empty")
    dp = tp_world_size(parallel.dp_group)
    counts = None
    if normalization == "global_tokens":
        labels = [model.mask_document_starts(b["labels"], b.get("document_ids")) for b in micro_batches]
        counts = global_target_counts(model, labels, parallel.dp_group)
    weight = 1.0 / (len(micro_batches) * dp)
    # Loss and token count stay on the device until one transfer at the end of the step (no per-micro-batch sync).
    totals = torch.zeros(2, dtype=torch.float64, device=parallel.device)
    for index, batch in enumerate(micro_batches):
        # The distributed optimizer reduce-scatters buckets during the last backward (with sharded gradients: during
        # every backward, finished by finish_micro_batch); the replicated one does nothing here.
        optimizer.start_micro_batch(last=index == len(micro_batches) - 1)
        loss = forward_loss(model, batch, counts, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
        if normalization == "mean_of_microbatches":
            loss = loss * weight
        loss.backward()
        optimizer.finish_micro_batch()
        totals[0] += loss.detach().to(torch.float64)
        totals[1] += _real_tokens(batch).to(totals.device)
    optimizer.reduce(parallel)
    norm = optimizer.clip_(parallel, max_grad_norm)
    if dp > 1:
        # The step's loss and token count over all replicas, for logging only (they do not touch the gradients).
        dist.all_reduce(totals, group=parallel.dp_group)
    tokens = totals.cpu()
    grad_norm = float(norm)
    # A non-finite loss or norm (equal on every rank: both are global) skips the update on every rank alike.
    skipped = not (math.isfinite(grad_norm) and math.isfinite(float(tokens[0])))
    if not skipped:
        optimizer.step(lr)
    optimizer.zero_grad()
    return StepResult(loss=float(tokens[0]), grad_norm=grad_norm, tokens=int(tokens[1]), skipped=skipped)
