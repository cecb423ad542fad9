"""Sequence parallelism at TP=2 (gloo, float64): on equals off (outputs, every gradient, three AdamW steps), the norm
gradients are bit-equal across the TP ranks after the step's reduction, the collectives per layer are the planned
all-gathers and reduce-scatters, and the shard layout itself (odd sizes, empty chunks)."""

import pytest
import torch
import torch.distributed as dist
from libra_dist_helpers import clone, make_batch, slice_batch, tiny_model

from libra_kernels.testing import run_in_process_group
from libra_model.modules.tensor_parallel import COLLECTIVES, SequenceShard, tp_rule
from libra_model.optim import MasterAdamW
from libra_model.parallel.grads import check_replicated_equal
from libra_model.parallel.mesh import init_parallel
from libra_model.parallel.tp_plan import is_tp_partial, shard_model_
from libra_model.train_step import forward_loss, train_step

pytestmark = pytest.mark.dist
TOL = dict(rtol=1e-10, atol=1e-12)
NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm", "model.vision_norm")


def test_sequence_shard_rows_cover_every_row_once():
    for n_text, n_vision, size in ((7, 5, 2), (0, 9, 2), (6, 0, 4), (1, 1, 4), (0, 0, 2), (13, 3, 3)):
        full = torch.arange(n_text + n_vision).float()[:, None]
        parts = [SequenceShard(n_text, n_vision, size, r) for r in range(size)]
        locals_ = [p.split(full) for p in parts]
        for part, local in zip(parts, locals_):
            # text rows first, then vision rows, in the full tensor's order
            assert local.shape[0] == part.local_text + (part.vision_range()[1] - part.vision_range()[0])
            assert (local[:part.local_text] < n_text).all() and (local[part.local_text:] >= n_text).all()
        text = torch.cat([loc[:p.local_text] for p, loc in zip(parts, locals_)])
        vision = torch.cat([loc[p.local_text:] for p, loc in zip(parts, locals_)])
        assert torch.equal(torch.cat([text, vision]), full)
        # the collectives' padded blocks put each row where the gather expects it
        blocks = torch.cat([p._pad(loc) for p, loc in zip(parts, locals_)])
        assert torch.equal(blocks.index_select(0, parts[0]._rows_in_blocks("cpu")), full)
        for p, loc in zip(parts, locals_):
            assert torch.equal(p._unpad(p._pad(loc)), loc)
    with pytest.raises(ValueError, match="SequenceShard"):
        SequenceShard(3, 2, 2, 2)
    with pytest.raises(ValueError, match="process group is required"):
        from libra_model.modules.tensor_parallel import gather_from_sequence_shard

        gather_from_sequence_shard(torch.zeros(2, 3), SequenceShard(2, 2, 2, 0), None)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _forward_backward(model, batch):
    out = model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                return_logits=True)
    COLLECTIVES.clear()  # count the collectives of one training forward and backward
    loss = forward_loss(model, batch, None)
    loss.backward()
    return out, loss


