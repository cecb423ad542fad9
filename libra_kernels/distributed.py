"""The collectives the library issues itself, written once: the all-gather shared by the vocab-parallel loss and the
tensor-parallel trainer (``libra_model.parallel`` imports it from here)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_flat(output: torch.Tensor, x: torch.Tensor, group) -> None:
    """Gather every rank's ``x`` into ``output`` (ranks concatenated along dim 0; ``output`` has world-size times
    ``x``'s rows, same dtype and device). Uses ``all_gather_single`` where torch has it (newer releases deprecate
    ``all_gather_into_tensor``) and ``all_gather_into_tensor`` elsewhere (torch 2.11 lacks ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, x, group=group)
