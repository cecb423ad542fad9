"""LibraForCausalLM against an independent naive implementation of docs/model.md, its own reference backend, and
the invariants of docs/model.md §14."""

import math

import pytest
import torch
from model_fixtures import make_batch, randomize_parameters
from naive_libra import naive_logits, naive_loss

from libra_kernels import ModalityLayout
from libra_kernels.ops import bridge_attention, rotary, routed_linear, routed_projections, routed_swiglu
from libra_kernels.ops import discrete_token_cross_entropy as cross_entropy
from libra_kernels.ops import routed_rms_norm as rms_norm
from libra_kernels.testing import assert_close_to_ref
from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM
from libra_model.modules.attention import AttentionContext
from libra_model.modules.rope import rotary_cos_sin

TINY = dict(num_hidden_layers=2)


def build(dtype=torch.float64, backend="torch", seed=0, **overrides):
    config = LibraConfig.tiny(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = LibraForCausalLM(config, backend=backend).to(dtype)
    randomize_parameters(model)
    return model


def forward_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")}


def state_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 2},
    {"concat_signals": False},
    {"norm_signals": False},
    {"addition_mode": True},
    {"vision_codebook_num": 4, "hidden_size": 64},
    {"vision_prediction_mode": "2d"},
    {"vision_prediction_mode": "2d", "image_feature_resolution": 4, "max_vision_token_length": 18},
])
def test_matches_naive_reference(overrides):
    model = build(**overrides).eval()
    config = model.config
    L = config.max_vision_token_length
    batch = make_batch(config, 3, 30, images=[[2], [3, 4 + L], []], padding=[0, 0, 4])  # the 2nd image is cut
    batch["contiguous_signal"] = batch["contiguous_signal"].double()
    with torch.no_grad():
        out = model(**forward_inputs(batch), labels=batch["labels"], return_logits=True)
        expected = naive_logits(state_of(model), config, **forward_inputs(batch))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[:, real], expected[:, real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, naive_loss(expected, batch["labels"]), rtol=1e-10, atol=1e-12)


def test_loss_equals_concatenated_vocabulary_cross_entropy_float32():
    # docs/model.md §14, item 14: the fused per-modality loss equals CE over the -inf padded 32514-style logits.
    model = build(torch.float32, backend="auto")
    batch = make_batch(model.config, 4, 26)
    out = model(**forward_inputs(batch), labels=batch["labels"], return_logits=True)
    exact = naive_loss(out.logits.double(), batch["labels"])
    same = naive_loss(out.logits, batch["labels"])
    assert_close_to_ref(out.loss, exact, same, torch.float32, "loss")


def runnable_backends():
    """Model backend switches to compare with "torch": "auto" plus each fast kernel that can run here."""
    choices = ["auto"]
    for op, module in (("routed_linear", routed_linear), ("routed_projections", routed_projections),
                       ("routed_swiglu", routed_swiglu), ("rotary", rotary), ("routed_rms_norm", rms_norm),
                       ("bridge_attention", bridge_attention), ("discrete_token_cross_entropy", cross_entropy)):
        for name, kernel in module.TABLE.kernels.items():
            if name != "torch" and not kernel.unavailable(torch.device("cpu")):
                choices.append({op: name})
    return choices


@pytest.mark.parametrize("backend", runnable_backends(), ids=str)
def test_backend_matches_torch_reference_values_and_grads(backend):
    exact = build(torch.float64, backend="torch")
    same = build(torch.float32, backend="torch")
    fast = build(torch.float32, backend=backend)
    batch = make_batch(exact.config, 3, 28, padding=[0, 3, 0])
    results = []
    for model in (exact, same, fast):
        inputs = forward_inputs(batch)
        if model is exact:
            inputs["contiguous_signal"] = inputs["contiguous_signal"].double()
        out = model(**inputs, labels=batch["labels"])
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss64, grads64), (loss32, grads32), (loss, grads) = results
    assert_close_to_ref(loss, loss64, loss32, torch.float32, "loss")
    assert grads.keys() == grads64.keys()
    for name in grads64:
        if name == "vision_hidden_placeholder":  # only used in "2d" mode, frozen in "1d"
            assert grads[name] is None and grads64[name] is None
            continue
        assert grads[name] is not None, name
        assert_close_to_ref(grads[name], grads64[name], grads32[name], torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_matches_torch_reference_values_and_grads(dtype):
    """The whole model on CUDA with the fast backends ("auto") against its float64 reference on the CPU; the same
    model on CUDA with the "torch" backend in ``dtype`` sets the allowed error."""
    exact = build(torch.float64, backend="torch")
    same = build(dtype, backend="torch").cuda()
    fast = build(dtype, backend="auto").cuda()
    batch = make_batch(exact.config, 3, 61, padding=[0, 5, 0])
    results = []
    for model in (exact, same, fast):
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in forward_inputs(batch).items()}
        inputs["contiguous_signal"] = inputs["contiguous_signal"].to(next(model.parameters()).dtype)
        out = model(**inputs, labels=batch["labels"].to(device))
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss64, grads64), (loss_same, grads_same), (loss, grads) = results
    assert_close_to_ref(loss.cpu(), loss64, loss_same.cpu(), dtype, "loss")
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert_close_to_ref(grads[name].cpu(), grads64[name], grads_same[name].cpu(), dtype, name)


