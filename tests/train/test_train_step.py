"""The training step: its loss is the model's own loss in both vision prediction modes, and with the collator's
guarantees (``check_input_values=False`` and a host-built layout) a forward+backward makes no device-to-host read."""

import contextlib
import copy
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libra_kernels import ModalityLayout
from libra_model.optim import MasterAdamW
from libra_model.parallel.mesh import ParallelState
from libra_model.train_step import forward_loss, global_target_counts, train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist"))
from libra_dist_helpers import make_batch, slice_batch, tiny_model  # noqa: E402

MODES = ("1d", "2d")


def _own_loss(model, batch):
    return model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                 labels=batch["labels"]).loss


@pytest.mark.parametrize("mode", MODES)
def test_step_loss_is_the_models_loss(mode):
    model = tiny_model(vision_prediction_mode=mode)
    batch = make_batch(model.config, 3, 21, [(0, 2), (2, 4)], seed=5)
    own = _own_loss(model, batch).detach()
    torch.testing.assert_close(forward_loss(model, batch, None).detach(), own, rtol=1e-12, atol=0)
    # Shares of the global-token normalisation add up to the whole batch's loss, and so do their gradients.
    parts = [slice_batch(batch, 0, 2), slice_batch(batch, 2, 3)]
    counts = global_target_counts(model, [p["labels"] for p in parts], None)
    assert torch.equal(counts, model.target_counts(batch["labels"]))
    torch.testing.assert_close(sum(forward_loss(model, p, counts) for p in parts).detach(), own, rtol=1e-12, atol=0)
    _own_loss(model, batch).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for part in parts:
        forward_loss(model, part, counts).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    if mode == "2d":
        assert "vision_hidden_placeholder" in got and got["vision_hidden_placeholder"].abs().sum() > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_train_step_lowers_the_loss(mode):
    model = tiny_model(vision_prediction_mode=mode)
    batch = make_batch(model.config, 2, 24, [(0, 1), (1, 6)], seed=6)
    before = float(_own_loss(model, batch).detach())
    optimizer = MasterAdamW(model, lr=0.0, master_dtype=torch.float64)
    micro = [slice_batch(batch, 0, 1), slice_batch(batch, 1, 2)]
    results = [train_step(model, optimizer, micro, ParallelState(), lr=1e-2) for _ in range(4)]
    assert results[0].loss == pytest.approx(before, rel=1e-10)
    assert results[-1].loss < results[0].loss and all(not r.skipped for r in results)


def test_step_passes_the_loss_options():
    model = tiny_model()
    batch = make_batch(model.config, 2, 20, [(1, 2)], seed=10)
    options = dict(label_smoothing=0.1, z_loss_weight=1e-3)
    out = model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"])
    expected = float(model.loss(out.head_inputs, out.layout, batch["labels"], **options))
    plain = float(model.loss(out.head_inputs, out.layout, batch["labels"]))
    result = train_step(model, MasterAdamW(model, master_dtype=torch.float64), [batch], ParallelState(), lr=1e-3,
                        **options)
    assert result.loss == pytest.approx(expected, rel=1e-12)
    assert abs(expected - plain) > 1e-3


