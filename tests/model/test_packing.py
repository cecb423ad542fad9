"""Packed projection weights (``LibraForCausalLM.pack_projections_``): the same model, checkpoints in the released
layout bit for bit, fewer GEMMs."""

import pytest
import torch
from model_fixtures import make_batch, randomize_parameters
from torch.profiler import ProfilerActivity, profile

from libra_kernels.testing import assert_close_to_ref
from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM


def build(dtype=torch.float64, backend="auto", **overrides):
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny(num_hidden_layers=2, **overrides), backend=backend).to(dtype)
    randomize_parameters(model)
    return model


def forward_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")}


def packed_groups(layer):
    attn, mlp = layer.self_attn, layer.mlp
    w_text, w_a, _ = attn._input_maps()
    return [w_text, w_a, *attn._bridge_b_factors(), [mlp.gate_proj.weight, mlp.up_proj.weight],
            [mlp.vision_gate_proj.weight_A, mlp.vision_up_proj.weight_A]]


def is_packed(tensors):
    storage = tensors[0].untyped_storage()
    return all(t.untyped_storage()._cdata == storage._cdata for t in tensors) and \
        storage.nbytes() == sum(t.numel() * t.element_size() for t in tensors)


def run(model, batch, double_signal):
    inputs = forward_inputs(batch)
    if double_signal:
        inputs["contiguous_signal"] = inputs["contiguous_signal"].double()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=batch["labels"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reference_backend", ["auto", "torch"])
@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"addition_mode": True},
                                       {"use_bridge": False}, {"vision_prediction_mode": "2d"}])
def test_packed_model_is_the_same_model(overrides, reference_backend):
    """The packed model (fastest backends) against the unpacked one, on the same backends or on the "torch"
    reference operators: loss and every gradient in float64."""
    plain, packed = build(backend=reference_backend, **overrides), build(**overrides).pack_projections_()
    for layer in packed.model.layers:
        for group in packed_groups(layer):
            if group:
                assert is_packed(group)
    assert {n: p.shape for n, p in plain.named_parameters()} == {n: p.shape for n, p in packed.named_parameters()}
    batch = make_batch(plain.config, 3, 28, padding=[0, 3, 0])
    loss, grads = run(plain, batch, True)
    loss_packed, grads_packed = run(packed, batch, True)
    assert_close_to_ref(loss_packed, loss, None, torch.float64, "loss")
    assert grads.keys() == grads_packed.keys()
    for name in grads:
        assert_close_to_ref(grads_packed[name], grads[name], None, torch.float64, name)


def test_checkpoints_keep_the_released_layout_bit_for_bit(tmp_path):
    model = build(torch.float32).pack_projections_()
    reference = {k: v.clone() for k, v in build(torch.float32).state_dict().items()}
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    model.save_pretrained(str(tmp_path / "packed"))
    loaded = LibraForCausalLM.from_pretrained(str(tmp_path / "packed"))
    assert all(torch.equal(loaded.state_dict()[k], reference[k]) for k in reference)
    # loading into a packed model keeps it packed, in place or by assignment
    for assign in (False, True):
        target = build(torch.float32).pack_projections_()
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        target.load_state_dict(reference, assign=assign)
        assert all(torch.equal(target.state_dict()[k], reference[k]) for k in reference)
        for layer in target.model.layers:
            assert all(is_packed(group) for group in packed_groups(layer))


def test_packing_removes_gemms_and_frozen_weights_get_no_dw():
    batch = make_batch(LibraConfig.tiny(), 2, 24)

    def gemms(model):
        inputs = {k: (v.float() if k == "contiguous_signal" else v) for k, v in forward_inputs(batch).items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs, labels=batch["labels"]).loss.backward()
        names = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
        return sum(e.name in names and (e.cpu_parent is None or e.cpu_parent.name not in names)
                   for e in prof.events())

    plain, packed = build(torch.float32), build(torch.float32).pack_projections_()
    # per layer, attention's five input maps: text and vision-A GEMMs forward and their dX (4 x (5 -> 1)); the
    # MLP's gate/up: the same four GEMMs (4 x (2 -> 1)); the k and v bridges' B factors: the text and vision
    # products forward and their dX (4 x (2 -> 1)); their dW is one batched GEMM per modality either way
    assert gemms(plain) - gemms(packed) == 2 * (4 * 4 + 4 * 1 + 4 * 1)
    from libra_model.trainer import freeze_language_

    frozen = build(torch.float32).pack_projections_()
    freeze_language_(frozen)
    inputs = {k: (v.float() if k == "contiguous_signal" else v) for k, v in forward_inputs(batch).items()}
    frozen(**inputs, labels=batch["labels"]).loss.backward()
    for name, p in frozen.named_parameters():
        assert (p.grad is not None) == p.requires_grad or name == "vision_hidden_placeholder", name
