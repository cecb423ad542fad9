"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically, reshardable across TP
sizes, plus the export of the trained model in the HF layout.

Layout: ``<root>/step_00000100/`` holds the DCP files and ``train_meta.json``. A save goes to
``<root>/.tmp-step_00000100/`` and is renamed to its final name by rank 0 only after every rank has finished
writing, so a crash mid-save leaves the previous checkpoint as the latest complete one (the rename is atomic on a
POSIX file system). :func:`latest_checkpoint` only considers final names that hold both the DCP metadata and
``train_meta.json``.

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
import torch.distributed.checkpoint as dcp

from libra_model.parallel.tp_plan import full_state_dict

META_NAME = "train_meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
    picklable object equal on every rank. Returns the final directory. ``keep_last`` prunes older checkpoints."""
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
    if parallel.is_main:
        meta = {"step": step, "tp": parallel.tp, "dp": parallel.dp, "include_frozen": include_frozen}
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
    """The ``train_meta.json`` of a checkpoint directory."""
    with open(os.path.join(path, META_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(path: str, model, optimizer, parallel, *, load_optimizer: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (at any TP size) into the live model, masters and AdamW
    state (a collective). Returns the saved ``train`` object."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"load_checkpoint: {path} is not a complete checkpoint (no .metadata)")
    meta = read_meta(path)
    state = _views(model, optimizer if load_optimizer else None, parallel, meta.get("include_frozen", True),
                   saving=False)
    if not load_optimizer:
        state.pop("optim")
    state["train"] = b""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not parallel.distributed)
    if hasattr(optimizer, "after_load"):
        # The distributed optimizer: the loaded shards gathered into the parameters, or, when only the weights were
        # loaded, its master shard taken from them.
        if load_optimizer:
            optimizer.after_load()
        else:
            optimizer.masters_from_params()
    elif optimizer is not None:
        optimizer.sync_params_from_masters()
    return pickle.loads(state["train"])


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
