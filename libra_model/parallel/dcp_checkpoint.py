"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically, reshardable across TP
sizes, plus the export of the trained model in the HF layout.

Layout: ``<root>/step_00000100/`` holds the DCP files and ``train_meta.json``. A save goes to
``<root>/.tmp-step_00000100/`` and is renamed to its final name by rank 0 only after every rank has finished
writing, so a crash mid-save leaves the previous checkpoint as the latest complete one (the rename is atomic on a
POSIX file system). :func:`latest_checkpoint` only considers final names that hold both the DCP metadata and
``train_meta.json``.

Integrity: ``train_meta.json`` records the size and CRC-32 of every file of the checkpoint (``libra_model.checksums``)
and the model config. :func:`find_resume_checkpoint` verifies the newest checkpoints in turn and returns the newest
that verifies, naming each file that did not (missing, truncated, changed, unreadable metadata);
:func:`load_checkpoint` refuses a checkpoint whose model config differs from the live model's (naming the differing
settings) or that holds model tensors the live model lacks, so nothing is ever loaded partially.

What is saved: the model's parameters (float master weights where they exist, so a bf16 run resumes exactly), the
AdamW state per parameter name, and a small ``train`` object (step, data-loader states of every DP replica, RNG
states, metrics bookkeeping). TP shards are written as DTensors on the TP mesh (``layout.dcp_view``), replicated
tensors as plain tensors (one copy kept), so a checkpoint holds full tensors and loads at any TP size.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from libra_model.checksums import ALGORITHM, checksum_files, checksum_names, verify_files
from libra_model.hf_checkpoint import CheckpointError
from libra_model.parallel.tp_plan import full_state_dict

META_NAME = "train_meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Settings of the model config that do not change what a checkpoint holds (the compute dtype is the run's choice).
_CONFIG_KEYS_IGNORED = ("torch_dtype",)



def step_dir_name(step: int) -> str:
    """``step_%08d``."""
    return f"step_{step:08d}"


def _tp_mesh(parallel):
    return None if parallel.mesh is None else parallel.mesh["tp"]


def _views(model, optimizer, parallel, include_frozen: bool, saving: bool) -> dict:
    """The state dict DCP reads from / writes into: live tensors (masters, AdamW state) wrapped as TP views."""
    from libra_model.parallel.tp_plan import dcp_view

    mesh = _tp_mesh(parallel)
    model_state, optim_state = {}, {}
    if hasattr(optimizer, "dcp_state"):
        # The distributed optimizer's state is sharded over DP: its own views, in full-tensor coordinates.
        model_state, optim_state = optimizer.dcp_state(saving=saving)
        for name, param in model.named_parameters():
            if not param.requires_grad and include_frozen:
                model_state[name] = dcp_view(param.data, getattr(param, "_tp_shard_dim", None), mesh)
        return {"model": model_state, "optim": optim_state}
    masters = optimizer.master_params() if optimizer is not None else {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not include_frozen:
            continue
        dim = getattr(param, "_tp_shard_dim", None)
        model_state[name] = dcp_view(masters.get(name, param).data, dim, mesh)
    if optimizer is not None:
        params = dict(model.named_parameters())
        for name, state in optimizer.named_state().items():
            dim = getattr(params[name], "_tp_shard_dim", None)
            optim_state[name] = {"exp_avg": dcp_view(state["exp_avg"], dim, mesh),
                                 "exp_avg_sq": dcp_view(state["exp_avg_sq"], dim, mesh),
                                 "step": state["step"]}
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(root: str, step: int, model, optimizer, parallel, train_state: dict, *,
                    include_frozen: bool = True, keep_last: int | None = None) -> str:
    """Save a checkpoint of ``step`` under ``root`` (a collective: every rank calls it). ``train_state`` must be a
    picklable object equal on every rank. Returns the final directory. ``keep_last`` (>= 1, None: keep all) prunes
    older checkpoints after the new one is complete."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"save_checkpoint: keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
    final = os.path.join(root, step_dir_name(step))
    temporary = os.path.join(root, ".tmp-" + step_dir_name(step))
    if parallel.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    parallel.barrier()
    state = _views(model, optimizer, parallel, include_frozen, saving=True)
    # One opaque leaf, so DCP stores it whole (it would otherwise flatten nested dicts and lists into keys).
    state["train"] = pickle.dumps(train_state)
    with warnings.catch_warnings():
        # In a single process DCP warns that it is not distributed, which is what we asked for.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=temporary, no_dist=not parallel.distributed)
    parallel.barrier()
    files = _record_files(temporary, parallel)
    if parallel.is_main:
        meta = {"step": step, "tp": parallel.tp, "dp": parallel.dp, "include_frozen": include_frozen,
                "model_config": _config_dict(model), "checksum": ALGORITHM, "files": files}
        with open(os.path.join(temporary, META_NAME), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.exists(final):
            # Same step saved again (e.g. the final save right after a cadence save): replace it.
            shutil.rmtree(final)
        os.replace(temporary, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


def _record_files(directory: str, parallel) -> dict | None:
    """The checksum record of a written checkpoint (on rank 0; None elsewhere). Each rank checksums the data files
    it wrote (DCP names them ``__<rank>_<n>.distcp``), still in its page cache, so no rank reads the whole
    checkpoint; rank 0 adds every other file (``.metadata``)."""
    rank = dist.get_rank() if parallel.distributed else 0
    mine = [name for name in os.listdir(directory) if name.startswith(f"__{rank}_")]
    record = checksum_files(directory, mine)
    if parallel.distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        record = {name: entry for part in gathered for name, entry in part.items()}
    if not parallel.is_main:
        return None
    rest = [name for name in checksum_names(directory) if name not in record]
    record.update(checksum_files(directory, rest))
    return record


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, META_NAME)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str) -> dict:
    """The ``train_meta.json`` of a checkpoint directory; CheckpointError naming the file when it is missing or
    not a JSON object."""
    file = os.path.join(path, META_NAME)
    try:
        with open(file, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{file}: checkpoint metadata without a step (not written by save_checkpoint)")
    return meta


def verify_checkpoint(path: str, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of the checkpoint at ``path``, one message per bad file (empty when it verifies): unreadable
    metadata, a file missing, truncated or changed since the save (the CRC-32 record of ``train_meta.json``).
    ``share`` = (i, n) checks only every n-th file from the i-th (so n ranks can split the reading); the metadata
    is checked by share 0."""
    index, count = share
    try:
        meta = read_meta(path)
    except CheckpointError as error:
        return [str(error)] if index == 0 else []
    if "files" not in meta or not isinstance(meta["files"], dict):
        return [f"{os.path.join(path, META_NAME)}: no checksum record (written without one): cannot be verified"] \
            if index == 0 else []
    names = sorted(meta["files"])
    problems = verify_files(path, {name: meta["files"][name] for name in names[index::count]})
    if ".metadata" not in meta["files"] and index == 0:
        problems.append(f"{path}: the checksum record lacks the DCP .metadata file")
    return problems


def find_resume_checkpoint(root: str, parallel=None) -> tuple[str | None, list[str]]:
    """The newest checkpoint under ``root`` that verifies (:func:`verify_checkpoint`), newest first, and the
    problems of each newer one rejected: (path or None, problems). With a distributed ``parallel`` it is a
    collective: the ranks split the files of each checkpoint between them (the checkpoint directory is shared, as
    DCP requires) and every rank gets the same answer."""
    distributed = parallel is not None and parallel.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    candidates = [list_checkpoints(root) if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(candidates, src=0)
    rejected: list[str] = []
    for path in reversed(candidates[0]):
        problems = verify_checkpoint(path, (rank, world))
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, problems)
            problems = [problem for part in gathered for problem in part]
        if not problems:
            return path, rejected
        rejected.extend(sorted(problems))
    return None, rejected


def _config_dict(model) -> dict:
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return {k: v for k, v in values.items() if k not in _CONFIG_KEYS_IGNORED}


def _check_same_model(path: str, meta: dict, model) -> None:
    """CheckpointError unless the checkpoint was saved from a model of this config holding no tensor this model
    lacks (a partial load would otherwise pass without a word)."""
    saved, live = meta.get("model_config"), _config_dict(model)
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k not in _CONFIG_KEYS_IGNORED}
        differing = sorted(k for k in set(saved) | set(live) if saved.get(k) != live.get(k))
        if differing:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {live.get(k)!r}" for k in differing)
            raise CheckpointError(f"{path}: saved from another model config ({detail}); resume with the model "
                                  "settings it was trained with, or start a new output_dir")
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - DCP raises many kinds; the message says which file
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable DCP metadata ({error})") from None
    # The model's own names, not the keys of ``state``: the distributed optimizer's views hold only this rank's share.
    ours = {f"model.{name}" for name, _ in model.named_parameters()}
    extra = sorted(key for key in stored if key.startswith("model.") and key not in ours)
    if extra:
        shown = ", ".join(k[len("model."):] for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"{path}: holds {len(extra)} model tensors this model lacks ({shown}); resume with "
                              "the model settings it was trained with")


