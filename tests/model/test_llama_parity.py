"""Text-only Libra equals transformers.LlamaForCausalLM built from the same HF directory (docs/model.md §14, item 1)."""

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import randomize_parameters
from transformers import LlamaConfig, LlamaForCausalLM

from libra_kernels.testing import assert_close_to_ref
from libra_model import init_from_llama

# HF's LlamaRMSNorm computes its statistics in float32 even for a float64 model, so float64 comparisons agree to
# float32 rounding of the norms (about 1e-7 relative here), not to float64 rounding.
TOL = dict(rtol=1e-5, atol=1e-6)
VISION = dict(vision_vocab_size=18, image_feature_resolution=3, max_vision_token_length=11, bridge_rank=4,
              contiguous_signal_size=32)


def write_llama(directory, kv_heads=4, fmt="safetensors", dtype=torch.float32):
    """A random tiny LLaMA written by transformers' save_pretrained ("safetensors": one file; "sharded": shards
    with an index; "no-index": shards whose index is removed) or as torch .bin shards with an index ("bin")."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                         max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
    directory = Path(directory)
    if fmt == "bin":
        config.save_pretrained(directory)
        state = llama.state_dict()
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[:7], names[7:]), 1):
            file_name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({n: state[n].clone() for n in part}, directory / file_name)
            weight_map.update({n: file_name for n in part})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return llama
    llama.save_pretrained(directory, **({} if fmt == "safetensors" else {"max_shard_size": "40KB"}))
    files = {p.name for p in directory.iterdir()}
    assert ("model.safetensors" in files) == (fmt == "safetensors")
    if fmt == "no-index":
        (directory / "model.safetensors.index.json").unlink()
    return llama


def text_batch(vocab, batch=3, length=29, codebooks=2):
    ids = torch.randint(1, vocab, (batch, length))
    return ids, ids[None].repeat(codebooks, 1, 1)


@pytest.mark.parametrize("kv_heads,fmt", [(4, "safetensors"), (2, "bin"), (1, "sharded"), (4, "no-index")])
def test_text_only_logits_equal_llama(tmp_path, kv_heads, fmt):
    llama = write_llama(tmp_path, kv_heads, fmt).double().eval()
    libra = init_from_llama(str(tmp_path), dtype=torch.float64, backend="torch", **VISION).eval()
    assert libra.config.kv_heads == kv_heads
    ids, ids3 = text_batch(96)
    vision_indices = torch.full(ids.shape, libra.config.max_vision_token_length)
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        out = libra(ids3, vision_indices)
    torch.testing.assert_close(out.logits[0, :, :, :96], expected, **TOL)
    assert torch.equal(out.logits[0], out.logits[1])
    assert torch.isneginf(out.logits[..., 96:]).all()


def test_text_only_loss_and_grads_equal_llama_float32(tmp_path):
    llama = write_llama(tmp_path)
    libra = init_from_llama(str(tmp_path), **VISION)
    assert libra.model.embed_tokens.weight.dtype == torch.float32
    ref = write_llama(tmp_path / "copy").double()  # float64 oracle for the tolerance rule
    ids, ids3 = text_batch(96)
    labels = ids.clone()
    labels[:, :3] = -100
    vision_indices = torch.full(ids.shape, libra.config.max_vision_token_length)
    out = libra(ids3, vision_indices, labels=labels[None].repeat(2, 1, 1))
    expected = llama(input_ids=ids, labels=labels).loss
    exact = ref(input_ids=ids, labels=labels).loss
    assert_close_to_ref(out.loss, exact, expected, torch.float32, "loss")
    out.loss.backward()
    expected.backward()
    exact.backward()
    llama_params, ref_params = dict(llama.named_parameters()), dict(ref.named_parameters())
    libra_params = dict(libra.named_parameters())
    for name, p in llama_params.items():
        assert_close_to_ref(libra_params[name].grad, ref_params[name].grad, p.grad, torch.float32, name)
    for name, p in libra_params.items():
        if "vision" in name and "bridge" not in name and "placeholder" not in name:
            # Text-only input: no vision parameter takes part, so their gradients are zero (or never created).
            assert p.grad is None or not p.grad.any(), name


def test_left_padding_matches_llama_with_positions(tmp_path):
    llama = write_llama(tmp_path).double().eval()
    libra = init_from_llama(str(tmp_path), dtype=torch.float64, backend="torch", **VISION).eval()
    ids, ids3 = text_batch(96, batch=2, length=17)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vision_indices = torch.full(ids.shape, libra.config.max_vision_token_length)
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = libra(ids3, vision_indices, attention_mask=mask).logits[0, :, :, :96]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)


def test_vision_parameters_cannot_change_text_only_output(tmp_path):
    write_llama(tmp_path)
    libra = init_from_llama(str(tmp_path), dtype=torch.float64, backend="torch", **VISION).eval()
    ids, ids3 = text_batch(96)
    vision_indices = torch.full(ids.shape, libra.config.max_vision_token_length)
    with torch.no_grad():
        before = libra(ids3, vision_indices).logits
        for name, p in libra.named_parameters():
            if "vision" in name:
                p.normal_(0, 1.0)
        after = libra(ids3, vision_indices).logits
    assert torch.equal(before, after)


def test_init_from_llama_initialises_vision_parts(tmp_path):
    write_llama(tmp_path)
    libra = init_from_llama(str(tmp_path), **VISION)
    params = dict(libra.named_parameters())
    assert not any(p.is_meta for p in params.values())
    for name, p in params.items():
        if name.endswith("weight_B") and "_bridge_on_" in name:
            assert not p.any(), name  # bridges start as exact zero maps
        elif "vision" in name and "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif "vision" in name:
            assert 0.01 < p.std().item() < 0.03, name  # N(0, 0.02²)
    randomize_parameters(libra)  # the helper works on a loaded model too
    copied = init_from_llama(str(tmp_path), copy_eos_to_pad=True, **VISION).model.embed_tokens.weight
    assert torch.equal(copied[0], copied[2]) and not torch.equal(copied[0], copied[3])
