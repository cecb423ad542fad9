"""PixelDecoder against an independent float64 implementation of the released decode path (docs/model.md): codes ->
MSB-first ±1 bits -> project_out -> post_quant_conv -> conv_in, mid (ResBlock, attention, ResBlock), levels coarse
to fine with num_res_blocks + 1 ResBlocks (+ attention at the listed resolutions), nearest upsampling (x2, and the
fractional last step to the output resolution) + 3x3 conv, GroupNorm(32, 1e-6), swish, conv_out. Also the released
parameter names and count (meta device), the YAML + checkpoint round trip and its errors, shapes and dtypes."""

import pytest
import torch
import torch.nn.functional as F

from libra_model.pixel_decoder import PixelDecoder, PixelDecoderConfig, random_pixel_decoder


# ------------------------------------------------------------------------------- independent implementation
def _group_norm(x, state, name):
    b, c, h, w = x.shape
    g = x.reshape(b, 32, c // 32, h, w)
    mean = g.mean(dim=(2, 3, 4), keepdim=True)
    var = ((g - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    g = (g - mean) / torch.sqrt(var + 1e-6)
    return g.reshape(b, c, h, w) * state[name + ".weight"][None, :, None, None] + state[name + ".bias"][None, :, None,
                                                                                                          None]


def _swish(x):
    return x / (1 + torch.exp(-x))


def _conv(x, state, name):
    weight = state[name + ".weight"]
    return F.conv2d(x, weight, state[name + ".bias"], padding=weight.shape[-1] // 2)


def _resblock(x, state, name):
    h = _conv(_swish(_group_norm(x, state, name + ".norm1")), state, name + ".conv1")
    h = _conv(_swish(_group_norm(h, state, name + ".norm2")), state, name + ".conv2")
    if name + ".nin_shortcut.weight" in state:
        x = _conv(x, state, name + ".nin_shortcut")
    return x + h


def _attention(x, state, name, heads):
    b, c, h, w = x.shape
    n = _group_norm(x, state, name + ".norm")
    q, k, v = (_conv(n, state, f"{name}.{p}").reshape(b, heads, c // heads, h * w) for p in "qkv")
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) / (c // heads) ** 0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, c, h, w)
    return x + _conv(out, state, name + ".proj_out")


def _nearest(x, size):
    # Output pixel i reads input pixel floor(i * in / out), in exact integer arithmetic.
    source = (torch.arange(size) * x.shape[-1]) // size
    return x[:, :, source][:, :, :, source]


def reference_decode(state, cfg, codes):
    """float64 decode of codes [C, B, P] with the tensors ``state`` under the released names."""
    state = {k: v.double() for k, v in state.items()}
    channels, batch, patches = codes.shape
    bits_per = cfg["codebook_size"].bit_length() - 1
    side = cfg["initial_resolution"]
    bits = torch.stack([(codes >> (bits_per - 1 - k)) & 1 for k in range(bits_per)], dim=-1)  # [C, B, P, K]
    signs = bits.double() * 2 - 1
    vector = signs.permute(1, 2, 0, 3).reshape(batch, patches, channels * bits_per)  # codebook 0 first
    latent = vector @ state["quantize.project_out.weight"].T + state["quantize.project_out.bias"]
    grid = latent.reshape(batch, side, side, -1).permute(0, 3, 1, 2)  # raster order: p = row * side + col
    h = _conv(grid, state, "post_quant_conv")
    if cfg.get("norm_first"):
        h = _group_norm(h, state, "decoder.first_norm")
    h = _conv(h, state, "decoder.conv_in")
    h = _resblock(h, state, "decoder.mid.block_1")
    h = _attention(h, state, "decoder.mid.attn_1", cfg["num_attn_head"])
    h = _resblock(h, state, "decoder.mid.block_2")
    levels = len(cfg["ch_mult"])
    for level in reversed(range(levels)):
        attend = h.shape[-1] in cfg["attn_resolutions"]
        for block in range(cfg["num_res_blocks"] + 1):
            h = _resblock(h, state, f"decoder.up.{level}.block.{block}")
            if attend:
                h = _attention(h, state, f"decoder.up.{level}.attn.{block}", cfg["num_attn_head"])
        if level >= 2:
            h = _conv(_nearest(h, 2 * h.shape[-1]), state, f"decoder.up.{level}.upsample.conv")
        elif level == 1:
            h = _conv(_nearest(h, cfg["resolution"]), state, f"decoder.up.{level}.upsample.conv")
    return _conv(_swish(_group_norm(h, state, "decoder.norm_out")), state, "decoder.conv_out")


# ------------------------------------------------------------------------------------------------- helpers
CASES = {
    # the released shape of the schedule: x2 steps then 1.75 (3 -> 6 -> 12 -> 21), attention at two levels
    "fractional_1.75": dict(embed_dim=24, codebook_size=512, num_codebook=2, ch=32, ch_mult=[1, 1, 2, 2],
                            num_res_blocks=1, attn_resolutions=[3, 6], num_attn_head=4, z_channels=40,
                            initial_resolution=3, resolution=21, out_ch=3),
    # odd sizes, one head, a factor of 3.7 (5 -> 10 -> 37), three ResBlocks per level, a GroupNorm on z
    "odd_single_head": dict(embed_dim=8, codebook_size=16, num_codebook=3, ch=32, ch_mult=[1, 2, 2],
                            num_res_blocks=2, attn_resolutions=[5], num_attn_head=1, z_channels=32,
                            initial_resolution=5, resolution=37, out_ch=3, norm_first=True),
    # two levels: only the fractional step (4 -> 18), attention nowhere but the middle
    "two_levels": dict(embed_dim=16, codebook_size=4, num_codebook=2, ch=64, ch_mult=[1, 1], num_res_blocks=0,
                       attn_resolutions=[], num_attn_head=2, z_channels=16, initial_resolution=4, resolution=18,
                       out_ch=3),
}


def config_of(cfg):
    return PixelDecoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def random_codes(cfg, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["codebook_size"], (cfg["num_codebook"], batch, cfg["initial_resolution"] ** 2),
                         generator=generator)


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_matches_the_independent_implementation(case):
    cfg = CASES[case]
    decoder = random_pixel_decoder(config_of(cfg), seed=len(case)).double()
    codes = random_codes(cfg, batch=2, seed=1)
    want = reference_decode(decoder.state_dict(), cfg, codes)
    got = decoder.decode(codes)
    assert got.shape == (2, cfg["out_ch"], cfg["resolution"], cfg["resolution"]) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # fp32 (the default dtype) stays close to the float64 reference
    got32 = random_pixel_decoder(config_of(cfg), seed=len(case)).decode(codes)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_bfloat16_decode_and_batching():
    cfg = CASES["two_levels"]
    decoder = random_pixel_decoder(config_of(cfg), seed=3)
    codes = random_codes(cfg, batch=3, seed=2)
    want = reference_decode(decoder.state_dict(), cfg, codes)
    whole = decoder.decode(codes)
    torch.testing.assert_close(decoder.decode(codes, batch_size=2), whole, rtol=1e-5, atol=1e-5)
    bf16 = decoder.to(torch.bfloat16).decode(codes)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == whole.shape
    error = (bf16.double() - want).norm() / want.norm()
    assert error < 5e-2, float(error)
    empty = decoder.decode(codes[:, :0])
    assert empty.shape == (0, 3, 18, 18)


def test_nearest_upsampling_of_the_released_schedule_is_exact_integer_indexing():
    # The module upsamples with F.interpolate(scale_factor=1.75) like the released model; the reference indexes
    # floor(i * 192 / 336) exactly. They must pick the same pixels at the released sizes.
    x = torch.randn(1, 1, 192, 192, dtype=torch.float64)
    torch.testing.assert_close(F.interpolate(x, scale_factor=336 / 192, mode="nearest"), _nearest(x, 336),
                               rtol=0, atol=0)


def released_expected_count():
    """Parameter count of the decode path, from the description of the released decoder."""
    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def norm(c):
        return 2 * c

    def res(cin, cout):
        return norm(cin) + conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + (conv(cin, cout, 1)
                                                                                   if cin != cout else 0)

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    total = (18 * 1024 + 1024) + conv(1024, 1024, 1) + conv(1024, 1024, 3)
    total += 2 * res(1024, 1024) + attn(1024)
    width = 1024
    for out_width, attention, upsample in ((1024, True, True), (512, False, True), (256, False, True),
                                           (128, False, True), (128, False, False)):
        for block in range(3):
            total += res(width if block == 0 else out_width, out_width) + (attn(out_width) if attention else 0)
        width = out_width
        total += conv(width, width, 3) if upsample else 0
    return total + norm(128) + conv(128, 3, 3)


def test_released_configuration_on_meta():
    decoder = PixelDecoder.released(device="meta")
    assert all(p.device.type == "meta" for p in decoder.parameters())
    count = sum(p.numel() for p in decoder.parameters())
    assert count == released_expected_count() == 157_521_027
    names = set(decoder.state_dict())
    assert all(n.startswith(("decoder.", "post_quant_conv.", "quantize.project_out.")) for n in names)
    for name in ("decoder.conv_in.weight", "decoder.mid.attn_1.proj_out.bias", "decoder.up.4.attn.2.q.weight",
                 "decoder.up.4.upsample.conv.weight", "decoder.up.1.upsample.conv.weight",
                 "decoder.up.3.block.0.nin_shortcut.weight", "decoder.norm_out.weight", "decoder.conv_out.bias",
                 "post_quant_conv.weight", "quantize.project_out.weight"):
        assert name in names, name
    assert not any(n.startswith(("decoder.up.0.upsample", "decoder.up.3.attn", "decoder.first_norm"))
                   for n in names)
    assert tuple(decoder.state_dict()["decoder.up.1.upsample.conv.weight"].shape) == (128, 128, 3, 3)
    # The level sizes 24 -> 48 -> 96 -> 192 -> 336, by shape propagation on the meta device.
    sizes = []
    for level in reversed(decoder.decoder.up):
        level.register_forward_hook(lambda module, args, out: sizes.append(out.shape[-1]))
    out = decoder.decoder(torch.empty(2, 1024, 24, 24, device="meta"))
    assert tuple(out.shape) == (2, 3, 336, 336)
    assert sizes == [48, 96, 192, 336, 336]


def test_yaml_and_checkpoint_round_trip(tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = CASES["odd_single_head"]
    decoder = random_pixel_decoder(config_of(cfg), seed=5)
    # A YAML in the released layout: target, encoder keys and the loss config are ignored.
    released_yaml = {"model": {"target": "VQModel", "params": {
        "embed_dim": cfg["embed_dim"], "codebook_size": cfg["codebook_size"], "num_codebook": cfg["num_codebook"],
        "lossconfig": {"target": "loss", "params": {"disc_start": 0}},
        "ddconfig": {"encoder_name": "clip", "select_layer": [2, 10], "double_z": False, "in_channels": 3,
                     "dropout": 0.0, **{k: cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                            "num_attn_head", "z_channels", "resolution",
                                                            "initial_resolution", "out_ch", "norm_first")}}}}}
    (tmp_path / "vision_tokenizer_config.yaml").write_text(yaml.safe_dump(released_yaml))
    state = dict(decoder.checkpoint_state_dict())
    state.update({"quant_conv.weight": torch.randn(8, 12, 1, 1), "quant_conv.bias": torch.randn(8),
                  "quantize.project_in.weight": torch.randn(12, 8), "quantize.mask": torch.tensor([8, 4, 2, 1]),
                  "loss.discriminator.weight": torch.randn(3), "encoder.vision_tower.x": torch.randn(2)})
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "vqgan.ckpt")
    loaded = PixelDecoder.from_pretrained(config=tmp_path / "vision_tokenizer_config.yaml",
                                          checkpoint=tmp_path / "vqgan.ckpt")
    assert loaded.config == decoder.config
    for key, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = random_codes(cfg, batch=2, seed=4)
    torch.testing.assert_close(loaded.decode(codes), decoder.decode(codes), rtol=0, atol=0)
    # our own YAML writer reads back the same config
    assert PixelDecoderConfig.from_yaml(decoder.config.save_yaml(tmp_path / "own.yaml")) == decoder.config

    missing = {k: v for k, v in state.items() if k != "decoder.up.1.block.2.conv2.bias"}
    with pytest.raises(ValueError, match=r"decoder\.up\.1\.block\.2\.conv2\.bias"):
        PixelDecoder.from_pretrained(decoder.config, missing)
    with pytest.raises(ValueError, match=r"decoder\.up\.0\.attn\.0\.q\.weight"):
        PixelDecoder.from_pretrained(decoder.config, {**state, "decoder.up.0.attn.0.q.weight": torch.zeros(1)})
    bad = {**state, "post_quant_conv.weight": torch.zeros(5, cfg["embed_dim"], 1, 1)}
    with pytest.raises(ValueError, match=r"post_quant_conv\.weight"):
        PixelDecoder.from_pretrained(decoder.config, bad)


def test_to_images_maps_minus_one_to_zero_and_one_to_255():
    pixels = torch.stack([torch.full((3, 5, 7), -1.0), torch.full((3, 5, 7), 1.0)])
    pixels[1, 0, 0, 0] = 0.0
    pixels[1, 1, 0, 0] = 7.0  # clamped
    images = PixelDecoder.to_images(pixels)
    assert [im.size for im in images] == [(7, 5), (7, 5)]
    assert images[0].getpixel((3, 2)) == (0, 0, 0)
    assert images[1].getpixel((3, 2)) == (255, 255, 255)
    assert images[1].getpixel((0, 0)) == (128, 255, 255)
    with pytest.raises(ValueError, match="pixels"):
        PixelDecoder.to_images(torch.zeros(3, 5, 7))


def test_bad_inputs_and_configs_are_errors():
    cfg = CASES["two_levels"]
    decoder = random_pixel_decoder(config_of(cfg))
    with pytest.raises(ValueError, match="codes must be"):
        decoder.decode(torch.zeros(1, 2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be"):
        decoder.decode(torch.zeros(2, 2, 15, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        decoder.decode(torch.zeros(2, 2, 16))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        decoder.decode(torch.full((2, 1, 16), 4))
    with pytest.raises(ValueError, match="batch_size"):
        decoder.decode(torch.zeros(2, 1, 16, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        PixelDecoderConfig(ch=16)
    with pytest.raises(ValueError, match="power of two"):
        PixelDecoderConfig(codebook_size=500)
    with pytest.raises(ValueError, match="num_attn_head"):
        PixelDecoderConfig(num_attn_head=3)
    with pytest.raises(ValueError, match="not resolution"):
        PixelDecoderConfig(ch_mult=(1,), initial_resolution=24, resolution=336)
    with pytest.raises(ValueError, match="ddconfig"):
        PixelDecoderConfig.from_params({"embed_dim": 4})
    with pytest.raises(ValueError, match="resamp_with_conv"):
        PixelDecoderConfig.from_params({"embed_dim": 4, "ddconfig": {
            "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4,
            "resolution": 4, "resamp_with_conv": False}})


def test_finest_level_attention_follows_the_released_rule():
    # The finest level is matched against attn_resolutions with the size before the fractional step (6 here),
    # as the released model builds it; its real size (14) is not what is matched.
    config = PixelDecoderConfig(embed_dim=4, codebook_size=4, num_codebook=1, ch=32, ch_mult=(1, 1, 1),
                                num_res_blocks=0, attn_resolutions=(6,), num_attn_head=1, z_channels=4,
                                initial_resolution=3, resolution=14)
    names = PixelDecoder(config).state_dict()
    assert "decoder.up.1.attn.0.q.weight" in names and "decoder.up.0.attn.0.q.weight" in names
    assert "decoder.up.2.attn.0.q.weight" not in names
