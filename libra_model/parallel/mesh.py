"""The (dp, tp) device mesh, built from ``torchrun``'s environment, and the seeding rules
(docs/parallel.md, "Mesh and groups").

TP is the innermost mesh dimension, so the ranks of one TP group are consecutive (on one node with torchrun's
usual rank order). The backend is NCCL when CUDA is available and gloo otherwise. Without torchrun (no WORLD_SIZE
in the environment and no process group) the run is a single process: every group is ``None`` and every collective
helper treats it as a group of one (the identity).

Seeding: the model is initialised with the same global seed on every rank (each full tensor is built and then
sliced, so TP=1 and TP=k start bit-identical); only the data order depends on the DP rank, so the TP ranks of one
DP replica read the same batch.
"""

from __future__ import annotations

import datetime
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    """Where this process sits in the (dp, tp) mesh.

    Attributes:
        world_size, rank: the global group.  dp, tp: mesh sizes (dp·tp = world_size).
        dp_rank, tp_rank: coordinates of this rank (rank = dp_rank·tp + tp_rank).
        device: the torch device this rank computes on.
        mesh: the ``DeviceMesh`` with dims ("dp", "tp"), or None for a single process.
        dp_group, tp_group: process groups along each mesh dim (None for a single process).
        world_group: the group over all ranks (= DP×TP, used for the combined reduction of TP-partial grads).
    """

    world_size: int = 1
    rank: int = 0
    dp: int = 1
    tp: int = 1
    dp_rank: int = 0
    tp_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None
    dp_group: object | None = None
    tp_group: object | None = None
    world_group: object | None = None

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that prints and writes shared files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group exists (more than one process)."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_parallel(tp: int = 1, *, device: str | torch.device | None = None, backend: str | None = None,
                  timeout_s: float | None = None) -> ParallelState:
    """Join (or create) the process group from ``torchrun``'s environment and build the (dp, tp) mesh.

    Args:
        tp: tensor-parallel size; must divide the world size (dp = world_size / tp).
        device: "cpu", "cuda" or a device; None picks CUDA (the LOCAL_RANK-th GPU) when available, else the CPU.
        backend: process-group backend; None = "nccl" on CUDA, "gloo" on the CPU.
        timeout_s: collective timeout in seconds, applied to the global group and to the mesh's dp and tp groups
            (None = torch's default, 30 minutes on gloo, 10 on NCCL). A collective that waits longer raises on gloo
            (see :func:`collective_failure_message`); on NCCL the watchdog aborts the process. Either way the rank
            exits, and torchrun then ends the others.

    Returns the :class:`ParallelState`. A single process without a process group gets all groups None.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"init_parallel: tp must be a positive int, got {tp!r}")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s < math.inf):
        raise ValueError(f"init_parallel: timeout_s must be a positive number of seconds, got {timeout_s!r}")
    world_size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    if world_size % tp:
        raise ValueError(f"init_parallel: tp={tp} must divide the world size {world_size} "
                         "(launch with torchrun --nproc_per_node=<a multiple of tp>)")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if world_size == 1 and not dist.is_initialized():
        return ParallelState(device=device)

    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one CPU: split the cores, since oversubscribed OpenMP threads spin and stall each other.
        local = _env_int("LOCAL_WORLD_SIZE", world_size)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl":
            # The watchdog aborts the communicator and the process when a collective exceeds the timeout (rather
            # than leaving the rank blocked in a kernel), so torchrun sees the failure and ends the job.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    dp = world_size // tp
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    rank = dist.get_rank()
    dp_group, tp_group = mesh["dp"].get_group(), mesh["tp"].get_group()
    if timeout is not None:
        # Sub-groups made by new_group take torch's default timeout, not the global group's: set it on each.
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        for group in {dp_group, tp_group, dist.group.WORLD}:
            if set_timeout is not None and group is not None:
                set_timeout(timeout, group)
    return ParallelState(world_size=world_size, rank=rank, dp=dp, tp=tp, dp_rank=rank // tp, tp_rank=rank % tp,
                         device=device, mesh=mesh, dp_group=dp_group, tp_group=tp_group,
                         world_group=dist.group.WORLD)


_COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                        "watchdog")


def collective_failure_message(error: BaseException, timeout_s: float | None) -> str | None:
    """A clear one-paragraph message when ``error`` is a collective that failed because another rank stalled, died
    or timed out (torch's DistBackendError, or gloo's RuntimeError "Timed out waiting ... for recv"); None for any
    other error (which should propagate as it is)."""
    text = str(error)
    if not isinstance(error, getattr(dist, "DistBackendError", ())) and not (
            isinstance(error, RuntimeError) and any(key in text.lower() for key in _COLLECTIVE_FAILURES)):
        return None
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    limit = f"within dist_timeout_s={timeout_s:g} s" if timeout_s is not None else "within the collective timeout"
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"rank {rank}: a collective did not complete {limit}: another rank stalled, died or lost its "
            f"connection, so the job stops ({type(error).__name__}: {first_line}). Check the other ranks' logs; "
            "resume with --resume from the last checkpoint.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when installed) and torch (CPU and CUDA) with the same ``seed`` on every rank, so that
    every rank builds the same full initial weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional here
        pass


def data_seed(seed: int, dp_rank: int) -> int:
    """Seed of the data order of DP replica ``dp_rank``: equal on the TP ranks of one replica, different between
    replicas. (The samplers in ``libra_model.data`` take the global seed and the DP rank and derive it themselves;
    this is for any other per-replica randomness, such as augmentation.)"""
    return (seed * 1_000_003 + 7919 * (dp_rank + 1)) % 2**63
