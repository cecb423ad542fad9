"""The pixel side of Libra's hybrid image tokenizer: codes back to pixels (the released decoder, docs/model.md).

Decode path: codes int [C, B, P] (P = r² in raster order, the layout of
:meth:`HybridImageTokenizer.codes_from_features`) -> K sign bits per codebook, most significant first -> a ±1 vector
[B, P, C·K] -> ``quantize.project_out`` (Linear C·K -> embed_dim) -> a grid [B, embed_dim, r, r] ->
``post_quant_conv`` (1×1 conv to z_channels) -> a taming-style convolutional decoder -> pixels [B, out_ch, R, R],
about [-1, 1].

The decoder: ``conv_in`` (3×3, z_channels -> ch·ch_mult[-1]); ``mid`` = ResBlock, multi-head self-attention,
ResBlock; then the levels from coarse to fine (``up.{L-1}`` ... ``up.0``, width ch·ch_mult[level]), each with
``num_res_blocks + 1`` ResBlocks, each followed by a self-attention block when the level's resolution is listed in
``attn_resolutions``; after every level but the finest, nearest-neighbour upsampling and a 3×3 conv: by 2, except
after level 1, which goes by the (possibly fractional) factor that reaches ``resolution`` (24 -> 48 -> 96 -> 192
-> 336 in the release, the last step by 1.75). The finest level is matched against ``attn_resolutions`` with the
resolution before that last step, as the released model does (it never lists those sizes). Norms are
GroupNorm(32, eps 1e-6), the activation is swish, and the end is GroupNorm, swish, 3×3 conv to ``out_ch``.
A ResBlock is x + conv2(swish(norm2(conv1(swish(norm1(x)))))), with a 1×1 ``nin_shortcut`` on x when the width
changes; an attention block is x + proj_out(attention(q, k, v of norm(x))), heads split the channels in order.

Parameter names are those of the released checkpoint (``decoder.*``, ``post_quant_conv.*``,
``quantize.project_out.*``), so the ``state_dict`` of a ``vqgan.ckpt`` loads with no missing or unexpected decoder
keys. :meth:`PixelDecoder.from_pretrained` reads the released ``vision_tokenizer_config.yaml`` (``model.params``)
and the Lightning-style checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .image_tokenizer import lfq_codes_to_latent, read_vision_tokenizer_checkpoint

_GROUPS = 32
_EPS = 1e-6
# Checkpoint names owned by the decode path; every other key of a vision tokenizer checkpoint belongs elsewhere.
_OWN_PREFIXES = ("decoder.", "post_quant_conv.", "quantize.project_out.")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"PixelDecoderConfig: {name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Sizes of the decode path; names and meaning as in the released YAML (``model.params`` and its ``ddconfig``).

    embed_dim: LFQ output width (``project_out`` rows). codebook_size: codes per codebook (a power of two, 2^K);
    num_codebook: C. ch, ch_mult: level widths ch·ch_mult[i] (level 0 finest). num_res_blocks: ResBlocks per level
    minus one. attn_resolutions: resolutions whose levels get attention. num_attn_head: heads of every attention
    block. z_channels: ``post_quant_conv`` output width. initial_resolution: r, the code grid side.
    resolution: R, the output side. out_ch: output channels. norm_first: a GroupNorm (``decoder.first_norm``) on
    the decoder input (off in the release).
    """

    embed_dim: int = 1024
    codebook_size: int = 512
    num_codebook: int = 2
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (24,)
    num_attn_head: int = 8
    z_channels: int = 1024
    initial_resolution: int = 24
    resolution: int = 336
    out_ch: int = 3
    norm_first: bool = False

    def __post_init__(self):
        for name in ("embed_dim", "codebook_size", "num_codebook", "ch", "num_attn_head", "z_channels",
                     "initial_resolution", "resolution", "out_ch"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) \
                or self.num_res_blocks < 0:
            raise ValueError(f"PixelDecoderConfig: num_res_blocks must be an int >= 0 (each level has "
                             f"num_res_blocks + 1 ResBlocks), got {self.num_res_blocks!r}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"PixelDecoderConfig: codebook_size must be a power of two >= 2 (LFQ codes are bits), "
                             f"got {self.codebook_size}")
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if not self.ch_mult:
            raise ValueError("PixelDecoderConfig: ch_mult must list at least one level")
        for mult in self.ch_mult:
            _positive_int("ch_mult entries", mult)
        for res in self.attn_resolutions:
            _positive_int("attn_resolutions entries", res)
        for width in sorted({self.ch * m for m in self.ch_mult}):
            if width % _GROUPS:
                raise ValueError(f"PixelDecoderConfig: level width {width} (ch {self.ch} × ch_mult) must be a "
                                 f"multiple of {_GROUPS} for GroupNorm({_GROUPS}); choose ch accordingly")
        if self.norm_first and self.z_channels % _GROUPS:
            raise ValueError(f"PixelDecoderConfig: norm_first needs z_channels ({self.z_channels}) to be a multiple "
                             f"of {_GROUPS}")
        attended = {self.ch * self.ch_mult[level] for level, (res, _) in enumerate(self.level_resolutions())
                    if res in self.attn_resolutions} | {self.ch * self.ch_mult[-1]}
        for width in sorted(attended):
            if width % self.num_attn_head:
                raise ValueError(f"PixelDecoderConfig: num_attn_head ({self.num_attn_head}) must divide the width "
                                 f"{width} of every attention block")

    @property
    def bits_per_codebook(self) -> int:
        """K = log2(codebook_size)."""
        return self.codebook_size.bit_length() - 1

    @property
    def num_patches(self) -> int:
        """P = r², the codes per image and codebook."""
        return self.initial_resolution ** 2

    def level_resolutions(self) -> list[tuple[int, float | None]]:
        """Per level (index 0 = finest): (the resolution matched against ``attn_resolutions``, the upsampling
        factor after the level or None). Raises ValueError when the factors cannot reach ``resolution``."""
        levels = len(self.ch_mult)
        out: list[tuple[int, float | None]] = [(0, None)] * levels
        current, size = self.initial_resolution, self.initial_resolution
        for level in reversed(range(levels)):
            factor = None
            if level > 1:
                factor = 2.0
            elif level == 1:
                factor = self.resolution / current
            out[level] = (current, factor)
            if factor is not None:
                size = int(size * factor)  # what nearest interpolation with this scale factor produces
                if level > 1:
                    current *= 2
        if size != self.resolution:
            raise ValueError(f"PixelDecoderConfig: {levels} levels from initial_resolution {self.initial_resolution} "
                             f"give {size} × {size} pixels, not resolution {self.resolution}")
        return out

    # ----------------------------------------------------------------------------------------------- YAML
    @classmethod
    def from_params(cls, params: dict) -> PixelDecoderConfig:
        """From the released YAML's ``model.params`` (``embed_dim``, ``codebook_size``, ``num_codebook`` and
        ``ddconfig``); keys of the encoder, the loss and training are ignored."""
        if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
            raise ValueError("PixelDecoderConfig.from_params: params must be a dict with a 'ddconfig' dict")
        dd = params["ddconfig"]
        required = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution")
        missing = [k for k in required if k not in dd] + [k for k in ("embed_dim",) if k not in params]
        if missing:
            raise ValueError(f"PixelDecoderConfig.from_params: the config lacks {missing}")
        if not dd.get("resamp_with_conv", True):
            raise ValueError("PixelDecoderConfig.from_params: resamp_with_conv=False (upsampling without a conv) is "
                             "not supported")
        levels = len(dd["ch_mult"])
        initial = dd.get("initial_resolution")
        if initial is None:
            initial = dd["resolution"] // 2 ** (levels - 1)
        return cls(embed_dim=params["embed_dim"], codebook_size=params.get("codebook_size", 512),
                   num_codebook=params.get("num_codebook", 2), ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                   num_res_blocks=dd["num_res_blocks"], attn_resolutions=tuple(dd["attn_resolutions"]),
                   num_attn_head=dd.get("num_attn_head", 1), z_channels=dd["z_channels"],
                   initial_resolution=initial, resolution=dd["resolution"], out_ch=dd.get("out_ch", 3),
                   norm_first=bool(dd.get("norm_first", False)))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PixelDecoderConfig:
        """Read a ``vision_tokenizer_config.yaml`` (``model: {params: ...}``; a bare ``params:`` also works)."""
        import yaml

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PixelDecoderConfig.from_yaml: no file {path!r}")
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        node = loaded.get("model", loaded) if isinstance(loaded, dict) else None
        params = node.get("params") if isinstance(node, dict) else None
        if not isinstance(params, dict):
            raise ValueError(f"PixelDecoderConfig.from_yaml: {path} has no model.params mapping")
        return cls.from_params(params)

    def to_params(self) -> dict:
        """The ``model.params`` mapping of the released YAML layout (decoder keys only)."""
        dd = {"ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
              "attn_resolutions": list(self.attn_resolutions), "num_attn_head": self.num_attn_head,
              "z_channels": self.z_channels, "resolution": self.resolution,
              "initial_resolution": self.initial_resolution, "out_ch": self.out_ch, "dropout": 0.0}
        if self.norm_first:
            dd["norm_first"] = True
        return {"embed_dim": self.embed_dim, "codebook_size": self.codebook_size, "num_codebook": self.num_codebook,
                "ddconfig": dd}

    def save_yaml(self, path: str | os.PathLike) -> str:
        """Write ``{"model": {"params": to_params()}}`` as YAML; returns the path."""
        import yaml

        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"model": {"params": self.to_params()}}, handle, sort_keys=False)
        return path


