"""TP=2 equals TP=1 and DP=2 equals one process with the doubled batch, on the whole tiny model (gloo, float64).

Each launch runs several checks, since a launch costs seconds."""

import pytest
import torch
import torch.distributed as dist
from libra_dist_helpers import clone, make_batch, slice_batch, tiny_model

from libra_kernels.testing import run_in_process_group
from libra_model.modules.tensor_parallel import COLLECTIVES, tp_rule
from libra_model.optim import MasterAdamW
from libra_model.parallel.grads import check_replicated_equal
from libra_model.parallel.mesh import ParallelState, init_parallel
from libra_model.parallel.tp_plan import is_tp_partial, is_tp_sharded, local_shard, shard_model_
from libra_model.train_step import forward_loss, train_step

pytestmark = pytest.mark.dist
TOL = dict(rtol=1e-10, atol=1e-12)
CLIP = 0.3  # small enough that every run here clips


def _freeze_language(model):
    from libra_model.trainer import freeze_language_

    freeze_language_(model)


def _check_forward_and_grads(parallel, ref, tp, batch):
    group = parallel.tp_group
    out_ref = ref(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                  return_logits=True)
    out_tp = tp(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                return_logits=True)
    torch.testing.assert_close(out_tp.hidden_states, out_ref.hidden_states, **TOL)
    finite = out_ref.logits.isfinite()
    assert torch.equal(finite, out_tp.logits.isfinite())
    torch.testing.assert_close(out_tp.logits[finite], out_ref.logits[finite], **TOL)

    loss_ref, loss_tp = forward_loss(ref, batch, None), forward_loss(tp, batch, None)
    torch.testing.assert_close(loss_tp, loss_ref, **TOL)
    loss_ref.backward()
    loss_tp.backward()
    ref_params = dict(ref.named_parameters())
    kinds = {"sharded": 0, "partial": 0, "replicated": 0, "frozen": 0}
    replicated = []
    for name, param in tp.named_parameters():
        expected = ref_params[name].grad
        if not param.requires_grad:
            assert param.grad is None and expected is None, name
            kinds["frozen"] += 1
            continue
        if expected is None:  # unused by this forward (the "2d" placeholder in "1d" mode)
            assert param.grad is None, name
            continue
        grad = param.grad.clone()
        if is_tp_partial(param):
            # Each rank holds a partial sum; the deferred reduction sums them.
            dist.all_reduce(grad, group=group)
            kinds["partial"] += 1
        elif is_tp_sharded(param):
            expected = local_shard(expected, tp_rule(name), group)
            kinds["sharded"] += 1
        else:
            replicated.append((name, grad))
            kinds["replicated"] += 1
        torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    check_replicated_equal(replicated, group)
    for model in (ref, tp):
        for param in model.parameters():
            param.grad = None
    return kinds


def _check_blocks(parallel, full, batch):
    """Each parallel block on its own: layer 0's attention and MLP at TP=2 equal TP=1 (output, input gradient, every
    weight gradient), each with exactly one all-reduce forward and one backward."""
    from libra_kernels import ModalityLayout

    group = parallel.tp_group
    tp = shard_model_(clone(full), group)
    layout = ModalityLayout.from_vision_indices(batch["vision_indices"], full.config.max_vision_token_length)
    ctx_full = full._attention_context(batch["vision_indices"], None, layout, None, None)
    ctx_tp = tp._attention_context(batch["vision_indices"], None, layout, None, None)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(layout.num_tokens, full.config.hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(x.shape, generator=g, dtype=torch.float64)
    prefix = "model.layers.0."
    for block in ("self_attn", "mlp"):
        ref_block, tp_block = getattr(full.model.layers[0], block), getattr(tp.model.layers[0], block)
        outputs = []
        for module, ctx in ((ref_block, ctx_full), (tp_block, ctx_tp)):
            inp = x.clone().requires_grad_(True)
            COLLECTIVES.clear()
            out = module(inp, ctx) if block == "self_attn" else module(inp, layout.n_text)
            (out * weight).sum().backward()
            outputs.append((out.detach(), inp.grad, dict(COLLECTIVES)))
        (ref_out, ref_dx, _), (tp_out, tp_dx, counts) = outputs
        torch.testing.assert_close(tp_out, ref_out, **TOL)
        torch.testing.assert_close(tp_dx, ref_dx, **TOL)
        assert counts == {("all_reduce", "forward"): 1, ("all_reduce", "backward"): 1}, (block, counts)
        ref_params = dict(ref_block.named_parameters())
        for name, param in tp_block.named_parameters():
            grad, expected = param.grad.clone(), ref_params[name].grad
            if is_tp_partial(param):
                dist.all_reduce(grad, group=group)
            elif is_tp_sharded(param):
                expected = local_shard(expected, tp_rule(prefix + f"{block}.{name}"), group)
            torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, n=name: f"{block}.{n}: {m}")
        ref_block.zero_grad(set_to_none=True)


