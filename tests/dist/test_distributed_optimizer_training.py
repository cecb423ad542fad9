"""The trainer at DP=2 on two gloo processes with the distributed optimizer: the same per-step losses as with the
replicated optimizer, kill-and-resume continues exactly, and its checkpoint resumes in one process (DP=1)."""

import os
import sys

import pytest
import torch

from libra_kernels.testing import run_in_process_group

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import read_metrics, small_config  # noqa: E402

pytestmark = pytest.mark.dist


def _dp2_runs(rank, world_size, processor, root):
    import libra_model.trainer as trainer
    from libra_model.parallel.distributed_optimizer import DistributedMasterAdamW
    from libra_model.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    assert parallel.dp == 2
    optimizers = []
    real_step = trainer.train_step

    def record(model, optimizer, *args, **kwargs):
        optimizers.append(type(optimizer))
        return real_step(model, optimizer, *args, **kwargs)

    trainer.train_step = record
    # micro_batch_size 2: two micro-batches per replica, so the buckets are reduced in the second one's backward.
    settings = dict(micro_batch_size=2, debug_checks=True)
    trainer.train(small_config(processor, os.path.join(root, "dist"), **settings), parallel)  # default: on at dp=2
    trainer.train(small_config(processor, os.path.join(root, "plain"), distributed_optimizer=False, **settings),
                  parallel)
    trainer.train_step = real_step
    assert set(optimizers[:6]) == {DistributedMasterAdamW} and DistributedMasterAdamW not in optimizers[6:]

    calls = {"n": 0}

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    trainer.train_step = dies_in_step_5
    try:
        trainer.train(small_config(processor, os.path.join(root, "resumed"), **settings), parallel)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    trainer.train_step = real_step
    trainer.train(small_config(processor, os.path.join(root, "resumed"), resume=True, **settings), parallel)
    if rank == 0:
        dist_rows, plain_rows = read_metrics(os.path.join(root, "dist")), read_metrics(os.path.join(root, "plain"))
        assert [r["step"] for r in dist_rows] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(dist_rows, plain_rows):
            # Same data, same arithmetic up to the order of float32 sums (the norm is summed shard by shard).
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (a, b)
        assert dist_rows[-1]["loss"] < dist_rows[0]["loss"]
        resumed = read_metrics(os.path.join(root, "resumed"))
        assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in dist_rows]


def test_trainer_distributed_optimizer_matches_replicated_and_resumes(processor_dir, tmp_path):
    run_in_process_group(_dp2_runs, 2, processor_dir, str(tmp_path))

    # The DP=2 sharded checkpoint resumes in one process (DP=1, the replicated optimizer).
    import libra_model.trainer as trainer
    from libra_model.parallel import dcp_checkpoint as ckpt

    path = ckpt.latest_checkpoint(str(tmp_path / "dist" / "checkpoints"))
    assert ckpt.read_meta(path)["dp"] == 2
    summary = trainer.train(small_config(processor_dir, tmp_path / "dist", resume=True, max_steps=7))
    assert summary["step"] == 7 and summary["loss"] < read_metrics(str(tmp_path / "dist"))[0]["loss"]


def test_trainer_rejects_bad_optimizer_settings(tmp_path):
    from libra_model.trainer import TrainConfig

    with pytest.raises(ValueError, match="distributed_optimizer"):
        TrainConfig(distributed_optimizer="yes").validate()
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        TrainConfig(grad_reduce_dtype="fp16").validate()
    with pytest.raises(ValueError, match="needs the distributed optimizer"):
        TrainConfig(grad_reduce_dtype="bf16", distributed_optimizer=False).validate()


def _dp2_sharded_runs(rank, world_size, processor, root):
    import shutil

    import torch.distributed as dist

    import libra_model.trainer as trainer
    from libra_model.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    optimizers = []
    real_step = trainer.train_step

    def record(model, optimizer, *args, **kwargs):
        optimizers.append(optimizer.shard_gradients)
        return real_step(model, optimizer, *args, **kwargs)

    trainer.train_step = record
    # Two micro-batches per replica: each backward reduce-scatters its own gradients with sharded gradients.
    settings = dict(micro_batch_size=2, debug_checks=True)
    trainer.train(small_config(processor, os.path.join(root, "sharded"), shard_gradients=True, **settings), parallel)
    trainer.train(small_config(processor, os.path.join(root, "zero1"), **settings), parallel)
    assert optimizers == [True] * 6 + [False] * 6
    # The sharded run's step-3 checkpoint resumed without sharded gradients.
    if rank == 0:
        shutil.copytree(os.path.join(root, "sharded", "checkpoints", "step_00000003"),
                        os.path.join(root, "switched", "checkpoints", "step_00000003"))
    dist.barrier()
    trainer.train(small_config(processor, os.path.join(root, "switched"), resume=True, **settings), parallel)
    trainer.train_step = real_step
    if rank == 0:
        sharded, zero1 = read_metrics(os.path.join(root, "sharded")), read_metrics(os.path.join(root, "zero1"))
        switched = read_metrics(os.path.join(root, "switched"))
        assert [r["step"] for r in sharded] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in switched] == [4, 5, 6]
        for a, b in zip(sharded, zero1):
            # The same data and arithmetic up to the order of float32 sums (micro-batches reduced one by one).
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (a, b)
        for a, b in zip(sharded[3:], switched):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
        assert sharded[-1]["loss"] < sharded[0]["loss"]


def test_trainer_sharded_gradients_match_zero1_and_resume(processor_dir, tmp_path):
    run_in_process_group(_dp2_sharded_runs, 2, processor_dir, str(tmp_path))

    # The sharded run's checkpoint resumes in one process (DP=1, the replicated optimizer, no sharded gradients).
    import libra_model.trainer as trainer
    from libra_model.parallel import dcp_checkpoint as ckpt

    path = ckpt.latest_checkpoint(str(tmp_path / "sharded" / "checkpoints"))
    assert ckpt.read_meta(path)["dp"] == 2
    summary = trainer.train(small_config(processor_dir, tmp_path / "sharded", resume=True, max_steps=7))
    assert summary["step"] == 7 and summary["loss"] < read_metrics(str(tmp_path / "sharded"))[0]["loss"]
    # ... and sharded gradients need data-parallel replicas: one process refuses them, naming the setting.
    with pytest.raises(ValueError, match="shard_gradients=true needs the distributed optimizer"):
        trainer.train(small_config(processor_dir, tmp_path / "one", shard_gradients=True))


def test_trainer_rejects_bad_shard_gradients_settings():
    from libra_model.trainer import TrainConfig

    with pytest.raises(ValueError, match="shard_gradients must be true or false"):
        TrainConfig(shard_gradients=1).validate()
    with pytest.raises(ValueError, match="shard_gradients=true needs the distributed optimizer"):
        TrainConfig(shard_gradients=True, distributed_optimizer=False).validate()
    TrainConfig(shard_gradients=True).validate()  # null distributed_optimizer: on at dp > 1, checked at start
