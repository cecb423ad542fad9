"""Libra's loss under tensor parallelism and gradient accumulation, with the normalisation made explicit.

Libra's loss of one batch (LIBRA.md §5.3) is L = (1/C) Σ_c S_c / N_c, with S_c the summed cross entropy of the
valid targets of codebook row c (text targets appear in every row) and N_c their number. A training step here sees
several micro-batches on several DP replicas. Two definitions are offered (PARALLEL.md §1(f)):

* ``"global_tokens"`` (the default): L computed as if the whole global batch were one batch, i.e. every micro-batch
  contributes (1/C) Σ_c S_{c,m} / N_c with N_c the counts of the whole step (all micro-batches, all DP ranks; one
  tiny all-reduce per step). Gradients are then summed, never averaged, over micro-batches and DP. This makes the
  step independent of how the batch is split: DP=2 equals one process with the doubled batch, and accumulation
  equals a bigger micro-batch.
* ``"mean_of_microbatches"`` (the reference's HF Trainer + DeepSpeed): each micro-batch's own Libra mean, averaged
  over the micro-batches and DP replicas (weight 1 / (accumulation · dp) each).

The text head may be vocab-parallel (``model.lm_head_tp_group``): the fused loss then takes this rank's vocabulary
shard and its ``process_group`` (PARALLEL.md §1(f)): every rank gets the full loss, the full gradient of the hidden
states and its shard's head gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from libra_kernels import ModalityLayout, discrete_token_cross_entropy
from libra_model.parallel.comm import COLLECTIVES, tp_world_size

IGNORE_INDEX = -100
NORMALIZATIONS = ("global_tokens", "mean_of_microbatches")


def sorted_shifted_labels(labels: torch.Tensor, layout: ModalityLayout, ignore_index: int = IGNORE_INDEX
                          ) -> torch.Tensor:
    """int64 [C, B, N] unshifted labels -> [C, T] targets in sorted order (position n predicts label n+1; the last
    position of each sequence gets ``ignore_index``), as the model's own loss does."""
    codebooks, batch, length = labels.shape
    shifted = torch.cat([labels[..., 1:], labels.new_full((codebooks, batch, 1), ignore_index)], dim=-1)
    return shifted.reshape(codebooks, batch * length).index_select(1, layout.sort_index.to(labels.device))


def valid_target_counts(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [C]: the number of valid (not ignored) shifted targets of each codebook row of unshifted [C, B, N]
    labels (the first position of each sequence is never a target)."""
    return (labels[..., 1:] != ignore_index).sum(dim=(1, 2))


def discrete_token_loss(h: torch.Tensor, n_text: int, w_text: torch.Tensor, w_vision: torch.Tensor,
                        labels: torch.Tensor, *, group=None, reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                        backend: str = "auto") -> torch.Tensor:
    """``discrete_token_cross_entropy`` with a vocab-parallel text head when ``group`` has several ranks.

    h [T, hidden] (replicated over the group); w_text [V/tp, hidden] this rank's vocabulary shard; w_vision
    [C, Vv, hidden]; labels int64 [C, T] (sorted, shifted). Returns what the operator returns for the full head."""
    return discrete_token_cross_entropy(h, n_text, w_text, w_vision, labels, ignore_index=ignore_index,
                                        reduction=reduction, backend=backend,
                                        process_group=group if tp_world_size(group) > 1 else None)


def libra_loss(model, hidden: torch.Tensor, layout: ModalityLayout, labels: torch.Tensor, *,
               target_counts: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss of one micro-batch from what the model's heads read, in sorted order (``hidden`` [T, width]: the
    final hidden states, or the model's ``head_inputs``) and unshifted labels int64 [C, B, N].

    ``target_counts`` None: Libra's mean loss of this batch. ``target_counts`` int [C] (the valid-target counts of
    the whole step): this micro-batch's share (1/C) Σ_c S_c / N_c of the step's global loss. Float32 scalar (float64
    for a float64 model)."""
    from libra_model.modules.layers import op_backend

    targets = sorted_shifted_labels(labels, layout, ignore_index)
    kwargs = dict(group=model.lm_head_tp_group, ignore_index=ignore_index,
                  backend=op_backend(model.backend, "discrete_token_cross_entropy"))
    w_text, w_vision = model.lm_head.weight, model.vision_lm_head.stacked_weight()
    if target_counts is None:
        return discrete_token_loss(hidden, layout.n_text, w_text, w_vision, targets, reduction="mean", **kwargs)
    grid = discrete_token_loss(hidden, layout.n_text, w_text, w_vision, targets, reduction="none", **kwargs)
    counts = target_counts.to(device=grid.device, dtype=grid.dtype).clamp(min=1)
    return (grid.sum(1) / counts).sum() / grid.shape[0]


def global_target_counts(label_batches: list[torch.Tensor], dp_group, ignore_index: int = IGNORE_INDEX
                         ) -> torch.Tensor:
    """int64 [C]: valid-target counts summed over the step's micro-batches (unshifted [C, B, N] labels each) and
    over the DP group (one all-reduce of C integers)."""
    counts = sum(valid_target_counts(labels, ignore_index) for labels in label_batches)
    if tp_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
        COLLECTIVES[("count_all_reduce", "step")] += 1
    return counts
