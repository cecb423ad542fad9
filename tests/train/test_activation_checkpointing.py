"""Activation checkpointing modes: "full" and "selective" give the gradients of no checkpointing (float64, both
backends, text-only and vision-only batches too); "full" runs every GEMM operator of a layer again in backward,
"selective" none of them (their outputs are kept) while it does recompute the norms."""

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist"))
from libra_dist_helpers import clone, make_batch, tiny_model  # noqa: E402

from libra_model.modules.recompute import check_mode  # noqa: E402
from libra_model.train_step import forward_loss  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-12)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _grads(model, batch, mode, count=False):
    model.activation_checkpointing_enable(mode)
    loss = forward_loss(model, batch, None)
    counter = _Count()
    if count:
        with counter:
            loss.backward()
    else:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, counter.calls


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("images", [[(0, 2), (1, 9)], [], [(0, 0), (1, 0)]], ids=["mixed", "text", "vision"])
def test_checkpointing_modes_give_the_same_gradients(backend, images):
    full = tiny_model()
    full.set_backend(backend)
    batch = make_batch(full.config, 2, 11 if images == [(0, 0), (1, 0)] else 19, images, seed=3)
    ref_loss, ref, _ = _grads(clone(full), batch, False)
    for mode in ("full", "selective"):
        loss, grads, _ = _grads(clone(full), batch, mode)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        assert grads.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], **TOL, msg=lambda m, n=name: f"{mode} {n}: {m}")


def test_selective_recomputes_the_norms_but_no_gemm():
    model = tiny_model()
    model.set_backend("auto")
    batch = make_batch(model.config, 2, 19, [(0, 2), (1, 9)], seed=4)
    layers = model.config.num_hidden_layers
    _, _, none = _grads(model, batch, False, count=True)
    _, _, full = _grads(model, batch, "full", count=True)
    _, _, selective = _grads(model, batch, "selective", count=True)
    for op in ("routed_projections", "routed_linear_grouped", "bridge_attention", "routed_swiglu"):
        assert none.get(op, 0) == 0, (op, none)
        assert full.get(op, 0) >= layers, (op, full)  # the forward again, layer by layer
        assert selective.get(op, 0) == 0, (op, selective)  # kept from the forward
    # selective does rerun the cheap ones: the routed norms (input norm and fused add+norm of every layer)
    norms = lambda calls: calls.get("routed_rms_norm", 0) + calls.get("routed_add_rms_norm", 0)  # noqa: E731
    assert norms(none) == 0 and norms(selective) == 2 * layers and norms(full) == 2 * layers


def test_mode_values():
    assert check_mode(True) == "full" and check_mode(False) is False and check_mode("selective") == "selective"
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        check_mode("some")
    from libra_model.trainer import TrainConfig

    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig.from_sources(None, {"activation_checkpointing": "partial"})
    with pytest.raises(ValueError, match="sequence_parallel"):
        TrainConfig.from_sources(None, {"sequence_parallel": "yes"})