def _sp_equals_tp(rank, world_size):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=2)
    group = parallel.tp_group
    cases = [
        ("mixed, odd rows", {}, [(0, 2), (1, 15)], 2, 23),
        ("all text", {}, [], 2, 9),
        ("one vision row", {}, [(0, 10)], 2, 11),  # rank 1's vision chunk is empty
        ("all vision", {}, [(0, 0), (1, 0)], 2, 7),  # images cut at 7 positions: no text row at all
        ("2d, frozen", {"vision_prediction_mode": "2d"}, [(0, 1), (1, 12)], 2, 24),
    ]
    for label, overrides, images, batch_size, length in cases:
        full = tiny_model(**overrides)
        if "frozen" in label:
            from libra_model.trainer import freeze_language_

            freeze_language_(full)
        batch = make_batch(full.config, batch_size, length, images, seed=len(label))
        off = shard_model_(clone(full), group).pack_projections_()
        on = shard_model_(clone(full), group, sequence_parallel=True).pack_projections_()
        assert on.sequence_parallel and not off.sequence_parallel
        out_off, loss_off = _forward_backward(off, batch)
        out_on, loss_on = _forward_backward(on, batch)
        layers = full.config.num_hidden_layers
        # per layer: 2 all-gathers forward (attention, MLP entries) + 2 backward (exits); 2 reduce-scatters each
        # way; plus the scatter (backward all-gather) and final gather at the ends; no block all-reduce at all
        assert COLLECTIVES[("all_gather", "forward")] == 2 * layers + 1, (label, COLLECTIVES)
        assert COLLECTIVES[("all_gather", "backward")] == 2 * layers + 1, (label, COLLECTIVES)
        assert COLLECTIVES[("reduce_scatter", "forward")] == 2 * layers, (label, COLLECTIVES)
        assert COLLECTIVES[("reduce_scatter", "backward")] == 2 * layers, (label, COLLECTIVES)
        assert COLLECTIVES[("all_reduce", "forward")] == COLLECTIVES[("all_reduce", "backward")] == 0
        torch.testing.assert_close(out_on.hidden_states, out_off.hidden_states, **TOL)
        finite = out_off.logits.isfinite()
        assert torch.equal(finite, out_on.logits.isfinite())
        torch.testing.assert_close(out_on.logits[finite], out_off.logits[finite], **TOL)
        torch.testing.assert_close(loss_on, loss_off, **TOL)
        g_on, g_off = _grads(on), _grads(off)
        checked = partial_norms = 0
        for name, param in on.named_parameters():
            if g_off[name] is None:
                assert g_on[name] is None, name
                continue
            grad = g_on[name]
            if is_tp_partial(param) and not tp_rule(name).partial_grad:
                assert any(key in name for key in NORMS), name  # only the norms become partial
                dist.all_reduce(grad, group=group)
                partial_norms += 1
            torch.testing.assert_close(grad, g_off[name], **TOL, msg=lambda m, n=name: f"{label} {n}: {m}")
            checked += 1
        assert checked > 0
        trained_norms = sum(1 for n, p in full.named_parameters()
                            if p.requires_grad and any(key in n for key in NORMS))
        assert partial_norms == trained_norms, (label, partial_norms, trained_norms)
        assert "frozen" in label or trained_norms == 4 * layers + 2

    # The norm gradients after the step's reduction are bit-equal on both TP ranks; three steps (clipped, with
    # accumulation) on equal off, under each activation checkpointing mode.
    full = tiny_model()
    batch = make_batch(full.config, 2, 21, [(0, 2), (1, 13)], seed=7)
    micro = [slice_batch(batch, 0, 1), slice_batch(batch, 1, 2)]
    off = shard_model_(clone(full), group).pack_projections_()
    opt_off = MasterAdamW(off, weight_decay=0.01, master_dtype=torch.float64)
    res_off = [train_step(off, opt_off, micro, parallel, lr=3e-2, max_grad_norm=0.3) for _ in range(3)]
    assert res_off[-1].loss < res_off[0].loss and res_off[0].grad_norm > 0.3
    for mode in (False, "full", "selective"):
        on = shard_model_(clone(full), group, sequence_parallel=True).pack_projections_()
        on.activation_checkpointing_enable(mode)
        optimizer = MasterAdamW(on, weight_decay=0.01, master_dtype=torch.float64)
        for b in micro:
            forward_loss(on, b, None).backward()
        optimizer.reduce(parallel)
        norm_grads = [(n, optimizer.main_grads[n]) for n in optimizer.names if any(k in n for k in NORMS)]
        assert len(norm_grads) == 4 * full.config.num_hidden_layers + 2
        assert all(g.abs().sum() > 0 for _, g in norm_grads)
        check_replicated_equal(norm_grads, group)  # bit-equal across TP
        optimizer.zero_grad()
        res_on = [train_step(on, optimizer, micro, parallel, lr=3e-2, max_grad_norm=0.3) for _ in range(3)]
        for a, b in zip(res_off, res_on):
            assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (mode, a, b)
        params_off = dict(off.named_parameters())
        for name, param in on.named_parameters():
            torch.testing.assert_close(param.detach(), params_off[name].detach(), **TOL,
                                       msg=lambda m, n=name: f"{mode} {n}: {m}")
        check_replicated_equal([(n, p.detach()) for n, p in on.named_parameters() if any(k in n for k in NORMS)],
                               group)


def test_sequence_parallel_equals_tensor_parallel_at_tp2():
    run_in_process_group(_sp_equals_tp, 2)
