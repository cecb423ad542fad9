"""The tensor-parallel plan applied to a built model: slice each parameter by the rule the model gives for its
name (``model.tensor_parallel_rule``, the table of ``libra_model.modules.tensor_parallel``), gather the full
tensors back, and describe the shards to ``torch.distributed.checkpoint``.

Each parameter gets ``p._tp_shard_dim`` (the sharded dim, or None when replicated) and ``p._tp_partial_grad`` (a
replicated factor inside an f…g region, whose TP-partial gradient ``grads.py`` reduces once per step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from libra_kernels.distributed import all_gather_flat
from libra_model.modules.tensor_parallel import REPLICATED, TPRule, tp_world_size


def _rule(model: nn.Module, name: str, sequence_parallel: bool = False) -> TPRule:
    """The model's rule for parameter ``name``; models without a plan replicate everything."""
    rule_of = getattr(model, "tensor_parallel_rule", None)
    if rule_of is None:
        return REPLICATED
    return rule_of(name, sequence_parallel=True) if sequence_parallel else rule_of(name)


def _check_divisible(name: str, param: torch.Tensor, rule: TPRule, tp: int, config) -> None:
    size = param.shape[rule.shard_dim]
    if size % tp:
        raise ValueError(f"shard_model_: {name} has {size} entries along dim {rule.shard_dim}, "
                         f"not divisible by the TP size {tp}")
    if config is not None and rule.heads is not None:
        heads = config.kv_heads if rule.heads == "kv" else config.num_attention_heads
        if heads % tp:
            raise ValueError(f"shard_model_: {name}: {heads} heads are not divisible by the TP size {tp} "
                             "(each rank must hold whole heads)")


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def shard_model_(model: nn.Module, tp_group, sequence_parallel: bool = False) -> nn.Module:
    """Slice the already-built full model's weights in place to this rank's TP shards (docs/parallel.md).

    Every rank must have built the same full weights (same seed or same checkpoint). Sharded parameters are
    replaced by new ``nn.Parameter`` objects holding a contiguous copy of the local slice (``requires_grad`` kept),
    so create optimizers after this call. Hands the group to the model (``model.set_tensor_parallel_group``: its
    attention and MLP blocks and its vocab-parallel text head) and sets the tags ``_tp_shard_dim`` /
    ``_tp_partial_grad`` on every parameter. ``sequence_parallel`` (TP > 1 only) makes the model keep a 1/tp shard
    of the rows between its blocks, and tags the norm weights that then see only their shard as TP-partial. With
    ``tp_group`` None or of size 1 only the tags are set. Returns ``model``.
    """
    tp = tp_world_size(tp_group)
    rank = _tp_rank(tp_group)
    config = getattr(model, "config", None)
    if tp > 1 and not hasattr(model, "set_tensor_parallel_group"):
        raise ValueError(f"shard_model_: {type(model).__name__} has no set_tensor_parallel_group method "
                         "(not a tensor-parallel-ready model)")
    for module_name, module in model.named_modules():
        for local_name, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{local_name}" if module_name else local_name
            rule = _rule(model, name, sequence_parallel and tp > 1)
            if rule.shard_dim is not None and tp > 1:
                _check_divisible(name, param, rule, tp, config)
                shard = param.detach().chunk(tp, dim=rule.shard_dim)[rank].clone(memory_format=torch.contiguous_format)
                new = nn.Parameter(shard, requires_grad=param.requires_grad)
                setattr(module, local_name, new)
                param = new
            param._tp_shard_dim = rule.shard_dim if tp > 1 else None
            param._tp_partial_grad = rule.partial_grad and tp > 1
    if hasattr(model, "set_tensor_parallel_group"):
        if sequence_parallel and tp > 1:
            model.set_tensor_parallel_group(tp_group, sequence_parallel=True)
        else:
            model.set_tensor_parallel_group(tp_group if tp > 1 else None)
    return model


def is_tp_sharded(param: torch.Tensor) -> bool:
    """True when ``param`` holds a TP shard (a slice of a larger full tensor)."""
    return getattr(param, "_tp_shard_dim", None) is not None


def is_tp_partial(param: torch.Tensor) -> bool:
    """True when ``param`` is replicated inside an f…g region (its gradient is a partial sum over TP ranks)."""
    return bool(getattr(param, "_tp_partial_grad", False))


def gather_tp_tensor(local: torch.Tensor, shard_dim: int | None, tp_group) -> torch.Tensor:
    """The full tensor from each rank's ``local`` shard along ``shard_dim`` (a collective over ``tp_group``; every
    rank gets the full tensor). Replicated tensors (``shard_dim`` None) and TP=1 return ``local`` itself."""
    tp = tp_world_size(tp_group)
    if shard_dim is None or tp == 1:
        return local
    moved = local.detach().movedim(shard_dim, 0).contiguous()
    full = torch.empty((tp * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    all_gather_flat(full, moved, tp_group)
    return full.movedim(0, shard_dim).contiguous()


def full_state_dict(model: nn.Module, tp_group, *, source: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a TP-sharded model (every rank gets it; a collective per sharded tensor).

    ``source`` (name -> local tensor) overrides the parameter values, e.g. with fp32 master weights; ``dtype``
    casts the result. Buffers are included as they are (they are replicated)."""
    out = {}
    source = source or {}
    for name, param in model.named_parameters():
        local = source.get(name, param).detach()
        full = gather_tp_tensor(local, getattr(param, "_tp_shard_dim", None), tp_group)
        out[name] = full.to(dtype) if dtype is not None else full.clone()
    for name, buffer in model.named_buffers():
        out[name] = buffer.detach().clone()
    return out


def local_shard(full: torch.Tensor, rule: TPRule, tp_group) -> torch.Tensor:
    """This TP rank's slice of the full tensor of a parameter placed by ``rule``."""
    tp = tp_world_size(tp_group)
    if rule.shard_dim is None or tp == 1:
        return full
    return full.chunk(tp, dim=rule.shard_dim)[_tp_rank(tp_group)]


def dcp_view(local: torch.Tensor, shard_dim: int | None, tp_mesh) -> torch.Tensor:
    """How ``local`` is written to a ``torch.distributed.checkpoint``: a DTensor sharded on the TP mesh when it is
    a shard, the plain tensor when it is replicated (DCP then keeps one copy), so the checkpoint holds full
    tensors and loads at any TP size."""
    if shard_dim is None or tp_mesh is None or tp_mesh.size() == 1:
        return local
    from torch.distributed.tensor import DTensor, Shard

    shape = list(local.shape)
    shape[shard_dim] *= tp_mesh.size()
    return DTensor.from_local(local, tp_mesh, [Shard(shard_dim)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())