def _train(parallel, model, batches, steps=3):
    optimizer = MasterAdamW(model, lr=0.0, weight_decay=0.01, master_dtype=torch.float64)
    results = [train_step(model, optimizer, batches, parallel, lr=3e-2, max_grad_norm=CLIP) for _ in range(steps)]
    return optimizer, results


def _tp_equals_tp1(rank, world_size):
    torch.set_num_threads(1)  # two processes on a small CPU: oversubscribed OpenMP threads spin and stall
    parallel = init_parallel(tp=2)
    assert (parallel.dp, parallel.tp, parallel.tp_rank) == (1, 2, rank)
    single = ParallelState()
    for frozen in (False, True):
        full = tiny_model()
        if frozen:
            _freeze_language(full)
        batch = make_batch(full.config, 2, 24, [(0, 2), (1, 15)], seed=1)  # sample 1's image is cut at the end
        # each rank packs its own shards (one GEMM per modality); the single-process reference stays unpacked
        ref, tp = clone(full), shard_model_(clone(full), parallel.tp_group).pack_projections_()
        for name, param in tp.named_parameters():
            rule = tp_rule(name)
            full_shape = dict(full.named_parameters())[name].shape
            if rule.shard_dim is None:
                assert param.shape == full_shape, name
            else:
                assert param.shape[rule.shard_dim] * 2 == full_shape[rule.shard_dim], name
        if not frozen:
            _check_blocks(parallel, full, batch)
        kinds = _check_forward_and_grads(parallel, ref, tp, batch)
        layers = full.config.num_hidden_layers  # per layer 11 partial: 3 expert A + o B + 4 bridge A, 2 A + down B
        assert kinds["partial"] == layers * 11 and kinds["sharded"] > 0 and kinds["replicated"] > 0, kinds
        assert kinds["frozen"] == sum(not p.requires_grad for p in full.parameters())
        assert not frozen or kinds["frozen"] > 10

        micro = [slice_batch(batch, 0, 1), slice_batch(batch, 1, 2)]
        if frozen:
            tp.activation_checkpointing_enable()  # recomputation re-issues the forward "g"; results must not change
        opt_ref, res_ref = _train(single, ref, micro)
        opt_tp, res_tp = _train(parallel, tp, micro)
        for a, b in zip(res_ref, res_tp):
            assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
        assert res_ref[0].grad_norm > CLIP  # clipping is exercised
        assert res_ref[-1].loss < res_ref[0].loss
        ref_params = dict(ref.named_parameters())
        replicated = []
        for name, param in tp.named_parameters():
            expected = local_shard(ref_params[name].detach(), tp_rule(name), parallel.tp_group)
            torch.testing.assert_close(param.detach(), expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")
            if not param.requires_grad:
                original = local_shard(dict(full.named_parameters())[name].detach(), tp_rule(name),
                                       parallel.tp_group)
                assert torch.equal(param.detach(), original), f"frozen {name} changed"
                assert name not in opt_tp.masters and name not in opt_tp.main_grads
            if not is_tp_sharded(param):
                replicated.append((name, param.detach()))
        check_replicated_equal(replicated, parallel.tp_group)
        state = opt_tp.named_state()
        assert len(state) == sum(p.requires_grad for p in tp.parameters())

    # Collectives of the blocks: 2 all-reduces per layer forward ("g" of attention and MLP), 2 backward ("f"). (The
    # vocab-parallel loss's own reductions belong to the operator and are tested with it.)
    model = shard_model_(tiny_model(), parallel.tp_group)
    COLLECTIVES.clear()
    out = model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"])
    assert COLLECTIVES[("all_reduce", "forward")] == 2 * layers
    assert COLLECTIVES[("all_reduce", "backward")] == 0
    loss = model.loss(out.head_inputs, out.layout, batch["labels"])
    loss.backward()
    assert COLLECTIVES[("all_reduce", "backward")] == 2 * layers
    assert COLLECTIVES[("all_reduce", "forward")] == 2 * layers


def test_tp2_equals_tp1_whole_model_grads_and_adamw_steps():
    run_in_process_group(_tp_equals_tp1, 2)


def _dp_equals_doubled_batch(rank, world_size):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=1)
    assert (parallel.dp, parallel.dp_rank, parallel.tp) == (2, rank, 1)
    full = tiny_model()
    # Images only in rank 0's samples: rank 1 sees no vision token at all.
    batch = make_batch(full.config, 4, 20, [(0, 3), (1, 0)], seed=2)
    reference = clone(full)
    _, res_ref = _train(ParallelState(), reference, [batch])
    mine = slice_batch(batch, 2 * rank, 2 * rank + 2)
    model = clone(full)
    _, res_dp = _train(parallel, model, [slice_batch(mine, 0, 1), slice_batch(mine, 1, 2)])  # with accumulation
    for a, b in zip(res_ref, res_dp):
        assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
        assert a.tokens == b.tokens == 80
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_dp2_equals_one_process_with_the_doubled_batch():
    run_in_process_group(_dp_equals_doubled_batch, 2)


