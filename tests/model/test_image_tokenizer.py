"""The hybrid image tokenizer (docs/model.md §10, §14 items 9-11) against transformers' CLIPVisionModel and independent
re-derivations of the quantiser; the released checkpoint names."""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModel

from libra_kernels.testing import assert_close_to_ref
from libra_model.image_tokenizer import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    CLIP_MEAN_RGB,
    HybridImageTokenizer,
    lfq_bits_to_codes,
    lfq_codes_to_bits,
    lfq_codes_to_latent,
    lfq_quantize,
    pad_to_square,
    read_vision_tokenizer_checkpoint,
)
from libra_model.tiny import build_tiny_clip, build_tiny_vision_tokenizer

CLIP_HIDDEN, CLIP_BLOCKS, IMAGE = 16, 4, 42  # 3x3 patches of 14 pixels
LAYERS = (0, 2, 3)  # includes the embeddings (index 0) and skips the last block
VOCAB = 100


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    vision = build_tiny_clip(root / "vision", image_size=IMAGE, hidden_size=CLIP_HIDDEN,
                             num_hidden_layers=CLIP_BLOCKS, seed=1)
    full = build_tiny_clip(root / "full", image_size=IMAGE, hidden_size=CLIP_HIDDEN,
                           num_hidden_layers=CLIP_BLOCKS, full_clip=True, seed=2)
    return {"vision": vision, "full": full, "root": root}


@pytest.fixture(scope="module")
def checkpoint(clip_dirs):
    return build_tiny_vision_tokenizer(clip_dirs["root"] / "vqgan.ckpt", feature_size=len(LAYERS) * CLIP_HIDDEN,
                                       embed_dim=12, codebook_num=2, bits_per_codebook=3, seed=3)


@pytest.fixture(scope="module")
def tokenizer(clip_dirs, checkpoint):
    return HybridImageTokenizer.from_pretrained(clip_dirs["vision"], checkpoint, feature_layers=LAYERS,
                                                codebook_num=2, text_vocab_size=VOCAB)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------- CLIP oracle
@pytest.mark.parametrize("kind", ["vision", "full"])
def test_clip_features_equal_hf_hidden_states(clip_dirs, checkpoint, kind):
    tok = HybridImageTokenizer.from_pretrained(clip_dirs[kind], checkpoint, feature_layers=LAYERS,
                                               text_vocab_size=VOCAB)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ours = tok.clip_features(pixels)
    assert ours.shape == (3, 9, len(LAYERS) * CLIP_HIDDEN)

    oracle = CLIPVisionModel.from_pretrained(clip_dirs[kind]).eval()

    def hf_features(model, x):
        with torch.no_grad():
            states = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(states) == CLIP_BLOCKS + 1
        return torch.cat([states[i][:, 1:] for i in LAYERS], dim=-1)

    same_precision = hf_features(oracle, pixels)
    reference = hf_features(oracle.double(), pixels.double())
    assert_close_to_ref(ours, reference, same_precision, torch.float32, "CLIP features")
    # The layer order of the concatenation is the list order: swapping layers must change the result.
    assert not torch.allclose(ours[..., :CLIP_HIDDEN], ours[..., CLIP_HIDDEN:2 * CLIP_HIDDEN])


def test_full_clip_directory_loads_vision_weights(clip_dirs, checkpoint):
    tok = HybridImageTokenizer.from_pretrained(clip_dirs["full"], checkpoint, feature_layers=LAYERS,
                                               text_vocab_size=VOCAB)
    from safetensors.torch import load_file

    stored = load_file(os.path.join(clip_dirs["full"], "model.safetensors"))
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(tok.clip.state_dict()["encoder.layers.1.mlp.fc1.weight"], stored[name])


