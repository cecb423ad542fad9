"""Gradient synchronisation, norm and clipping under TP × DP (docs/parallel.md, "Gradient reduction,
clipping, the optimizer step").

Order per optimizer step: backward of every micro-batch (gradients accumulate in float32 buffers) → one SUM
all-reduce over the combined DP×TP group of the TP-partial gradients (``p._tp_partial_grad``) → one SUM all-reduce
over DP of all the others → global norm → clip → step.

Both reductions are plain SUMs: the trainer scales each micro-batch loss by the *global* token counts of the step
(see ``libra_model.trainer``), so the summed gradient is the gradient of the global loss and nothing is divided by
the DP size here.

Why not DDP: the TP-partial gradients need a reduction over DP×TP while the others need one over DP only, and
both are needed once per optimizer step rather than per micro-batch. A flat float32 buffer per class gives exactly
two collectives per step with no per-micro-batch ``no_sync`` bookkeeping. The cost is that the reductions do not
overlap the backward pass; with gradient accumulation that overlap only ever covered the last micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from libra_kernels.distributed import all_gather_flat
from libra_model.modules.tensor_parallel import COLLECTIVES, tp_world_size

# Flat buffers are reduced in slices of this many elements, so a collective never needs a second full-size buffer
# (gloo and NCCL both work in place, but very large single messages stall gloo).
BUCKET_ELEMENTS = 1 << 26


def _world(group) -> int:
    return tp_world_size(group)


def all_reduce_flat_(buffer: torch.Tensor, group, kind: str = "grad_all_reduce") -> None:
    """SUM all-reduce of a 1-D ``buffer`` over ``group`` in place, in slices of :data:`BUCKET_ELEMENTS`
    (no-op for a group of one rank or None). Counted in ``COLLECTIVES[(kind, "step")]``."""
    if _world(group) == 1 or buffer.numel() == 0:
        return
    for start in range(0, buffer.numel(), BUCKET_ELEMENTS):
        dist.all_reduce(buffer[start:start + BUCKET_ELEMENTS], group=group)
        COLLECTIVES[(kind, "step")] += 1


def reduce_gradients_(partial_buffer: torch.Tensor, other_buffer: torch.Tensor, *, dp_group, world_group,
                      tp_group) -> None:
    """The one deferred gradient reduction of a step, in place.

    Args:
        partial_buffer: float32 [P], the flat gradients of the TP-partial parameters (replicated inside f…g).
        other_buffer: float32 [Q], the flat gradients of every other trainable parameter.
        dp_group, world_group, tp_group: the mesh groups (None for size one).

    The partial gradients are summed over DP×TP (the world group of the mesh: TP ranks hold partial sums, DP ranks
    hold different data) in one collective; the others over DP only. With TP=1 the partial buffer is empty.
    """
    if _world(tp_group) > 1:
        all_reduce_flat_(partial_buffer, world_group, "grad_all_reduce_dp_tp")
    else:
        all_reduce_flat_(partial_buffer, dp_group, "grad_all_reduce_dp")
    all_reduce_flat_(other_buffer, dp_group, "grad_all_reduce_dp")


def global_grad_norm(sharded: list[torch.Tensor], replicated: list[torch.Tensor], *, tp_group,
                     tp_rank: int) -> torch.Tensor:
    """The L2 norm of the full model's gradient (a scalar tensor, float32 or float64 for float64 gradients, equal
    on every rank).

    Args:
        sharded: gradients of TP-sharded parameters (each rank holds a distinct slice).
        replicated: gradients of replicated parameters (after reduction: identical on every TP rank).
        tp_group, tp_rank: the TP group and this rank's index in it.

    Sharded squares are summed on every rank, replicated ones on TP rank 0 only, then summed over TP, so no
    replicated parameter is counted tp times. Gradients are already reduced over DP (identical across DP), so there
    is no DP reduction.
    """
    first = (sharded or replicated or [torch.zeros(())])[0]
    dtype = torch.promote_types(first.dtype, torch.float32)  # float32, or float64 for float64 buffers
    total = torch.zeros((), dtype=dtype, device=first.device)
    for grad in sharded:
        total += grad.to(dtype).pow(2).sum()
    if tp_rank == 0:
        for grad in replicated:
            total += grad.to(dtype).pow(2).sum()
    if _world(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
        COLLECTIVES[("grad_norm_all_reduce", "step")] += 1
    return total.sqrt()


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) as a float32 scalar tensor (torch's ``clip_grad_norm_`` rule).
    A non-finite norm gives a non-finite coefficient, so the caller can skip the step."""
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"clip_coefficient: max_norm must be a positive finite number, got {max_norm!r}")
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def check_replicated_equal(named: list[tuple[str, torch.Tensor]], tp_group) -> None:
    """Debug invariant: every tensor in ``named`` (replicated parameters or their reduced gradients) is bit-equal
    on all TP ranks. Gathers everything (slow): for tests and ``debug_checks`` runs. Raises AssertionError naming the
    first tensor that differs."""
    tp = _world(tp_group)
    if tp == 1:
        return
    for name, tensor in named:
        flat = tensor.detach().reshape(-1).contiguous()
        gathered = torch.empty(tp * flat.numel(), dtype=flat.dtype, device=flat.device)
        all_gather_flat(gathered, flat, tp_group)
        gathered = gathered.view(tp, -1)
        if not all(torch.equal(gathered[0], gathered[r]) for r in range(1, tp)):
            diff = (gathered - gathered[0]).abs().max().item()
            raise AssertionError(f"replicated tensor {name} differs across TP ranks (max abs difference {diff})")
