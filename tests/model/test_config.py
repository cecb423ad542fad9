"""LibraConfig: the released values, presets, config.json round trips and the validation errors."""

import json

import pytest

from libra_model import LibraConfig


def test_libra_11b_has_the_released_values():
    c = LibraConfig.libra_11b()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == \
        (32000, 4096, 11008, 32, 32)
    assert (c.vision_vocab_size, c.vision_codebook_num, c.max_vision_token_length, c.image_feature_resolution) == \
        (514, 2, 578, 24)
    assert (c.vision_down_ratio, c.bridge_rank, c.contiguous_signal_size) == (4, 8, 4096)
    assert c.concat_signals and c.norm_signals and c.use_bridge and c.vision_prediction_mode == "1d"
    assert not (c.addition_mode or c.unified_head or c.use_2d_rope or c.use_vision_position_embedding)
    assert (c.newline_token_id, c.rms_norm_eps, c.max_position_embeddings, c.initializer_range) == (13, 1e-6, 2048,
                                                                                                   0.02)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.rope_theta) == (0, 1, 2, 10000.0)
    assert (c.boi_token_id, c.eoi_token_id, c.total_vocab_size, c.head_dim) == (32512, 32513, 32514, 128)
    assert c.expert_rank(4096) == 1024 and c.expert_rank(11008) == 2752


def test_json_round_trip_and_released_style_file(tmp_path):
    for config in (LibraConfig.libra_11b(), LibraConfig.tiny(num_key_value_heads=2, vision_prediction_mode="2d"),
                   LibraConfig.tiny(use_2d_rope=True)):
        path = config.save_pretrained(tmp_path / "c")
        assert LibraConfig.from_pretrained(tmp_path / "c") == config
        assert LibraConfig.from_json_file(path) == config
    released = LibraConfig.libra_11b().to_dict()
    released.update(architectures=["LibraForCausalLM"], model_type="libra", transformers_version="4.31.0",
                    use_cache=True, pretraining_tp=1, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert LibraConfig.from_pretrained(tmp_path) == LibraConfig.libra_11b()


def test_transformers_5_rope_parameters_are_read():
    values = LibraConfig.tiny().to_dict()
    del values["rope_theta"]
    values["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert LibraConfig.from_dict(values).rope_theta == 500000.0
    values["rope_parameters"] = {"rope_theta": 1.0, "rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_parameters"):
        LibraConfig.from_dict(values)


@pytest.mark.parametrize("overrides,match", [
    ({"hidden_size": 66}, "divisible by num_attention_heads"),
    ({"hidden_size": 60, "num_attention_heads": 4}, "vision_down_ratio|even"),
    ({"vision_codebook_num": 3}, "divisible by vision_codebook_num"),
    ({"max_vision_token_length": 12}, "image_feature_resolution"),
    ({"image_feature_resolution": 4}, "max_vision_token_length"),
    ({"vision_vocab_size": 19}, "vision_vocab_size"),
    ({"vision_prediction_mode": "3d"}, "vision_prediction_mode"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": 130}, "vision_down_ratio"),
    ({"newline_token_id": 64}, "newline_token_id"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"attn_pdrop": 0.1}, "attn_pdrop"),
    ({"resid_pdrop": 1.0}, "resid_pdrop"),
    ({"unified_head": True}, "unified_head"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"use_bridge": 1}, "use_bridge"),
    ({"bridge_rank": 0}, "bridge_rank"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"use_2d_rope": True, "num_key_value_heads": 2}, "use_2d_rope"),
])
def test_inconsistent_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        LibraConfig.tiny(**overrides)


def test_unknown_keys_raise_unless_not_strict():
    values = {**LibraConfig.tiny().to_dict(), "vision_mystery": 3}
    with pytest.raises(ValueError, match="vision_mystery"):
        LibraConfig.from_dict(values)
    with pytest.warns(UserWarning, match="vision_mystery"):
        assert LibraConfig.from_dict(values, strict=False) == LibraConfig.tiny()
    with pytest.raises(TypeError):
        LibraConfig.from_dict([1, 2])
