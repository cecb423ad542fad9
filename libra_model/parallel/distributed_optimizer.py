"""The distributed optimizer (ZeRO-1 over the data-parallel group, Megatron style, and optionally ZeRO-2;
docs/parallel.md).

Every DP rank keeps the full float32 gradient buffers (as :class:`~libra_model.optim.MasterAdamW` does) but only
1/dp of the optimizer state: the float32 master weights and the two AdamW moments of its shard. With
``shard_gradients`` (ZeRO-2) it keeps only its 1/dp shard of the gradients too (see "Sharded gradients" below).
Per step:

1. Gradients of every micro-batch are added into the flat buffers by post-accumulate hooks. The buffers are cut into
   buckets of whole parameters (in reverse registration order, roughly the order the backward completes them); in
   the last micro-batch's backward a bucket is reduce-scattered over DP asynchronously as soon as all its
   parameters have their gradient, so the communication overlaps the rest of the backward. Buckets are launched
   strictly in bucket order on every rank (a bucket waits for the ones before it), so the collectives match across
   ranks even when a rank's batch leaves some parameter without a gradient.
2. :meth:`reduce` waits for the buckets (launching any left), then sums the shard of the TP-partial gradients over
   TP (one all-reduce): reduce-scatter over DP followed by the all-reduce of a 1/dp shard over TP is the DP×TP sum.
3. The gradient norm is the sum of squares of each rank's shard (TP-sharded parameters on every TP rank, replicated
   ones on TP rank 0 only) all-reduced over DP×TP; clipping scales the shards.
4. AdamW (torch's, on views of the flat shard, so the arithmetic per element is exactly MasterAdamW's; the same
   weight-decay rule) updates the shard; the updated values are all-gathered over DP into flat parameter buffers
   that the model's parameters are views of (one all-gather per bucket, all in flight together).

Bucket b of a buffer spans ``padded_b`` elements (its parameters' sizes summed, rounded up to a multiple of dp);
DP rank r owns its elements [r·padded_b/dp, (r+1)·padded_b/dp). A parameter may be split between ranks; its part
on a rank is a "segment". Checkpoints (:meth:`dcp_state`) describe every segment in the coordinates of the full,
unsharded parameter (a flat range of a row-major tensor is a few boxes), so a checkpoint loads at any DP and TP
size, and into the plain MasterAdamW.

Sharded gradients (``shard_gradients=True``, ZeRO-2): no full float32 gradient buffer exists. In EVERY micro-batch's
backward a bucket's gradients are added into a transient full-bucket buffer in the reduce dtype (allocated when the
bucket gets its first gradient of the micro-batch), the bucket is reduce-scattered over DP as soon as all its
parameters have their gradient (buckets in bucket order on every rank, as above: a parameter without a gradient
leaves zeros in its part) and, once the collective has finished, the rank's part is added into its float32 gradient
shard and the transient buffer is freed. At most :data:`BUCKETS_IN_FLIGHT` reductions are outstanding (a launch
first waits for the oldest), so the transient memory is a few buckets: those in flight and those filled but waiting
for an earlier bucket (the vector parameters fill the last buckets, :func:`bucket_layout`, so that a layer's norms do
not hold its blocks back). After the last micro-batch the step goes on
exactly as with ZeRO-1 (TP all-reduce of the partial shard, norm, clipping, AdamW, all-gather). The cost: one
reduce-scatter per bucket per micro-batch instead of per step.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from libra_model.modules.tensor_parallel import COLLECTIVES, tp_world_size
from libra_model.optim import ADAMW_BETAS, ADAMW_EPS, no_weight_decay
from libra_model.parallel.grads import clip_coefficient
from libra_model.parallel.tp_plan import is_tp_partial, is_tp_sharded

# Elements per bucket: large enough that a collective is bandwidth bound, small enough that the first buckets are
# reduced while most of the backward is still running (the planner, libra_model.memory, uses the same numbers).
DEFAULT_BUCKET_ELEMENTS = 1 << 25
# Sharded gradients: bucket reductions outstanding at once.
BUCKETS_IN_FLIGHT = 2
# Sharded gradients: buckets holding gradients while not yet launched. A bucket waits until every parameter in it, and
# in every bucket before it, has its gradient, and the projections of one attention or MLP block complete together at
# the block's end (a block of the 11B model spans two to three buckets at the default size). An estimate, not a
# guarantee: the tests measure the peak against it.
BUCKETS_FILLING = 3
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class _Bucket:
    """Contiguous parameters of one buffer ("partial" or "other") reduced and gathered together."""

    group: str
    start: int  # first element in the group's full buffer
    padded: int = 0  # elements in the buffer, a multiple of dp
    shard: int = 0  # padded / dp: the elements each rank owns
    shard_start: int = 0  # first element of this rank's part in the group's shard buffers
    names: list[str] = field(default_factory=list)
    pending: int = 0  # parameters still without their gradient of the micro-batch being reduced
    handle: object = None
    staging: tuple | None = None  # (shard, bucket) in the reduce dtype when the reduction is not in float32
    grad: torch.Tensor | None = None  # sharded gradients: the transient full-bucket gradient (reduce dtype)
    launched: bool = False  # sharded gradients: reduced in the current micro-batch already


@dataclass
class _Segment:
    """This rank's part of one parameter: flat elements [lo, hi) of the (TP-local) parameter, stored at
    [shard_lo, shard_lo + hi - lo) of its group's shard buffers."""

    name: str
    group: str
    lo: int
    hi: int
    shard_lo: int