def zero_bridges(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_bridge_on_" in name and name.endswith("weight_B"):
                p.zero_()


def test_zero_bridge_is_plain_causal_attention():
    # docs/model.md §14, item 2: with all bridge B = 0 the bridged attention is one ordinary causal softmax attention.
    model = build().eval()
    zero_bridges(model)
    batch = make_batch(model.config, 2, 30, images=[[3], [20]])
    with torch.no_grad():
        got = model(**forward_inputs(batch)).logits
        expected = naive_logits(state_of(model), model.config, **forward_inputs(batch), plain_attention=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # And the bridges matter once they are not zero.
    randomize_parameters(model)
    with torch.no_grad():
        bridged = model(**forward_inputs(batch)).logits
        plain = naive_logits(state_of(model), model.config, **forward_inputs(batch), plain_attention=True)
    assert (bridged - plain)[torch.isfinite(plain)].abs().max() > 1e-3


def attention_output(attn, x, vision_mask, config):
    layout = ModalityLayout.from_vision_mask(vision_mask)
    batch, length = vision_mask.shape
    cos, sin = rotary_cos_sin(torch.arange(length).expand(batch, length), config.head_dim, config.rope_theta,
                              x.dtype)
    ctx = AttentionContext(layout, cos, sin, vision_mask, None, None)
    return layout.unsort(attn(layout.sort(x), ctx))


@pytest.mark.parametrize("side", ["vision", "language"])
def test_bridge_locality_single_layer(side):
    # docs/model.md §14, item 3: G^V only changes language queries that see a vision key; G^L only vision queries that
    # see a text key.
    model = build()
    attn, config = model.model.layers[0].self_attn, model.config
    vision_mask = torch.zeros(3, 16, dtype=torch.bool)
    vision_mask[0, 5:11] = True   # text, image, text
    vision_mask[1, :7] = True     # image first: its queries see no text key
    vision_mask[2, 9:] = True     # text first: its text queries see no vision key
    x = torch.randn(3, 16, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        before = attention_output(attn, x, vision_mask, config)
        for name in ("k", "v"):
            getattr(attn, f"vision_{name}_bridge_on_{side}").weight_B.normal_(0, 1.0)
        after = attention_output(attn, x, vision_mask, config)
    changed = (after - before).abs().amax(-1) > 1e-9  # [B, N]
    seen_vision = vision_mask.long().cumsum(-1) > 0
    seen_text = (~vision_mask).long().cumsum(-1) > 0
    expected = (~vision_mask & seen_vision) if side == "vision" else (vision_mask & seen_text)
    assert torch.equal(changed, expected)


def test_cross_modal_labels_raise():
    model = build(torch.float32)
    batch = make_batch(model.config, 2, 24, images=[[3], [5]])
    labels = batch["labels"].clone()
    labels[:, 0, 3] = model.config.boi_token_id  # a text position (2) would have to predict BOI
    with pytest.raises(ValueError, match="vision label"):
        model(**forward_inputs(batch), labels=labels)
    labels = batch["labels"].clone()
    labels[:, 1, 5 + 11] = 5  # EOI would have to predict the text token after the image
    with pytest.raises(ValueError, match="text label"):
        model(**forward_inputs(batch), labels=labels)


def test_inconsistent_inputs_raise():
    model = build(torch.float32)
    config = model.config
    batch = make_batch(config, 2, 24, images=[[3], []])
    inputs = forward_inputs(batch)

    def check(match, **changes):
        with pytest.raises((ValueError, TypeError), match=match):
            model(**{**inputs, **changes})

    check("input_ids", input_ids=inputs["input_ids"][0])
    check("input_ids", input_ids=inputs["input_ids"].int())
    check("vision_indices", vision_indices=inputs["vision_indices"][:, :-1])
    wrong = inputs["vision_indices"].clone()
    wrong[1, 4] = 3  # says vision where the ids are text
    check("disagree", vision_indices=wrong)
    ids = inputs["input_ids"].clone()
    ids[1, 1, 7] = (ids[0, 1, 7] + 1) % config.vocab_size
    check("same id", input_ids=ids)
    check("contiguous_signal", contiguous_signal=inputs["contiguous_signal"][..., :-1])
    check("attention_mask", attention_mask=inputs["attention_mask"][:1])
    check("labels", labels=batch["labels"][:1])
    check("layout", layout=ModalityLayout.from_vision_mask(torch.zeros(2, 23, dtype=torch.bool)))
    model.check_input_values = False  # shape checks stay; the value checks (a host sync) are skipped
    check("vision_indices", vision_indices=inputs["vision_indices"][:, :-1])
    model(**{**inputs, "input_ids": ids})


def test_logits_only_when_asked_or_without_labels():
    model = build(torch.float32)
    batch = make_batch(model.config, 2, 20)
    assert model(**forward_inputs(batch), labels=batch["labels"]).logits is None
    out = model(**forward_inputs(batch))
    assert out.loss is None and out.logits.shape == (2, 2, 20, model.config.total_vocab_size)
    vision = batch["vision_indices"] < model.config.max_vision_token_length
    assert torch.isneginf(out.logits[:, vision][..., :model.config.vocab_size]).all()
    assert torch.isneginf(out.logits[:, ~vision][..., model.config.vocab_size:]).all()
    assert torch.equal(out.logits[0][~vision], out.logits[1][~vision])
    layout = ModalityLayout.from_vision_indices(batch["vision_indices"], model.config.max_vision_token_length)
    torch.testing.assert_close(model(**forward_inputs(batch), layout=layout).logits, out.logits)


def test_activation_checkpointing_gives_the_same_gradients():
    model = build(torch.float64).train()
    batch = make_batch(model.config, 2, 24)
    model.gradient_checkpointing_enable()  # HF's name for the same switch
    assert model.model.activation_checkpointing
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.activation_checkpointing_enable(enabled)
        model(**forward_inputs(batch), labels=batch["labels"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-14)


def test_frozen_language_trains_only_vision_parameters():
    model = build(torch.float32, backend="auto")
    for name, p in model.named_parameters():
        p.requires_grad_("vision" in name)
    batch = make_batch(model.config, 2, 24)
    model(**forward_inputs(batch), labels=batch["labels"]).loss.backward()
    for name, p in model.named_parameters():
        if "vision" in name and "placeholder" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif "vision" not in name:
            assert p.grad is None, name


def test_addition_mode_at_init_attention_equals_llama():
    # docs/model.md §14, item 6: with every low-rank B = 0 and equal attention norms, a vision token's attention
    # sub-block is LLaMA's.
    config = LibraConfig.tiny(addition_mode=True)
    model = LibraForCausalLM(config, backend="torch").double()
    attn = model.model.layers[0].self_attn
    assert all(not p.weight_B.any() for n, p in attn.named_children() if n.startswith("vision_"))
    vision_mask = torch.zeros(2, 14, dtype=torch.bool)
    vision_mask[0, 3:10] = True
    vision_mask[1, :] = True
    x = torch.randn(2, 14, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        routed = attention_output(attn, x, vision_mask, config)
        text_only = attention_output(attn, x, torch.zeros_like(vision_mask), config)
    torch.testing.assert_close(routed, text_only, rtol=1e-12, atol=1e-12)


def test_initialisation_follows_the_reference_hook():
    model = LibraForCausalLM(LibraConfig.tiny(hidden_size=128, intermediate_size=256))
    for name, p in model.named_parameters():
        if "_bridge_on_" in name and name.endswith("weight_B"):
            assert not p.any(), name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.006, name


def test_11b_preset_parameter_count_on_meta():
    with torch.device("meta"):
        model = LibraForCausalLM(LibraConfig.libra_11b())
    assert model.num_parameters() == 11_015_860_224
    vision_in_layers = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.")
                           and "vision" in n)
    assert vision_in_layers == 4_237_557_760
    assert model.model.layers[0].self_attn.vision_q_proj.weight_A.shape == (1024, 4096)
    assert model.model.vision_contiguous_signal_processor.weight.shape == (4096, 8192)


def test_backend_switch_validation():
    model = build(torch.float32)
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fast")
    with pytest.raises(ValueError, match="operator"):
        model.set_backend({"attention": "torch"})
    model.set_backend({"bridge_attention": "torch"})
    assert model.model.layers[1].self_attn.backend == {"bridge_attention": "torch"}
    logits = model(**forward_inputs(make_batch(model.config, 1, 15))).logits
    assert not math.isnan(logits[torch.isfinite(logits)].sum().item())


def test_2d_mode_trains_the_placeholder_and_matches_the_torch_path():
    exact = build(torch.float64, backend="torch", vision_prediction_mode="2d")
    fast = build(torch.float32, backend="auto", vision_prediction_mode="2d")
    same = build(torch.float32, backend="torch", vision_prediction_mode="2d")
    assert exact.vision_lm_head.heads[0].weight.shape[1] == 2 * exact.config.hidden_size
    batch = make_batch(exact.config, 2, 26)
    losses, grads = [], []
    for model in (exact, same, fast):
        inputs = forward_inputs(batch)
        inputs["contiguous_signal"] = inputs["contiguous_signal"].to(model.lm_head.weight.dtype)
        loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        losses.append(loss)
        grads.append(model.vision_hidden_placeholder.grad)
    assert grads[0].abs().sum() > 0
    assert_close_to_ref(losses[2], losses[0], losses[1], torch.float32, "loss")
    assert_close_to_ref(grads[2], grads[0], grads[1], torch.float32, "placeholder grad")
