"""Sharded gradients (ZeRO-2, ``DistributedMasterAdamW(shard_gradients=True)``): DP=2 equals ZeRO-1 and the replicated
optimizer step for step (3 micro-batches per step, fp32 and bf16 reduction, a rank without images, a parameter that
gets no gradient on one rank), TP=2 x DP=2 equals one process, the collectives are one reduce-scatter per bucket per
micro-batch, no full gradient buffer exists and the transient buckets stay bounded, and its checkpoints load at
another DP size and without sharded gradients exactly."""

import os

import pytest
import torch
import torch.distributed as dist
from libra_dist_helpers import (
    assert_matches_reference_shards,
    assert_state_equal,
    check_replicas_identical,
    clone,
    gathered_optimizer_state,
    make_batch,
    slice_batch,
    tiny_model,
)
from torch import nn

from libra_kernels.testing import run_in_process_group
from libra_model.modules.tensor_parallel import COLLECTIVES
from libra_model.optim import MasterAdamW
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.parallel.distributed_optimizer import BUCKETS_FILLING, BUCKETS_IN_FLIGHT, DistributedMasterAdamW
from libra_model.parallel.mesh import ParallelState, init_parallel
from libra_model.parallel.tp_plan import shard_model_
from libra_model.train_step import train_step

pytestmark = pytest.mark.dist
TOL64 = dict(rtol=1e-10, atol=1e-12)
CLIP = 0.3  # every run here clips
BUCKET = 3000  # many small buckets, parameters split between ranks
STEPS, MICRO = 3, 3


def _micro_batches(config, rank):
    """Three micro-batches of this DP rank: rank 0 mixed, all vision, all text; rank 1 all text (no image at all)."""
    if rank == 0:
        mixed = make_batch(config, 2, 20, [(0, 3), (1, 0)], seed=2)
        vision = make_batch(config, 1, config.max_vision_token_length, [(0, 0)], seed=3)
        text = make_batch(config, 1, 17, [], seed=4)
        return [mixed, vision, text]
    return [make_batch(config, 2, 19, [], seed=5), make_batch(config, 1, 23, [], seed=6),
            make_batch(config, 1, 11, [], seed=7)]


def _as_float32(batches):
    return [{k: v.float() if v.is_floating_point() else v for k, v in b.items()} for b in batches]


def _train(parallel, model, batches, kind, dtype=torch.float64, **kwargs):
    """kind: "replicated" (MasterAdamW), "zero1" or "zero2"; STEPS steps on ``batches``."""
    if kind == "replicated":
        optimizer = MasterAdamW(model, lr=0.0, master_dtype=dtype)
    else:
        optimizer = DistributedMasterAdamW(model, parallel, lr=0.0, master_dtype=dtype, bucket_elements=BUCKET,
                                           shard_gradients=kind == "zero2", **kwargs)
    results = [train_step(model, optimizer, batches, parallel, lr=3e-2, max_grad_norm=CLIP) for _ in range(STEPS)]
    return optimizer, results


def _assert_same_training(res_a, res_b, model_a, model_b, tol=1e-10):
    for a, b in zip(res_a, res_b):
        assert abs(a.loss - b.loss) < tol and abs(a.grad_norm - b.grad_norm) < tol, (a, b)
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m, n=name: f"{n}: {m}")


class _HeldTransients:
    """Records the peak of the transient bucket buffers of a sharded-gradient optimizer (bytes of the buckets being
    filled and of the reductions in flight, taken as each bucket is launched, before anything is freed) and the
    most reductions outstanding at a launch."""

    def __init__(self, optimizer):
        self.optimizer, self.peak, self.in_flight = optimizer, 0, 0
        real = optimizer._launch_transient

        def watched(bucket):
            opt = self.optimizer
            live = sum(b.grad.numel() * b.grad.element_size() for b in opt.buckets if b.grad is not None)
            live += sum(t.numel() * t.element_size() for b in opt._in_flight for t in b.staging)
            self.peak = max(self.peak, live)
            self.in_flight = max(self.in_flight, len(opt._in_flight))
            real(bucket)

        optimizer._launch_transient = watched


