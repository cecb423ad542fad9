"""Checkpoint import and export in the HF layout: LLaMA-2 directories (to start a Libra from), released Libra
checkpoints and our own saves, which use the same names so they round-trip (docs/model.md lists them).

This module sits below the model: it never imports ``libra_model.model``; the model class is passed in
(``LibraForCausalLM.from_pretrained`` / ``from_llama`` / ``save_pretrained`` call the functions here).

Weights are read from ``model.safetensors``, ``pytorch_model.bin`` or their sharded forms (with an index file
``*.index.json``, or shards found by name without one). Models are built on the meta device and the loaded tensors
are assigned, so nothing is initialised twice; only parameters absent from a LLaMA checkpoint are initialised
(docs/model.md §12). Missing or unexpected names are reported by name, a shape mismatch is an error.

Integrity: our saves write ``checksums.json`` beside the shards (size and CRC-32 of config.json, the index and every
weight file; ``libra_model.checksums``). When it is present the files are verified before anything is read, and a
missing, truncated or changed file is an error naming it. Released checkpoints have no such file and load as they
are; a file that cannot be parsed (truncated, zero bytes, invalid JSON) is reported with its path either way.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import warnings

import torch

from libra_model.checksums import checksum_files, verify_files
from libra_model.config import LibraConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
CHECKSUMS = "checksums.json"

# Buffers that released checkpoints may hold and that carry no learned state (docs/model.md §13), plus the
# rotary buffer of older LLaMA saves.
IGNORED_BUFFERS = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq|naive_placeholder"
    r"|vision_logits_placeholder|language_logits_placeholder|eoi_to_newline_logits_placeholder|model\.pos_offset)$")

# Fields of a LLaMA config.json that carry over to LibraConfig unchanged.
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "initializer_range",
                 "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias",
                 "rope_scaling", "rope_parameters", "attention_dropout", "head_dim")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing or unexpected names, a shape or config mismatch, or a file that is
    missing, damaged or fails its checksum. The message names the file or settings at fault and what to do."""


def _weight_files(directory: str) -> list[str]:
    """The weight files of an HF directory, in load order."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    for index_name in (SAFE_INDEX, TORCH_INDEX):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path, "the weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' mapping; re-export the checkpoint or remove "
                                      "the index to load the shards found by name")
            return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    for single in (SAFE_WEIGHTS, TORCH_WEIGHTS):
        path = os.path.join(directory, single)
        if os.path.isfile(path):
            return [path]
    for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", "*.safetensors"):
        shards = sorted(glob.glob(os.path.join(directory, pattern)))
        if shards:
            return shards
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shards (with or without an index) in "
                            f"{directory!r}")


def _read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file and the position of a syntax error."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({error.msg} at line {error.lineno}, column "
                              f"{error.colno}); the file is truncated or damaged: restore it") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read {what} ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def verify_checksums(directory: str) -> bool:
    """Verify the files listed in ``directory/checksums.json`` (our saves write it); returns False when there is no
    such file (released checkpoints), True when every file verifies, and raises CheckpointError naming each file
    that is missing, truncated or changed."""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        return False
    problems = verify_files(directory, _read_json(path, "the checksum record").get("files"))
    if problems:
        raise CheckpointError(f"{directory}: the checkpoint does not verify: " + "; ".join(problems)
                              + ". Export it again or restore the files")
    return True


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(f"{path}: cannot read the weights ({size} bytes; {type(error).__name__}: {error}); "
                              "the file is truncated or damaged: download or export it again") from None


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors or .bin, single file or shards) on the CPU, verified
    against ``checksums.json`` first when the directory has one."""
    verify_checksums(directory)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        part = _load_weight_file(path)
        duplicate = state.keys() & part.keys()
        if duplicate:
            raise CheckpointError(f"{path}: tensors {sorted(duplicate)[:5]} also appear in another shard")
        state.update(part)
    return state


def _assign(model, state: dict[str, torch.Tensor], dtype: torch.dtype | None,
            device: torch.device | str, *, allow_missing: bool, strict: bool, source: str) -> list[str]:
    """Assign checkpoint tensors to a meta-device model; returns the names it did not find (when allowed)."""
    expected = dict(model.named_parameters())
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected and not IGNORED_BUFFERS.match(name)]
    if unexpected:
        message = f"{source}: unexpected tensors not in the model: {unexpected}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message + " (ignored)", stacklevel=3)
    if missing and not allow_missing:
        raise CheckpointError(f"{source}: missing tensors: {missing}")
    loaded = {}
    for name, param in expected.items():
        if name not in state:
            continue
        tensor = state[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                                  f"{tuple(param.shape)} in the model")
        loaded[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    return missing


def _materialise(model, names: list[str], dtype: torch.dtype, device) -> None:
    """Give the parameters still on the meta device real storage and initialise them (docs/model.md §12)."""
    for name in names:
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        param = getattr(module, param_name)
        setattr(module, param_name, torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                       requires_grad=param.requires_grad))
    model.init_weights(only=set(names))


def _model_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    embed = state.get("model.embed_tokens.weight")
    return embed.dtype if embed is not None else torch.float32