def load_checkpoint(path: str, model, optimizer, parallel, *, load_optimizer: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (at any TP size) into the live model, masters and AdamW
    state (a collective). Returns the saved ``train`` object. Raises CheckpointError (naming the checkpoint) when it
    is incomplete, does not match the model (config or tensor names) or cannot be read."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"load_checkpoint: {path} is not a complete checkpoint (no .metadata)")
    meta = read_meta(path)
    state = _views(model, optimizer if load_optimizer else None, parallel, meta.get("include_frozen", True),
                   saving=False)
    _check_same_model(path, meta, model)
    if not load_optimizer:
        state.pop("optim")
    state["train"] = b""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not parallel.distributed)
        train_state = pickle.loads(state["train"])
    except Exception as error:  # noqa: BLE001 - DCP wraps rank failures in its own types; name the checkpoint
        raise CheckpointError(f"{path}: cannot be loaded ({type(error).__name__}: {error}); resume from an earlier "
                              "checkpoint or start a new output_dir") from error
    if hasattr(optimizer, "after_load"):
        # The distributed optimizer: the loaded shards gathered into the parameters, or, when only the weights were
        # loaded, its master shard taken from them.
        if load_optimizer:
            optimizer.after_load()
        else:
            optimizer.masters_from_params()
    elif optimizer is not None:
        optimizer.sync_params_from_masters()
    return train_state


def export_hf(model, optimizer, parallel, directory: str, *, dtype: torch.dtype | None = None) -> str | None:
    """Write the full (unsharded) model in the HF layout through the model's ``save_pretrained`` (a collective: the
    TP shards are gathered; rank 0 writes). Master weights are exported when they exist. Returns the directory on
    rank 0, None elsewhere."""
    masters = optimizer.master_params() if optimizer is not None else None
    full = full_state_dict(model, parallel.tp_group, source=masters, dtype=dtype)
    if parallel.is_main:
        with torch.device("meta"):
            plain = type(model)(model.config)
        plain.load_state_dict({name: full[name] for name in plain.state_dict()}, strict=True, assign=True)
        plain.save_pretrained(directory)
    parallel.barrier()
    return directory if parallel.is_main else None
