"""The trainer at TP=2 on two gloo processes with sequence parallelism on and off: the same per-step losses and
gradient norms (fp32 rounding: the norm weights' gradients are summed in another order); and the planner's state
numbers at TP=2 equal the bytes of the tensors the trainer allocates on each rank; a run that generates its processor
builds the same weights on every rank."""

import os
import sys

import pytest
import torch

from libra_kernels.testing import run_in_process_group

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from test_plan import trainer_state  # noqa: E402
from train_helpers import read_metrics, small_config  # noqa: E402

pytestmark = pytest.mark.dist


def _runs(rank, world_size, processor, root):
    import libra_model.trainer as trainer
    from libra_model.parallel.mesh import init_parallel
    from libra_model.plan import state_bytes

    torch.set_num_threads(1)
    parallel = init_parallel(tp=2)
    for sp in (False, True):
        cfg = small_config(processor, os.path.join(root, f"sp_{sp}"), tp=2, sequence_parallel=sp, max_steps=4,
                           save_every=100, activation_checkpointing="selective" if sp else False)
        summary = trainer.train(cfg, parallel)
        assert summary["loss"] < summary["first_loss"]
    if rank == 0:
        off, on = read_metrics(os.path.join(root, "sp_False")), read_metrics(os.path.join(root, "sp_True"))
        assert [r["step"] for r in off] == [r["step"] for r in on] == [1, 2, 3, 4]
        for a, b in zip(off, on):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a, b)
    # A run that generates its processor (rank 0 only) still builds the same weights on both ranks: debug_checks
    # compares every replicated parameter across the TP ranks after each step.
    cfg = small_config(None, os.path.join(root, "generated"), tp=2, sequence_parallel=True, max_steps=1, warmup_steps=1,
                       debug_checks=True)
    trainer.train(cfg, parallel)
    for precision, sp in (("bf16", True), ("fp32", False)):
        cfg = small_config(processor, os.path.join(root, "state"), tp=2, precision=precision, sequence_parallel=sp)
        allocated = trainer_state(cfg, parallel)
        planned = state_bytes(cfg, trainer._model_config(cfg), tp=2, dp=1, device_type="cpu")
        for key in ("weights", "grads", "optimizer"):
            assert abs(planned[key] - allocated[key]) <= 0.05 * allocated[key], (key, planned, allocated)


def test_sequence_parallel_training_and_planned_state_at_tp2(processor_dir, tmp_path):
    run_in_process_group(_runs, 2, processor_dir, str(tmp_path))