def _dp2(rank, world_size, root):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    assert (parallel.dp, parallel.tp) == (2, 1)
    full = tiny_model()
    micro = _micro_batches(full.config, rank)
    ref, zero1, zero2 = clone(full), clone(full), clone(full)
    _, res_ref = _train(parallel, ref, micro, "replicated")
    _, res1 = _train(parallel, zero1, micro, "zero1")
    COLLECTIVES.clear()
    optimizer = DistributedMasterAdamW(zero2, parallel, lr=0.0, master_dtype=torch.float64, bucket_elements=BUCKET,
                                       shard_gradients=True)
    watch = _HeldTransients(optimizer)
    res2 = [train_step(zero2, optimizer, micro, parallel, lr=3e-2, max_grad_norm=CLIP) for _ in range(STEPS)]
    assert res2[0].grad_norm > CLIP and res2[-1].loss < res2[0].loss
    _assert_same_training(res_ref, res2, ref, zero2)
    _assert_same_training(res1, res2, zero1, zero2)
    check_replicas_identical(zero2, parallel.dp_group)
    # Collectives: one reduce-scatter per bucket per micro-batch, the rest as with ZeRO-1 (once per step).
    buckets = len(optimizer.buckets)
    assert buckets > 10
    assert dict(COLLECTIVES) == {("grad_reduce_scatter_dp", "step"): buckets * MICRO * STEPS,
                                 ("param_all_gather_dp", "step"): buckets * STEPS,
                                 ("grad_norm_all_reduce", "step"): STEPS, ("count_all_reduce", "step"): STEPS}, \
        dict(COLLECTIVES)
    # No full gradient buffer; the transient buckets stay within the bound, far from all of them.
    assert optimizer.grad_buffers == {} and optimizer.main_grads == {}
    assert all(b.grad is None and b.staging is None and b.handle is None for b in optimizer.buckets)
    state = sum(t.numel() for t in optimizer.master_shards.values())
    assert watch.in_flight <= BUCKETS_IN_FLIGHT  # a launch first waits while BUCKETS_IN_FLIGHT are outstanding
    # With these tiny buckets an attention block spans 7 of them, all completing at the block's end: still a
    # fraction of the whole buffer (twice the shard).
    assert 0 < watch.peak < 0.5 * 8 * 2 * state, (watch.peak, state)
    largest = sorted((b.padded for b in optimizer.buckets), reverse=True)
    transient = 8 * (sum(largest[:BUCKETS_IN_FLIGHT + BUCKETS_FILLING]) + sum(largest[:BUCKETS_IN_FLIGHT]) // 2)
    assert optimizer.transient_grad_bytes() == transient
    assert optimizer.memory_bytes() == {"weights": 8 * 2 * state, "grads": 8 * state + transient,
                                        "optimizer": 24 * state}

    # Recomputation in backward must not fire a gradient hook twice (each bucket is reduced once per micro-batch).
    recomputed = clone(full)
    recomputed.activation_checkpointing_enable("full")
    _, res_recomputed = _train(parallel, recomputed, micro, "zero2")
    _assert_same_training(res_ref, res_recomputed, ref, recomputed)

    # bf16 reduction: ZeRO-2 rounds each micro-batch's contribution, ZeRO-1 the step's sum; both close to fp32.
    f32 = tiny_model(dtype=torch.float32)
    micro32 = _as_float32(micro)
    _, res32 = _train(parallel, clone(f32), micro32, "zero2", dtype=torch.float32)
    _, res1_16 = _train(parallel, clone(f32), micro32, "zero1", dtype=torch.float32, grad_reduce_dtype="bf16")
    model16 = clone(f32)
    opt16, res2_16 = _train(parallel, model16, micro32, "zero2", dtype=torch.float32, grad_reduce_dtype="bf16")
    for a, b, c in zip(res32, res1_16, res2_16):
        assert abs(a.loss - c.loss) < 2e-2 * abs(a.loss) and abs(a.grad_norm - c.grad_norm) < 2e-2 * a.grad_norm
        assert abs(b.loss - c.loss) < 2e-2 * abs(b.loss) and abs(b.grad_norm - c.grad_norm) < 2e-2 * b.grad_norm
    check_replicas_identical(model16, parallel.dp_group)
    assert opt16.transient_grad_bytes() == transient // 4  # the same buckets, 2-byte elements instead of 8
    # At buckets about the size of a block (as at the 11B model's default), the peak stays within the planned bound.
    for bucket_elements in (12000, 30000):
        sized = clone(full)
        sized_opt = DistributedMasterAdamW(sized, parallel, lr=0.0, master_dtype=torch.float64,
                                           bucket_elements=bucket_elements, shard_gradients=True)
        sized_watch = _HeldTransients(sized_opt)
        train_step(sized, sized_opt, micro, parallel, lr=3e-2, max_grad_norm=CLIP)
        bound = sized_opt.transient_grad_bytes()
        assert 0 < sized_watch.peak <= bound, (bucket_elements, sized_watch.peak, bound)

    # The ZeRO-2 checkpoint and the state it must restore, for the loads in other layouts.
    ckpt.save_checkpoint(os.path.join(root, "ckpt"), STEPS, zero2, optimizer, parallel, {"step": STEPS})
    masters, named = optimizer.master_params(), optimizer.named_state()
    batches = [None, None]
    dist.all_gather_object(batches, micro)
    if rank == 0:
        torch.save({"masters": masters, "state": named, "batches": batches}, os.path.join(root, "gathered.pt"))


class _Toy(nn.Module):
    """Three linear layers; ``late`` (registered last, so in the first bucket) only runs when asked, so a rank
    whose micro-batch skips it holds that bucket, and every later one, until the end of the backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.first = nn.Linear(40, 30, bias=False).double()
        self.second = nn.Linear(30, 20, bias=False).double()
        self.late = nn.Linear(20, 20, bias=False).double()

    def forward(self, x, use_late):
        h = self.second(torch.tanh(self.first(x)))
        return (self.late(h) if use_late else h).square().mean()


def _toy_steps(model, optimizer, parallel, rank, launched=None):
    """Two steps of three micro-batches; ``launched`` gets the buckets launched by each backward itself."""
    g = torch.Generator().manual_seed(10 + rank)
    norms = []
    for _ in range(2):
        for index in range(MICRO):
            optimizer.start_micro_batch(last=index == MICRO - 1)
            model(torch.randn(5, 40, generator=g, dtype=torch.float64), use_late=rank == 0 or index == 1).backward()
            if launched is not None:
                launched.append(optimizer._next_launch)
            optimizer.finish_micro_batch()
        optimizer.reduce(parallel)
        norms.append(float(optimizer.clip_(parallel, 0.5)))
        optimizer.step(1e-2)
        optimizer.zero_grad()
    return norms


def _dp2_missing_gradient(rank, world_size):
    """A parameter without a gradient on one rank in some micro-batches: its part of the bucket is zeros, the
    buckets are launched in order at the end of the backward, and the training equals the replicated one."""
    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    ref, model = _Toy(), _Toy()
    norms_ref = _toy_steps(ref, MasterAdamW(ref, lr=0.0, master_dtype=torch.float64), parallel, rank)
    optimizer = DistributedMasterAdamW(model, parallel, lr=0.0, master_dtype=torch.float64, bucket_elements=300,
                                       shard_gradients=True)
    assert len(optimizer.buckets) == 3 and optimizer.buckets[0].names == ["late.weight"]
    launched = []
    norms = _toy_steps(model, optimizer, parallel, rank, launched)
    # Rank 1's first bucket gets no gradient in micro-batches 0 and 2: nothing is launched before the backward ends.
    assert launched == ([3] * 6 if rank == 0 else [0, 3, 0] * 2), launched
    assert norms == pytest.approx(norms_ref, rel=1e-12)
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m, n=name: f"{n}: {m}")
    check_replicas_identical(model, parallel.dp_group)


def test_sharded_gradients_equal_zero1_and_replicated_at_dp2(tmp_path):
    run_in_process_group(_dp2, 2, str(tmp_path))

    # The ZeRO-2 checkpoint loads at DP=1 into the replicated optimizer (no sharded gradients), every value exact.
    expected = torch.load(str(tmp_path / "gathered.pt"))
    model = tiny_model(seed=1)
    optimizer = MasterAdamW(model, master_dtype=torch.float64)
    path = ckpt.latest_checkpoint(str(tmp_path / "ckpt"))
    assert ckpt.read_meta(path)["dp"] == 2
    assert ckpt.load_checkpoint(path, model, optimizer, ParallelState()) == {"step": STEPS}
    _assert_state_equal(optimizer.master_params(), optimizer.named_state(), expected)

    run_in_process_group(_tp2_dp2, 4, str(tmp_path))


def test_a_parameter_without_gradient_on_one_rank(tmp_path):
    run_in_process_group(_dp2_missing_gradient, 2)


def _dp2_no_host_reads(rank, world_size):
    """The micro-batch path with sharded gradients (hooks, transient buffers, reduce-scatters, waits) reads nothing
    back to the host, as the replicated step's forward and backward do not."""
    from test_train_step import HostReadError, no_host_reads

    from libra_kernels import ModalityLayout
    from libra_model.train_step import forward_loss

    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    model = tiny_model(dtype=torch.float32)
    model.check_input_values = False
    optimizer = DistributedMasterAdamW(model, parallel, bucket_elements=BUCKET, shard_gradients=True)
    batches = _as_float32(_micro_batches(model.config, rank))
    for batch in batches:
        batch["layout"] = ModalityLayout.from_vision_indices(batch["vision_indices"],
                                                              model.config.max_vision_token_length)
    counts = model.target_counts(batches[0]["labels"])
    COLLECTIVES.clear()
    with no_host_reads():
        for index, batch in enumerate(batches):
            optimizer.start_micro_batch(last=index == len(batches) - 1)
            forward_loss(model, batch, counts).backward()
            optimizer.finish_micro_batch()
        optimizer.reduce(parallel)
    assert COLLECTIVES[("grad_reduce_scatter_dp", "step")] == len(optimizer.buckets) * len(batches)
    with pytest.raises(HostReadError), no_host_reads():  # the detector works in these processes
        bool(optimizer.grad_shards["other"].sum() > 0)


def test_sharded_gradients_add_no_host_read():
    run_in_process_group(_dp2_no_host_reads, 2)


def _assert_state_equal(masters, state, expected):
    assert_state_equal(masters, state, expected, steps=STEPS)


def _tp2_dp2(rank, world_size, root):
    """4 ranks: the ZeRO-2 DP=2 checkpoint loads at DP=4 with sharded gradients and at TP=2 x DP=2 without them,
    exactly, and training continues alike; TP=2 x DP=2 with sharded gradients equals TP=1 x DP=1."""
    torch.set_num_threads(1)
    expected = torch.load(os.path.join(root, "gathered.pt"))
    path = ckpt.latest_checkpoint(os.path.join(root, "ckpt"))

    flat = ParallelState(world_size=4, rank=rank, dp=4, tp=1, dp_rank=rank, tp_rank=0,
                         dp_group=dist.group.WORLD, world_group=dist.group.WORLD)
    model = tiny_model(seed=1)
    optimizer = DistributedMasterAdamW(model, flat, master_dtype=torch.float64, bucket_elements=BUCKET,
                                       shard_gradients=True)
    assert ckpt.load_checkpoint(path, model, optimizer, flat) == {"step": STEPS}
    _assert_state_equal(optimizer.master_params(), optimizer.named_state(), expected)
    for name, value in expected["masters"].items():
        assert torch.equal(model.get_parameter(name).detach(), value), name
    # ... and a step after the load equals the same step with ZeRO-1 loaded from the same checkpoint.
    other = tiny_model(seed=1)
    plain = DistributedMasterAdamW(other, flat, master_dtype=torch.float64, bucket_elements=BUCKET)
    ckpt.load_checkpoint(path, other, plain, flat)
    mine = [slice_batch(b, 0, 1) for b in expected["batches"][rank % 2]]
    a = train_step(model, optimizer, mine, flat, lr=1e-2, max_grad_norm=CLIP)
    b = train_step(other, plain, mine, flat, lr=1e-2, max_grad_norm=CLIP)
    assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
    for (name, x), (_, y) in zip(model.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(x, y, **TOL64, msg=lambda m, n=name: f"{n}: {m}")

    parallel = init_parallel(tp=2)
    assert (parallel.dp, parallel.tp) == (2, 2)
    model = shard_model_(tiny_model(seed=1), parallel.tp_group)
    optimizer = DistributedMasterAdamW(model, parallel, master_dtype=torch.float64, bucket_elements=BUCKET)
    ckpt.load_checkpoint(path, model, optimizer, parallel)
    _assert_state_equal(*gathered_optimizer_state(model, optimizer, parallel), expected)

    # TP=2 x DP=2 with sharded gradients equals one process with the whole batch (DP rank r: rank r's batches).
    full = tiny_model()
    ref = clone(full)
    _, res_ref = _train(ParallelState(), ref, expected["batches"][0] + expected["batches"][1], "replicated")
    model = shard_model_(clone(full), parallel.tp_group)
    COLLECTIVES.clear()
    optimizer, res = _train(parallel, model, expected["batches"][parallel.dp_rank], "zero2")
    for a, b in zip(res_ref, res):
        assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
    assert_matches_reference_shards(model, ref, parallel.tp_group, **TOL64)
    check_replicas_identical(model, parallel.dp_group)
    buckets = len(optimizer.buckets)
    assert COLLECTIVES[("grad_reduce_scatter_dp", "step")] == buckets * MICRO * STEPS
    assert COLLECTIVES[("param_all_gather_dp", "step")] == buckets * STEPS
    assert COLLECTIVES[("grad_all_reduce_tp", "step")] == STEPS  # the TP-partial shard, once per step
    assert COLLECTIVES[("grad_norm_all_reduce", "step")] == STEPS


def test_sharded_gradients_need_the_micro_batch_calls_and_valid_settings():
    model = tiny_model()
    with pytest.raises(ValueError, match="shard_gradients"):
        DistributedMasterAdamW(model, ParallelState(), shard_gradients="yes")
    optimizer = DistributedMasterAdamW(model, ParallelState(), shard_gradients=True, master_dtype=torch.float64)
    from libra_model.train_step import forward_loss

    batch = make_batch(model.config, 1, 12, [], seed=1)
    with pytest.raises(RuntimeError, match="start_micro_batch"):
        forward_loss(model, batch, None).backward()
    # At dp=1 the buckets are added into the shard as they complete: the shard is the plain gradient.
    model.zero_grad(set_to_none=True)
    optimizer.zero_grad()
    reference = clone(model)
    optimizer.start_micro_batch(last=True)
    forward_loss(model, batch, None).backward()
    optimizer.finish_micro_batch()
    optimizer.reduce()
    forward_loss(reference, batch, None).backward()
    for segment in optimizer.segments:
        grad = reference.get_parameter(segment.name).grad
        want = torch.zeros(segment.hi - segment.lo, dtype=torch.float64) if grad is None else \
            grad.reshape(-1)[segment.lo:segment.hi]
        torch.testing.assert_close(optimizer._shard_view(optimizer.grad_shards, segment), want, **TOL64)
