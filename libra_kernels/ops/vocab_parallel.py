"""The vocab-parallel protocol of ``discrete_token_cross_entropy`` (``process_group``): the text head is sharded by
rows over the group, rank r holding ids [r·V/tp, (r+1)·V/tp); the vision heads are replicated.

"cpp" backend: each rank runs the fused kernel on its shard for the per-row statistics (log-sum-exp, target logit,
sum of logits); :func:`combine_text_statistics` reduces them over the group with two all-reduces for the whole call
(MAX of the log-sum-exp, then one SUM of the rescaled exponentials, target logits and logit sums) into the global
log-sum-exp and loss. The kernel then runs again with the global log-sum-exp for the gradients (one more local
logits GEMM instead of one collective per chunk), and :func:`all_reduce_partial` sums the text rows' partial
gradient of h. "torch" backend: :func:`gather_rows` all-gathers the text head for the unsharded reference and
:func:`own_rows` keeps this rank's rows of its gradient. Every rank ends with the full loss, the full gradient of h,
its shard's gradient and the full (identical) vision gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from libra_kernels.distributed import all_gather_flat


def group_name(op: str, process_group) -> str:
    """The name the registered op carries for ``process_group``: "" without vocab parallelism (no group, or a group
    of one rank). TypeError for anything but a ProcessGroup or None."""
    if process_group is None:
        return ""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    return process_group.group_name if dist.get_world_size(process_group) > 1 else ""


def resolve_group(name: str):
    """The process group of a name from :func:`group_name` (None for "")."""
    return dist.distributed_c10d._resolve_process_group(name) if name else None


def full_vocab(w_text: torch.Tensor, group) -> int:
    """V: the ids of the whole text head, given this rank's shard [V/tp, hidden]."""
    return w_text.shape[0] * (dist.get_world_size(group) if group is not None else 1)


def shard_start(w_text: torch.Tensor, group) -> int:
    """The first text id of this rank's shard (0 without a group)."""
    return dist.get_rank(group) * w_text.shape[0] if group is not None else 0


def gather_rows(weight: torch.Tensor, group) -> torch.Tensor:
    """The full text head [V, ...] from the shards of ``group`` (``weight`` itself without a group)."""
    if group is None:
        return weight
    full = weight.new_empty((dist.get_world_size(group) * weight.shape[0], *weight.shape[1:]))
    all_gather_flat(full, weight.contiguous(), group)
    return full


def own_rows(full_grad: torch.Tensor, shard_rows: int, group) -> torch.Tensor:
    """This rank's rows of a gradient of the full text head (an empty placeholder stays as it is)."""
    if group is None or full_grad.numel() == 0:
        return full_grad
    rank = dist.get_rank(group)
    return full_grad[rank * shard_rows:(rank + 1) * shard_rows].contiguous()


def combine_text_statistics(stats: torch.Tensor, valid: torch.Tensor, vocab: int, label_smoothing: float,
                            z_loss_weight: float, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (loss [n], lse [n]) of the text rows from this shard's statistics ``stats`` [3, n] = (log-sum-exp,
    target logit or 0 when the target is in another shard, sum of logits) in float32/float64; ``valid`` bool [n]
    marks rows whose label is not ignored (the loss is 0 elsewhere). Two all-reduces over ``group``."""
    local_lse = stats[0]
    lse_max = local_lse.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    # The global log-sum-exp from the shards' ones; the target logit and the sum of logits are plain sums.
    sums = torch.stack([(local_lse - lse_max).exp(), stats[1], stats[2]])
    dist.all_reduce(sums, group=group)
    lse = lse_max + sums[0].log()
    loss = lse - (1 - label_smoothing) * sums[1] - label_smoothing / vocab * sums[2] + z_loss_weight * lse.square()
    return torch.where(valid, loss, 0), lse


def all_reduce_partial(dh: torch.Tensor, group) -> None:
    """Sum, in place over ``group``, the text rows' gradient of h that each shard computed for its ids."""
    dist.all_reduce(dh, group=group)
