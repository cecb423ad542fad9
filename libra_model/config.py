"""Libra's configuration (docs/model.md §11) with the field names of the released ``config.json``.

``LibraConfig`` is a plain dataclass: it validates itself on construction (unknown or inconsistent values raise
ValueError naming the field), reads and writes ``config.json``, and has two presets: ``libra_11b()`` (the released
Libra-11B, LLaMA-2-7B plus the vision parts, contiguous_signal_size 4096) and ``tiny()`` (a few-thousand-parameter
model for tests and the trainer's embedded default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"

# Keys that HF writes into every config.json and that carry nothing this implementation reads. They are accepted
# (and dropped) so that released and LLaMA config files load; any other unknown key is an error.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "use_cache",
    "pretraining_tp", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "dtype", "_attn_implementation_autoset", "attn_implementation", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
    "gradient_checkpointing",
})

# Keys with a single supported value: anything else is an architecture this implementation does not have.
_FIXED_KEYS = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "use_vision_position_embedding": False,
    "unified_head": False,
}

_DROPOUTS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "vision_resid_pdrop", "vision_embd_pdrop")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LibraConfig:
    """Hyper-parameters of a Libra language model (the CLIP encoder and the VQ tokenizer are configured apart).

    Names follow the released ``config.json``. Derived quantities (``head_dim``, ``kv_dim``, ``boi_token_id``, ...)
    are properties. ``num_key_value_heads`` (None = ``num_attention_heads``) allows grouped-query attention;
    ``rope_theta`` is LLaMA's RoPE base (Libra hard-codes 10000, the LLaMA-2 value).
    """

    # LLaMA part
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    newline_token_id: int = 13
    # vision vocabulary and image geometry
    vision_vocab_size: int = 514
    vision_codebook_num: int = 2
    max_vision_token_length: int = 578
    image_feature_resolution: int = 24
    # routed expert, bridge and hybrid signal
    vision_down_ratio: int = 4
    bridge_rank: int = 8
    contiguous_signal_size: int = 4096
    concat_signals: bool = True
    norm_signals: bool = True
    use_bridge: bool = True
    vision_prediction_mode: str = "1d"
    addition_mode: bool = False
    unified_head: bool = False
    use_2d_rope: bool = False
    use_vision_position_embedding: bool = False
    # dropouts (all 0 in the release)
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    vision_resid_pdrop: float = 0.0
    vision_embd_pdrop: float = 0.0
    # fixed architecture switches, kept so that config.json round-trips with its usual keys
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope_scaling: Any = None
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "bfloat16"
    # the head width may be written explicitly by newer HF configs; it must then equal hidden / heads
    head_dim_: int | None = field(default=None, repr=False)

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (num_key_value_heads, or num_attention_heads when that is None)."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def kv_dim(self) -> int:
        """Output width of the k and v projections (kv_heads · head_dim)."""
        return self.kv_heads * self.head_dim

    @property
    def num_codes(self) -> int:
        """Codes per codebook without BOI/EOI (512 in the release)."""
        return self.vision_vocab_size - 2

    @property
    def total_vocab_size(self) -> int:
        """Width of the combined id space: text ids then one codebook's ids (32514 in the release)."""
        return self.vocab_size + self.vision_vocab_size

    @property
    def boi_token_id(self) -> int:
        """Combined id of the begin-of-image token (32512 in the release), the same in every codebook row."""
        return self.vocab_size + self.vision_vocab_size - 2

    @property
    def eoi_token_id(self) -> int:
        """Combined id of the end-of-image token (32513 in the release)."""
        return self.vocab_size + self.vision_vocab_size - 1

    @property
    def text_vision_index(self) -> int:
        """The ``vision_indices`` value of text and padding positions (= max_vision_token_length, 578)."""
        return self.max_vision_token_length

    @property
    def eoi_vision_index(self) -> int:
        """The ``vision_indices`` value of the EOI position (577 in the release)."""
        return self.max_vision_token_length - 1

    @property
    def vision_embed_dim(self) -> int:
        """Width of one codebook's embedding table (hidden_size / vision_codebook_num)."""
        return self.hidden_size // self.vision_codebook_num

    def expert_rank(self, out_features: int) -> int:
        """Rank of a routed low-rank expert with ``out_features`` outputs (out / vision_down_ratio)."""
        return out_features // self.vision_down_ratio

    # ------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError, naming the field, on any unknown or inconsistent value."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "vision_vocab_size", "vision_codebook_num", "max_vision_token_length",
                    "image_feature_resolution", "vision_down_ratio", "bridge_rank", "contiguous_signal_size")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"LibraConfig: {name} must be a positive int, got {value!r}")
        if self.num_key_value_heads is not None and (not _is_int(self.num_key_value_heads)
                                                     or self.num_key_value_heads <= 0):
            raise ValueError(f"LibraConfig: num_key_value_heads must be a positive int or None, "
                             f"got {self.num_key_value_heads!r}")
        for name in ("concat_signals", "norm_signals", "use_bridge", "addition_mode", "unified_head", "use_2d_rope",
                     "use_vision_position_embedding", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LibraConfig: {name} must be a bool, got {getattr(self, name)!r}")
        for name, value in _FIXED_KEYS.items():
            if getattr(self, name) != value:
                raise ValueError(f"LibraConfig: {name}={getattr(self, name)!r} is not supported (only {value!r})")

        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LibraConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LibraConfig: the head dim hidden_size/num_attention_heads = {self.head_dim} must be "
                             "even for rotary embeddings")
        if self.head_dim_ is not None and self.head_dim_ != self.head_dim:
            raise ValueError(f"LibraConfig: head_dim={self.head_dim_} differs from hidden_size/num_attention_heads "
                             f"= {self.head_dim}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"LibraConfig: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.kv_heads})")
        if self.use_2d_rope and self.kv_heads != self.num_attention_heads:
            raise ValueError("LibraConfig: use_2d_rope assigns a position component per head and needs "
                             f"num_key_value_heads == num_attention_heads, got {self.kv_heads} and "
                             f"{self.num_attention_heads}")
        if self.hidden_size % self.vision_codebook_num:
            raise ValueError(f"LibraConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"vision_codebook_num ({self.vision_codebook_num})")
        expected = self.image_feature_resolution ** 2 + 2
        if self.max_vision_token_length != expected:
            raise ValueError(f"LibraConfig: max_vision_token_length must be image_feature_resolution**2 + 2 = "
                             f"{expected} (codes + BOI + EOI), got {self.max_vision_token_length}")
        codes = self.vision_vocab_size - 2
        if codes < 2 or codes & (codes - 1):
            raise ValueError(f"LibraConfig: vision_vocab_size must be 2**bits + 2 (codes + BOI + EOI), "
                             f"got {self.vision_vocab_size}")
        for name, width in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                            ("the k/v width num_key_value_heads*head_dim", self.kv_dim)):
            if width % self.vision_down_ratio:
                raise ValueError(f"LibraConfig: {name} ({width}) must be divisible by vision_down_ratio "
                                 f"({self.vision_down_ratio}): the experts have rank out/vision_down_ratio")
        if self.vision_prediction_mode not in ("1d", "2d"):
            raise ValueError(f"LibraConfig: vision_prediction_mode must be '1d' or '2d', "
                             f"got {self.vision_prediction_mode!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "newline_token_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ValueError(f"LibraConfig: {name} must be a text id in [0, vocab_size={self.vocab_size}), "
                                 f"got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"LibraConfig: {name} must be a positive number, got {value!r}")
        if not isinstance(self.initializer_range, (int, float)) or not self.initializer_range >= 0:
            raise ValueError(f"LibraConfig: initializer_range must be >= 0, got {self.initializer_range!r}")
        for name in _DROPOUTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"LibraConfig: {name} must be in [0, 1), got {value!r}")
        if self.attn_pdrop != 0.0:
            raise ValueError("LibraConfig: attn_pdrop must be 0.0: the fused bridge attention has no "
                             "attention-probability dropout (the release uses 0.0)")
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in ("float32", "bfloat16", "float16",
                                                                             "float64"):
            raise ValueError(f"LibraConfig: torch_dtype must be a float dtype name, got {self.torch_dtype!r}")

    # -------------------------------------------------------------------------------------------- presets
    @classmethod
    def libra_11b(cls, **overrides) -> LibraConfig:
        """The released Libra-11B configuration (LLaMA-2-7B-chat + vision parts, contiguous_signal_size 4096)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> LibraConfig:
        """A tiny Libra for tests and the trainer's embedded default: hidden 64, 4 heads of 16, 2 layers,
        text vocab 64, 2 codebooks of 16 codes (+BOI/EOI), 3×3 images (11 vision positions), signal width 32."""
        base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, vision_vocab_size=18, vision_codebook_num=2,
                    max_vision_token_length=11, image_feature_resolution=3, vision_down_ratio=4, bridge_rank=4,
                    contiguous_signal_size=32, newline_token_id=13, torch_dtype="float32")
        base.update(overrides)
        return cls(**base)

    # -------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        """JSON-ready dict with the released key names (plus model_type and architectures)."""
        out = {"architectures": ["LibraForCausalLM"], "model_type": "libra"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "head_dim_":
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict, *, strict: bool = True, **overrides) -> LibraConfig:
        """Build from a config.json dict. HF bookkeeping keys are dropped; any other unknown key raises
        ValueError (``strict=False`` turns that into a warning). ``overrides`` replace values of the dict."""
        if not isinstance(values, dict):
            raise TypeError(f"LibraConfig.from_dict: values must be a dict, got {type(values).__name__}")
        values = {**values, **overrides}
        if "torch_dtype" not in values and isinstance(values.get("dtype"), str):
            values["torch_dtype"] = values["dtype"]
        rope = values.pop("rope_parameters", None)
        if rope is not None:
            # transformers 5 writes RoPE settings as one dict; only the plain (unscaled) rotation exists here.
            if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                raise ValueError(f"LibraConfig: rope_parameters={rope!r} is not supported (only rope_type 'default')")
            values.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if values.pop("attention_dropout", 0.0) not in (0, 0.0):
            raise ValueError("LibraConfig: attention_dropout must be 0.0 (no attention-probability dropout)")
        known = {f.name for f in dataclasses.fields(cls)} - {"head_dim_"}
        kwargs, unknown = {}, []
        for key, value in values.items():
            if key in known:
                kwargs[key] = value
            elif key == "head_dim":
                kwargs["head_dim_"] = value
            elif key not in _IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            message = f"LibraConfig: unknown config keys {sorted(unknown)}"
            if strict:
                raise ValueError(message)
            warnings.warn(message + " (ignored)", stacklevel=2)
        if isinstance(kwargs.get("rms_norm_eps"), int):
            kwargs["rms_norm_eps"] = float(kwargs["rms_norm_eps"])
        return cls(**kwargs)

    def to_json_string(self) -> str:
        """The config as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``directory/config.json`` (creating the directory); returns the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, strict: bool = True, **overrides) -> LibraConfig:
        """Read a config.json file (see :meth:`from_dict`)."""
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"LibraConfig: {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                             f"{error.colno}); restore or rewrite the config file") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"LibraConfig: {path} is not UTF-8 text ({error}); is it a config.json?") from None
        if not isinstance(values, dict):
            raise ValueError(f"LibraConfig: {path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, strict=strict, **overrides)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, strict: bool = True, **overrides) -> LibraConfig:
        """Read ``directory/config.json`` (or a config.json path) (see :meth:`from_dict`)."""
        path = directory if os.path.isfile(directory) else os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LibraConfig.from_pretrained: no {CONFIG_NAME} in {directory}")
        return cls.from_json_file(path, strict=strict, **overrides)