def test_loss_options_reach_the_operator():
    model = tiny_model(vision_prediction_mode="2d")
    batch = make_batch(model.config, 2, 20, [(0, 3)], seed=7)
    out = model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"])
    plain = model.loss(out.head_inputs, out.layout, batch["labels"])
    grid = model.loss(out.head_inputs, out.layout, batch["labels"], reduction="none")
    counts = model.target_counts(batch["labels"]).to(grid.dtype)
    torch.testing.assert_close((grid.sum(1) / counts).mean(), plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(model.loss(out.head_inputs, out.layout, batch["labels"], reduction="sum"),
                               grid.sum(), rtol=1e-12, atol=0)
    assert model.loss(out.head_inputs, out.layout, batch["labels"], label_smoothing=0.1) != plain
    assert model.loss(out.head_inputs, out.layout, batch["labels"], z_loss_weight=1e-2) > plain
    with pytest.raises(ValueError, match="reduction"):
        model.loss(out.head_inputs, out.layout, batch["labels"], reduction="avg")
    with pytest.raises(ValueError, match="target_counts"):
        model.loss(out.head_inputs, out.layout, batch["labels"], target_counts=counts)  # floating
    with pytest.raises(ValueError, match="target_counts"):
        model.loss(out.head_inputs, out.layout, batch["labels"], reduction="sum",
                   target_counts=model.target_counts(batch["labels"]))


# ------------------------------------------------------------------------------------------------ no host syncs
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "is_nonzero", "item", "equal", "masked_select",
             "unique", "_unique2", "unique_consecutive", "argwhere"}


class HostReadError(AssertionError):
    """A tensor value was read on the host during a region that must not sync."""


class _FailOnHostRead(TorchDispatchMode):
    """Fails on every aten op that reads a tensor's value to the host or has a data-dependent output shape."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            raise HostReadError(f"device-to-host read: {func}")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
                if i is not None):
            raise HostReadError(f"boolean-mask indexing (a nonzero on the device): {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Fail on aten host reads (dispatch mode) and on Tensor.__bool__/item/tolist/__int__/__float__ (patched)."""
    patched = {}

    def failing(name):
        def method(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} during a sync-free region")
        return method

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        patched[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, failing(name))
    try:
        with _FailOnHostRead():
            yield
    finally:
        for name, method in patched.items():
            setattr(torch.Tensor, name, method)


def test_the_detector_catches_host_reads():
    x = torch.arange(4.0)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: x.nonzero(),
                 lambda: float(x[1]), lambda: x[x > 1]):
        with pytest.raises(HostReadError), no_host_reads():
            read()
    assert bool(x[1]) and x.tolist() == [0.0, 1.0, 2.0, 3.0]  # restored afterwards


def _collated(model, batch):
    """The batch as the trainer's collator hands it over: the layout built on the host, beside the tensors."""
    out = dict(batch)
    out["layout"] = ModalityLayout.from_vision_indices(batch["vision_indices"], model.config.max_vision_token_length)
    out["attention_mask"] = torch.ones_like(batch["vision_indices"])
    return out


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("images", [[(0, 2), (1, 5)], [], "all"], ids=["mixed", "all_text", "all_vision"])
def test_forward_backward_makes_no_host_read(mode, backend, images):
    model = tiny_model(dtype=torch.float32, vision_prediction_mode=mode)
    model.set_backend(backend)
    model.check_input_values = False
    length = 23
    if images == "all":  # every position of both samples is in an image
        images, length = [(0, 0), (1, 0)], model.config.max_vision_token_length
    batch = _collated(model, make_batch(model.config, 2, length, images, seed=8, dtype=torch.float32))
    counts = model.target_counts(batch["labels"])
    reference = copy.deepcopy(model)
    reference.check_input_values = True
    with no_host_reads():
        loss = forward_loss(model, batch, counts)
        loss.backward()
    expected = _own_loss(reference, batch)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # With the value checks on, the model and the loss operator do read the host (so the test above can fail).
    model.check_input_values = True
    with pytest.raises(HostReadError), no_host_reads():
        forward_loss(model, batch, counts)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_step_makes_no_sync(mode):
    model = tiny_model(dtype=torch.bfloat16, vision_prediction_mode=mode).cuda()
    model.check_input_values = False
    host = make_batch(model.config, 2, 40, [(0, 3), (1, 20)], seed=9, dtype=torch.bfloat16)
    batch = _collated(model, host)
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v.to("cuda")) for k, v in batch.items()}
    counts = model.target_counts(batch["labels"])
    forward_loss(model, batch, counts).backward()  # warm-up: lazy initialisation may sync once
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = forward_loss(model, batch, counts)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.float().cpu())
