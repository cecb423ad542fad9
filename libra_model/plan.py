"""The memory planner's command line: what one GPU holds when the trainer runs a config at a given TP × DP.

    python -m libra_model.plan --config configs/sft.yaml --dp 8 --gpu-memory 40

prints a per-GPU table (bf16 weights, float32 gradient buffers (with ``shard_gradients``: the rank's shard and the
transient buckets), the optimizer state = float32 masters and AdamW moments, the activations of one micro-batch
under the config's checkpointing option, an allowance for the CUDA context and NCCL), settings on the same number of
GPUs that fit, and as its last line of stdout one JSON object
with the keys ``weights_gib``, ``grads_gib``, ``optimizer_gib``, ``activations_gib``, ``total_gib`` and ``fits``.
The numbers come from the model on the meta device (``libra_model.memory``) with the trainer's model config and
freezing rule.
"""

from __future__ import annotations

import argparse
import json
import sys

from libra_model import memory
from libra_model.memory import GIB, MemoryPlan, format_plan  # noqa: F401  (the planner's public names)
from libra_model.trainer import TrainConfig, _model_config, freeze_language_, parse_set


def state_bytes(cfg, config, tp: int, dp: int, device_type: str = "cuda") -> dict[str, int]:
    """:func:`libra_model.memory.state_bytes` with the trainer's freezing rule."""
    return memory.state_bytes(cfg, config, tp, dp, device_type, freeze=freeze_language_)


def activation_bytes(cfg, config, tp: int, device_type: str = "cuda") -> int:
    """:func:`libra_model.memory.activation_bytes` with the trainer's freezing rule."""
    return memory.activation_bytes(cfg, config, tp, device_type, freeze=freeze_language_)


def plan(cfg: TrainConfig, *, tp: int | None = None, dp: int = 1, gpu_memory_gib: float | None = None,
         device_type: str = "cuda") -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` at ``tp`` (default ``cfg.tp``) × ``dp`` with the trainer's rules."""
    return memory.plan_memory(cfg, _model_config(cfg), tp=tp, dp=dp, gpu_memory_gib=gpu_memory_gib,
                              device_type=device_type, freeze=freeze_language_)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m libra_model.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a TrainConfig YAML file (default: the embedded run)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the config's)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory of one GPU in GiB")
    args = parser.parse_args(argv)
    overrides = parse_set(args.set)
    if args.tp is not None:
        overrides["tp"] = args.tp
    cfg = TrainConfig.from_sources(args.config, overrides)
    result = plan(cfg, tp=cfg.tp, dp=args.dp, gpu_memory_gib=args.gpu_memory)
    print(format_plan(result))
    if args.gpu_memory is not None:
        options = memory.alternatives(cfg, _model_config(cfg), tp=cfg.tp, dp=args.dp, gpu_memory_gib=args.gpu_memory,
                                      freeze=freeze_language_)
        print(f"settings that fit {args.gpu_memory:g} GiB on {cfg.tp * args.dp} GPUs:" if options else
              f"no setting tried fits {args.gpu_memory:g} GiB on {cfg.tp * args.dp} GPUs")
        for option in options:
            keys = ("tp", "dp", "micro_batch_size", "activation_checkpointing", "sequence_parallel", "shard_gradients")
            print("  " + " ".join(f"{k}={option.settings[k]}" for k in keys) + f": {option.total / GIB:.2f} GiB")
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
