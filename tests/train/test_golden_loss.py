"""Golden tiny loss curve: the first losses of a fixed tiny run (float32, CPU) must stay within the stated tolerance
of tests/golden/tiny_loss_curve.json, which this code generated. A change that moves them (data order, tokenizer,
initialisation, loss, optimizer, kernels beyond rounding) fails here; if the change is intended, regenerate with
``LIBRA_UPDATE_GOLDEN=1 pytest tests/train/test_golden_loss.py`` and say why in the commit."""

import json
import os

import torch
from train_helpers import read_metrics, small_config

from libra_model.trainer import train

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "tiny_loss_curve.json")
STEPS = 10
# Float32 on the CPU: kernels and thread counts change summation order (about 1e-6 relative per step); the curve
# over 10 steps stays well within 1e-4 relative, while any real change of the training path moves it by far more.
RTOL, ATOL = 1e-4, 1e-5


def test_tiny_loss_curve_matches_golden(processor_dir, tmp_path):
    train(small_config(processor_dir, tmp_path, max_steps=STEPS, save_every=STEPS))
    losses = [row["loss"] for row in read_metrics(tmp_path)]
    assert len(losses) == STEPS
    if os.environ.get("LIBRA_UPDATE_GOLDEN") == "1":
        with open(GOLDEN, "w", encoding="utf-8") as handle:
            json.dump({"description": "losses of steps 1..10 of tests/train/train_helpers.py small_config (tiny Libra, "
                                      "generated shapes, seed 42, float32 CPU)",
                       "rtol": RTOL, "atol": ATOL, "torch": torch.__version__, "losses": losses}, handle, indent=2)
            handle.write("\n")
    with open(GOLDEN, encoding="utf-8") as handle:
        golden = json.load(handle)
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(golden["losses"], dtype=torch.float64),
                               rtol=golden["rtol"], atol=golden["atol"])
    assert losses[-1] < losses[0] - 0.5  # the curve falls
