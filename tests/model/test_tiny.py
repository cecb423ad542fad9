"""The tiny real-format builders: files in the formats of the released artefacts, sized from a LibraConfig."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel, LlamaTokenizer

from libra_model.config import LibraConfig
from libra_model.processor import LibraProcessor
from libra_model.tiny import (
    build_tiny_clip,
    build_tiny_processor,
    build_tiny_processor_dir,
    build_tiny_text_tokenizer,
    build_tiny_vision_tokenizer,
    tiny_clip_geometry,
    tiny_pixel_decoder_config,
)


def random_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)) for _ in range(count)]


def test_processor_dir_fits_the_tiny_config(tmp_path):
    config = LibraConfig.tiny()
    directory = build_tiny_processor_dir(tmp_path / "proc", config)
    for name in ("config.json", "processor_config.json", "vision_tokenizer.ckpt", "tokenizer/tokenizer.model",
                 "tokenizer/tokenizer.json", "clip/config.json", "clip/model.safetensors",
                 "clip/preprocessor_config.json"):
        assert os.path.isfile(os.path.join(directory, name)), name
    assert LibraConfig.from_pretrained(directory) == config
    settings = json.load(open(os.path.join(directory, "processor_config.json")))
    assert settings["feature_layers"] == [1, 3] and settings["codebook_num"] == config.vision_codebook_num
    processor = LibraProcessor.from_pretrained(directory)
    image = processor.image_tokenizer
    assert image.tokens_per_image == config.max_vision_token_length
    assert image.num_patches == config.image_feature_resolution ** 2
    assert image.feature_size == config.contiguous_signal_size
    assert image.vision_vocab_size == config.vision_vocab_size and image.codebook_num == config.vision_codebook_num
    assert image.clip.config.num_hidden_layers == 4  # one block after the last feature layer
    assert processor.text_tokenizer.hf.vocab_size <= config.vocab_size
    # The random quantiser spreads real images over the codebook, so tests built on it see varied codes.
    codes = image.tokenize(random_images(6)).codes
    assert codes.unique().numel() >= config.num_codes // 2


def test_byte_fallback_tokenizer_has_llamas_layout(tmp_path):
    directory = build_tiny_text_tokenizer(tmp_path / "tok", ["a red circle on the left"], vocab_size=320)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert sp.get_piece_size() <= 320
    hf = LlamaTokenizer.from_pretrained(directory)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf("a\nb", add_special_tokens=False).input_ids[1:-1] == [13]
    with pytest.raises(ValueError, match="newline_token_id"):
        build_tiny_text_tokenizer(tmp_path / "bad", vocab_size=320, newline_token_id=20)


def test_compact_tokenizer_keeps_newline_at_its_id(tmp_path):
    corpus = ["a red circle on the left", "yes"]
    directory = build_tiny_text_tokenizer(tmp_path / "tok", corpus, vocab_size=64, newline_token_id=13)
    hf = LlamaTokenizer.from_pretrained(directory)
    assert hf.vocab_size <= 64
    assert hf.convert_ids_to_tokens(13) == "\n"
    ids = hf("a red circle\non the left", add_special_tokens=False).input_ids
    assert 13 in ids and all(i > 13 for i in ids if i != 13)  # the reserved ids never appear in text
    assert hf.decode(ids) == "a red circle\non the left"
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_text_tokenizer(tmp_path / "small", corpus, vocab_size=20)


def test_clip_formats(tmp_path):
    vision = build_tiny_clip(tmp_path / "vision", image_size=28, hidden_size=8, num_hidden_layers=2)
    full = build_tiny_clip(tmp_path / "full", image_size=28, hidden_size=8, num_hidden_layers=2, full_clip=True)
    vision_keys, full_keys = load_file(f"{vision}/model.safetensors"), load_file(f"{full}/model.safetensors")
    assert all(not k.startswith("vision_model.") for k in vision_keys)
    assert any(k.startswith("vision_model.") for k in full_keys) and any(k.startswith("text_model.") for k in full_keys)
    for directory in (vision, full):
        model = CLIPVisionModel.from_pretrained(directory)
        assert model.config.image_size == 28 and model.config.num_hidden_layers == 2
        processor = json.load(open(f"{directory}/preprocessor_config.json"))
        assert processor["crop_size"] == {"height": 28, "width": 28} and processor["size"] == {"shortest_edge": 28}
    with pytest.raises(ValueError, match="patch_size"):
        build_tiny_clip(tmp_path / "odd", image_size=30)


def test_vision_tokenizer_checkpoint_names_and_shapes(tmp_path):
    path = build_tiny_vision_tokenizer(tmp_path / "vqgan.ckpt", feature_size=24, embed_dim=10, codebook_num=2,
                                       bits_per_codebook=5, post_quant_channels=7)
    payload = torch.load(path, weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
    assert shapes == {"quant_conv.weight": (10, 24, 1, 1), "quant_conv.bias": (10,),
                      "quantize.project_in.weight": (10, 10), "quantize.project_in.bias": (10,),
                      "quantize.project_out.weight": (10, 10), "quantize.project_out.bias": (10,),
                      "post_quant_conv.weight": (7, 10, 1, 1), "post_quant_conv.bias": (7,),
                      "quantize.mask": (5,)}
    assert payload["state_dict"]["quantize.mask"].tolist() == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match="feature_size"):
        build_tiny_vision_tokenizer(tmp_path / "bad.ckpt", feature_size=0)


def test_vision_tokenizer_checkpoint_with_a_pixel_decoder(tmp_path):
    from libra_model.pixel_decoder import PixelDecoder

    config = LibraConfig.tiny()
    decoder_config = tiny_pixel_decoder_config(config, 42, embed_dim=10, z_channels=7)
    assert (decoder_config.initial_resolution, decoder_config.resolution, decoder_config.codebook_size) == (3, 42, 16)
    path = build_tiny_vision_tokenizer(tmp_path / "vqgan.ckpt", feature_size=24, embed_dim=10, codebook_num=2,
                                       bits_per_codebook=4, post_quant_channels=7, decoder=decoder_config)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("decoder.up.1.upsample.") for k in state)
    decoder = PixelDecoder.from_pretrained(decoder_config, path)  # every decoder tensor present, none extra
    assert torch.equal(decoder.post_quant_conv.weight, state["post_quant_conv.weight"])
    assert decoder.decode(torch.zeros(2, 1, 9, dtype=torch.long)).shape == (1, 3, 42, 42)
    with pytest.raises(ValueError, match="z_channels"):
        build_tiny_vision_tokenizer(tmp_path / "bad.ckpt", feature_size=24, embed_dim=10, codebook_num=2,
                                    bits_per_codebook=4, post_quant_channels=8, decoder=decoder_config)


def test_builders_are_deterministic(tmp_path):
    first = build_tiny_processor_dir(tmp_path / "a", seed=3)
    second = build_tiny_processor_dir(tmp_path / "b", seed=3)
    other = build_tiny_processor_dir(tmp_path / "c", seed=4)
    a, b, c = (load_file(f"{d}/clip/model.safetensors") for d in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    ckpts = [torch.load(f"{d}/vision_tokenizer.ckpt", weights_only=True)["state_dict"] for d in (first, second)]
    assert all(torch.equal(ckpts[0][k], ckpts[1][k]) for k in ckpts[0])
    for name in ("tokenizer.model", "tokenizer.json"):
        assert open(f"{first}/tokenizer/{name}", "rb").read() == open(f"{second}/tokenizer/{name}", "rb").read()


def test_other_geometries(tmp_path):
    config = LibraConfig.tiny(vocab_size=320, image_feature_resolution=2, max_vision_token_length=6,
                              contiguous_signal_size=48, vision_vocab_size=34)
    processor = build_tiny_processor(tmp_path / "p", config, texts=["a red circle"])
    batch = processor(images=random_images(1), texts=["a red circle"], template="caption", return_labels=True)
    assert batch["contiguous_signal"].shape[-1] == 48
    vision = batch["vision_indices"][0] < 6
    assert int(vision.sum()) == 6
    codes = batch["input_ids"][:, 0, vision][:, 1:-1] - 320
    assert ((codes >= 0) & (codes < 32)).all()
    assert processor.text_tokenizer.hf.convert_ids_to_tokens(13) == "<0x0A>"
    assert tiny_clip_geometry(LibraConfig.tiny(contiguous_signal_size=33))["feature_layers"] == (2,)
    with pytest.raises(ValueError, match="divisible"):
        tiny_clip_geometry(config, feature_layers=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="bos"):
        build_tiny_processor_dir(tmp_path / "q", LibraConfig.tiny(bos_token_id=5))
