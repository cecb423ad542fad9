import pytest
import torch
import torch.distributed as dist

from libra_kernels.testing import run_in_process_group

pytestmark = pytest.mark.dist


def _all_reduce_sums(rank, world_size):
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((3,), float(sum(range(1, world_size + 1)))))


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one fails on purpose")


def test_runs_on_gloo():
    run_in_process_group(_all_reduce_sums, 2)


def test_reports_the_failing_rank():
    with pytest.raises(AssertionError, match="rank 1 failed(.|\n)*rank one fails on purpose"):
        run_in_process_group(_fails_on_rank_one, 2)
