"""The two tensor-parallel region boundaries as autograd functions, and a counter of the collectives they issue.

"f" (:func:`copy_to_tp_region`) is the identity forward and a SUM all-reduce of the gradient backward; it sits on
the replicated input of a block. "g" (:func:`reduce_from_tp_region`) is a SUM all-reduce forward and the identity
backward; it sits on the block's output of partial sums. Both are the identity when ``group`` is None or has one
rank, so a model written with them runs unchanged without tensor parallelism.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from libra_kernels.distributed import all_gather_flat as all_gather_flat

COLLECTIVES: Counter = Counter()  # (kind, "forward" | "backward") -> number of collectives issued


def tp_world_size(group) -> int:
    """Ranks in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    COLLECTIVES[("all_reduce", direction)] += 1
    return x


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group, "backward"), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """"f": identity forward, all-reduce (SUM over ``group``) of the gradient backward. Any shape and dtype."""
    if tp_world_size(group) == 1:
        return x
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """"g": all-reduce (SUM over ``group``) forward, identity backward. Any shape and dtype."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceFromTPRegion.apply(x, group)

