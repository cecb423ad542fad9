"""Vocab-parallel discrete-token loss on gloo: with the text head sharded over 2 ranks, every rank's loss, gradient of
h, gradient of its text shard and gradient of the vision heads equal the unsharded operator's, and the vision
gradients are bit-identical across ranks."""

import pytest
import torch
import torch.distributed as dist

from libra_kernels import discrete_token_cross_entropy
from libra_kernels.ops.discrete_token_cross_entropy import TABLE
from libra_kernels.testing import assert_close_to_ref, random_labels, run_in_process_group

pytestmark = pytest.mark.dist

BACKENDS = [name for name, kernel in TABLE.kernels.items() if not kernel.unavailable(torch.device("cpu"))]
CASES = [  # n_text, n_vision, hidden, V, Vv, C, reduction, options, dtype, chunk_elements, grads of (h, w_text, w_v)
    (23, 41, 33, 98, 19, 2, "mean", dict(), torch.float64, None, (True, True, True)),
    (23, 41, 33, 98, 19, 2, "sum", dict(label_smoothing=0.1, z_loss_weight=0.02), torch.float32, 5 * 49,
     (True, True, True)),
    (17, 9, 16, 64, 7, 2, "none", dict(label_smoothing=0.2), torch.float64, 3 * 32, (True, True, True)),
    (31, 12, 16, 64, 7, 3, "mean", dict(z_loss_weight=0.05), torch.float32, None, (True, False, True)),  # frozen
    (0, 25, 8, 30, 5, 2, "mean", dict(label_smoothing=0.1), torch.float64, None, (True, True, True)),  # all vision
    (19, 0, 8, 30, 5, 2, "none", dict(z_loss_weight=0.01), torch.float64, 40, (True, True, False)),  # all text
]


def _run(inputs, dtype, grads, **kwargs):
    # copy=True: a fresh leaf per run even in float64, so the two runs' gradients never accumulate into one tensor.
    leaves = {k: inputs[k].to(dtype, copy=True).requires_grad_(need)
              for k, need in zip(("h", "w_text", "w_vision"), grads)}
    loss, z_loss = discrete_token_cross_entropy(leaves["h"], inputs["n_text"], leaves["w_text"], leaves["w_vision"],
                                                inputs["labels"], return_z_loss=True, **kwargs)
    cotangent = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(cotangent)
    return loss.detach(), z_loss, {k: t.grad for k, t in leaves.items()}


def _check_cases(rank, world_size):
    group = dist.group.WORLD
    for index, (n_text, n_vision, hidden, vocab, vision_vocab, codebooks, reduction, options, dtype, chunk,
                grads) in enumerate(CASES):
        torch.manual_seed(1234 + index)  # the same full inputs on every rank
        inputs = dict(h=torch.randn(n_text + n_vision, hidden, dtype=torch.float64), n_text=n_text,
                      w_text=torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5,
                      w_vision=torch.randn(codebooks, vision_vocab, hidden, dtype=torch.float64) / hidden**0.5,
                      labels=random_labels(n_text, n_vision, vocab, vision_vocab, codebooks, 0.2))
        shard = vocab // world_size
        rows = slice(rank * shard, (rank + 1) * shard)
        sharded = dict(inputs, w_text=inputs["w_text"][rows].clone())
        common = dict(reduction=reduction, chunk_elements=chunk, **options)
        for backend in BACKENDS:
            name = f"case {index} {backend}"
            loss, z_loss, full = _run(inputs, dtype, grads, backend=backend, **common)
            tp_loss, tp_z_loss, tp = _run(sharded, dtype, grads, backend=backend, process_group=group, **common)
            assert_close_to_ref(tp_loss, loss, None, dtype, f"{name}: loss")
            assert_close_to_ref(tp_z_loss, z_loss, None, dtype, f"{name}: z_loss")
            for key, need in zip(("h", "w_text", "w_vision"), grads):
                if not need:
                    assert tp[key] is None, f"{name}: {key} got a gradient it did not ask for"
                    continue
                expected = full[key][rows] if key == "w_text" else full[key]
                assert_close_to_ref(tp[key], expected, None, dtype, f"{name}: grad of {key}")
            # Replicated results are identical across ranks, not merely close.
            for key, value in (("loss", tp_loss), ("h", tp["h"]), ("w_vision", tp["w_vision"])):
                if value is None:
                    continue
                gathered = [torch.empty_like(value) for _ in range(world_size)]
                dist.all_gather(gathered, value.contiguous(), group=group)
                assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: {key} differs across ranks"


def test_vocab_parallel_equals_unsharded():
    run_in_process_group(_check_cases, 2)
