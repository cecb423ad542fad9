"""The tensor-parallel sharding table of PARALLEL.md §1(b), keyed by parameter name (LIBRA.md Appendix A), and
the functions that apply it to a built model, gather the full tensors back, and describe the shards to
``torch.distributed.checkpoint``.

Every block is one "f" at its entry, TP-local compute, one "g" at its exit (PARALLEL.md §1(c)). Inside a block:

* column-parallel weights (text q/k/v/gate/up, the expert ``weight_B`` under a column base, bridge ``weight_B``,
  and the vocab-parallel ``lm_head``) keep the rows [rank·out/tp, (rank+1)·out/tp) (whole heads for q/k/v);
* row-parallel weights (text o/down, the expert ``weight_A`` under a row base) keep the matching input columns;
* the replicated factors inside an f…g region (column-side ``weight_A``: expert q/k/v/gate/up and the four
  bridges; row-side ``weight_B``: expert o/down) receive TP-partial gradients and are tagged
  ``p._tp_partial_grad = True`` for the one deferred reduction per step (``grads.py``);
* everything else (norms, embeddings, the signal projector, the vision heads, the placeholder) is replicated
  outside any TP region: its gradient is identical on every TP rank and needs no TP reduction.

The text embedding ``embed_tokens`` is replicated, not vocab-parallel (PARALLEL.md §1(b), v1): it is frozen in
stage 1 and 262 MB in bf16 at 32000×4096, and replication keeps the embedding free of collectives. The text head
``lm_head`` is vocab-parallel (rows split), feeding the fused loss's ``process_group``.

Each parameter also gets ``p._tp_shard_dim`` (the sharded dim, or None when replicated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from libra_model.parallel.comm import all_gather_flat, tp_world_size


@dataclass(frozen=True)
class TPRule:
    """How one parameter is placed over the TP group: ``shard_dim`` (0 = rows/column-parallel, 1 = columns/
    row-parallel, None = replicated) and ``partial_grad`` (replicated inside an f…g region, so each rank holds a
    partial sum of its gradient)."""

    shard_dim: int | None
    partial_grad: bool = False


REPLICATED = TPRule(None)
_COLUMN = TPRule(0)
_ROW = TPRule(1)
_PARTIAL = TPRule(None, partial_grad=True)

# (pattern on the full parameter name, rule); the first match wins. Names follow LIBRA.md Appendix A.
TP_RULES: tuple[tuple[str, TPRule], ...] = (
    (r"\.self_attn\.(q|k|v)_proj\.weight$", _COLUMN),
    (r"\.self_attn\.o_proj\.weight$", _ROW),
    (r"\.mlp\.(gate|up)_proj\.weight$", _COLUMN),
    (r"\.mlp\.down_proj\.weight$", _ROW),
    (r"\.self_attn\.vision_(q|k|v)_proj\.weight_A$", _PARTIAL),
    (r"\.self_attn\.vision_(q|k|v)_proj\.weight_B$", _COLUMN),
    (r"\.self_attn\.vision_o_proj\.weight_A$", _ROW),
    (r"\.self_attn\.vision_o_proj\.weight_B$", _PARTIAL),
    (r"\.mlp\.vision_(gate|up)_proj\.weight_A$", _PARTIAL),
    (r"\.mlp\.vision_(gate|up)_proj\.weight_B$", _COLUMN),
    (r"\.mlp\.vision_down_proj\.weight_A$", _ROW),
    (r"\.mlp\.vision_down_proj\.weight_B$", _PARTIAL),
    (r"\.self_attn\.vision_(k|v)_bridge_on_(language|vision)\.weight_A$", _PARTIAL),
    (r"\.self_attn\.vision_(k|v)_bridge_on_(language|vision)\.weight_B$", _COLUMN),
    (r"(^|\.)lm_head\.weight$", _COLUMN),
)
_COMPILED = tuple((re.compile(pattern), rule) for pattern, rule in TP_RULES)
# Parameters inside these submodules sit inside an f…g region; each must have a rule above.
_INSIDE_REGION = re.compile(r"\.(self_attn|mlp)\.")
# Column-parallel weights whose rows are attention heads (the slice must hold whole heads).
_HEAD_ROWS = re.compile(r"\.self_attn\.((q|k|v)_proj\.weight|vision_(q|k|v)_proj\.weight_B"
                        r"|vision_(k|v)_bridge_on_\w+\.weight_B)$")


def tp_rule(name: str) -> TPRule:
    """The :class:`TPRule` of the parameter called ``name`` (its full dotted name in the model).

    Raises ValueError for a parameter inside an attention or MLP block that the table does not cover: such a
    parameter would silently be treated as replicated with an unreduced partial gradient."""
    for pattern, rule in _COMPILED:
        if pattern.search(name):
            return rule
    if _INSIDE_REGION.search(name):
        raise ValueError(f"tp_rule: no tensor-parallel rule for parameter {name!r} inside a TP block; "
                         "add it to libra_model.parallel.layout.TP_RULES")
    return REPLICATED


def _check_divisible(name: str, param: torch.Tensor, rule: TPRule, tp: int, config) -> None:
    size = param.shape[rule.shard_dim]
    if size % tp:
        raise ValueError(f"shard_model_: {name} has {size} entries along dim {rule.shard_dim}, "
                         f"not divisible by the TP size {tp}")
    if config is not None and _HEAD_ROWS.search(name):
        heads = config.kv_heads if re.search(r"(k_proj|v_proj|bridge)", name) else config.num_attention_heads
        if heads % tp:
            raise ValueError(f"shard_model_: {name}: {heads} heads are not divisible by the TP size {tp} "
                             "(each rank must hold whole heads)")


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def shard_model_(model: nn.Module, tp_group) -> nn.Module:
    """Slice the already-built full model's weights in place to this rank's TP shards (PARALLEL.md §1(b)).

    Every rank must have built the same full weights (same seed or same checkpoint). Sharded parameters are
    replaced by new ``nn.Parameter`` objects holding a contiguous copy of the local slice (``requires_grad`` kept),
    so create optimizers after this call. Sets ``tp_group`` on every module that has that attribute (the attention
    and MLP blocks), ``model.lm_head_tp_group``, and the tags ``_tp_shard_dim`` / ``_tp_partial_grad`` on every
    parameter. With ``tp_group`` None or of size 1 only the tags are set. Returns ``model``.
    """
    tp = tp_world_size(tp_group)
    rank = _tp_rank(tp_group)
    config = getattr(model, "config", None)
    blocks = [m for m in model.modules() if hasattr(m, "tp_group")]
    if tp > 1 and not blocks:
        raise ValueError("shard_model_: the model has no module with a tp_group attribute (no TP-ready blocks)")
    for module_name, module in model.named_modules():
        for local_name, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{local_name}" if module_name else local_name
            rule = tp_rule(name)
            if rule.shard_dim is not None and tp > 1:
                _check_divisible(name, param, rule, tp, config)
                shard = param.detach().chunk(tp, dim=rule.shard_dim)[rank].clone(memory_format=torch.contiguous_format)
                new = nn.Parameter(shard, requires_grad=param.requires_grad)
                setattr(module, local_name, new)
                param = new
            param._tp_shard_dim = rule.shard_dim if tp > 1 else None
            param._tp_partial_grad = rule.partial_grad and tp > 1
    group = tp_group if tp > 1 else None
    for block in blocks:
        block.tp_group = group
    model.lm_head_tp_group = group
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


def local_shard(full: torch.Tensor, name: str, tp_group) -> torch.Tensor:
    """This TP rank's slice of the full tensor of parameter ``name`` (by :func:`tp_rule`)."""
    rule = tp_rule(name)
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
