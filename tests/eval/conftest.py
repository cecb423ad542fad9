"""A tiny Libra trained by the trainer (the embedded default's code path, a few steps, with held-out evaluation),
shared by the evaluation tests."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import build_processor_dir, small_config  # noqa: E402

EVAL_EVERY, STEPS = 2, 4


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """{"processor": dir, "output": run dir, "hf": exported model dir, "summary": train()'s summary, "eval_every",
    "steps"}."""
    from libra_model.trainer import train

    processor = build_processor_dir(tmp_path_factory.mktemp("processor"))
    output = tmp_path_factory.mktemp("run")
    config = small_config(processor, output, max_steps=STEPS, save_every=STEPS, export_hf=True,
                          eval_every=EVAL_EVERY, eval_samples=3, caption_max_new_tokens=8)
    summary = train(config)
    return {"processor": processor, "output": str(output), "hf": os.path.join(output, "hf"), "summary": summary,
            "eval_every": EVAL_EVERY, "steps": STEPS}
