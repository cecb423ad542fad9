"""Whole training steps: tokens/s and MFU (model FLOPs counted as Libra's real FLOPs, the trainer's own estimate)
of the tiny default on any machine and of the ~1B config (configs/bench_1b.yaml) on a GPU. The numbers are the
trainer's last logged window (after the first steps, which include warm-up), read from its metrics.jsonl."""

from __future__ import annotations

import json
import os

import pytest
import torch

from libra_model.trainer import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"tiny": (None, 12, 6), "bench_1b": (os.path.join(ROOT, "configs", "bench_1b.yaml"), 20, 10)}


@pytest.mark.parametrize("name", list(RUNS))
def test_train_step(benchmark, record, device, tmp_path, name):
    source, steps, window = RUNS[name]
    if name == "bench_1b" and device.type != "cuda":
        pytest.skip("the ~1B config is measured on a GPU")
    overrides = dict(output_dir=str(tmp_path), max_steps=steps, log_every=window, save_every=10**9, export_hf=False,
                     caption_samples=0)
    if name == "tiny":
        overrides["data_num_samples"] = 512
    config = TrainConfig.from_sources(source, overrides)
    benchmark.pedantic(train, args=(config,), rounds=1, iterations=1)
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if "tokens_per_s" in line]
    last = rows[-1]
    record("train_step", dict(op="training step", shape=name, dtype=config.precision, impl="libra trainer",
                              ms=1e3 * last["step_time_s"], tokens_per_s=last["tokens_per_s"], mfu=last["mfu"]))
    assert last["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(last["loss"]))
