"""Libra's hybrid image tokenizer (docs/model.md §10): CLIP features plus lookup-free-quantised (LFQ) codes.

An image goes through

1. ``pad_to_square`` (centred on a square canvas of the CLIP mean colour) and HF's CLIP image processor;
2. a frozen ``transformers.CLIPVisionModel``: the hidden states of ``feature_layers`` (HF ``hidden_states`` indices,
   default 2/10/18/22), patch tokens only, concatenated per patch → features [B, P, L·H_clip] (P = res²);
3. ``quant_conv`` (a 1×1 convolution, i.e. one linear map per patch) and LFQ: ``project_in`` to C·K logits, one sign
   bit per logit (strict ``> 0``), K bits per codebook read most significant first → codes [C, B, P] in [0, 2^K);
4. framing: ids ``vocab_size + code`` between BOI (``vocab_size + 2^K``) and EOI (``vocab_size + 2^K + 1``) →
   ids [C, B, P+2]; the contiguous signal is the features with a zero row at BOI and at EOI → [B, P+2, L·H_clip].

Weights load from the released vision tokenizer checkpoint (a PyTorch-Lightning style ``{"state_dict": ...}``
``.ckpt``, the released names) and CLIP from an HF CLIP directory. The way back to pixels is
:class:`libra_model.pixel_decoder.PixelDecoder`, which reads the ``decoder.*``, ``post_quant_conv.*`` and
``quantize.project_out.*`` weights of the same checkpoint (this module reports ``decoder.*`` as ignored).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Mean colour of CLIP's training images in 0..255 RGB: the padding colour of pad_to_square (docs/model.md §10).
CLIP_MEAN_RGB = (122, 116, 104)
DEFAULT_FEATURE_LAYERS = (2, 10, 18, 22)
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Checkpoint names of the released vision tokenizer: required for tokenizing, optional (the decode path), ignored.
_REQUIRED_KEYS = ("quant_conv.weight", "quant_conv.bias", "quantize.project_in.weight", "quantize.project_in.bias")
_OPTIONAL_KEYS = ("quantize.project_out.weight", "quantize.project_out.bias", "post_quant_conv.weight",
                  "post_quant_conv.bias")
_IGNORED_PREFIXES = ("loss.", "decoder.")
_IGNORED_KEYS = ("quantize.mask",)
_CLIP_PREFIX = "encoder.vision_tower."


# ---------------------------------------------------------------------------------------------------- LFQ helpers
def _check_bits(bits_per_codebook: int) -> None:
    if isinstance(bits_per_codebook, bool) or not isinstance(bits_per_codebook, int) \
            or not 1 <= bits_per_codebook <= 30:
        raise ValueError(f"bits_per_codebook must be an int in [1, 30], got {bits_per_codebook!r}")


def lfq_bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits [..., K] (bool or 0/1 integers, most significant first) -> codes int64 [...] in [0, 2^K)."""
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"lfq_bits_to_codes: bits must be a torch.Tensor, got {type(bits).__name__}")
    if bits.dim() == 0:
        raise ValueError("lfq_bits_to_codes: bits must have a trailing bit dimension")
    width = bits.shape[-1]
    _check_bits(width)
    weights = 2 ** torch.arange(width - 1, -1, -1, device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) * weights).sum(-1)


def lfq_codes_to_bits(codes: torch.Tensor, bits_per_codebook: int) -> torch.Tensor:
    """Codes (any integer dtype) [...] in [0, 2^K) -> bool bits [..., K], most significant first."""
    _check_bits(bits_per_codebook)
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError("lfq_codes_to_bits: codes must be an integer torch.Tensor")
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** bits_per_codebook):
        raise ValueError(f"lfq_codes_to_bits: codes must lie in [0, {2 ** bits_per_codebook}), got "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    shifts = torch.arange(bits_per_codebook - 1, -1, -1, device=codes.device, dtype=torch.int64)
    return ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).to(torch.bool)


