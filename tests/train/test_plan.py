"""The memory planner: its state numbers equal the bytes of the tensors the trainer allocates (tiny config, fp32
and bf16, frozen or not), its activation numbers follow the checkpointing modes and sequence parallelism, its
command line ends with the JSON line, and both paper configs fit 40 GiB on 16 GPUs."""

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


@pytest.mark.parametrize("name,tp,dp", [("pretrain", 2, 8), ("sft", 4, 4)])
def test_the_paper_configs_fit_40_gib_on_16_gpus(name, tp, dp):
    cfg = TrainConfig.from_sources(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.tp == tp and tp * dp == 16
    assert cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0
    result = plan(cfg, dp=dp, gpu_memory_gib=40)
    assert isinstance(result, MemoryPlan) and result.fits, result.summary()
    assert result.optimizer < result.grads  # sharded over DP
    assert result.total > 20 * GIB  # an 11B model, not a tiny one
