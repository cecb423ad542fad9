"""A non-finite loss or gradient norm skips the update (on every rank alike) and is counted; after
``max_skipped_updates`` consecutive skips the run stops, naming the step and the last good checkpoint."""

import math

import pytest
import torch
from train_helpers import read_metrics, small_config

from libra_model import trainer
from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM
from libra_model.optim import MasterAdamW
from libra_model.parallel.mesh import ParallelState
from libra_model.train_step import train_step


def _tiny_batch(config, generator):
    ids = torch.randint(0, config.vocab_size, (1, 2, 7), generator=generator).expand(config.vision_codebook_num,
                                                                                    -1, -1).clone()
    vision = torch.full((2, 7), config.max_vision_token_length)
    return {"input_ids": ids, "vision_indices": vision, "labels": ids.clone()}


@pytest.mark.parametrize("poison", ["weight", "loss_only"])
def test_step_skips_a_non_finite_loss_or_norm(poison):
    torch.manual_seed(0)
    config = LibraConfig.tiny()
    model = LibraForCausalLM(config, backend="torch")
    optimizer = MasterAdamW(model, lr=1e-3)
    batch = _tiny_batch(config, torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if poison == "weight":
        with torch.no_grad():
            model.lm_head.weight[3, 0] = float("nan")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = train_step(model, optimizer, [batch], ParallelState(), lr=1e-3)
        assert math.isnan(result.loss) and not math.isfinite(result.grad_norm)
    else:
        # A loss that overflows to inf while the gradients stay finite: still no update.
        real = model.loss
        model.loss = lambda *a, **k: real(*a, **k) * float("inf")
        result = train_step(model, optimizer, [batch], ParallelState(), lr=1e-3, max_grad_norm=None)
        assert math.isinf(result.loss)
    assert result.skipped
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    # A healthy step afterwards does update.
    if poison == "loss_only":
        model.loss = real
        assert not train_step(model, optimizer, [batch], ParallelState(), lr=1e-3).skipped
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def _infinite_loss_from(step_numbers):
    """A train_step whose model loss is inf on the given (1-based) calls: gradients NaN, weights untouched."""
    real_step = trainer.train_step
    calls = {"n": 0}

    def step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] not in step_numbers:
            return real_step(model, *args, **kwargs)
        real_loss = model.loss
        model.loss = lambda *a, **k: real_loss(*a, **k) * float("inf")
        try:
            return real_step(model, *args, **kwargs)
        finally:
            del model.loss

    return step


def test_run_stops_after_max_skipped_updates(processor_dir, tmp_path, monkeypatch):
    from libra_model.parallel import dcp_checkpoint as ckpt

    monkeypatch.setattr(trainer, "train_step", _infinite_loss_from(range(3, 100)))
    config = small_config(processor_dir, tmp_path, max_steps=8, save_every=2, max_skipped_updates=3)
    with pytest.raises(RuntimeError, match=r"3 consecutive steps up to step 5 .*max_skipped_updates=3.*last good "
                                           r"checkpoint is .*step_00000004"):
        trainer.train(config)
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row.get("skipped_update", False) for row in rows] == [False] * 2 + [True] * 3
    assert [row["skipped_updates"] for row in rows] == [0, 0, 1, 2, 3]
    # Skipped steps change nothing: the checkpoint of step 4 holds the weights of step 2.
    assert ckpt.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("step_00000004")


def test_isolated_skips_are_counted_and_the_run_goes_on(processor_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "train_step", _infinite_loss_from({2}))
    summary = trainer.train(small_config(processor_dir, tmp_path, max_steps=4, max_skipped_updates=2))
    assert summary["skipped_updates"] == 1 and summary["step"] == 4 and math.isfinite(summary["loss"])
    assert [row.get("skipped_update", False) for row in read_metrics(tmp_path)] == [False, True, False, False]
