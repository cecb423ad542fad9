"""Train Libra.

    python train.py                                        # the embedded default: a tiny Libra on generated shapes
    torchrun --nproc_per_node=2 train.py --tp 2            # the same with tensor parallelism over two processes
    torchrun --nproc_per_node=8 train.py --config configs/pretrain.yaml --tp 2 --set processor=/data/libra-proc

Settings come from the defaults of ``libra_model.trainer.TrainConfig``, then ``--config``, then the flags, then
``--set key=value`` (values parsed as YAML).
"""

import argparse
import os
import sys

import torch.distributed as dist

from libra_model.parallel.mesh import collective_failure_message
from libra_model.trainer import TrainConfig, parse_set, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train Libra (tensor parallel over --tp ranks, data parallel over "
                                                 "the rest of the torchrun world).")
    parser.add_argument("--config", help="a YAML file of TrainConfig settings (e.g. configs/pretrain.yaml)")
    parser.add_argument("--output-dir", help="where metrics.jsonl, checkpoints/ and hf/ go")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of the whole run")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (must divide the number of processes)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint that verifies")
    parser.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                        help="collective timeout (dist_timeout_s, default 600): a stalled rank ends the job")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting")
    args = parser.parse_args(argv)
    try:
        overrides = parse_set(args.set)
    except ValueError as error:
        parser.error(str(error))
    for flag, key in (("output_dir", "output_dir"), ("max_steps", "max_steps"), ("tp", "tp"),
                      ("dist_timeout", "dist_timeout_s")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.resume:
        overrides["resume"] = True
    try:
        config = TrainConfig.from_sources(args.config, overrides)
    except ValueError as error:
        parser.error(str(error))  # a bad setting: its message and the usage, exit status 2, no traceback
    try:
        train(config)
    except Exception as error:
        message = collective_failure_message(error, config.dist_timeout_s)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        # The peer is gone or stuck: tearing the group down would wait for it. Exit now; torchrun ends the rest.
        sys.stdout.flush()
        os._exit(1)
    finally:
        # Tear the process group down explicitly: left to interpreter exit, gloo's threads can abort the process.
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