def flat_range_boxes(lo: int, hi: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The flat elements [lo, hi) of a row-major tensor of ``shape`` as boxes (offsets, sizes), in flat order; each
    box is itself a contiguous run of the flat range (at most 2·ndim - 1 boxes)."""
    if lo >= hi:
        return []
    if len(shape) == 0:
        return [((), ())]
    if len(shape) == 1:
        return [((lo,), (hi - lo,))]
    inner = math.prod(shape[1:])
    row0, col0 = divmod(lo, inner)
    row1, col1 = divmod(hi, inner)

    def in_row(row, a, b):
        return [((row, *off), (1, *size)) for off, size in flat_range_boxes(a, b, shape[1:])]

    if row0 == row1:
        return in_row(row0, col0, col1)
    boxes = []
    if col0:
        boxes += in_row(row0, col0, inner)
        row0 += 1
    if row1 > row0:
        boxes.append(((row0, *([0] * (len(shape) - 1))), (row1 - row0, *shape[1:])))
    if col1:
        boxes += in_row(row1, 0, col1)
    return boxes


def bucket_layout(params: list[tuple[bool, int, int]], dp: int, bucket_elements: int, shard_gradients: bool
                  ) -> list[tuple[bool, list[int], int]]:
    """The gradient buckets, in launch order, as (TP-partial?, indices into ``params``, padded elements), from
    (TP-partial?, local elements, ndim) of the trainable parameters in registration order: whole parameters in
    reverse registration order (roughly the order the backward completes them), the two kinds of gradient in
    separate buckets, a bucket closed once it holds ``bucket_elements``, each padded to a multiple of ``dp``.

    With sharded gradients the vector parameters (norm weights, biases: ndim <= 1) come last: a decoder layer
    registers its norms after its attention and MLP, so in reverse order they would open the layer's first bucket
    while their gradients arrive at the end of each block, holding every completed bucket of the block back (and its
    transient buffer alive); they are a tiny part of the model."""
    order = list(reversed(range(len(params))))
    if shard_gradients:
        order = [i for i in order if params[i][2] > 1] + [i for i in order if params[i][2] <= 1]
    buckets, open_bucket, filled = [], {True: [], False: []}, {True: 0, False: 0}

    def close(partial):
        if open_bucket[partial]:
            buckets.append((partial, open_bucket[partial], -(-filled[partial] // dp) * dp))
        open_bucket[partial], filled[partial] = [], 0

    for i in order:
        partial = params[i][0]
        open_bucket[partial].append(i)
        filled[partial] += params[i][1]
        if filled[partial] >= bucket_elements:
            close(partial)
    close(True)
    close(False)
    return buckets


def transient_grad_bytes(buckets: list[int], dp: int, itemsize: int) -> int:
    """Sharded gradients: the bound on the transient bucket buffers, in bytes, for buckets of these padded sizes
    reduced in the dtype of ``itemsize`` bytes: the reductions in flight (at most :data:`BUCKETS_IN_FLIGHT` full
    buckets and their output shards) and :data:`BUCKETS_FILLING` buckets being filled, counted as the largest
    buckets (at dp = 1 a bucket is added into the shard as it completes: only the ones being filled)."""
    largest = sorted(buckets, reverse=True)
    if dp == 1:
        return sum(largest[:BUCKETS_FILLING]) * itemsize
    in_flight = sum(largest[:BUCKETS_IN_FLIGHT]) // dp
    return (sum(largest[:BUCKETS_IN_FLIGHT + BUCKETS_FILLING]) + in_flight) * itemsize


def _reduce_scatter(output: torch.Tensor, x: torch.Tensor, group, async_op: bool):
    return dist.reduce_scatter_tensor(output, x, group=group, async_op=async_op)


def _all_gather(output: torch.Tensor, x: torch.Tensor, group, async_op: bool):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, x, group=group, async_op=async_op)


class DistributedMasterAdamW:
    """AdamW with float32 masters and moments sharded over the DP group (ZeRO-1; with ``shard_gradients`` the
    gradients too, ZeRO-2); the interface of :class:`~libra_model.optim.MasterAdamW`: :meth:`start_micro_batch`
    before and :meth:`finish_micro_batch` after every micro-batch's backward, then ``reduce`` → ``clip_`` → ``step``
    → ``zero_grad``.

    Args:
        model: the (already TP-sharded) model; its trainable parameters all have one dtype. Their storage is moved
            into flat buffers (``param.data`` becomes a view), so build this before anything keeps ``param.data``.
        parallel: the ``ParallelState`` (its dp/tp groups and ranks).
        lr, betas, eps, weight_decay, master_dtype, initial_masters: as for ``MasterAdamW``.
        bucket_elements: target elements per bucket (a bucket holds whole parameters, so it may be larger).
        grad_reduce_dtype: "fp32" (default) or "bf16": the dtype the gradients travel in over DP (the buffers and
            the shards stay float32; bf16 halves the traffic and rounds each rank's contribution).
        shard_gradients: keep only this rank's 1/dp shard of the float32 gradients (ZeRO-2): every micro-batch's
            gradients are reduce-scattered bucket by bucket during its backward through transient bucket buffers
            (module docstring). Off: the full gradient buffers, reduced once per step (ZeRO-1).
    """

    def __init__(self, model: nn.Module, parallel, *, lr: float = 1e-4, betas: tuple[float, float] = ADAMW_BETAS,
                 eps: float = ADAMW_EPS, weight_decay: float = 0.01, master_dtype: torch.dtype = torch.float32,
                 initial_masters: dict[str, torch.Tensor] | None = None,
                 bucket_elements: int = DEFAULT_BUCKET_ELEMENTS, grad_reduce_dtype: str = "fp32",
                 shard_gradients: bool = False):
        if grad_reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"DistributedMasterAdamW: grad_reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, "
                             f"got {grad_reduce_dtype!r}")
        if isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) or bucket_elements <= 0:
            raise ValueError(f"DistributedMasterAdamW: bucket_elements must be a positive int, got {bucket_elements!r}")
        if not isinstance(shard_gradients, bool):
            raise ValueError(f"DistributedMasterAdamW: shard_gradients must be True or False, got {shard_gradients!r}")
        ordered = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not ordered:
            raise ValueError("DistributedMasterAdamW: the model has no trainable parameter")
        dtypes = {p.dtype for _, p in ordered}
        if len(dtypes) != 1:
            raise ValueError(f"DistributedMasterAdamW: trainable parameters must share one dtype, got {dtypes}")
        self.parallel = parallel
        self.dp, self.dp_rank = tp_world_size(parallel.dp_group), parallel.dp_rank
        self.tp, self.tp_rank = tp_world_size(parallel.tp_group), parallel.tp_rank
        # "fp32" means the buffers' own dtype (float64 in parity tests): no cast at all.
        self.reduce_dtype = master_dtype if grad_reduce_dtype == "fp32" else REDUCE_DTYPES[grad_reduce_dtype]
        self.master_dtype = master_dtype
        self.shard_gradients = shard_gradients
        self.names = sorted(n for n, _ in ordered)
        self.params = dict(ordered)
        device = ordered[0][1].device
        param_dtype = ordered[0][1].dtype

        # Buckets (bucket_layout); each holds parameters of one group only, laid out in its group's buffers.
        self.buckets: list[_Bucket] = []
        sizes = {"partial": 0, "other": 0}  # elements of each full buffer
        shard_sizes = {"partial": 0, "other": 0}
        offsets: dict[str, tuple[str, int]] = {}  # name -> (group, first element in the group's buffer)
        entries = [(is_tp_partial(p), p.numel(), p.dim()) for _, p in ordered]
        for partial, indices, padded in bucket_layout(entries, self.dp, bucket_elements, shard_gradients):
            group = "partial" if partial else "other"
            bucket = _Bucket(group=group, start=sizes[group], padded=padded, shard=padded // self.dp,
                             shard_start=shard_sizes[group])
            position = bucket.start
            for i in indices:
                name, param = ordered[i]
                offsets[name] = (group, position)
                position += param.numel()
                bucket.names.append(name)
            sizes[group] += padded
            shard_sizes[group] += bucket.shard
            self.buckets.append(bucket)

        self._sizes = dict(sizes)
        # Sharded gradients: no full buffer (each bucket's transient buffer lives only while it is reduced).
        self.grad_buffers = {} if shard_gradients else {
            g: torch.zeros(sizes[g], dtype=master_dtype, device=device) for g in sizes}
        self.param_buffers = {g: torch.zeros(sizes[g], dtype=param_dtype, device=device) for g in sizes}
        self.grad_shards = {g: torch.zeros(shard_sizes[g], dtype=master_dtype, device=device) for g in sizes}
        self.master_shards = {g: torch.zeros(shard_sizes[g], dtype=master_dtype, device=device) for g in sizes}
        self.exp_avg = {g: torch.zeros(shard_sizes[g], dtype=master_dtype, device=device) for g in sizes}
        self.exp_avg_sq = {g: torch.zeros(shard_sizes[g], dtype=master_dtype, device=device) for g in sizes}
        self.main_grads: dict[str, torch.Tensor] = {}  # name -> its full gradient (ZeRO-1 only)
        self._bucket_of: dict[str, _Bucket] = {}
        self._offsets = offsets
        self.segments: list[_Segment] = []
        initial_masters = initial_masters or {}
        for bucket in self.buckets:
            own_lo = bucket.start + self.dp_rank * bucket.shard
            own_hi = own_lo + bucket.shard
            for name in bucket.names:
                param, (group, start) = self.params[name], offsets[name]
                end = start + param.numel()
                self._bucket_of[name] = bucket
                if not shard_gradients:
                    self.main_grads[name] = self.grad_buffers[group][start:end].view(param.shape)
                start_value = initial_masters.get(name, param).detach()
                if start_value.shape != param.shape:
                    raise ValueError(f"DistributedMasterAdamW: initial_masters[{name!r}] has shape "
                                     f"{tuple(start_value.shape)}, the parameter {tuple(param.shape)}")
                view = self.param_buffers[group][start:end].view(param.shape)
                view.copy_(param.detach())
                param.data = view
                lo, hi = max(start, own_lo), min(end, own_hi)
                if lo < hi:
                    segment = _Segment(name, group, lo - start, hi - start, bucket.shard_start + lo - own_lo)
                    self.segments.append(segment)
                    self._shard_view(self.master_shards, segment).copy_(
                        start_value.reshape(-1)[segment.lo:segment.hi].to(master_dtype))
                param.register_post_accumulate_grad_hook(self._accumulate_hook(name))
        self._last_micro_batch = False  # ZeRO-1: the step's last micro-batch is running
        self._in_micro_batch = False  # sharded gradients: between start_micro_batch and finish_micro_batch
        self._in_flight: collections.deque[_Bucket] = collections.deque()  # sharded gradients, oldest first
        self._next_launch = 0

        # torch's AdamW over views of the shards (leaf Parameters sharing the shard storage), state created eagerly
        # as views of the flat moment shards, so a checkpoint loads into it in place.
        self._seg_params = [nn.Parameter(self._shard_view(self.master_shards, s), requires_grad=False)
                            for s in self.segments]
        decay = [p for p, s in zip(self._seg_params, self.segments) if not no_weight_decay(s.name, self.params[s.name])]
        no_decay = [p for p, s in zip(self._seg_params, self.segments) if no_weight_decay(s.name, self.params[s.name])]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        # A rank may own no segment at all (more DP ranks than elements): it still takes part in every collective.
        self.optimizer = torch.optim.AdamW(groups or [{"params": [torch.zeros(0, requires_grad=True)]}], lr=lr,
                                           betas=betas, eps=eps, foreach=False)
        self.step_count = torch.zeros((), dtype=torch.float32)
        for p, s in zip(self._seg_params, self.segments):
            self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                       "exp_avg": self._shard_view(self.exp_avg, s),
                                       "exp_avg_sq": self._shard_view(self.exp_avg_sq, s)}

    @staticmethod
    def _shard_view(shards: dict[str, torch.Tensor], segment: _Segment) -> torch.Tensor:
        return shards[segment.group][segment.shard_lo:segment.shard_lo + segment.hi - segment.lo]

    def _own(self, bucket: _Bucket, shards: dict[str, torch.Tensor]) -> torch.Tensor:
        return shards[bucket.group][bucket.shard_start:bucket.shard_start + bucket.shard]

    def _full(self, bucket: _Bucket, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return buffers[bucket.group][bucket.start:bucket.start + bucket.padded]

    # ------------------------------------------------------------------------------------------- reduction
    def _accumulate_hook(self, name: str):
        if self.shard_gradients:
            return self._transient_hook(name)
        main, bucket = self.main_grads[name], self._bucket_of[name]

        def hook(param: torch.Tensor) -> None:
            main.add_(param.grad)
            param.grad = None
            if self._last_micro_batch:
                bucket.pending -= 1
                if bucket.pending == 0:
                    self._launch_ready()

        return hook

    def _transient_hook(self, name: str):
        """Sharded gradients: the hook that adds ``name``'s gradient into its bucket's transient buffer."""
        bucket, (_, start) = self._bucket_of[name], self._offsets[name]
        lo, shape = start - bucket.start, self.params[name].shape
        hi = lo + self.params[name].numel()

        def hook(param: torch.Tensor) -> None:
            if not self._in_micro_batch:
                raise RuntimeError(f"DistributedMasterAdamW(shard_gradients=True): gradient of {name} outside a "
                                   "micro-batch; call start_micro_batch(last) before every backward and "
                                   "finish_micro_batch() after it (train_step does)")
            if bucket.launched:
                raise RuntimeError(f"DistributedMasterAdamW: a second gradient of {name} in one backward, after its "
                                   "bucket was reduced (its hook fired twice: reentrant recomputation, or a "
                                   "backward that was not announced with start_micro_batch)")
            if bucket.grad is None:
                bucket.grad = torch.zeros(bucket.padded, dtype=self.reduce_dtype, device=param.grad.device)
            bucket.grad[lo:hi].view(shape).add_(param.grad)
            param.grad = None
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()

        return hook

    def start_micro_batch(self, last: bool) -> None:
        """Call before each micro-batch's backward (``last``: the step's last one). ZeRO-1 reduce-scatters each bucket
        as soon as it is complete in the last micro-batch's backward; with sharded gradients every micro-batch's
        backward does."""
        if self.shard_gradients:
            self.finish_micro_batch()  # a micro-batch left open (its backward never finished) is reduced first
            self._in_micro_batch = True
        elif not last:
            return
        self._last_micro_batch = last
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.pending = len(bucket.names)
            bucket.launched = False

    def finish_micro_batch(self) -> None:
        """Call after each micro-batch's backward. With sharded gradients: the buckets not yet reduced (some parameter
        got no gradient on this rank) are launched in order and every outstanding reduction is waited for and added
        into the shard, so no transient buffer outlives the micro-batch; ZeRO-1: nothing (``reduce`` finishes)."""
        if not (self.shard_gradients and self._in_micro_batch):
            return
        for bucket in self.buckets[self._next_launch:]:
            self._launch(bucket)
        self._next_launch = len(self.buckets)
        while self._in_flight:
            self._complete(self._in_flight.popleft())
        self._in_micro_batch = False

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        if self.shard_gradients:
            self._launch_transient(bucket)
            return
        full, own = self._full(bucket, self.grad_buffers), self._own(bucket, self.grad_shards)
        if self.dp == 1:
            own.copy_(full)
            return
        if self.reduce_dtype != self.master_dtype:
            # Both the cast input and the output are kept on the bucket until the collective has finished.
            bucket.staging = (torch.empty(bucket.shard, dtype=self.reduce_dtype, device=own.device),
                              full.to(self.reduce_dtype))
            bucket.handle = _reduce_scatter(*bucket.staging, self.parallel.dp_group, True)
        else:
            bucket.handle = _reduce_scatter(own, full, self.parallel.dp_group, True)
        COLLECTIVES[("grad_reduce_scatter_dp", "step")] += 1

    def _launch_transient(self, bucket: _Bucket) -> None:
        """Sharded gradients: reduce-scatter the bucket's transient buffer (zeros when no parameter of it got a
        gradient on this rank), after waiting for the oldest reduction when BUCKETS_IN_FLIGHT are outstanding."""
        own = self._own(bucket, self.grad_shards)
        grad = bucket.grad
        if grad is None:
            grad = torch.zeros(bucket.padded, dtype=self.reduce_dtype, device=own.device)
        bucket.grad, bucket.launched = None, True
        if self.dp == 1:
            own.add_(grad)
            return
        while len(self._in_flight) >= BUCKETS_IN_FLIGHT:
            self._complete(self._in_flight.popleft())
        bucket.staging = (torch.empty(bucket.shard, dtype=self.reduce_dtype, device=own.device), grad)
        bucket.handle = _reduce_scatter(*bucket.staging, self.parallel.dp_group, True)
        COLLECTIVES[("grad_reduce_scatter_dp", "step")] += 1
        self._in_flight.append(bucket)

    def _complete(self, bucket: _Bucket) -> None:
        """Sharded gradients: wait for a bucket's reduction, add its part into the shard, free its buffers."""
        bucket.handle.wait()
        self._own(bucket, self.grad_shards).add_(bucket.staging[0])
        bucket.handle = bucket.staging = None

    def reduce(self, parallel=None) -> None:
        """Finish the step's gradient reduction: every bucket's shard summed over DP (launching the buckets not yet
        launched, in order), the TP-partial shard summed over TP. ``parallel`` is accepted for the interface of
        ``MasterAdamW`` and must be the state given at construction."""
        if self.shard_gradients:
            self.finish_micro_batch()  # each micro-batch was reduced in its own backward
        else:
            if not self._last_micro_batch:
                self.start_micro_batch(last=True)  # no backward announced its last micro-batch: reduce everything
            for bucket in self.buckets[self._next_launch:]:
                self._launch(bucket)
            self._next_launch = len(self.buckets)
            for bucket in self.buckets:
                if bucket.handle is not None:
                    bucket.handle.wait()
                    bucket.handle = None
                if bucket.staging is not None:
                    self._own(bucket, self.grad_shards).copy_(bucket.staging[0])
                    bucket.staging = None
        self._last_micro_batch = False
        if self.tp > 1 and self.grad_shards["partial"].numel():
            dist.all_reduce(self.grad_shards["partial"], group=self.parallel.tp_group)
            COLLECTIVES[("grad_all_reduce_tp", "step")] += 1

    def grad_norm(self, parallel=None) -> torch.Tensor:
        """The full model's gradient L2 norm (equal on every rank); call after :meth:`reduce`. Each element is
        counted once: shards are disjoint over DP, replicated parameters are counted on TP rank 0 only."""
        dtype = torch.promote_types(self.master_dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=self.grad_shards["other"].device)
        for segment in self.segments:
            if self.tp_rank == 0 or is_tp_sharded(self.params[segment.name]):
                total += self._shard_view(self.grad_shards, segment).to(dtype).pow(2).sum()
        if self.dp * self.tp > 1:
            dist.all_reduce(total, group=self.parallel.world_group)
            COLLECTIVES[("grad_norm_all_reduce", "step")] += 1
        return total.sqrt()

    def clip_(self, parallel=None, max_norm: float | None = None) -> torch.Tensor:
        """The global gradient norm (returned, before clipping); the shards are scaled to at most ``max_norm``
        (None: no clipping)."""
        norm = self.grad_norm()
        if max_norm is not None:
            coefficient = clip_coefficient(norm, max_norm).to(self.master_dtype)
            for shard in self.grad_shards.values():
                shard.mul_(coefficient)
        return norm

    def zero_grad(self) -> None:
        """Zero the gradient buffers and shards (call after :meth:`step`)."""
        for buffers in (self.grad_buffers, self.grad_shards):
            for buffer in buffers.values():
                buffer.zero_()

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW at ``lr`` on this rank's shard, then the updated parameters all-gathered over DP."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, s in zip(self._seg_params, self.segments):
            p.grad = self._shard_view(self.grad_shards, s)
        self.optimizer.step()
        for p in self._seg_params:
            p.grad = None
        self.step_count += 1
        self.sync_params_from_masters()

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """All-gather the master shards over DP into the model's parameters (one all-gather per bucket, all in
        flight together; a collective)."""
        handles = []
        for bucket in self.buckets:
            own = self._own(bucket, self.master_shards)
            full = self._full(bucket, self.param_buffers)
            if self.dp == 1:
                full.copy_(own)
                continue
            handles.append(_all_gather(full, own.to(full.dtype, copy=True), self.parallel.dp_group, True))
            COLLECTIVES[("param_all_gather_dp", "step")] += 1
        for handle in handles:
            handle.wait()

    def transient_grad_bytes(self) -> int:
        """Sharded gradients: the planned bound on the transient bucket buffers in bytes
        (:func:`transient_grad_bytes`: BUCKETS_IN_FLIGHT reductions with their output shards and
        BUCKETS_FILLING buckets being filled, counted as the largest buckets). A bucket completed while an earlier
        one still waits for a gradient is held until its turn, so a parameter whose gradient comes late in the
        backward (or never, on this rank) holds more. 0 without sharded gradients."""
        if not self.shard_gradients:
            return 0
        itemsize = torch.empty((), dtype=self.reduce_dtype).element_size()
        return transient_grad_bytes([bucket.padded for bucket in self.buckets], self.dp, itemsize)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank allocates for training state: "weights" (the flat trainable parameter buffers),
        "grads" (the float32 gradient buffers (ZeRO-1 only) and the rank's shard, plus with sharded gradients the
        bound on the transient bucket buffers, :meth:`transient_grad_bytes`), "optimizer" (master shard and both
        moments)."""
        size = lambda buffers: sum(t.numel() * t.element_size() for t in buffers.values())  # noqa: E731
        grads = size(self.grad_buffers) + size(self.grad_shards) + self.transient_grad_bytes()
        return {"weights": size(self.param_buffers), "grads": grads,
                "optimizer": size(self.master_shards) + size(self.exp_avg) + size(self.exp_avg_sq)}

    # ------------------------------------------------------------------------------------------ checkpoint
    @torch.no_grad()
    def _gather(self, shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """name -> the full (TP-local) tensor of ``shards`` (masters or a moment), gathered over DP."""
        full = {g: torch.zeros(n, dtype=self.master_dtype, device=self.master_shards[g].device)
                for g, n in self._sizes.items()}
        for bucket in self.buckets:
            own, out = self._own(bucket, shards), self._full(bucket, full)
            if self.dp == 1:
                out.copy_(own)
            else:
                _all_gather(out, own.clone(), self.parallel.dp_group, False)
        out = {}
        for name in self.names:
            group, start = self._offsets[name]
            param = self.params[name]
            out[name] = full[group][start:start + param.numel()].view(param.shape)
        return out

    def master_params(self) -> dict[str, torch.Tensor]:
        """name -> the full (TP-local) master tensor, gathered over DP (a collective that allocates a full copy of
        the masters: for exports and checks, not for the step)."""
        return self._gather(self.master_shards)

    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {"exp_avg", "exp_avg_sq", "step"}, gathered over DP like :meth:`master_params` (copies, not
        the live state)."""
        exp_avg, exp_avg_sq = self._gather(self.exp_avg), self._gather(self.exp_avg_sq)
        return {n: {"exp_avg": exp_avg[n], "exp_avg_sq": exp_avg_sq[n], "step": self.step_count.clone()}
                for n in self.names}

    def dcp_state(self, *, saving: bool) -> tuple[dict, dict]:
        """(model entries, optim entries) for ``torch.distributed.checkpoint``: per parameter name, the masters and
        the moments of this rank's segment as ``ShardedTensor`` boxes in full-tensor coordinates (views of the live
        shards, so a load writes in place), and the AdamW step count. When ``saving``, replicated parameters are
        written by TP rank 0 only (the other TP ranks hold the same values)."""
        segment_of = {segment.name: segment for segment in self.segments}  # a parameter lies in one bucket
        model_state, optim_state = {}, {}
        for name in self.names:
            entry = {"step": self.step_count}
            segment = segment_of.get(name)
            if segment is not None and not (saving and self.tp_rank != 0 and not is_tp_sharded(self.params[name])):
                model_state[name] = self._sharded(segment, self.master_shards)
                entry["exp_avg"] = self._sharded(segment, self.exp_avg)
                entry["exp_avg_sq"] = self._sharded(segment, self.exp_avg_sq)
            optim_state[name] = entry
        return model_state, optim_state

    def _sharded(self, segment: _Segment, shards: dict[str, torch.Tensor]):
        """The ``ShardedTensor`` of one parameter: this rank's boxes as local shards, and the boxes of every DP rank
        (and of every TP rank for a TP-sharded parameter, of this TP rank's column for a replicated one) as its
        global metadata, which the bucket layout, equal on all ranks, gives without communication."""
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        param, bucket = self.params[segment.name], self._bucket_of[segment.name]
        _, start = self._offsets[segment.name]
        end = start + param.numel()
        local_shape = tuple(param.shape)
        dim = getattr(param, "_tp_shard_dim", None)
        full_shape = list(local_shape)
        if dim is not None:
            full_shape[dim] *= self.tp
        me = dist.get_rank() if dist.is_initialized() else 0
        flat = self._shard_view(shards, segment)
        everyone, local_shards = [], []
        for dp_rank in range(self.dp):
            own_lo = bucket.start + dp_rank * bucket.shard
            lo, hi = max(start, own_lo), min(end, own_lo + bucket.shard)
            boxes = flat_range_boxes(lo - start, hi - start, local_shape)
            for tp_rank in (range(self.tp) if dim is not None else [self.tp_rank]):
                rank = dp_rank * self.tp + tp_rank  # the mesh's rank order
                base = [0] * len(local_shape)
                if dim is not None:
                    base[dim] = tp_rank * local_shape[dim]
                position = 0
                for offsets, sizes in boxes:
                    metadata = ShardMetadata(shard_offsets=[o + b for o, b in zip(offsets, base)],
                                             shard_sizes=list(sizes), placement=f"rank:{rank}/{param.device}")
                    everyone.append(metadata)
                    numel = math.prod(sizes)
                    if rank == me:
                        local_shards.append(Shard(tensor=flat[position:position + numel].view(sizes),
                                                  metadata=metadata))
                    position += numel
        properties = TensorProperties(dtype=self.master_dtype, layout=torch.strided, requires_grad=False,
                                      memory_format=torch.contiguous_format, pin_memory=False)
        metadata = ShardedTensorMetadata(shards_metadata=everyone, size=torch.Size(full_shape),
                                         tensor_properties=properties)
        return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata)

    @torch.no_grad()
    def after_load(self) -> None:
        """After a checkpoint was loaded into :meth:`dcp_state`'s views: every segment's AdamW step set from the
        loaded count, the parameters re-gathered from the masters (a collective)."""
        for p in self._seg_params:
            self.optimizer.state[p]["step"].copy_(self.step_count)
        self.sync_params_from_masters()

    @torch.no_grad()
    def masters_from_params(self) -> None:
        """Set this rank's master shard from the model's parameters (after loading the weights without the optimizer
        state; no collective)."""
        for segment in self.segments:
            value = self.params[segment.name].detach().reshape(-1)[segment.lo:segment.hi]
            self._shard_view(self.master_shards, segment).copy_(value)