def load_pretrained(model_class, directory: str, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", strict: bool = True, strict_config: bool = False,
                    backend: str | dict = "auto", **config_overrides):
    """Load a released Libra checkpoint or one written by :func:`save_pretrained` into a new ``model_class``.

    Args:
        model_class: the model class (``LibraForCausalLM`` or a subclass), built as ``model_class(config,
            backend=backend)``.
        directory: holds config.json and the weights (safetensors or .bin; sharded with or without an index).
        dtype: cast every tensor to this dtype (default: the dtype stored for ``model.embed_tokens.weight``).
        device: where the weights go. strict: unexpected tensor names are an error (else a warning); the buffers
            of Appendix A are always ignored. strict_config: unknown config.json keys are an error (else a warning).
        config_overrides: replace config values (for example ``use_2d_rope``).
    Returns:
        the model in eval mode. Raises CheckpointError (a ValueError) naming missing/unexpected tensors or a
        shape mismatch.
    """
    config = LibraConfig.from_pretrained(directory, strict=strict_config, **config_overrides)
    state = load_state_dict(directory)
    with torch.device("meta"):
        model = model_class(config, backend=backend)
    _assign(model, state, _model_dtype(state, dtype), device, allow_missing=False, strict=strict, source=directory)
    return model.eval()


def llama_config_to_libra(llama_config: dict, **overrides) -> LibraConfig:
    """LibraConfig from a LLaMA config.json dict: the language fields carried over, the vision fields from the
    released defaults or ``overrides``. A missing pad id becomes 0 (LLaMA-2's unk, Libra's pad)."""
    fields = {key: llama_config[key] for key in _LLAMA_FIELDS if key in llama_config}
    if fields.get("pad_token_id") is None:
        fields["pad_token_id"] = 0
    if llama_config.get("tie_word_embeddings"):
        fields["tie_word_embeddings"] = True  # rejected by LibraConfig with a clear message
    fields["torch_dtype"] = llama_config.get("torch_dtype") or llama_config.get("dtype") or "float32"
    fields.update(overrides)
    return LibraConfig.from_dict(fields)


def load_from_llama(model_class, llama_dir: str, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", backend: str | dict = "auto", copy_eos_to_pad: bool = False,
                    **config_overrides):
    """A new ``model_class`` whose language part is an HF LLaMA(-2) checkpoint and whose vision parts are freshly
    initialised (``init_weights``; bridges start as exact zero maps).

    Args:
        model_class: the model class (``LibraForCausalLM`` or a subclass).
        llama_dir: an HF LLaMA directory (config.json + safetensors or .bin weights, sharded or not).
        dtype: the model dtype (default: that of the LLaMA embedding). device: where the model is built.
        copy_eos_to_pad: overwrite the pad row of ``embed_tokens`` with the EOS row, as the reference training
            wrapper of the released code does; off by default so the language part stays the LLaMA checkpoint.
        config_overrides: LibraConfig fields for the vision side (e.g. ``contiguous_signal_size``); the language
            fields come from the LLaMA config.
    Returns:
        the model (train mode). Raises CheckpointError on missing language tensors, unexpected names or shapes.
    """
    llama_config = _read_json(os.path.join(llama_dir, "config.json"), "the LLaMA config")
    config = llama_config_to_libra(llama_config, **config_overrides)
    state = load_state_dict(llama_dir)
    with torch.device("meta"):
        model = model_class(config, backend=backend)
    model_dtype = _model_dtype(state, dtype)
    missing = _assign(model, state, model_dtype, device, allow_missing=True, strict=True, source=llama_dir)
    language_missing = [name for name in missing if not _is_vision_parameter(name)]
    if language_missing:
        raise CheckpointError(f"{llama_dir}: missing LLaMA tensors: {language_missing}")
    _materialise(model, missing, model_dtype, device)
    if copy_eos_to_pad:
        with torch.no_grad():
            table = model.model.embed_tokens.weight
            table[config.pad_token_id] = table[config.eos_token_id]
    return model


def _is_vision_parameter(name: str) -> bool:
    """Parameters a LLaMA checkpoint does not have: every name with 'vision' in it."""
    return "vision" in name


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB'/'200MB', got {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a copy when it is a block of a larger buffer (packed projection weights): safetensors
    refuses tensors that share memory."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()


def save_pretrained(model, directory: str, *, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and the parameters as safetensors with the released names: one ``model.safetensors``,
    or shards ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when they exceed
    ``max_shard_size``. ``dtype`` casts the saved tensors (default: as they are)."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    os.makedirs(directory, exist_ok=True)
    config = model.config
    tensors = {name: _own_storage(p.detach().to(dtype or p.dtype).contiguous().cpu())
               for name, p in model.named_parameters()}
    saved_dtype = model.model.embed_tokens.weight.dtype if dtype is None else dtype
    config = LibraConfig.from_dict(config.to_dict(), torch_dtype=str(saved_dtype).removeprefix("torch."))
    config.save_pretrained(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in glob.glob(os.path.join(directory, "model*.safetensors")) + [os.path.join(directory, SAFE_INDEX),
                                                                            os.path.join(directory, CHECKSUMS)]:
        if os.path.isfile(stale):
            os.remove(stale)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SAFE_WEIGHTS), metadata={"format": "pt"})
        _write_checksums(directory, ["config.json", SAFE_WEIGHTS])
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2, sort_keys=True)
    _write_checksums(directory, ["config.json", SAFE_INDEX, *sorted(set(weight_map.values()))])


def _write_checksums(directory: str, names: list[str]) -> None:
    """``checksums.json``: size and CRC-32 of each of ``names`` (written last, so it only lists complete files)."""
    with open(os.path.join(directory, CHECKSUMS), "w", encoding="utf-8") as handle:
        json.dump({"files": checksum_files(directory, names)}, handle, indent=2, sort_keys=True)
