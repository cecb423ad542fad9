"""Tiny, randomly initialised but real-format tokenizers for tests and the trainer's embedded default (no downloads).

* :func:`build_tiny_text_tokenizer`: a SentencePiece BPE model with LLaMA's special ids (unk 0, bos 1, eos 2) that
  ``transformers.LlamaTokenizer.from_pretrained`` loads. With room for it (``vocab_size >= 259 +`` the corpus
  alphabet) it has LLaMA's byte fallback, so ids 3..258 are the bytes and "\\n" is ``<0x0A>`` = 13; a smaller
  vocabulary gets a compact layout with "\\n" as a symbol at ``newline_token_id`` (characters outside the corpus
  alphabet are then dropped by the tokenizer, so train it on the texts it will see).
* :func:`build_tiny_clip`: a small random ``CLIPVisionModel`` (or a full ``CLIPModel`` with ``vision_model.*``
  names, like the ``openai/clip-vit-large-patch14-336`` directory) plus a ``preprocessor_config.json``.
* :func:`build_tiny_vision_tokenizer`: random ``quant_conv``/LFQ/``post_quant_conv`` weights and, given a
  :class:`PixelDecoderConfig`, a random pixel decoder (``decoder.*``), under the released names, saved as a
  Lightning-style ``{"state_dict": ...}`` ``.ckpt``; :func:`tiny_pixel_decoder_config` sizes that decoder.
* :func:`build_tiny_processor_dir`: all of them in the :mod:`libra_model.processor` layout (with the decoder's
  ``vision_tokenizer_config.yaml``), sized from a ``LibraConfig`` (default ``LibraConfig.tiny()``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import torch

from .config import LibraConfig
from .pixel_decoder import PixelDecoderConfig, random_pixel_decoder
from .processor import DEFAULT_LAYOUT, PROCESSOR_CONFIG_NAME
from .text import V1_ROLES, V1_SYSTEM

_BYTE_PIECES = 256
_SPECIALS = 3  # <unk>, <s>, </s>
# Text every tiny tokenizer is trained on, so the chat template and plain captions tokenise compactly.
_BASE_CORPUS = (V1_SYSTEM, f"{V1_ROLES[0]}: what is in the image? {V1_ROLES[1]}: a photo of a dog.",
                "a cat sitting on a mat", "the quick brown fox jumps over the lazy dog")


def _corpus(texts) -> list[str]:
    if texts is None:
        texts = []
    elif isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be None, a str or a list of str")
    # Newlines are kept out of training: "\n" must stay the byte/symbol piece at newline_token_id, as in LLaMA.
    lines = [line for text in (*_BASE_CORPUS, *texts) for line in text.split("\n")]
    return [line for line in lines if line.strip()]


def build_tiny_text_tokenizer(directory: str | os.PathLike, texts: str | Sequence[str] | None = None,
                              vocab_size: int = 320, newline_token_id: int = 13) -> str:
    """Train a SentencePiece BPE tokenizer on ``texts`` (plus the chat template words) and write
    ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` to ``directory``; returns the directory.

    Ids: unk 0, bos 1, eos 2 (LLaMA's); "\\n" = ``newline_token_id``. The vocabulary has at most ``vocab_size``
    ids (fewer when the corpus has fewer merges). Raises ValueError when ``vocab_size`` cannot hold the layout."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"build_tiny_text_tokenizer: vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(newline_token_id, bool) or not isinstance(newline_token_id, int) or newline_token_id < _SPECIALS:
        raise ValueError(f"build_tiny_text_tokenizer: newline_token_id must be an int >= {_SPECIALS}, "
                         f"got {newline_token_id!r}")
    lines = _corpus(texts)
    alphabet = {"▁"} | {ch for line in lines for ch in line if not ch.isspace()}
    byte_fallback = vocab_size >= _SPECIALS + _BYTE_PIECES + len(alphabet) + 1
    if byte_fallback and newline_token_id != _SPECIALS + ord("\n"):
        raise ValueError(f"build_tiny_text_tokenizer: with byte fallback '\\n' is <0x0A> = {_SPECIALS + ord(chr(10))}"
                         f", got newline_token_id={newline_token_id}")
    # Compact layout: filler symbols (never in text) hold ids 3..newline-1 so that "\n" lands on newline_token_id.
    symbols = [] if byte_fallback else [f"<reserved{i}>" for i in range(_SPECIALS, newline_token_id)] + ["\n"]
    if not byte_fallback and vocab_size < _SPECIALS + len(symbols) + len(alphabet):
        raise ValueError(f"build_tiny_text_tokenizer: vocab_size={vocab_size} cannot hold the 3 special ids, "
                         f"{len(symbols)} reserved ids up to '\\n' and the {len(alphabet)} characters of the corpus; "
                         f"use >= {_SPECIALS + _BYTE_PIECES + len(alphabet) + 1} for LLaMA's byte fallback")
    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=byte_fallback,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=symbols, num_threads=1, minloglevel=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as handle:
        handle.write(model.getvalue())
    # Converting once and saving tokenizer.json makes later loads fast and independent of the converter.
    LlamaTokenizer.from_pretrained(directory).save_pretrained(directory)
    return os.fspath(directory)


def build_tiny_clip(directory: str | os.PathLike, *, image_size: int = 42, patch_size: int = 14,
                    hidden_size: int = 16, num_hidden_layers: int = 4, num_attention_heads: int = 2,
                    intermediate_size: int | None = None, full_clip: bool = False, seed: int = 0) -> str:
    """Save a random CLIP (``CLIPVisionModel``, or with ``full_clip`` a ``CLIPModel`` whose vision weights are named
    ``vision_model.*`` like the released CLIP directories) and a stock ``preprocessor_config.json`` at
    ``image_size`` to ``directory``; returns the directory. (image_size / patch_size)² patches."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

    from .image_tokenizer import default_image_processor

    if image_size % patch_size:
        raise ValueError(f"build_tiny_clip: image_size ({image_size}) must be a multiple of patch_size "
                         f"({patch_size})")
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                              num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if full_clip:
            text = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                                  num_attention_heads=num_attention_heads, vocab_size=64,
                                  max_position_embeddings=16, projection_dim=hidden_size)
            model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=hidden_size))
        else:
            model = CLIPVisionModel(vision)
    model.save_pretrained(directory)
    default_image_processor(image_size).save_pretrained(directory)
    return os.fspath(directory)


def build_tiny_vision_tokenizer(path: str | os.PathLike, *, feature_size: int, embed_dim: int = 16,
                                codebook_num: int = 2, bits_per_codebook: int = 4,
                                post_quant_channels: int | None = 16, decoder: PixelDecoderConfig | None = None,
                                seed: int = 0) -> str:
    """Write a random vision tokenizer checkpoint with the released names (``quant_conv`` Conv2d feature_size →
    embed_dim 1×1, ``quantize.project_in`` Linear embed_dim → C·K, ``quantize.project_out``, ``post_quant_conv``,
    the ``quantize.mask`` buffer, and with ``decoder`` the pixel decoder's ``decoder.*``, whose ``project_out`` and
    ``post_quant_conv`` are then the ones written) as ``{"state_dict": ..., "epoch": 0, "global_step": 0}``;
    returns the path."""
    for name, value in (("feature_size", feature_size), ("embed_dim", embed_dim), ("codebook_num", codebook_num),
                        ("bits_per_codebook", bits_per_codebook)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"build_tiny_vision_tokenizer: {name} must be a positive int, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale: torch.randn(*shape, generator=generator) * scale
    bits = codebook_num * bits_per_codebook
    state = {
        # Fan-in scaling keeps the LFQ logits of order 1, so codes use the whole codebook.
        "quant_conv.weight": randn(embed_dim, feature_size, 1, 1, scale=feature_size ** -0.5),
        "quant_conv.bias": randn(embed_dim, scale=0.1),
        "quantize.project_in.weight": randn(bits, embed_dim, scale=embed_dim ** -0.5),
        "quantize.project_in.bias": randn(bits, scale=0.1),
        "quantize.project_out.weight": randn(embed_dim, bits, scale=bits ** -0.5),
        "quantize.project_out.bias": randn(embed_dim, scale=0.1),
        "quantize.mask": 2 ** torch.arange(bits_per_codebook - 1, -1, -1),
    }
    if post_quant_channels:
        state["post_quant_conv.weight"] = randn(post_quant_channels, embed_dim, 1, 1, scale=embed_dim ** -0.5)
        state["post_quant_conv.bias"] = randn(post_quant_channels, scale=0.1)
    if decoder is not None:
        wanted = (embed_dim, 2 ** bits_per_codebook, codebook_num, post_quant_channels)
        have = (decoder.embed_dim, decoder.codebook_size, decoder.num_codebook, decoder.z_channels)
        if wanted != have:
            raise ValueError(f"build_tiny_vision_tokenizer: decoder (embed_dim, codebook_size, num_codebook, "
                             f"z_channels) = {have} must match the tokenizer's {wanted}")
        state.update(random_pixel_decoder(decoder, seed=seed + 1).checkpoint_state_dict())
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, path)
    return path


def tiny_pixel_decoder_config(config: LibraConfig, image_size: int, *, embed_dim: int = 16,
                              z_channels: int = 16) -> PixelDecoderConfig:
    """A small decoder for ``config``'s code grid and ``image_size`` pixels: ch 32 (the least GroupNorm(32)
    allows), three levels (widths 64, 32, 32, one ×2 step then the fractional step to ``image_size``), 1 + 1
    ResBlocks per level, 2-head attention at the code grid."""
    side = config.image_feature_resolution
    return PixelDecoderConfig(embed_dim=embed_dim, codebook_size=2 ** (config.num_codes.bit_length() - 1),
                              num_codebook=config.vision_codebook_num, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                              attn_resolutions=(side,), num_attn_head=2, z_channels=z_channels,
                              initial_resolution=side, resolution=image_size)


def tiny_clip_geometry(config: LibraConfig, feature_layers: Sequence[int] | None = None) -> dict:
    """CLIP sizes that fit ``config``: patches = image_feature_resolution², len(feature_layers) · hidden =
    contiguous_signal_size. Default: two feature layers (1 and 3 of 4 blocks, so a block after the last feature
    layer exists) when the signal width is even, else one (2 of 3 blocks)."""
    width = config.contiguous_signal_size
    if feature_layers is None:
        feature_layers = (1, 3) if width % 2 == 0 else (2,)
    feature_layers = tuple(feature_layers)
    if not feature_layers or width % len(feature_layers):
        raise ValueError(f"tiny_clip_geometry: contiguous_signal_size ({width}) must be divisible by the number of "
                         f"feature layers ({len(feature_layers)})")
    hidden = width // len(feature_layers)
    heads = 2 if hidden % 2 == 0 else 1
    return {"feature_layers": feature_layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_hidden_layers": max(max(feature_layers), 1) + 1}


def build_tiny_processor_dir(directory: str | os.PathLike, config: LibraConfig | None = None, *,
                             texts: str | Sequence[str] | None = None, feature_layers: Sequence[int] | None = None,
                             patch_size: int = 14, embed_dim: int = 16, full_clip: bool = False, seed: int = 0) -> str:
    """Write a complete processor directory (tokenizer/, clip/, vision_tokenizer.ckpt with a pixel decoder,
    vision_tokenizer_config.yaml, processor_config.json, config.json) consistent with ``config`` (default
    ``LibraConfig.tiny()``): image side ``image_feature_resolution · patch_size`` pixels, codebooks of
    ``vision_vocab_size - 2`` codes, ``contiguous_signal_size`` = feature layers × CLIP width, text vocabulary of
    at most ``vocab_size`` ids with "\\n" at ``newline_token_id``. Load it with
    ``LibraProcessor.from_pretrained(directory)``; returns the directory."""
    config = LibraConfig.tiny() if config is None else config
    if not isinstance(config, LibraConfig):
        raise TypeError(f"build_tiny_processor_dir: config must be a LibraConfig, got {type(config).__name__}")
    if (config.bos_token_id, config.eos_token_id, config.pad_token_id) != (1, 2, 0):
        raise ValueError("build_tiny_processor_dir: the tiny tokenizer has LLaMA's ids (pad/unk 0, bos 1, eos 2); "
                         f"the config has pad {config.pad_token_id}, bos {config.bos_token_id}, "
                         f"eos {config.eos_token_id}")
    geometry = tiny_clip_geometry(config, feature_layers)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    build_tiny_text_tokenizer(os.path.join(directory, DEFAULT_LAYOUT["tokenizer"]), texts,
                              vocab_size=config.vocab_size, newline_token_id=config.newline_token_id)
    image_size = config.image_feature_resolution * patch_size
    decoder = tiny_pixel_decoder_config(config, image_size, embed_dim=embed_dim)
    decoder.save_yaml(os.path.join(directory, DEFAULT_LAYOUT["pixel_decoder_config"]))
    build_tiny_clip(os.path.join(directory, DEFAULT_LAYOUT["clip"]),
                    image_size=image_size, patch_size=patch_size,
                    hidden_size=geometry["hidden_size"], num_hidden_layers=geometry["num_hidden_layers"],
                    num_attention_heads=geometry["num_attention_heads"], full_clip=full_clip, seed=seed)
    build_tiny_vision_tokenizer(os.path.join(directory, DEFAULT_LAYOUT["vision_tokenizer"]),
                                feature_size=config.contiguous_signal_size, embed_dim=embed_dim,
                                codebook_num=config.vision_codebook_num,
                                bits_per_codebook=(config.vision_vocab_size - 2).bit_length() - 1,
                                decoder=decoder, seed=seed + 1)
    config.save_pretrained(directory)
    settings = dict(DEFAULT_LAYOUT, feature_layers=list(geometry["feature_layers"]),
                    codebook_num=config.vision_codebook_num)
    with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2)
        handle.write("\n")
    return directory


def build_tiny_processor(directory: str | os.PathLike, config: LibraConfig | None = None, **kwargs):
    """:func:`build_tiny_processor_dir` then ``LibraProcessor.from_pretrained(directory)``."""
    from .processor import LibraProcessor

    build_tiny_processor_dir(directory, config, **kwargs)
    return LibraProcessor.from_pretrained(directory, config)
