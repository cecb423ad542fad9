"""The memory planner: its state numbers equal the bytes of the tensors the trainer allocates (tiny config, fp32
and bf16, frozen or not), its activation numbers follow the checkpointing modes and sequence parallelism, its
command line ends with the JSON line, and both paper configs fit 40 GiB on 16 GPUs."""

import dataclasses
import json
import os

import pytest
import torch

from libra_model.plan import GIB, MemoryPlan, activation_bytes, main, plan, state_bytes
from libra_model.trainer import TrainConfig, _build_model, _model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def allocated_state(model, optimizer) -> dict[str, int]:
    """Bytes of the tensors a trainer rank holds: parameters (by storage: packed projections share one), the two
    flat gradient buffers, the optimizer's masters that are not the parameters themselves and its moments."""
    storages = {}
    for param in model.parameters():
        storages[param.untyped_storage()._cdata] = param.untyped_storage().nbytes()
    grads = optimizer.partial_buffer.numel() * optimizer.partial_buffer.element_size() \
        + optimizer.other_buffer.numel() * optimizer.other_buffer.element_size()
    state = 0
    for name, entry in optimizer.named_state().items():
        state += sum(entry[k].numel() * entry[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        master = optimizer.masters[name]
        if master is not optimizer.params[name]:
            state += master.numel() * master.element_size()
    return {"weights": sum(storages.values()), "grads": grads, "optimizer": state}


def trainer_state(cfg, parallel):
    from libra_model.optim import MasterAdamW

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, masters = _build_model(cfg, _model_config(cfg), parallel, dtype)
    optimizer = MasterAdamW(model, initial_masters=masters)
    return allocated_state(model, optimizer)


@pytest.mark.parametrize("precision,frozen", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_state_numbers_equal_the_trainers_tensors(precision, frozen):
    from libra_model.parallel.mesh import ParallelState

    cfg = TrainConfig.from_sources(None, {"precision": precision, "frozen_language": frozen})
    allocated = trainer_state(cfg, ParallelState())
    planned = state_bytes(cfg, _model_config(cfg), tp=1, dp=1, device_type="cpu")
    for key in ("weights", "grads", "optimizer"):
        assert abs(planned[key] - allocated[key]) <= 0.05 * allocated[key], (key, planned, allocated)
    if precision == "fp32":
        # fp32 compute: the parameters are the masters, only the two moments are extra
        assert planned["optimizer"] == 2 * planned["grads"]
    else:
        assert planned["optimizer"] == 3 * planned["grads"] and planned["weights"] < planned["grads"] * 2
    if frozen:
        assert planned["grads"] < 0.5 * 2 * planned["weights"]


def test_optimizer_state_is_divided_over_dp_only_with_the_distributed_optimizer():
    cfg = TrainConfig.from_sources(None, {"precision": "bf16"})
    config = _model_config(cfg)
    one = state_bytes(cfg, config, tp=1, dp=1)
    four = state_bytes(cfg, config, tp=1, dp=4)  # default: distributed optimizer on when dp > 1
    assert four["weights"] == one["weights"] and four["grads"] == one["grads"]
    assert abs(four["optimizer"] * 4 - one["optimizer"]) < 4
    cfg.distributed_optimizer = False  # the setting the trainer reads (getattr, so both orders of landing work)
    assert state_bytes(cfg, config, tp=1, dp=4)["optimizer"] == one["optimizer"]
    two = state_bytes(TrainConfig.from_sources(None, {"precision": "bf16"}), config, tp=2, dp=1)
    assert two["weights"] < one["weights"] and two["grads"] < one["grads"]
    with pytest.raises(ValueError, match="tp=3 must divide"):
        state_bytes(cfg, config, tp=3, dp=1)


def test_activations_follow_the_checkpointing_mode_and_sequence_parallelism():
    cfg = TrainConfig.from_sources(None, {"precision": "bf16", "micro_batch_size": 4})
    config = _model_config(cfg)
    sizes = {}
    for mode in (False, "selective", "full"):
        cfg.activation_checkpointing = mode
        sizes[mode] = activation_bytes(cfg, config, tp=1)
    assert sizes["full"] < sizes["selective"] < sizes[False], sizes
    cfg.activation_checkpointing = False
    tp2 = activation_bytes(cfg, config, tp=2)
    cfg.sequence_parallel = True
    tp2_sp = activation_bytes(cfg, config, tp=2)
    assert tp2_sp < tp2 < sizes[False], (tp2_sp, tp2, sizes[False])
    cfg.micro_batch_size = 8
    assert activation_bytes(cfg, config, tp=2) > 1.8 * tp2_sp  # twice the rows, about twice the bytes


def test_command_line_prints_the_table_and_ends_with_the_json_line(capsys):
    assert main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--gpu-memory", "0.001"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"weights_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib", "fits"}
    assert result["fits"] is False and any("does NOT fit" in line for line in lines)
    parts = sum(result[k] for k in ("weights_gib", "grads_gib", "optimizer_gib", "activations_gib"))
    assert result["total_gib"] == pytest.approx(parts + 2.5, abs=0.01)


@pytest.mark.parametrize("name,tp,dp", [("pretrain", 2, 8), ("sft", 2, 8)])
def test_the_paper_configs_fit_40_gib_on_16_gpus(name, tp, dp):
    cfg = TrainConfig.from_sources(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.tp == tp and tp * dp == 16
    assert cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0
    result = plan(cfg, dp=dp, gpu_memory_gib=40)
    assert isinstance(result, MemoryPlan) and result.fits, result.summary()
    if result.settings["shard_gradients"]:
        # Stage 2: gradients sharded over DP too (the whole fp32 buffer would not fit beside the rest).
        unsharded = plan(dataclasses.replace(cfg, shard_gradients=False), dp=dp, gpu_memory_gib=40)
        assert name == "sft" and not unsharded.fits and result.grads < 0.25 * unsharded.grads
        assert result.optimizer == unsharded.optimizer and result.weights == unsharded.weights
    else:
        assert result.optimizer < result.grads  # sharded over DP
    assert result.total > 20 * GIB  # an 11B model, not a tiny one


def _distributed_state(rank, world_size):
    """At TP=2 x DP=2: the planner's state numbers equal what the trainer allocates per rank with the distributed
    optimizer, with and without sharded gradients (and their bucket layout, exactly)."""
    from libra_model.memory import bucket_sizes
    from libra_model.parallel.distributed_optimizer import DistributedMasterAdamW
    from libra_model.parallel.mesh import init_parallel
    from libra_model.parallel.tp_plan import is_tp_partial

    torch.set_num_threads(1)
    parallel = init_parallel(tp=2)
    assert (parallel.tp, parallel.dp) == (2, 2)
    for precision, shard, reduce_dtype in [("fp32", False, "fp32"), ("bf16", False, "fp32"), ("fp32", True, "fp32"),
                                           ("bf16", True, "fp32"), ("bf16", True, "bf16")]:
        cfg = TrainConfig.from_sources(None, {"precision": precision, "tp": 2, "shard_gradients": shard,
                                              "grad_reduce_dtype": reduce_dtype})
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, masters = _build_model(cfg, _model_config(cfg), parallel, dtype)
        optimizer = DistributedMasterAdamW(model, parallel, initial_masters=masters, shard_gradients=shard,
                                           grad_reduce_dtype=reduce_dtype)
        size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
        storages = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in model.parameters()}
        # The planner leaves out ZeRO-1's reduced gradient shard beside its full buffers (1/dp of them).
        allocated = {"weights": sum(storages.values()),
                     "grads": size(optimizer.grad_buffers) + (size(optimizer.grad_shards) if shard else 0)
                     + optimizer.transient_grad_bytes(),
                     "optimizer": size(optimizer.master_shards) + size(optimizer.exp_avg) + size(optimizer.exp_avg_sq)}
        assert allocated["grads"] == optimizer.memory_bytes()["grads"] - (0 if shard else size(optimizer.grad_shards))
        planned = state_bytes(cfg, _model_config(cfg), tp=2, dp=2, device_type="cpu")
        for key in ("weights", "grads", "optimizer"):
            assert abs(planned[key] - allocated[key]) <= 0.05 * allocated[key], (key, shard, planned, allocated)
        if shard:
            assert optimizer.grad_buffers == {}
            params = [(is_tp_partial(p), p.numel(), p.dim()) for p in model.parameters() if p.requires_grad]
            assert bucket_sizes(params, 2) == [b.padded for b in optimizer.buckets]
            itemsize = 2 if reduce_dtype == "bf16" else 4
            total = sum(b.padded for b in optimizer.buckets)  # two buckets (TP-partial and the rest): both held
            assert len(optimizer.buckets) == 2 and optimizer.transient_grad_bytes() == itemsize * (total + total // 2)


@pytest.mark.dist
def test_state_numbers_equal_the_distributed_optimizers_tensors():
    from libra_kernels.testing import run_in_process_group

    run_in_process_group(_distributed_state, 4)


def test_shard_gradients_settings():
    cfg = TrainConfig.from_sources(None, {"precision": "bf16", "shard_gradients": True})
    config = _model_config(cfg)
    one = state_bytes(dataclasses.replace(cfg, shard_gradients=False), config, tp=1, dp=8)
    eight = state_bytes(cfg, config, tp=1, dp=8)
    assert eight["weights"] == one["weights"] and eight["optimizer"] == one["optimizer"]
    assert eight["grads"] != one["grads"]
    with pytest.raises(ValueError, match="shard_gradients=true needs the distributed optimizer"):
        state_bytes(cfg, config, tp=1, dp=1)
    with pytest.raises(ValueError, match="shard_gradients"):
        plan(cfg, dp=1)
    assert plan(cfg, dp=2).settings["shard_gradients"] is True
    with pytest.raises(ValueError, match="shard_gradients must be true or false"):
        TrainConfig(shard_gradients="yes").validate()
    with pytest.raises(ValueError, match="shard_gradients=true needs the distributed optimizer"):
        TrainConfig(shard_gradients=True, distributed_optimizer=False).validate()
