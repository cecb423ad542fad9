"""Helpers of the trainer tests (tests/train and tests/dist)."""

import json
import os

from libra_model.config import LibraConfig
from libra_model.data.shapes import ShapesCaptions

TINY = {"vocab_size": 128}


def build_processor_dir(directory):
    """A tiny processor directory (tokenizer trained on the shapes captions, random CLIP and quantiser)."""
    from libra_model.tiny import build_tiny_processor_dir

    return build_tiny_processor_dir(directory, LibraConfig.tiny(**TINY), texts=ShapesCaptions.vocabulary_text(),
                                    seed=42)


def small_config(processor_dir, output_dir, **overrides):
    from libra_model.trainer import TrainConfig

    values = dict(processor=processor_dir, output_dir=str(output_dir), model_overrides=dict(TINY), max_steps=6,
                  global_batch_size=8, micro_batch_size=4, log_every=1, save_every=3, caption_samples=0, eval_samples=0,
                  export_hf=False, tensorboard=False, data_num_samples=256, lr=3e-3, warmup_steps=2)
    values.update(overrides)
    return TrainConfig.from_sources(None, values)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