def lfq_quantize(latent: torch.Tensor, codebook_num: int) -> torch.Tensor:
    """LFQ logits [..., C·K] (float) -> codes int64 [..., C]: bit k of codebook c is ``latent[..., c·K + k] > 0``
    (strict, so an exact 0 is bit 0), bits read most significant first."""
    if not isinstance(latent, torch.Tensor) or not latent.dtype.is_floating_point:
        raise TypeError("lfq_quantize: latent must be a floating torch.Tensor")
    if isinstance(codebook_num, bool) or not isinstance(codebook_num, int) or codebook_num <= 0 \
            or latent.dim() == 0 or latent.shape[-1] % codebook_num:
        raise ValueError(f"lfq_quantize: the last dim of latent {tuple(latent.shape)} must be a multiple of "
                         f"codebook_num={codebook_num!r}")
    bits = (latent > 0).unflatten(-1, (codebook_num, latent.shape[-1] // codebook_num))
    return lfq_bits_to_codes(bits)


def lfq_codes_to_latent(codes: torch.Tensor, bits_per_codebook: int, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Codes [..., C] -> the quantised LFQ vector [..., C·K] of ±1 (bit 1 -> +1, bit 0 -> -1) in ``dtype``.

    Inverse of :func:`lfq_quantize` on ±1 vectors: ``lfq_quantize(lfq_codes_to_latent(x, K), C) == x``.
    """
    bits = lfq_codes_to_bits(codes, bits_per_codebook)
    return (bits.to(dtype) * 2 - 1).flatten(-2)


class LookupFreeQuantizer(nn.Module):
    """The LFQ of the vision tokenizer: ``project_in`` Linear(embed_dim → C·K) then sign bits, and ``project_out``
    Linear(C·K → embed_dim) for the decode path. Parameter names match the checkpoint (``quantize.*``)."""

    def __init__(self, embed_dim: int, codebook_num: int, bits_per_codebook: int):
        super().__init__()
        _check_bits(bits_per_codebook)
        self.embed_dim, self.codebook_num, self.bits_per_codebook = embed_dim, codebook_num, bits_per_codebook
        self.project_in = nn.Linear(embed_dim, codebook_num * bits_per_codebook)
        self.project_out = nn.Linear(codebook_num * bits_per_codebook, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., embed_dim] float -> codes int64 [..., C]. The projection runs in float32 so that codes do not
        depend on the compute dtype more than the input already does (a sign near 0 flips easily: bf16 and fp32 can give
        different codes)."""
        latent = F.linear(x.float(), self.project_in.weight.float(), self.project_in.bias.float())
        return lfq_quantize(latent, self.codebook_num)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., C] -> ``project_out`` of the ±1 vector, float [..., embed_dim] in the module's dtype."""
        latent = lfq_codes_to_latent(codes, self.bits_per_codebook, self.project_out.weight.dtype)
        return self.project_out(latent)


# -------------------------------------------------------------------------------------------------- preprocessing
def pad_to_square(image, fill: tuple[int, int, int] = CLIP_MEAN_RGB):
    """Centre a PIL image on a square RGB canvas of side max(w, h) filled with ``fill`` (docs/model.md §10)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"pad_to_square: image must be a PIL.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _image_processor_class():
    # The PIL backend: the reference used transformers' PIL/numpy CLIP processor, and this one needs no torchvision.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil


def default_image_processor(image_size: int = 336):
    """The stock ``openai/clip-vit-large-patch14-336`` preprocessing for ``image_size``-pixel inputs: shortest edge
    resized to ``image_size`` (bicubic), centre crop, scale to [0, 1], normalise with CLIP's mean and std."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"default_image_processor: image_size must be a positive int, got {image_size!r}")
    return _image_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_IMAGE_MEAN), image_std=list(CLIP_IMAGE_STD), do_convert_rgb=True)


def preprocess_images(image_processor, images: Sequence) -> torch.Tensor:
    """PIL images -> pixel values float32 [B, 3, S, S]: pad to square with the CLIP mean colour, then the HF CLIP
    image processor (docs/model.md §10). Host-side; data loaders call it per sample."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("preprocess_images: images must be a non-empty list of PIL images")
    squared = [pad_to_square(image) for image in images]
    pixels = image_processor(images=squared, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixels, dtype=torch.float32)


def load_image_processor(clip_dir: str | os.PathLike, image_size: int):
    """The CLIP directory's ``preprocessor_config.json`` if it has one, else :func:`default_image_processor`."""
    if os.path.isfile(os.path.join(clip_dir, "preprocessor_config.json")):
        return _image_processor_class().from_pretrained(clip_dir)
    return default_image_processor(image_size)


