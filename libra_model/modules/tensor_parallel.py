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

Sequence parallelism (:class:`SequenceShard`, docs/parallel.md): the residual stream between the blocks holds only
this rank's 1/tp of the sorted rows (its share of the text rows, then its share of the vision rows, so every shard
keeps the text-then-vision order the routed operators need). The norms, residual adds and dropout run on the
shard; a block's entry all-gathers the full rows (backward: reduce-scatter) in place of "f", its exit
reduce-scatters the partial sums (backward: all-gather) in place of "g". The norm weights then see only their
shard's rows: their gradients are partial sums over TP (:func:`tp_rule` with ``sequence_parallel=True``).

The text embedding ``embed_tokens`` is replicated, not vocab-parallel: it is frozen in stage 1 and 262 MB in bf16 at
32000×4096, and replication keeps the embedding free of collectives. The text head ``lm_head`` is vocab-parallel
(rows split), feeding the fused loss's ``process_group``.
"""

from __future__ import annotations

import math
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
# The norms that run on a sequence shard under sequence parallelism (not the embedding's signal norm, which runs
# before the rows are split).
_SEQUENCE_NORMS = re.compile(r"(\.layers\.\d+\.(vision_)?(input|post_attention)_layernorm|(^|\.)model\.(vision_)?norm)"
                             r"\.weight$")
# Parameters inside these submodules sit inside an f…g region; each must have a rule above.
_INSIDE_REGION = re.compile(r"\.(self_attn|mlp)\.")


def tp_rule(name: str, sequence_parallel: bool = False) -> TPRule:
    """The :class:`TPRule` of the parameter called ``name`` (its full dotted name in the model). With
    ``sequence_parallel`` the norm weights of the residual stream (each layer's four, the final two) hold
    TP-partial gradients, since each rank normalises only its shard of the rows.

    Raises ValueError for a parameter inside an attention or MLP block that the table does not cover: such a
    parameter would silently be treated as replicated with an unreduced partial gradient."""
    if sequence_parallel and _SEQUENCE_NORMS.search(name):
        return _PARTIAL
    for pattern, rule in _COMPILED:
        if pattern.search(name):
            return rule
    if _INSIDE_REGION.search(name):
        raise ValueError(f"tp_rule: no tensor-parallel rule for parameter {name!r} inside a TP block; "
                         "add it to libra_model.modules.tensor_parallel.TP_RULES")
    return REPLICATED


# ---------------------------------------------------------------------------------------------- sequence parallelism
@dataclass(frozen=True)
class SequenceShard:
    """Which rows of a sorted [T, ...] tensor (``n_text`` text rows, then ``n_vision`` vision rows) TP rank ``rank``
    of ``size`` holds under sequence parallelism: the ``rank``-th of ``size`` chunks of ``ceil(n / size)`` rows of
    the text rows and likewise of the vision rows (the last chunks may be shorter or empty). Its local tensor is
    [local_text + local_vision, ...] with its text rows first. Collectives move ``size`` equal blocks of
    ``text_chunk + vision_chunk`` rows (the short chunks zero-padded)."""

    n_text: int
    n_vision: int
    size: int
    rank: int

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size or self.n_text < 0 or self.n_vision < 0:
            raise ValueError(f"SequenceShard: need n_text, n_vision >= 0 and 0 <= rank < size, got {self}")

    @property
    def text_chunk(self) -> int:
        """Rows of the text chunk of every rank before trimming (ceil(n_text / size))."""
        return math.ceil(self.n_text / self.size)

    @property
    def vision_chunk(self) -> int:
        """Rows of the vision chunk of every rank before trimming (ceil(n_vision / size))."""
        return math.ceil(self.n_vision / self.size)

    def text_range(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of ``rank``'s (default: this rank's) text rows among the text rows."""
        rank = self.rank if rank is None else rank
        start = min(rank * self.text_chunk, self.n_text)
        return start, min(start + self.text_chunk, self.n_text)

    def vision_range(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of ``rank``'s (default: this rank's) vision rows among the vision rows."""
        rank = self.rank if rank is None else rank
        start = min(rank * self.vision_chunk, self.n_vision)
        return start, min(start + self.vision_chunk, self.n_vision)

    @property
    def local_text(self) -> int:
        """Text rows of this rank's shard (the ``n_text`` the routed operators get on it)."""
        start, stop = self.text_range()
        return stop - start

    def split(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the full sorted ``full`` [T, ...] (a new tensor)."""
        t0, t1 = self.text_range()
        v0, v1 = self.vision_range()
        return torch.cat([full[t0:t1], full[self.n_text + v0:self.n_text + v1]])

    def _rows_in_blocks(self, device) -> torch.Tensor:
        """int64 [T]: for each full row (sorted order), its row in the ``size`` padded blocks of the collectives
        (built once per device: every collective of a forward uses the same shard)."""
        cache = self.__dict__.setdefault("_rows_cache", {})
        key = str(device)
        if key not in cache:
            cache[key] = self._build_rows_in_blocks().to(device)
        return cache[key]

    def _build_rows_in_blocks(self) -> torch.Tensor:
        block = self.text_chunk + self.vision_chunk
        rows = []
        for rank in range(self.size):
            t0, t1 = self.text_range(rank)
            v0, v1 = self.vision_range(rank)
            rows.append((torch.arange(t1 - t0) + rank * block, torch.arange(v1 - v0) + rank * block + self.text_chunk))
        text = torch.cat([r[0] for r in rows])
        vision = torch.cat([r[1] for r in rows])
        return torch.cat([text, vision])

    def _pad(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's block: the local rows at [0, local_text) and [text_chunk, text_chunk + local vision)."""
        block = local.new_zeros(self.text_chunk + self.vision_chunk, *local.shape[1:])
        n = self.local_text
        block[:n] = local[:n]
        block[self.text_chunk:self.text_chunk + local.shape[0] - n] = local[n:]
        return block

    def _unpad(self, block: torch.Tensor) -> torch.Tensor:
        v0, v1 = self.vision_range()
        return torch.cat([block[:self.local_text], block[self.text_chunk:self.text_chunk + v1 - v0]])


def _check_group(x: torch.Tensor, shard: SequenceShard, group) -> bool:
    """True when a collective must run; False on the meta device without a group (a shape-only trace, such as the
    memory planner's: meta tensors hold no data to exchange)."""
    if group is None:
        if x.device.type != "meta":
            raise ValueError("sequence parallelism: a process group is required outside the meta device")
        return False
    if dist.get_world_size(group) != shard.size:
        raise ValueError(f"sequence parallelism: the shard is for {shard.size} ranks, the group has "
                         f"{dist.get_world_size(group)}")
    return True


def _sp_all_gather(local: torch.Tensor, shard: SequenceShard, group, direction: str) -> torch.Tensor:
    block = shard.text_chunk + shard.vision_chunk
    gathered = local.new_empty(shard.size * block, *local.shape[1:])
    if _check_group(local, shard, group):
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, shard._pad(local).contiguous(), group=group)
        COLLECTIVES[("all_gather", direction)] += 1
    return gathered.index_select(0, shard._rows_in_blocks(local.device))


def _sp_reduce_scatter(full: torch.Tensor, shard: SequenceShard, group, direction: str) -> torch.Tensor:
    block = shard.text_chunk + shard.vision_chunk
    out = full.new_empty(block, *full.shape[1:])
    if _check_group(full, shard, group):
        blocks = full.new_zeros(shard.size * block, *full.shape[1:])
        blocks.index_copy_(0, shard._rows_in_blocks(full.device), full)
        if dist.get_backend(group) == "gloo":
            # gloo has no reduce-scatter: all-reduce the blocks and keep this rank's (same result, more traffic).
            dist.all_reduce(blocks, group=group)
            out = blocks[shard.rank * block:(shard.rank + 1) * block]
        else:
            dist.reduce_scatter_tensor(out, blocks, group=group)
        COLLECTIVES[("reduce_scatter", direction)] += 1
    return shard._unpad(out)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, group):
        ctx.shard, ctx.group = shard, group
        return shard.split(x)

    @staticmethod
    def backward(ctx, grad):
        return _sp_all_gather(grad, ctx.shard, ctx.group, "backward"), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, group, grad_is_partial):
        ctx.shard, ctx.group, ctx.grad_is_partial = shard, group, grad_is_partial
        return _sp_all_gather(x, shard, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _sp_reduce_scatter(grad, ctx.shard, ctx.group, "backward"), None, None, None
        return ctx.shard.split(grad), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, group):
        ctx.shard, ctx.group = shard, group
        return _sp_reduce_scatter(x, shard, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _sp_all_gather(grad, ctx.shard, ctx.group, "backward"), None, None


def scatter_to_sequence_shard(x: torch.Tensor, shard: SequenceShard, group) -> torch.Tensor:
    """Replicated full sorted rows [T, ...] -> this rank's shard; backward all-gathers the gradient (the rows of the
    other ranks' shards get their gradients there), so a replicated producer gets its whole gradient."""
    return _ScatterToSequence.apply(x, shard, group)


def gather_from_sequence_shard(x: torch.Tensor, shard: SequenceShard, group, *, grad_is_partial: bool = True
                               ) -> torch.Tensor:
    """This rank's shard -> the full sorted rows [T, ...] on every rank (all-gather). Backward: reduce-scatter of
    the gradient when each rank's is a partial sum (``grad_is_partial``, a block's TP region), else the rank's own
    rows of a gradient that is the same on every rank (the vocab-parallel loss, which reduces its input's gradient
    itself)."""
    return _GatherFromSequence.apply(x, shard, group, grad_is_partial)


def reduce_scatter_to_sequence_shard(x: torch.Tensor, shard: SequenceShard, group) -> torch.Tensor:
    """Partial sums of the full sorted rows [T, ...] -> this rank's shard of their sum (reduce-scatter); backward
    all-gathers the gradient."""
    return _ReduceScatterToSequence.apply(x, shard, group)


def enter_tp_region(x: torch.Tensor, group, shard: SequenceShard | None) -> torch.Tensor:
    """A block's entry: "f" on the replicated input, or with a sequence shard the all-gather of the full rows."""
    if shard is None:
        return copy_to_tp_region(x, group)
    return gather_from_sequence_shard(x, shard, group)


def exit_tp_region(x: torch.Tensor, group, shard: SequenceShard | None) -> torch.Tensor:
    """A block's exit: "g" on the partial sums, or with a sequence shard their reduce-scatter to the shard."""
    if shard is None:
        return reduce_from_tp_region(x, group)
    return reduce_scatter_to_sequence_shard(x, shard, group)