def test_clip_with_missing_weights_is_an_error(tmp_path, clip_dirs, checkpoint):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "clip"
    shutil.copytree(clip_dirs["vision"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["encoder.layers.2.self_attn.k_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.layers.2.self_attn.k_proj.weight"):
        HybridImageTokenizer.from_pretrained(broken, checkpoint, feature_layers=LAYERS)


def test_feature_layers_are_validated(clip_dirs, checkpoint):
    with pytest.raises(ValueError, match="feature_layers"):
        HybridImageTokenizer.from_pretrained(clip_dirs["vision"], checkpoint, feature_layers=(1, 2, CLIP_BLOCKS + 1))
    with pytest.raises(ValueError, match="quant_conv takes"):
        HybridImageTokenizer.from_pretrained(clip_dirs["vision"], checkpoint, feature_layers=(1, 2))


def test_pixel_values_are_validated(tokenizer):
    with pytest.raises(ValueError, match="pixel_values"):
        tokenizer.tokenize(torch.randn(1, 3, IMAGE + 1, IMAGE))
    with pytest.raises(TypeError, match="pixel_values"):
        tokenizer.tokenize(torch.zeros(1, 3, IMAGE, IMAGE, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------- preprocessing
def test_pad_to_square_centres_on_the_clip_mean_colour():
    image = random_image(10, 4)
    square = pad_to_square(image)
    assert square.size == (10, 10)
    pixels = np.asarray(square)
    assert (pixels[:3] == CLIP_MEAN_RGB).all() and (pixels[7:] == CLIP_MEAN_RGB).all()
    assert (pixels[3:7] == np.asarray(image)).all()
    tall = pad_to_square(random_image(3, 8))
    assert tall.size == (8, 8) and (np.asarray(tall)[:, :2] == CLIP_MEAN_RGB).all()


def test_preprocess_is_clip_normalisation(tokenizer, clip_dirs):
    image = random_image(IMAGE, IMAGE, seed=5)
    pixels = tokenizer.preprocess([image])
    # A square image already at the CLIP size is only rescaled and normalised: compare with the arithmetic.
    expected = (torch.tensor(np.asarray(image), dtype=torch.float64).permute(2, 0, 1) / 255
                - torch.tensor(CLIP_IMAGE_MEAN, dtype=torch.float64)[:, None, None]) \
        / torch.tensor(CLIP_IMAGE_STD, dtype=torch.float64)[:, None, None]
    assert_close_to_ref(pixels[0], expected, None, torch.float32, "pixel values")
    # A non-square image is padded first, then resized and cropped by the CLIP processor.
    wide = random_image(70, 30, seed=6)
    processor = CLIPImageProcessorPil.from_pretrained(clip_dirs["vision"])
    direct = processor(images=[pad_to_square(wide)], return_tensors="pt")["pixel_values"]
    assert torch.equal(tokenizer.preprocess([wide]), direct)


# ------------------------------------------------------------------------------------------------------- LFQ
def test_lfq_bijection_for_every_code():
    codes = torch.arange(512)
    bits = lfq_codes_to_bits(codes, 9)
    assert bits.shape == (512, 9)
    assert torch.equal(lfq_bits_to_codes(bits), codes)
    # Most significant bit first: code 256 is 1 followed by eight zeros.
    assert bits[256].tolist() == [True] + [False] * 8 and bits[1].tolist() == [False] * 8 + [True]
    pairs = torch.stack([codes, codes.flip(0)], dim=-1)  # [512, C=2]
    latent = lfq_codes_to_latent(pairs, 9)
    assert latent.shape == (512, 18) and set(latent.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(lfq_quantize(latent, 2), pairs)


def test_lfq_sign_rule_and_codebook_split():
    assert lfq_quantize(torch.full((18,), 0.3), 2).tolist() == [511, 511]
    assert lfq_quantize(torch.full((18,), -0.3), 2).tolist() == [0, 0]
    assert lfq_quantize(torch.zeros(18), 2).tolist() == [0, 0]  # strict > 0: an exact 0 is bit 0
    z = torch.randn(5, 18)
    expected = [[sum(int(z[r, c * 9 + k] > 0) << (8 - k) for k in range(9)) for c in range(2)] for r in range(5)]
    assert lfq_quantize(z, 2).tolist() == expected
    with pytest.raises(ValueError, match="codebook_num"):
        lfq_quantize(torch.randn(4, 17), 2)
    with pytest.raises(ValueError, match="codes must lie"):
        lfq_codes_to_bits(torch.tensor([8]), 3)


def test_codes_follow_the_reference_conv_and_raster_order(tokenizer):
    features = torch.randn(2, 9, len(LAYERS) * CLIP_HIDDEN)
    codes = tokenizer.codes_from_features(features)
    assert codes.shape == (2, 2, 9) and codes.dtype == torch.int64
    # The reference reshapes the patch tokens to a [B, F, 3, 3] map, applies the 1x1 conv, and flattens back.
    grid = features.double().transpose(1, 2).reshape(2, -1, 3, 3)
    conv = F.conv2d(grid, tokenizer.quant_conv.weight.double(), tokenizer.quant_conv.bias.double())
    z = F.linear(conv.flatten(2).transpose(1, 2), tokenizer.quantize.project_in.weight.double(),
                 tokenizer.quantize.project_in.bias.double())
    for b in range(2):
        for row in range(3):
            for col in range(3):
                patch = row * 3 + col
                for c in range(2):
                    want = sum(int(z[b, patch, c * 3 + k] > 0) << (2 - k) for k in range(3))
                    assert codes[c, b, patch] == want
    assert codes.unique().numel() > 2  # the random quantiser uses the codebook, so the check above is not vacuous


# ---------------------------------------------------------------------------------------------- ids and signal
def test_ids_and_contiguous_signal_layout(tokenizer):
    images = [random_image(50, 30, seed=7), random_image(42, 42, seed=8)]
    out = tokenizer.tokenize(images)
    num_codes = 2 ** 3
    boi, eoi = VOCAB + num_codes, VOCAB + num_codes + 1
    assert tokenizer.boi_token_id == boi and tokenizer.eoi_token_id == eoi and tokenizer.tokens_per_image == 11
    assert out.ids.shape == (2, 2, 11) and out.ids.dtype == torch.int64
    assert (out.ids[:, :, 0] == boi).all() and (out.ids[:, :, -1] == eoi).all()
    assert torch.equal(out.ids[:, :, 1:-1], out.codes + VOCAB)
    assert ((out.codes >= 0) & (out.codes < num_codes)).all()
    features = tokenizer.clip_features(tokenizer.preprocess(images))
    assert out.contiguous_signal.shape == (2, 11, len(LAYERS) * CLIP_HIDDEN)
    assert (out.contiguous_signal[:, 0] == 0).all() and (out.contiguous_signal[:, -1] == 0).all()
    assert torch.equal(out.contiguous_signal[:, 1:-1], features)
    assert torch.equal(out.codes, tokenizer.codes_from_features(features))
    # Pixel values in, same tokens out.
    assert torch.equal(tokenizer.tokenize(tokenizer.preprocess(images)).ids, out.ids)


def test_dequantize_is_project_out_then_post_quant_conv(tokenizer):
    codes = torch.randint(0, 8, (2, 3, 9))
    latent = tokenizer.dequantize(codes)
    assert latent.shape == (3, 16, 3, 3)
    signs = torch.stack([lfq_codes_to_latent(codes[:, b].T, 3) for b in range(3)])  # [B, P, 6]
    projected = F.linear(signs.double(), tokenizer.quantize.project_out.weight.double(),
                         tokenizer.quantize.project_out.bias.double())
    grid = projected.transpose(1, 2).reshape(3, -1, 3, 3)
    expected = F.conv2d(grid, tokenizer.post_quant_conv.weight.double(), tokenizer.post_quant_conv.bias.double())
    assert_close_to_ref(latent, expected, None, torch.float32, "dequantized latent")


# -------------------------------------------------------------------------------------------------- checkpoints
class _Opaque:
    pass


def test_released_checkpoint_names_load_and_report(tmp_path, tokenizer, clip_dirs):
    state = read_vision_tokenizer_checkpoint(tokenizer_checkpoint_path(tmp_path, tokenizer))
    extra = dict(state)
    extra["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    extra["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(2)
    extra["decoder.conv_in.weight"] = torch.randn(4, 16, 3, 3)
    extra["encoder.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"] = torch.randn(CLIP_HIDDEN)
    path = tmp_path / "released.ckpt"
    torch.save({"state_dict": extra, "epoch": 3, "global_step": 10}, path)
    tok = HybridImageTokenizer.from_pretrained(clip_dirs["vision"], path, feature_layers=LAYERS,
                                               text_vocab_size=VOCAB)
    report = tok.load_report
    assert set(report.loaded) == {"quant_conv.weight", "quant_conv.bias", "quantize.project_in.weight",
                                  "quantize.project_in.bias", "quantize.project_out.weight",
                                  "quantize.project_out.bias", "post_quant_conv.weight", "post_quant_conv.bias"}
    assert set(report.ignored) == {"quantize.mask", "loss.discriminator.main.0.weight",
                                   "loss.perceptual_loss.net.slice1.0.weight", "decoder.conv_in.weight",
                                   "encoder.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"}
    assert report.missing == [] and report.unexpected == []
    for name, value in state.items():
        if name != "quantize.mask":
            assert torch.equal(tok.tokenizer_state_dict()[name], value), name
    image = [random_image(40, 40, seed=9)]
    assert torch.equal(tok.tokenize(image).ids, tokenizer.tokenize(image).ids)


def tokenizer_checkpoint_path(tmp_path, tok):
    return tok.save_checkpoint(tmp_path / "saved" / "vision_tokenizer.ckpt")


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path, tokenizer, clip_dirs):
    state = read_vision_tokenizer_checkpoint(tokenizer_checkpoint_path(tmp_path, tokenizer))
    missing = {k: v for k, v in state.items() if k != "quantize.project_in.bias"}
    with pytest.raises(ValueError, match=r"quantize\.project_in\.bias"):
        tokenizer.load_checkpoint(missing)
    with pytest.raises(ValueError, match=r"quantize\.project_in\.bias"):
        HybridImageTokenizer.from_pretrained(clip_dirs["vision"], missing, feature_layers=LAYERS)
    unexpected = dict(state, **{"quantize.embedding.weight": torch.randn(3)})
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight"):
        tokenizer.load_checkpoint(unexpected)
    report = tokenizer.load_checkpoint(unexpected, strict=False)
    assert report.unexpected == ["quantize.embedding.weight"]
    mismatched = dict(state, **{"quant_conv.bias": torch.randn(5)})
    with pytest.raises(ValueError, match=r"quant_conv\.bias"):
        tokenizer.load_checkpoint(mismatched)
    optional_absent = {k: v for k, v in state.items() if not k.startswith("post_quant_conv")}
    assert set(tokenizer.load_checkpoint(optional_absent).missing) == {"post_quant_conv.weight",
                                                                       "post_quant_conv.bias"}
    without_decoder = HybridImageTokenizer.from_pretrained(clip_dirs["vision"], optional_absent,
                                                           feature_layers=LAYERS)
    with pytest.raises(ValueError, match="post_quant_conv"):
        without_decoder.dequantize(torch.zeros(2, 1, 9, dtype=torch.int64))


def test_clip_weights_from_the_tokenizer_checkpoint(tmp_path, tokenizer, clip_dirs):
    # A checkpoint that carries its own CLIP copy (LLaVA-style wrapper names) can replace the directory's weights.
    other = CLIPVisionModel.from_pretrained(clip_dirs["full"])
    state = read_vision_tokenizer_checkpoint(tokenizer_checkpoint_path(tmp_path, tokenizer))
    for name, value in other.state_dict().items():
        state[f"encoder.vision_tower.vision_tower.vision_model.{name}"] = value
    tok = HybridImageTokenizer.from_pretrained(clip_dirs["vision"], state, feature_layers=LAYERS, load_clip=True)
    for name, value in other.state_dict().items():
        assert torch.equal(tok.clip.state_dict()[name], value), name
    del state["encoder.vision_tower.vision_tower.vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError, match="post_layernorm.bias"):
        HybridImageTokenizer.from_pretrained(clip_dirs["vision"], state, feature_layers=LAYERS, load_clip=True)


def test_untrusted_pickles_need_an_explicit_opt_in(tmp_path, tokenizer):
    state = read_vision_tokenizer_checkpoint(tokenizer_checkpoint_path(tmp_path, tokenizer))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        read_vision_tokenizer_checkpoint(path)
    assert set(read_vision_tokenizer_checkpoint(path, weights_only=False)) == set(state)
