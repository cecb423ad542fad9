"""The trainer's collective helpers. The tensor-parallel region boundaries ("f"/"g"), ``tp_world_size`` and the
``COLLECTIVES`` counter belong to the model (``libra_model.modules.tensor_parallel``)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_flat(output: torch.Tensor, x: torch.Tensor, group) -> None:
    """Gather every rank's ``x`` into ``output`` (ranks concatenated along dim 0). Uses ``all_gather_single`` where
    torch has it (newer releases deprecate ``all_gather_into_tensor``) and ``all_gather_into_tensor`` elsewhere
    (torch 2.11 lacks ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, x, group=group)
