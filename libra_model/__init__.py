"""The Libra model on the fused operators of ``libra_kernels``: configuration, modules, tokenizers, checkpoint
import/export, decoding, data pipelines and the tensor-parallel trainer.

The main names are importable from here (loaded on first use, so ``import libra_model.config`` stays light)::

    from libra_model import LibraConfig, LibraForCausalLM, init_from_llama

Decoding is ``LibraForCausalLM.generate`` (or ``libra_model.decoding.generate``); ``libra_model.generate`` is the
command-line module, not re-exported as a function, so the name means one thing whatever was imported first.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LibraConfig": "libra_model.config",
    "LibraForCausalLM": "libra_model.model",
    "LibraOutput": "libra_model.model",
    "BridgeKVCache": "libra_model.modules.cache",
    "StaticBridgeKVCache": "libra_model.modules.cache",
    "GenerationOutput": "libra_model.decoding",
    "init_from_llama": "libra_model.model",
    "load_libra": "libra_model.model",
    "save_pretrained": "libra_model.hf_checkpoint",
    "CheckpointError": "libra_model.hf_checkpoint",
    "LibraProcessor": "libra_model.processor",
    "HybridImageTokenizer": "libra_model.image_tokenizer",
    "PixelDecoder": "libra_model.pixel_decoder",
    "PixelDecoderConfig": "libra_model.pixel_decoder",
    "generate_images": "libra_model.image_generation",
    "TextTokenizer": "libra_model.text",
    "build_tiny_processor_dir": "libra_model.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Load an exported name from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'libra_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The exported names plus the module attributes."""
    return sorted(set(globals()) | set(_EXPORTS))
