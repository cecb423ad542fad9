"""HF checkpoint files: our saves carry ``checksums.json``, verified by ``from_pretrained``; a truncated, zero-byte,
changed or missing file, an invalid config.json or index is an error naming the file and what to do."""

import json
import os

import pytest
import torch

from libra_model.config import LibraConfig
from libra_model.hf_checkpoint import CHECKSUMS, SAFE_INDEX, SAFE_WEIGHTS, CheckpointError, verify_checksums
from libra_model.model import LibraForCausalLM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(single-file save, sharded save, the model)."""
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny())
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(str(single))
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    return str(single), str(sharded), model


def _copy(source, tmp_path):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return str(target)


def _shard(directory):
    with open(os.path.join(directory, SAFE_INDEX), encoding="utf-8") as handle:
        return os.path.join(directory, sorted(set(json.load(handle)["weight_map"].values()))[1])


def test_saves_record_and_verify_their_checksums(saved):
    single, sharded, model = saved
    with open(os.path.join(single, CHECKSUMS), encoding="utf-8") as handle:
        assert sorted(json.load(handle)["files"]) == ["config.json", SAFE_WEIGHTS]
    with open(os.path.join(sharded, CHECKSUMS), encoding="utf-8") as handle:
        names = sorted(json.load(handle)["files"])
    assert SAFE_INDEX in names and len([n for n in names if n.endswith(".safetensors")]) > 2
    assert verify_checksums(single) and verify_checksums(sharded)
    for directory in (single, sharded):
        loaded = LibraForCausalLM.from_pretrained(directory)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero", "remove"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_damaged_weights_fail_verification_by_name(saved, tmp_path, damage, layout):
    directory = _copy(saved[0] if layout == "single" else saved[1], tmp_path)
    target = os.path.join(directory, SAFE_WEIGHTS) if layout == "single" else _shard(directory)
    size = os.path.getsize(target)
    if damage == "flip":
        with open(target, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(bytes(64))
    elif damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(size // 2)
    elif damage == "zero":
        open(target, "wb").close()
    else:
        os.remove(target)
    expected = {"flip": "changed", "truncate": "truncated", "zero": "truncated", "remove": "missing"}[damage]
    with pytest.raises(CheckpointError, match=rf"{target}: .*{expected}"):
        LibraForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_unreadable_weights_without_checksums_name_the_file(saved, tmp_path, damage):
    directory = _copy(saved[0], tmp_path)
    os.remove(os.path.join(directory, CHECKSUMS))  # as a released checkpoint: nothing to verify against
    target = os.path.join(directory, SAFE_WEIGHTS)
    data = open(target, "rb").read()
    with open(target, "wb") as handle:
        handle.write({"truncate": data[: len(data) // 2], "zero": b"", "garbage": b"\x00" * 1000}[damage])
    with pytest.raises(CheckpointError, match=rf"{target}: cannot read the weights .*download or export it again"):
        LibraForCausalLM.from_pretrained(directory)


def test_invalid_config_json_names_the_file_and_the_position(saved, tmp_path):
    directory = _copy(saved[0], tmp_path)
    path = os.path.join(directory, "config.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{\n  "vocab_size": 64,\n  "hidden_size": \n}')
    os.remove(os.path.join(directory, CHECKSUMS))
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(Expecting value at line 4, column 1\)"):
        LibraForCausalLM.from_pretrained(directory)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} must hold a JSON object"):
        LibraForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("text", ['{"weight_map": {"a": ', '{"metadata": {}}', "[]"])
def test_invalid_index_names_the_file(saved, tmp_path, text):
    directory = _copy(saved[1], tmp_path)
    os.remove(os.path.join(directory, CHECKSUMS))
    index = os.path.join(directory, SAFE_INDEX)
    with open(index, "w", encoding="utf-8") as handle:
        handle.write(text)
    with pytest.raises(CheckpointError, match=rf"{index}: "):
        LibraForCausalLM.from_pretrained(directory)


def test_damaged_checksum_record_is_reported(saved, tmp_path):
    directory = _copy(saved[0], tmp_path)
    path = os.path.join(directory, CHECKSUMS)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"files": {')
    with pytest.raises(CheckpointError, match=rf"{path}: the checksum record is not valid JSON"):
        LibraForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncate", "zero"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_damaged_vision_tokenizer_checkpoint_names_the_file(tmp_path, damage, suffix):
    from safetensors.torch import save_file

    from libra_model.image_tokenizer import read_vision_tokenizer_checkpoint

    path = str(tmp_path / f"vision_tokenizer{suffix}")
    state = {"quantize.embedding.weight": torch.randn(8, 4)}
    if suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, path)
    assert torch.equal(read_vision_tokenizer_checkpoint(path)["quantize.embedding.weight"],
                       state["quantize.embedding.weight"])
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2] if damage == "truncate" else b"")
    with pytest.raises(ValueError, match=rf"{path} cannot be read \(\d+ bytes; .*truncated or damaged"):
        read_vision_tokenizer_checkpoint(path)


def test_invalid_processor_config_names_the_file(processor_dir, tmp_path):
    import shutil

    from libra_model.processor import PROCESSOR_CONFIG_NAME, LibraProcessor

    directory = tmp_path / "processor"
    shutil.copytree(processor_dir, directory)
    path = directory / PROCESSOR_CONFIG_NAME
    path.write_text('{"clip": "clip", ')
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        LibraProcessor.from_pretrained(str(directory))
