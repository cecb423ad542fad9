"""The distributed optimizer (ZeRO-1 over DP): it equals the replicated MasterAdamW step for step (DP=2, and TP=2 x
DP=2 against one process with the whole batch), keeps DP replicas bit-identical, issues the planned collectives,
and its DCP checkpoints load at other DP and TP sizes with every value restored exactly."""

import math
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

from libra_kernels.testing import run_in_process_group
from libra_model.modules.tensor_parallel import COLLECTIVES
from libra_model.optim import MasterAdamW
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.parallel.distributed_optimizer import DistributedMasterAdamW, flat_range_boxes
from libra_model.parallel.mesh import ParallelState, init_parallel
from libra_model.parallel.tp_plan import shard_model_
from libra_model.train_step import train_step

pytestmark = pytest.mark.dist
TOL64 = dict(rtol=1e-10, atol=1e-12)
CLIP = 0.3  # small enough that every run here clips
BUCKET = 3000  # small buckets, so there are many and parameters are split between ranks


def test_flat_range_boxes_cover_the_range_in_order():
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 5), (4, 3, 5), (2, 1, 3, 4), (1, 9)]:
        numel = math.prod(shape)
        for _ in range(30):
            lo, hi = sorted(torch.randint(0, numel + 1, (2,), generator=g).tolist())
            marks = torch.full(shape, -1, dtype=torch.int64)
            position = lo
            for offsets, sizes in flat_range_boxes(lo, hi, shape):
                box = marks[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                assert (box == -1).all(), (shape, lo, hi)
                box.copy_(torch.arange(position, position + box.numel()).view(box.shape))
                position += box.numel()
            assert position == hi
            expected = torch.full((numel,), -1, dtype=torch.int64)
            expected[lo:hi] = torch.arange(lo, hi)
            assert torch.equal(marks.reshape(-1), expected), (shape, lo, hi)


def _bad_settings():
    model = tiny_model()
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        DistributedMasterAdamW(model, ParallelState(), grad_reduce_dtype="fp16")
    with pytest.raises(ValueError, match="bucket_elements"):
        DistributedMasterAdamW(model, ParallelState(), bucket_elements=0)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        DistributedMasterAdamW(model, ParallelState())


def test_bad_settings_are_errors():
    _bad_settings()


def _train(parallel, model, batches, distributed, steps=3, dtype=torch.float64, **kwargs):
    if distributed:
        optimizer = DistributedMasterAdamW(model, parallel, lr=0.0, master_dtype=dtype, bucket_elements=BUCKET,
                                           **kwargs)
    else:
        optimizer = MasterAdamW(model, lr=0.0, master_dtype=dtype)
    results = [train_step(model, optimizer, batches, parallel, lr=3e-2, max_grad_norm=CLIP) for _ in range(steps)]
    return optimizer, results


def _dp2(rank, world_size, root):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    assert (parallel.dp, parallel.tp) == (2, 1)
    for frozen in (False, True):
        full = tiny_model()
        if frozen:
            from libra_model.trainer import freeze_language_

            freeze_language_(full)
        # Images only in rank 0's samples: rank 1 has no vision row, so some vision gradients never arrive there.
        batch = make_batch(full.config, 4, 20, [(0, 3), (1, 0)], seed=2)
        mine = slice_batch(batch, 2 * rank, 2 * rank + 2)
        micro = [slice_batch(mine, 0, 1), slice_batch(mine, 1, 2)]
        ref, model = clone(full), clone(full)
        if frozen:
            model.activation_checkpointing_enable()  # recomputation must not fire a gradient hook twice
        opt_ref, res_ref = _train(parallel, ref, micro, distributed=False)
        COLLECTIVES.clear()
        optimizer, res = _train(parallel, model, micro, distributed=True)
        for a, b in zip(res_ref, res):
            assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
        assert res[0].grad_norm > CLIP and res[-1].loss < res[0].loss
        for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(b, a, **TOL64, msg=lambda m, n=name: f"{n}: {m}")
        check_replicas_identical(model, parallel.dp_group)
        # Planned collectives per step: one reduce-scatter and one all-gather per bucket, one norm all-reduce, the
        # step's target counts and its logged totals; nothing else (no all-reduce of gradients).
        buckets = len(optimizer.buckets)
        assert buckets > 4
        assert any(s.hi - s.lo < model.get_parameter(s.name).numel() for s in optimizer.segments)  # split ones
        assert dict(COLLECTIVES) == {("grad_reduce_scatter_dp", "step"): 3 * buckets,
                                     ("param_all_gather_dp", "step"): 3 * buckets,
                                     ("grad_norm_all_reduce", "step"): 3, ("count_all_reduce", "step"): 3}, \
            dict(COLLECTIVES)
        # Each rank keeps only its half of the optimizer state.
        state = sum(t.numel() for t in optimizer.master_shards.values())
        padded = sum(b.padded for b in optimizer.buckets)
        trained = sum(p.numel() for p in ref.parameters() if p.requires_grad)
        assert state * 2 == padded and trained <= padded < trained + 2 * buckets
        # Bytes per rank (float64 here): the replicated optimizer's masters are the parameters themselves.
        assert opt_ref.memory_bytes() == {"weights": 8 * trained, "grads": 8 * trained, "optimizer": 16 * trained}
        assert optimizer.memory_bytes() == {"weights": 8 * padded, "grads": 8 * padded + 8 * state,
                                            "optimizer": 24 * state}
        if frozen:
            assert all(name in optimizer.names for name, p in model.named_parameters() if p.requires_grad)
            assert all("vision" in name for name in optimizer.names)

    # Buckets are reduce-scattered during the last micro-batch's backward, not after it.
    optimizer.zero_grad()
    optimizer.start_micro_batch(last=True)
    from libra_model.train_step import forward_loss

    forward_loss(model, micro[0], None).backward()
    launched = optimizer._next_launch
    assert 0 < launched, launched
    optimizer.reduce()
    optimizer.zero_grad()

    # bf16 gradient reduction: the same training up to bf16 rounding of what each rank sends.
    full = tiny_model(dtype=torch.float32)
    f32 = dict(dtype=torch.float32)
    _, res32 = _train(parallel, clone(full), [{k: v.float() if v.is_floating_point() else v for k, v in b.items()}
                                              for b in micro], distributed=True, **f32)
    model16 = clone(full)
    _, res16 = _train(parallel, model16, [{k: v.float() if v.is_floating_point() else v for k, v in b.items()}
                                          for b in micro], distributed=True, grad_reduce_dtype="bf16", **f32)
    for a, b in zip(res32, res16):
        assert abs(a.loss - b.loss) < 2e-2 * abs(a.loss) and abs(a.grad_norm - b.grad_norm) < 2e-2 * a.grad_norm
    check_replicas_identical(model16, parallel.dp_group)

    # A checkpoint of the sharded state, and the gathered state it must restore, for the loads in other layouts.
    full = tiny_model()
    model = clone(full)
    optimizer, _ = _train(parallel, model, micro, distributed=True)
    ckpt.save_checkpoint(os.path.join(root, "ckpt"), 3, model, optimizer, parallel, {"step": 3})
    masters, state = optimizer.master_params(), optimizer.named_state()
    if rank == 0:
        torch.save({"masters": masters, "state": state, "batch": batch}, os.path.join(root, "gathered.pt"))


def _assert_state_equal(masters, state, expected):
    assert_state_equal(masters, state, expected, steps=3)


def _tp2_dp2(rank, world_size, root):
    """4 ranks: the DP=2 checkpoint loads at DP=4 (TP=1) and at TP=2 x DP=2 exactly; a TP=2 x DP=2 distributed
    run equals one process with the whole batch."""
    torch.set_num_threads(1)
    expected = torch.load(os.path.join(root, "gathered.pt"))
    path = ckpt.latest_checkpoint(os.path.join(root, "ckpt"))

    # DP=4, TP=1 (the 4 ranks as one DP group).
    flat = ParallelState(world_size=4, rank=rank, dp=4, tp=1, dp_rank=rank, tp_rank=0,
                         dp_group=dist.group.WORLD, world_group=dist.group.WORLD)
    model = tiny_model(seed=1)  # other initial values, so the load must overwrite all of them
    optimizer = DistributedMasterAdamW(model, flat, master_dtype=torch.float64, bucket_elements=BUCKET)
    assert ckpt.load_checkpoint(path, model, optimizer, flat) == {"step": 3}
    _assert_state_equal(optimizer.master_params(), optimizer.named_state(), expected)
    for name, value in expected["masters"].items():
        assert torch.equal(model.get_parameter(name).detach(), value), name

    parallel = init_parallel(tp=2)
    assert (parallel.dp, parallel.tp) == (2, 2)
    model = shard_model_(tiny_model(seed=1), parallel.tp_group)
    optimizer = DistributedMasterAdamW(model, parallel, master_dtype=torch.float64, bucket_elements=BUCKET)
    ckpt.load_checkpoint(path, model, optimizer, parallel)
    _assert_state_equal(*gathered_optimizer_state(model, optimizer, parallel), expected)

    # TP=2 x DP=2 with the distributed optimizer equals TP=1 x DP=1 on the same global batch.
    full = tiny_model()
    batch = expected["batch"]
    ref = clone(full)
    _, res_ref = _train(ParallelState(), ref, [slice_batch(batch, 0, 2), slice_batch(batch, 2, 4)],
                        distributed=False)
    model = shard_model_(clone(full), parallel.tp_group)
    mine = slice_batch(batch, 2 * parallel.dp_rank, 2 * parallel.dp_rank + 2)
    COLLECTIVES.clear()
    optimizer, res = _train(parallel, model, [slice_batch(mine, 0, 1), slice_batch(mine, 1, 2)], distributed=True)
    for a, b in zip(res_ref, res):
        assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
    assert_matches_reference_shards(model, ref, parallel.tp_group, **TOL64)
    check_replicas_identical(model, parallel.dp_group)
    buckets = len(optimizer.buckets)
    assert COLLECTIVES[("grad_reduce_scatter_dp", "step")] == 3 * buckets
    assert COLLECTIVES[("param_all_gather_dp", "step")] == 3 * buckets
    assert COLLECTIVES[("grad_all_reduce_tp", "step")] == 3  # the TP-partial shard, once per step
    assert COLLECTIVES[("grad_norm_all_reduce", "step")] == 3
    assert not any(kind.startswith("grad_all_reduce_dp") for kind, _ in COLLECTIVES)


def test_distributed_optimizer_dp2_equals_replicated_and_checkpoints_reshard(tmp_path):
    run_in_process_group(_dp2, 2, str(tmp_path))

    # The DP=2 checkpoint loads at DP=1 into the replicated optimizer, every value exact.
    expected = torch.load(str(tmp_path / "gathered.pt"))
    model = tiny_model(seed=1)
    optimizer = MasterAdamW(model, master_dtype=torch.float64)
    path = ckpt.latest_checkpoint(str(tmp_path / "ckpt"))
    assert ckpt.read_meta(path)["dp"] == 2
    assert ckpt.load_checkpoint(path, model, optimizer, ParallelState()) == {"step": 3}
    _assert_state_equal(optimizer.master_params(), optimizer.named_state(), expected)

    run_in_process_group(_tp2_dp2, 4, str(tmp_path))
