"""Training integration: eval_every logs the held-out loss and caption metrics to metrics.jsonl; the run's summary
ends with them."""

import math
import os
import sys

import pytest
import torch

from libra_model.eval.caption_metrics import CAPTION_METRICS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import read_metrics  # noqa: E402


def test_eval_rows_in_metrics_and_summary(trained_run):
    rows = [row for row in read_metrics(trained_run["output"]) if "val_loss" in row]
    every, steps = trained_run["eval_every"], trained_run["steps"]
    assert [row["step"] for row in rows] == list(range(every, steps + 1, every))
    for row in rows:
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0
        assert row["val_caption_images"] == 3
        for name in CAPTION_METRICS:
            assert 0.0 <= row[f"val_{name}"] <= (10.0 if name == "CIDEr" else 1.0), name
    assert trained_run["summary"]["evaluation"] == {k: v for k, v in rows[-1].items() if k != "step"}


def test_validation_loss_is_libra_loss_of_the_heldout_samples(trained_run):
    # With batches of one sample the evaluation's sample-weighted mean of batch losses is the mean of the samples'
    # losses, each computed here from the processor's caption template (with its EOS) and the model's forward.
    from libra_model.config import LibraConfig
    from libra_model.data.shapes import ShapesCaptions
    from libra_model.eval.heldout import validation_loss
    from libra_model.model import LibraForCausalLM
    from libra_model.processor import LibraProcessor

    model = LibraForCausalLM.from_pretrained(trained_run["hf"]).eval()
    processor = LibraProcessor.from_pretrained(trained_run["processor"], LibraConfig.from_pretrained(trained_run["hf"]))
    source = ShapesCaptions(5, image_size=processor.image_tokenizer.clip.config.image_size, seed=42, split="heldout")
    losses = []
    for index in range(2):
        sample = source[index]
        batch = processor(images=[sample["image"]], texts=[sample["caption"]], template="caption",
                          return_labels=True, caption_eos=True)
        with torch.no_grad():
            losses.append(float(model(batch["input_ids"], batch["vision_indices"], batch["attention_mask"],
                                      batch["contiguous_signal"], labels=batch["labels"]).loss))
    got = validation_loss(model, processor, source, count=2, batch_size=1, device=torch.device("cpu"),
                          dtype=torch.float32, caption_eos=True)
    assert got == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_eval_settings_are_checked():
    from libra_model.trainer import TrainConfig

    with pytest.raises(ValueError, match="eval_every must be an int >= 0"):
        TrainConfig.from_sources(None, {"eval_every": -1})
    with pytest.raises(ValueError, match="eval_samples must be an int >= 0"):
        TrainConfig.from_sources(None, {"eval_samples": 1.5})
