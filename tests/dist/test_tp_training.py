"""The trainer at TP=2 on two gloo processes: the default run trains, kill-and-resume continues exactly, and its
TP=2 checkpoint loads at TP=1 (weights and AdamW state equal to the gathered TP=2 ones)."""

import os
import sys

import pytest
import torch

from libra_kernels.testing import run_in_process_group

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import read_metrics, small_config  # noqa: E402

pytestmark = pytest.mark.dist


def _tp2_runs(rank, world_size, processor, root):
    import libra_model.trainer as trainer
    from libra_model.parallel.mesh import init_parallel
    from libra_model.parallel.tp_plan import full_state_dict

    torch.set_num_threads(1)  # two processes on a small CPU: oversubscribed OpenMP threads spin and stall
    parallel = init_parallel(tp=2)
    captured = {}
    real_step, real_save = trainer.train_step, trainer.ckpt.save_checkpoint

    def keep(root_dir, step, model, optimizer, parallel_, state, **kwargs):
        captured["model"], captured["optimizer"] = model, optimizer
        return real_save(root_dir, step, model, optimizer, parallel_, state, **kwargs)

    trainer.ckpt.save_checkpoint = keep
    summary = trainer.train(small_config(processor, os.path.join(root, "a"), tp=2, debug_checks=True), parallel)
    trainer.ckpt.save_checkpoint = real_save
    assert summary["loss"] < summary["first_loss"]
    # Gathered full tensors of the final state, for the TP=1 load check in the parent process.
    model, optimizer = captured["model"], captured["optimizer"]
    full = full_state_dict(model, parallel.tp_group, source=optimizer.master_params())
    exp_avg = full_state_dict(model, parallel.tp_group,
                              source={n: s["exp_avg"] for n, s in optimizer.named_state().items()})
    if rank == 0:
        torch.save({"params": full, "exp_avg": {n: exp_avg[n] for n in optimizer.names}},
                   os.path.join(root, "gathered.pt"))

    calls = {"n": 0}

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    trainer.train_step = dies_in_step_5
    try:
        trainer.train(small_config(processor, os.path.join(root, "b"), tp=2), parallel)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    trainer.train_step = real_step
    trainer.train(small_config(processor, os.path.join(root, "b"), tp=2, resume=True), parallel)
    if rank == 0:
        expected, got = read_metrics(os.path.join(root, "a")), read_metrics(os.path.join(root, "b"))
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
        assert [(r["loss"], r["grad_norm"]) for r in expected] == [(r["loss"], r["grad_norm"]) for r in got]


def test_tp2_training_resume_and_load_at_tp1(processor_dir, tmp_path):
    run_in_process_group(_tp2_runs, 2, processor_dir, str(tmp_path))

    # The TP=2 checkpoint loads into an unsharded (TP=1) model and optimizer, in this single process.
    from libra_model.config import LibraConfig
    from libra_model.model import LibraForCausalLM
    from libra_model.optim import MasterAdamW
    from libra_model.parallel import dcp_checkpoint as ckpt
    from libra_model.parallel.mesh import ParallelState

    path = ckpt.latest_checkpoint(str(tmp_path / "a" / "checkpoints"))
    assert ckpt.read_meta(path)["tp"] == 2
    model = LibraForCausalLM(LibraConfig.tiny(vocab_size=128))
    optimizer = MasterAdamW(model)
    state = ckpt.load_checkpoint(path, model, optimizer, ParallelState())
    assert state["step"] == 6
    gathered = torch.load(str(tmp_path / "gathered.pt"))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), gathered["params"][name]), name
    for name, value in gathered["exp_avg"].items():
        assert torch.equal(optimizer.named_state()[name]["exp_avg"], value), name
        assert int(optimizer.named_state()[name]["step"]) == 6
    # ... and a TP=1 run resumes from it.
    summary = __import__("libra_model.trainer", fromlist=["train"]).train(
        small_config(processor_dir, tmp_path / "a", tp=1, resume=True, max_steps=7))
    assert summary["step"] == 7 and summary["loss"] < 10
