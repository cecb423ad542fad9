"""Tensor parallelism as the model sees it: the two region boundaries of a block, and the sharding rule of every
parameter, keyed by its name.

"f" (:func:`copy_to_tp_region`) is the identity forward and a SUM all-reduce of the gradient backward; it sits on
the replicated input of a block. "g" (:func:`reduce_from_tp_region`) is a SUM all-reduce forward and the identity
backward; it sits on the block's output of partial sums. Both are the identity when ``group`` is None or has one
rank, so a model written with them runs unchanged without tensor parallelism. ``COLLECTIVES`` counts what they
issue (tests check the number of collectives per layer).

:data:`TP_RULES` is the model's sharding plan (see docs/parallel.md): every block is one "f" at its entry, TP-local
compute, one "g" at its exit. Inside a block:

* column-parallel weights (text q/k/v/gate/up, the expert ``weight_B`` under a column base, bridge ``weight_B``,
  and the vocab-parallel ``lm_head``) keep the rows [rank·out/tp, (rank+1)·out/tp) (whole heads for q/k/v);
* row-parallel weights (text o/down, the expert ``weight_A`` under a row base) keep the matching input columns;
* the replicated factors inside an f…g region (column-side ``weight_A``: expert q/k/v/gate/up and the four
  bridges; row-side ``weight_B``: expert o/down) receive TP-partial gradients, reduced once per step;
* everything else (norms, embeddings, the signal projector, the vision heads, the placeholder) is replicated
  outside any TP region: its gradient is identical on every TP rank and needs no TP reduction.

The text embedding ``embed_tokens`` is replicated, not vocab-parallel: it is frozen in stage 1 and 262 MB in bf16 at
32000×4096, and replication keeps the embedding free of collectives. The text head ``lm_head`` is vocab-parallel
(rows split), feeding the fused loss's ``process_group``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVES: Counter = Counter()  # (kind, "forward" | "backward" | "step") -> number of collectives issued


def tp_world_size(group) -> int:
    """Ranks in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    COLLECTIVES[("all_reduce", direction)] += 1
    return x


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group, "backward"), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """"f": identity forward, all-reduce (SUM over ``group``) of the gradient backward. Any shape and dtype."""
    if tp_world_size(group) == 1:
        return x
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """"g": all-reduce (SUM over ``group``) forward, identity backward. Any shape and dtype."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceFromTPRegion.apply(x, group)


@dataclass(frozen=True)
class TPRule:
    """How one parameter is placed over the TP group.

    ``shard_dim``: 0 = rows (column-parallel), 1 = columns (row-parallel), None = replicated. ``partial_grad``:
    replicated inside an f…g region, so each rank holds a partial sum of its gradient. ``heads``: for a
    column-parallel weight whose rows are attention heads, which head count must divide the TP size ("query" for
    the query heads, "kv" for the key/value heads), so every rank holds whole heads; None otherwise."""

    shard_dim: int | None
    partial_grad: bool = False
    heads: str | None = None


REPLICATED = TPRule(None)
_COLUMN = TPRule(0)
_ROW = TPRule(1)
_PARTIAL = TPRule(None, partial_grad=True)
_QUERY_HEADS = TPRule(0, heads="query")
_KV_HEADS = TPRule(0, heads="kv")

# (pattern on the full parameter name, rule); the first match wins. The names are those of the released checkpoints.
TP_RULES: tuple[tuple[str, TPRule], ...] = (
    (r"\.self_attn\.q_proj\.weight$", _QUERY_HEADS),
    (r"\.self_attn\.(k|v)_proj\.weight$", _KV_HEADS),
    (r"\.self_attn\.o_proj\.weight$", _ROW),
    (r"\.mlp\.(gate|up)_proj\.weight$", _COLUMN),
    (r"\.mlp\.down_proj\.weight$", _ROW),
    (r"\.self_attn\.vision_(q|k|v)_proj\.weight_A$", _PARTIAL),
    (r"\.self_attn\.vision_q_proj\.weight_B$", _QUERY_HEADS),
    (r"\.self_attn\.vision_(k|v)_proj\.weight_B$", _KV_HEADS),
    (r"\.self_attn\.vision_o_proj\.weight_A$", _ROW),
    (r"\.self_attn\.vision_o_proj\.weight_B$", _PARTIAL),
    (r"\.mlp\.vision_(gate|up)_proj\.weight_A$", _PARTIAL),
    (r"\.mlp\.vision_(gate|up)_proj\.weight_B$", _COLUMN),
    (r"\.mlp\.vision_down_proj\.weight_A$", _ROW),
    (r"\.mlp\.vision_down_proj\.weight_B$", _PARTIAL),
    (r"\.self_attn\.vision_(k|v)_bridge_on_(language|vision)\.weight_A$", _PARTIAL),
    (r"\.self_attn\.vision_(k|v)_bridge_on_(language|vision)\.weight_B$", _KV_HEADS),
    (r"(^|\.)lm_head\.weight$", _COLUMN),
)
_COMPILED = tuple((re.compile(pattern), rule) for pattern, rule in TP_RULES)
# Parameters inside these submodules sit inside an f…g region; each must have a rule above.
_INSIDE_REGION = re.compile(r"\.(self_attn|mlp)\.")


def tp_rule(name: str) -> TPRule:
    """The :class:`TPRule` of the parameter called ``name`` (its full dotted name in the model).

    Raises ValueError for a parameter inside an attention or MLP block that the table does not cover: such a
    parameter would silently be treated as replicated with an unreduced partial gradient."""
    for pattern, rule in _COMPILED:
        if pattern.search(name):
            return rule
    if _INSIDE_REGION.search(name):
        raise ValueError(f"tp_rule: no tensor-parallel rule for parameter {name!r} inside a TP block; "
                         "add it to libra_model.modules.tensor_parallel.TP_RULES")
    return REPLICATED