# -------------------------------------------------------------------------------------------------- building blocks
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=_EPS)


class ResBlock(nn.Module):
    """x [B, c_in, h, w] -> [B, c_out, h, w]: two GroupNorm-swish-conv3×3 steps plus the (1×1 projected) input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """x [B, c, h, w] -> x + proj_out(softmax(q kᵀ / sqrt(c/heads)) v) over the h·w positions, per head (head i
    holds channels [i·c/heads, (i+1)·c/heads)); q, k, v and proj_out are 1×1 convs of GroupNorm(x)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttnBlock: num_heads ({num_heads}) must divide channels ({channels})")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def heads(conv: nn.Conv2d) -> torch.Tensor:  # [B, heads, h·w, c/heads]
            return conv(h).reshape(batch, self.num_heads, channels // self.num_heads, height * width).transpose(2, 3)

        # The fused kernel never materialises the (h·w)² scores per head on GPUs.
        out = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v))
        return x + self.proj_out(out.transpose(2, 3).reshape(batch, channels, height, width))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by ``scale_factor`` (output side floor(side · factor)), then a 3×3 conv."""

    def __init__(self, channels: int, scale_factor: float):
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, c, h, w] -> [B, c, floor(h·s), floor(w·s)]."""
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


class _Level(nn.Module):
    """One decoder level: ``block`` (ResBlocks), ``attn`` (empty or one per block), optional ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention_heads: int | None,
                 factor: float | None):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, attention_heads) for _ in range(blocks)) \
            if attention_heads else nn.ModuleList()
        if factor is not None:
            self.upsample = Upsample(out_channels, factor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """ResBlocks (each followed by its attention block, if any), then the upsampling, if any."""
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[index](h)
        upsample = getattr(self, "upsample", None)
        return h if upsample is None else upsample(h)


class TamingDecoder(nn.Module):
    """The convolutional decoder of the module docstring: z [B, z_channels, r, r] -> [B, out_ch, R, R]."""

    def __init__(self, config: PixelDecoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        width = widths[-1]
        if config.norm_first:
            self.first_norm = _norm(config.z_channels)
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(width, width)
        self.mid.attn_1 = AttnBlock(width, config.num_attn_head)
        self.mid.block_2 = ResBlock(width, width)
        levels = []
        for level, (res, factor) in enumerate(config.level_resolutions()):
            heads = config.num_attn_head if res in config.attn_resolutions else None
            in_width = widths[level + 1] if level + 1 < len(widths) else width
            levels.append(_Level(in_width, widths[level], config.num_res_blocks + 1, heads, factor))
        self.up = nn.ModuleList(levels)  # index 0 = finest, as in the checkpoint; run from the last one
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        first_norm = getattr(self, "first_norm", None)
        h = self.conv_in(z if first_norm is None else first_norm(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -------------------------------------------------------------------------------------------------------- the module
class PixelDecoder(nn.Module):
    """Codes -> pixels with the released decoder (see the module docstring).

    Args:
        config: a :class:`PixelDecoderConfig` (default: the released one).
    """

    def __init__(self, config: PixelDecoderConfig | None = None):
        super().__init__()
        config = PixelDecoderConfig() if config is None else config
        if not isinstance(config, PixelDecoderConfig):
            raise TypeError(f"PixelDecoder: config must be a PixelDecoderConfig, got {type(config).__name__}")
        self.config = config
        self.quantize = nn.Module()
        self.quantize.project_out = nn.Linear(config.num_codebook * config.bits_per_codebook, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = TamingDecoder(config)
        self.requires_grad_(False)

    @classmethod
    def released(cls, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PixelDecoder:
        """The released configuration (ch 128, ch_mult [1, 1, 2, 4, 8], 2 res blocks, z_channels 1024, attention
        at 24 with 8 heads, 24 -> 336), random weights; ``device="meta"`` builds it without memory."""
        with torch.device(device if device is not None else "cpu"):
            decoder = cls(PixelDecoderConfig())
        return decoder if dtype is None else decoder.to(dtype)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (that of the weights)."""
        return self.post_quant_conv.weight.dtype

    # ---------------------------------------------------------------------------------------------- decoding
    def _check_codes(self, codes) -> None:
        config = self.config
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError("PixelDecoder: codes must be an integer tensor [C, B, P]")
        if codes.dim() != 3 or codes.shape[0] != config.num_codebook or codes.shape[2] != config.num_patches:
            raise ValueError(f"PixelDecoder: codes must be [C={config.num_codebook}, B, P={config.num_patches}] "
                             f"(the layout of codes_from_features), got {tuple(codes.shape)}")

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [C, B, P] -> the decoder input z [B, z_channels, r, r] (±1 bits, ``project_out``,
        ``post_quant_conv``) in the module dtype."""
        config = self.config
        self._check_codes(codes)
        batch = codes.shape[1]
        side = config.initial_resolution
        bits = lfq_codes_to_latent(codes.to(self.device).permute(1, 2, 0), config.bits_per_codebook, self.dtype)
        latent = self.quantize.project_out(bits)  # [B, P, E], P in raster order
        return self.post_quant_conv(latent.transpose(1, 2).reshape(batch, config.embed_dim, side, side))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """codes int [C, B, P] -> pixels [B, out_ch, R, R] in the module dtype, about [-1, 1] (not clamped).
        ``batch_size`` decodes that many images at a time (the 336-px activations dominate memory)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ValueError(f"PixelDecoder.decode: batch_size must be a positive int or None, got {batch_size!r}")
        self._check_codes(codes)
        if codes.shape[1] == 0:
            size = self.config.resolution
            return torch.empty(0, self.config.out_ch, size, size, device=self.device, dtype=self.dtype)
        if batch_size is None or codes.shape[1] <= batch_size:
            return self.decoder(self.latent(codes))
        return torch.cat([self.decoder(self.latent(chunk)) for chunk in codes.split(batch_size, dim=1)])

    forward = decode

    @staticmethod
    def to_images(pixels: torch.Tensor) -> list:
        """pixels [B, 3, H, W] about [-1, 1] -> B RGB PIL images (clamped to [-1, 1], mapped to 0..255)."""
        from PIL import Image

        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"PixelDecoder.to_images: pixels must be [B, 3, H, W], "
                             f"got {tuple(getattr(pixels, 'shape', ()))}")
        values = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), "RGB") for image in values]

    # --------------------------------------------------------------------------------------------- checkpoints
    def load_checkpoint(self, state: dict | str | os.PathLike, *, weights_only: bool = True) -> list[str]:
        """Load the decode-path tensors from a vision tokenizer state dict or checkpoint path; keys outside
        ``decoder.*``, ``post_quant_conv.*`` and ``quantize.project_out.*`` (the quantiser, CLIP, loss) are left
        alone. Missing, unexpected (inside those prefixes) or mis-shaped tensors raise ValueError naming them.
        Returns the loaded keys."""
        if not isinstance(state, dict):
            state = read_vision_tokenizer_checkpoint(state, weights_only=weights_only)
        own = self.state_dict()
        given = {k: v for k, v in state.items() if k.startswith(_OWN_PREFIXES)}
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        if missing or unexpected:
            raise ValueError(f"PixelDecoder.load_checkpoint: the checkpoint does not match the decoder config: "
                             f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} keys), "
                             f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                             f"({len(unexpected)} keys)")
        mismatched = [f"{k}: {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own)
                      if given[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(f"PixelDecoder.load_checkpoint: shape mismatch (checkpoint vs config) {mismatched[:8]}")
        self.load_state_dict(given, strict=True, assign=self.device.type == "meta")
        self.requires_grad_(False)
        return sorted(given)

    @classmethod
    def from_pretrained(cls, config: str | os.PathLike | PixelDecoderConfig, checkpoint: str | os.PathLike | dict,
                        *, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        weights_only: bool = True) -> PixelDecoder:
        """Build from the released ``vision_tokenizer_config.yaml`` (a path, or a :class:`PixelDecoderConfig`) and
        load the decode-path weights of ``checkpoint`` (a ``{"state_dict": ...}`` ``.ckpt``, a state dict, or a
        ``.safetensors`` file); see :meth:`load_checkpoint` for the errors."""
        config = config if isinstance(config, PixelDecoderConfig) else PixelDecoderConfig.from_yaml(config)
        with torch.device("meta"):
            decoder = cls(config)
        decoder.load_checkpoint(checkpoint, weights_only=weights_only)
        return decoder.to(device=device, dtype=torch_dtype)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The decode-path tensors under the released names, on the CPU (merge with the quantiser's to write a
        complete vision tokenizer checkpoint)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}


def random_pixel_decoder(config: PixelDecoderConfig, seed: int = 0, scale: float = 1.0) -> PixelDecoder:
    """A decoder with seeded random weights (fan-in scaled normals, GroupNorm affine near identity): for tests and
    the tiny builders, where a decoder of order-one activations exercises every path."""
    generator = torch.Generator().manual_seed(seed)
    decoder = PixelDecoder(config)
    with torch.no_grad():
        for name, tensor in decoder.state_dict().items():
            if name.split(".")[-2].startswith(("norm", "first_norm")):
                base = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(base + 0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(scale * torch.randn(tensor.shape, generator=generator) * fan_in ** -0.5)
    return decoder