def load_clip_vision_model(clip_dir: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """``CLIPVisionModel`` from an HF CLIP directory (a full CLIP model or a vision-only one). Missing vision weights
    raise ValueError naming them (a silently random CLIP would give meaningless codes); the text tower of a full CLIP
    checkpoint is expected and dropped."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(clip_dir):
        raise FileNotFoundError(f"load_clip_vision_model: clip_dir {clip_dir!r} is not a directory")
    verbosity = hf_logging.get_verbosity()
    # The loader prints every text-tower key of a full CLIP checkpoint as "unexpected"; missing keys are checked here.
    hf_logging.set_verbosity_error()
    try:
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ValueError(f"load_clip_vision_model: {clip_dir} lacks CLIP vision weights {missing}")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ checkpoint I/O
@dataclass
class LoadReport:
    """What :meth:`HybridImageTokenizer.load_checkpoint` did with each checkpoint key."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_vision_tokenizer_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> dict:
    """The flat state dict of a vision tokenizer checkpoint: a ``.ckpt``/``.pt`` holding ``{"state_dict": {...}}``
    (PyTorch Lightning) or a plain state dict, or a ``.safetensors`` file. ``weights_only=False`` is needed for
    Lightning files that pickle arbitrary objects; only use it on files you trust (it runs pickled code)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_vision_tokenizer_checkpoint: no file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"read_vision_tokenizer_checkpoint: {path} cannot be read ({os.path.getsize(path)} "
                             f"bytes; {error}): the file is truncated or damaged, download it again") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # the unpickler's error types vary across torch versions
        if weights_only and isinstance(error, pickle.UnpicklingError):
            raise ValueError(f"read_vision_tokenizer_checkpoint: {path} cannot be read with weights_only=True "
                             f"({type(error).__name__}: {error}); pass weights_only=False if you trust the file, "
                             "or download it again if it is damaged") from error
        raise ValueError(f"read_vision_tokenizer_checkpoint: {path} cannot be read ({os.path.getsize(path)} bytes; "
                         f"{type(error).__name__}: {error}): the file is truncated or damaged, download it again") \
            from error
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
        raise ValueError(f"read_vision_tokenizer_checkpoint: {path} holds no state dict")
    return {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}


def _clip_key(key: str) -> str:
    # Wrapped CLIPs store e.g. encoder.vision_tower.vision_tower.vision_model.encoder.layers.0...; the model's own
    # names start after "vision_model." (transformers 5 CLIPVisionModel has no vision_model prefix).
    rest = key[len(_CLIP_PREFIX):]
    if "vision_model." in rest:
        return rest.split("vision_model.", 1)[1]
    while rest.startswith("vision_tower."):
        rest = rest[len("vision_tower."):]
    return rest


# ---------------------------------------------------------------------------------------------------- the module
@dataclass
class ImageTokens:
    """Output of :meth:`HybridImageTokenizer.tokenize`.

    ids: int64 [C, B, P+2]: BOI, ``vocab_size + code`` in raster order, EOI (Libra's combined id space).
    codes: int64 [C, B, P] in [0, 2^K).
    contiguous_signal: float [B, P+2, L·H_clip]: the CLIP features, zero at BOI and EOI.
    """

    ids: torch.Tensor
    codes: torch.Tensor
    contiguous_signal: torch.Tensor


class HybridImageTokenizer(nn.Module):
    """Frozen CLIP + ``quant_conv`` + LFQ: PIL images or pixel values → discrete ids and the contiguous signal.

    Args:
        clip: a ``transformers.CLIPVisionModel`` (frozen here).
        image_processor: HF CLIP image processor (None: the stock settings at CLIP's image size).
        feature_layers: HF ``hidden_states`` indices whose patch tokens are concatenated (0 = the embeddings after
            CLIP's pre-LayerNorm, i = output of block i).
        embed_dim: ``quant_conv`` output width (1024 in the release).
        codebook_num, bits_per_codebook: C and K (2 and 9 in the release: codebooks of 512 codes).
        text_vocab_size: offset of vision ids (32000).
        post_quant_channels: output width of ``post_quant_conv`` (None: the module is absent).
    """

    def __init__(self, clip, image_processor=None, *, feature_layers: Sequence[int] = DEFAULT_FEATURE_LAYERS,
                 embed_dim: int = 1024, codebook_num: int = 2, bits_per_codebook: int = 9,
                 text_vocab_size: int = 32000, post_quant_channels: int | None = None):
        super().__init__()
        layers = tuple(feature_layers) if isinstance(feature_layers, (list, tuple)) else None
        n_blocks = clip.config.num_hidden_layers
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= n_blocks
                             for i in layers):
            raise ValueError(f"HybridImageTokenizer: feature_layers must be a non-empty list of ints in "
                             f"[0, {n_blocks}] (CLIP has {n_blocks} blocks), got {feature_layers!r}")
        for name, value in (("embed_dim", embed_dim), ("codebook_num", codebook_num),
                            ("text_vocab_size", text_vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HybridImageTokenizer: {name} must be a positive int, got {value!r}")
        _check_bits(bits_per_codebook)
        self.clip = clip.eval().requires_grad_(False)
        self.image_processor = image_processor if image_processor is not None else \
            default_image_processor(clip.config.image_size)
        self.feature_layers = layers
        self.text_vocab_size = text_vocab_size
        patches = clip.config.image_size // clip.config.patch_size
        self.resolution = patches
        self.num_patches = patches * patches
        self.feature_size = len(layers) * clip.config.hidden_size
        self.quant_conv = nn.Conv2d(self.feature_size, embed_dim, 1)
        self.quantize = LookupFreeQuantizer(embed_dim, codebook_num, bits_per_codebook)
        self.post_quant_conv = nn.Conv2d(embed_dim, post_quant_channels, 1) if post_quant_channels else None
        self.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def codebook_num(self) -> int:
        """C, the number of codebooks."""
        return self.quantize.codebook_num

    @property
    def bits_per_codebook(self) -> int:
        """K, the bits per codebook (codes in [0, 2^K))."""
        return self.quantize.bits_per_codebook

    @property
    def vision_vocab_size(self) -> int:
        """Ids per codebook including BOI and EOI (2^K + 2; 514 in the release)."""
        return 2 ** self.bits_per_codebook + 2

    @property
    def boi_token_id(self) -> int:
        """Combined id of BOI (text_vocab_size + 2^K)."""
        return self.text_vocab_size + 2 ** self.bits_per_codebook

    @property
    def eoi_token_id(self) -> int:
        """Combined id of EOI (text_vocab_size + 2^K + 1)."""
        return self.boi_token_id + 1

    @property
    def tokens_per_image(self) -> int:
        """Sequence positions of one image: P codes + BOI + EOI (578 in the release)."""
        return self.num_patches + 2

    @property
    def device(self) -> torch.device:
        """Device of the tokenizer's weights."""
        return self.quant_conv.weight.device

    # ------------------------------------------------------------------------------------------------ pipeline
    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images -> pixel values float32 [B, 3, S, S] (see :func:`preprocess_images`)."""
        return preprocess_images(self.image_processor, images)

    def _check_pixels(self, pixel_values) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError("HybridImageTokenizer: pixel_values must be a floating torch.Tensor [B, 3, S, S]")
        size = self.clip.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"HybridImageTokenizer: pixel_values must be [B, 3, {size}, {size}], "
                             f"got {tuple(pixel_values.shape)}")
        return pixel_values

    @torch.no_grad()
    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel values [B, 3, S, S] -> features [B, P, L·H_clip] in the CLIP dtype: hidden states of
        ``feature_layers`` (patch tokens, CLS dropped), concatenated in list order. Blocks after the last requested
        layer are not run."""
        self._check_pixels(pixel_values)
        clip = self.clip
        dtype = clip.embeddings.patch_embedding.weight.dtype
        hidden = clip.pre_layrnorm(clip.embeddings(pixel_values.to(self.device, dtype)))
        wanted = {0: hidden} if 0 in self.feature_layers else {}
        for index, block in enumerate(clip.encoder.layers[:max(self.feature_layers)], start=1):
            hidden = block(hidden, None)
            if index in self.feature_layers:
                wanted[index] = hidden
        return torch.cat([wanted[i][:, 1:] for i in self.feature_layers], dim=-1)

    @torch.no_grad()
    def codes_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, P, F] -> codes int64 [C, B, P] (``quant_conv`` as a per-patch linear map, then LFQ; float32)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != self.feature_size:
            raise ValueError(f"HybridImageTokenizer.codes_from_features: features must be [B, P, {self.feature_size}]"
                             f", got {tuple(getattr(features, 'shape', ()))}")
        weight = self.quant_conv.weight.float().flatten(1)  # a 1x1 convolution is a linear map per pixel
        latent = F.linear(features.to(self.device, torch.float32), weight, self.quant_conv.bias.float())
        return self.quantize(latent).permute(2, 0, 1).contiguous()

    def ids_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [C, B, P] -> ids int64 [C, B, P+2]: BOI, ``text_vocab_size + code``, EOI."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[0] != self.codebook_num:
            raise ValueError(f"HybridImageTokenizer.ids_from_codes: codes must be [{self.codebook_num}, B, P], "
                             f"got {tuple(getattr(codes, 'shape', ()))}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** self.bits_per_codebook):
            raise ValueError(f"HybridImageTokenizer.ids_from_codes: codes must lie in "
                             f"[0, {2 ** self.bits_per_codebook})")
        channels, batch, _ = codes.shape
        boi = codes.new_full((channels, batch, 1), self.boi_token_id, dtype=torch.int64)
        return torch.cat([boi, codes.to(torch.int64) + self.text_vocab_size, boi + 1], dim=-1)

    @staticmethod
    def signal_from_features(features: torch.Tensor) -> torch.Tensor:
        """features [B, P, F] -> contiguous signal [B, P+2, F] with a zero row for BOI and for EOI."""
        return F.pad(features, (0, 0, 1, 1))

    @torch.no_grad()
    def tokenize(self, images) -> ImageTokens:
        """PIL images (a list) or pixel values [B, 3, S, S] -> :class:`ImageTokens` (ids [C, B, P+2], codes
        [C, B, P], contiguous signal [B, P+2, F] in the CLIP dtype)."""
        pixel_values = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        features = self.clip_features(pixel_values)
        codes = self.codes_from_features(features)
        return ImageTokens(self.ids_from_codes(codes), codes, self.signal_from_features(features))

    forward = tokenize

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [C, B, P] -> the decoder's input latent [B, Z, r, r]: ±1 vectors, ``project_out``, then
        ``post_quant_conv`` (:class:`libra_model.pixel_decoder.PixelDecoder` continues to pixels)."""
        if self.post_quant_conv is None:
            raise ValueError("HybridImageTokenizer.dequantize: no post_quant_conv weights were loaded")
        channels, batch, patches = codes.shape
        if channels != self.codebook_num or patches != self.num_patches:
            raise ValueError(f"HybridImageTokenizer.dequantize: codes must be [{self.codebook_num}, B, "
                             f"{self.num_patches}], got {tuple(codes.shape)}")
        latent = self.quantize.dequantize(codes.permute(1, 2, 0))  # [B, P, E]
        grid = latent.transpose(1, 2).reshape(batch, -1, self.resolution, self.resolution)
        return self.post_quant_conv(grid)

    # ------------------------------------------------------------------------------------------- checkpoints
    def tokenizer_state_dict(self) -> dict[str, torch.Tensor]:
        """The quantiser weights under the released checkpoint names (``quant_conv.*``, ``quantize.project_*``,
        ``post_quant_conv.*``) plus the ``quantize.mask`` buffer of powers of two, as the released file has."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("clip.")}
        state["quantize.mask"] = 2 ** torch.arange(self.bits_per_codebook - 1, -1, -1)
        return state

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict[str, torch.Tensor] | None = None) -> str:
        """Write the quantiser as a Lightning-style ``{"state_dict": ...}`` ``.ckpt`` file; returns the path.
        ``extra_state`` (e.g. the pixel decoder's tensors) is written into the same state dict; for names both
        hold (``post_quant_conv``, ``quantize.project_out``) it must hold the same values."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = self.tokenizer_state_dict()
        for key, value in (extra_state or {}).items():
            if key in state and not torch.equal(state[key], value.detach().cpu()):
                raise ValueError(f"HybridImageTokenizer.save_checkpoint: extra_state[{key!r}] differs from the "
                                 f"tokenizer's own {key}")
            state[key] = value.detach().cpu()
        torch.save({"state_dict": state}, path)
        return path

    def load_checkpoint(self, state: dict | str | os.PathLike, *, strict: bool = True, load_clip: bool = False,
                        weights_only: bool = True) -> LoadReport:
        """Load released-layout weights (a state dict or a checkpoint path). ``quant_conv`` and
        ``quantize.project_in`` are required; ``project_out``/``post_quant_conv`` are loaded when present;
        ``loss.*``, ``decoder.*`` and ``quantize.mask`` are ignored; ``encoder.vision_tower.*`` (a CLIP copy) is
        loaded into the CLIP when ``load_clip`` and ignored otherwise. Missing required keys, unknown keys (when
        ``strict``) and shape mismatches raise ValueError naming them."""
        if not isinstance(state, dict):
            state = read_vision_tokenizer_checkpoint(state, weights_only=weights_only)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}
        report, clip_state = LoadReport(), {}
        for key in sorted(state):
            if key in own:
                report.loaded.append(key)
            elif key.startswith(_CLIP_PREFIX) and load_clip:
                clip_state[_clip_key(key)] = state[key]
            elif key.startswith(_CLIP_PREFIX):
                report.ignored.append(key)
            elif key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
        report.missing = [k for k in _REQUIRED_KEYS if k not in state]
        absent_optional = [k for k in own if k not in state and k not in _REQUIRED_KEYS]
        if report.missing:
            raise ValueError(f"HybridImageTokenizer.load_checkpoint: missing required keys {report.missing}")
        if strict and report.unexpected:
            raise ValueError(f"HybridImageTokenizer.load_checkpoint: unexpected keys {report.unexpected}")
        mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in report.loaded
                      if state[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(f"HybridImageTokenizer.load_checkpoint: shape mismatch {mismatched}")
        report.missing = absent_optional
        with torch.no_grad():
            for key in report.loaded:
                own[key].copy_(state[key])
        if load_clip:
            if not clip_state:
                raise ValueError(f"HybridImageTokenizer.load_checkpoint: load_clip=True but the checkpoint has no "
                                 f"{_CLIP_PREFIX}* keys")
            result = self.clip.load_state_dict(clip_state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"HybridImageTokenizer.load_checkpoint: CLIP keys under {_CLIP_PREFIX} do not match "
                                 f"the CLIP model: missing {sorted(result.missing_keys)}, "
                                 f"unexpected {sorted(result.unexpected_keys)}")
            report.loaded.extend(_CLIP_PREFIX + k for k in sorted(clip_state))
        return report

    @classmethod
    def from_pretrained(cls, clip_dir: str | os.PathLike, checkpoint: str | os.PathLike | dict, *,
                        feature_layers: Sequence[int] = DEFAULT_FEATURE_LAYERS, codebook_num: int = 2,
                        text_vocab_size: int = 32000, strict: bool = True, load_clip: bool = False,
                        weights_only: bool = True, torch_dtype: torch.dtype | None = None) -> HybridImageTokenizer:
        """Build from an HF CLIP directory and a vision tokenizer checkpoint; widths are read from the checkpoint
        shapes (K = project_in rows / codebook_num). The load report is kept as ``self.load_report``."""
        state = checkpoint if isinstance(checkpoint, dict) else \
            read_vision_tokenizer_checkpoint(checkpoint, weights_only=weights_only)
        missing = [k for k in _REQUIRED_KEYS if k not in state]
        if missing:
            raise ValueError(f"HybridImageTokenizer.from_pretrained: missing required keys {missing}")
        clip = load_clip_vision_model(clip_dir, torch_dtype)
        embed_dim = state["quant_conv.weight"].shape[0]
        n_bits = state["quantize.project_in.weight"].shape[0]
        if isinstance(codebook_num, bool) or not isinstance(codebook_num, int) or codebook_num <= 0 \
                or n_bits % codebook_num:
            raise ValueError(f"HybridImageTokenizer.from_pretrained: project_in has {n_bits} outputs, not a multiple "
                             f"of codebook_num={codebook_num!r}")
        post = state["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in state else None
        tokenizer = cls(clip, load_image_processor(clip_dir, clip.config.image_size), feature_layers=feature_layers,
                        embed_dim=embed_dim, codebook_num=codebook_num, bits_per_codebook=n_bits // codebook_num,
                        text_vocab_size=text_vocab_size, post_quant_channels=post)
        if state["quant_conv.weight"].shape[1] != tokenizer.feature_size:
            raise ValueError(f"HybridImageTokenizer.from_pretrained: quant_conv takes "
                             f"{state['quant_conv.weight'].shape[1]} channels but {len(tokenizer.feature_layers)} "
                             f"CLIP layers of width {clip.config.hidden_size} give {tokenizer.feature_size}")
        tokenizer.load_report = tokenizer.load_checkpoint(state, strict=strict, load_clip=load_clip)
        if torch_dtype is not None:
            tokenizer.to(torch_dtype)
        return tokenizer
