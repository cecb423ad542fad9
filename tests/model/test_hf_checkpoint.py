"""Checkpoint loading and saving: a released-layout checkpoint written from the released name table, our own
save/load round trip, and clear errors for missing, unexpected and mis-shaped tensors."""

import json

import pytest
import torch
from model_fixtures import make_batch, randomize_parameters
from safetensors.torch import save_file

from libra_model import init_from_llama, load_libra
from libra_model.config import LibraConfig
from libra_model.hf_checkpoint import CheckpointError, load_state_dict
from libra_model.model import LibraForCausalLM


def released_names(config):
    """Name -> shape of a released Libra checkpoint, written out from the name table of docs/model.md §13 (not from the
    model)."""
    D, F, r = config.hidden_size, config.intermediate_size, config.vision_down_ratio
    names = {"model.embed_tokens.weight": (config.vocab_size, D), "lm_head.weight": (config.vocab_size, D),
             "model.norm.weight": (D,), "model.vision_norm.weight": (D,), "vision_hidden_placeholder": (D,),
             "model.vision_signal_norm.weight": (D + config.contiguous_signal_size,),
             "model.vision_contiguous_signal_processor.weight": (D, D + config.contiguous_signal_size)}
    for c in range(config.vision_codebook_num):
        names[f"model.vision_embed_tokens.{c}.weight"] = (config.vision_vocab_size, D // config.vision_codebook_num)
        names[f"vision_lm_head.heads.{c}.weight"] = (config.vision_vocab_size, D)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for x in "qkvo":
            names[f"{p}self_attn.{x}_proj.weight"] = (D, D)
            names[f"{p}self_attn.vision_{x}_proj.weight_A"] = (D // r, D)
            names[f"{p}self_attn.vision_{x}_proj.weight_B"] = (D, D // r)
        for x in "kv":
            for side in ("language", "vision"):
                names[f"{p}self_attn.vision_{x}_bridge_on_{side}.weight_A"] = (config.bridge_rank, D)
                names[f"{p}self_attn.vision_{x}_bridge_on_{side}.weight_B"] = (D, config.bridge_rank)
        for x in ("gate", "up"):
            names[f"{p}mlp.{x}_proj.weight"] = (F, D)
            names[f"{p}mlp.vision_{x}_proj.weight_A"] = (F // r, D)
            names[f"{p}mlp.vision_{x}_proj.weight_B"] = (F, F // r)
        names[f"{p}mlp.down_proj.weight"] = (D, F)
        names[f"{p}mlp.vision_down_proj.weight_A"] = (D // r, F)
        names[f"{p}mlp.vision_down_proj.weight_B"] = (D, D // r)
        for x in ("input", "post_attention"):
            names[f"{p}{x}_layernorm.weight"] = (D,)
            names[f"{p}vision_{x}_layernorm.weight"] = (D,)
    return names


def write_released(directory, config, extra=None, drop=()):
    """A released-style checkpoint: bf16 shards with an index, the released files' buffers, an HF-style config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in released_names(config).items()
               if name not in drop}
    for i in range(config.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(config.head_dim // 2)
    for name in ("naive_placeholder", "vision_logits_placeholder", "language_logits_placeholder",
                 "eoi_to_newline_logits_placeholder"):
        tensors[name] = torch.zeros(3)
    tensors.update(extra or {})
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    released = {k: v for k, v in config.to_dict().items()}
    released.update(architectures=["LibraForCausalLM"], model_type="libra", torch_dtype="bfloat16",
                    transformers_version="4.31.0", use_cache=True, pretraining_tp=1)
    (directory / "config.json").write_text(json.dumps(released))
    return tensors


def test_model_names_are_exactly_the_released_names():
    config = LibraConfig.tiny()
    model = LibraForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == released_names(config)
    assert not list(model.buffers())


def test_released_layout_checkpoint_loads_without_missing_keys(tmp_path):
    config = LibraConfig.tiny()
    tensors = write_released(tmp_path, config)
    model = load_libra(str(tmp_path))
    assert model.config == LibraConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, tensors[name]), name
    batch = make_batch(config, 2, 20)
    model.float()
    logits = model(**{k: batch[k] for k in ("input_ids", "vision_indices", "attention_mask")}).logits
    assert torch.isfinite(logits).any()
    same = LibraForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert same.lm_head.weight.dtype == torch.float32


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    config = LibraConfig.tiny()
    write_released(tmp_path / "missing", config, drop=("model.layers.1.mlp.vision_up_proj.weight_B",))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.vision_up_proj.weight_B'\]"):
        load_libra(str(tmp_path / "missing"))
    write_released(tmp_path / "unexpected", config, extra={"model.layers.0.self_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.extra.weight"):
        load_libra(str(tmp_path / "unexpected"))
    with pytest.warns(UserWarning, match="extra.weight"):
        load_libra(str(tmp_path / "unexpected"), strict=False)
    write_released(tmp_path / "shape", config, extra={"lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \(3, 3\)"):
        load_libra(str(tmp_path / "shape"))


@pytest.mark.parametrize("shard", ["5GB", 20_000])
def test_save_load_round_trip(tmp_path, shard):
    config = LibraConfig.tiny(num_key_value_heads=2)
    model = LibraForCausalLM(config)
    randomize_parameters(model)
    model.save_pretrained(str(tmp_path), max_shard_size=shard)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard == "5GB":
        assert files == ["checksums.json", "config.json", "model.safetensors"]  # checksums.json: the integrity record
    else:
        assert "model.safetensors.index.json" in files and len(files) > 3
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == {n for n, _ in model.named_parameters()}
    loaded = LibraForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == config
    original = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, original[name]), name
    assert not loaded.vision_hidden_placeholder.requires_grad and loaded.lm_head.weight.requires_grad
    batch = make_batch(config, 2, 22)
    inputs = {k: batch[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def test_save_in_bfloat16_and_torch_bin_shards(tmp_path):
    config = LibraConfig.tiny()
    model = LibraForCausalLM(config)
    model.save_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    loaded = load_libra(str(tmp_path / "bf16"))
    assert loaded.config.torch_dtype == "bfloat16" and loaded.lm_head.weight.dtype == torch.bfloat16
    # A .bin checkpoint with an index (the older HF format) holding the same tensors.
    state = {n: p.detach() for n, p in model.named_parameters()}
    names = sorted(state)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:]), 1):
        file_name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, bin_dir / file_name)
        weight_map.update({n: file_name for n in part})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config.save_pretrained(str(bin_dir))
    assert load_state_dict(str(bin_dir)).keys() == state.keys()
    loaded = load_libra(str(bin_dir))
    assert all(torch.equal(p, state[n]) for n, p in loaded.named_parameters())


def test_llama_import_reports_missing_language_tensors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    state = {k: v for k, v in llama.state_dict().items() if k != "model.layers.0.mlp.up_proj.weight"}
    llama.config.save_pretrained(str(tmp_path))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight"):
        init_from_llama(str(tmp_path), contiguous_signal_size=16)
    with pytest.raises(FileNotFoundError):
        load_libra(str(tmp_path / "nowhere"))