def _tp_2d_equals_tp1(rank, world_size):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=2)
    full = tiny_model(vision_prediction_mode="2d")
    batch = make_batch(full.config, 2, 24, [(0, 1), (1, 12)], seed=3)
    ref, tp = clone(full), shard_model_(clone(full), parallel.tp_group)
    assert tp.lm_head.weight.shape[0] * 2 == full.lm_head.weight.shape[0]  # the text head is vocab-parallel
    kinds = _check_forward_and_grads(parallel, ref, tp, batch)
    assert kinds["partial"] > 0 and kinds["sharded"] > 0
    # The step's loss is the model's own loss, and a TP=2 step equals a TP=1 step.
    own = full(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
               labels=batch["labels"]).loss
    micro = [slice_batch(batch, 0, 1), slice_batch(batch, 1, 2)]
    ref, tp = clone(full), shard_model_(clone(full), parallel.tp_group)
    _, res_ref = _train(ParallelState(), ref, micro)
    _, res_tp = _train(parallel, tp, micro)
    assert abs(res_ref[0].loss - float(own)) < 1e-10
    for a, b in zip(res_ref, res_tp):
        assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
    assert res_tp[-1].loss < res_tp[0].loss
    ref_params = dict(ref.named_parameters())
    for name, param in tp.named_parameters():
        expected = local_shard(ref_params[name].detach(), tp_rule(name), parallel.tp_group)
        torch.testing.assert_close(param.detach(), expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_tp2_equals_tp1_in_2d_vision_prediction_mode():
    run_in_process_group(_tp_2d_equals_tp1, 2)


def _tp_packed_equals_tp1(rank, world_size):
    torch.set_num_threads(1)
    parallel = init_parallel(tp=2)
    full = tiny_model()
    batch = make_batch(full.config, 2, 24, [(0, 1), (1, 12)], seed=4)
    # packed rows: row 0 = documents [0, 14) and [14, 24); row 1 = [0, 5), [5, 23) (its image inside), [23, 24)
    batch["document_ids"] = torch.tensor([[0] * 14 + [1] * 10, [0] * 5 + [1] * 18 + [2]])
    ref, tp = clone(full), shard_model_(clone(full), parallel.tp_group).pack_projections_()
    inputs = dict(contiguous_signal=batch["contiguous_signal"], document_ids=batch["document_ids"],
                  return_logits=True)
    out_ref = ref(batch["input_ids"], batch["vision_indices"], **inputs)
    out_tp = tp(batch["input_ids"], batch["vision_indices"], **inputs)
    finite = out_ref.logits.isfinite()
    assert torch.equal(finite, out_tp.logits.isfinite())
    torch.testing.assert_close(out_tp.logits[finite], out_ref.logits[finite], **TOL)
    # the packed rows are not the unpacked ones (the documents do not see each other) ...
    plain = ref(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                return_logits=True).logits
    assert not torch.allclose(plain[finite], out_ref.logits[finite])
    # ... and a TP=2 step with packed micro-batches equals the TP=1 step
    _, res_ref = _train(ParallelState(), ref, [batch])
    _, res_tp = _train(parallel, tp, [batch])
    for a, b in zip(res_ref, res_tp):
        assert abs(a.loss - b.loss) < 1e-10 and abs(a.grad_norm - b.grad_norm) < 1e-10, (a, b)
    ref_params = dict(ref.named_parameters())
    for name, param in tp.named_parameters():
        expected = local_shard(ref_params[name].detach(), tp_rule(name), parallel.tp_group)
        torch.testing.assert_close(param.detach(), expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_tp2_equals_tp1_with_packed_rows():
    run_in_process_group(_tp_packed_equals_tp1, 2)
