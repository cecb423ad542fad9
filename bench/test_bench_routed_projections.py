"""The fused attention input projection: q, k, v and the two bridge A factors of one layer in one GEMM per modality
(``routed_projections``, with and without weights packed by ``pack_rows``), forward+backward with every weight
trained, against five ``routed_linear`` calls (both with the "auto" backend).

GPU: the pre and sft mixes (docs/performance.md) at LLaMA-2-7B sizes in bfloat16. CPU: an eighth of the rows and a
sixteenth of the widths, float32, so the suite runs on a development machine (CPU numbers are not performance
targets; on a shared machine they vary by tens of percent, hence the best of two interleaved rounds).
"""

import pytest
import torch
from common import best_of_rounds

from libra_kernels import routed_linear
from libra_kernels.ops.routed_projections import pack_rows, routed_projections

# (name, T, n_text): pre = 8 rows of 640 tokens with one 578-token image each; sft = 2 rows of 2048, one image each.
GPU_MIXES = [("pre", 5120, 8 * (640 - 578)), ("sft", 4096, 2 * (2048 - 578))]
CPU_MIXES = [("pre/8", 640, 62), ("sft/8", 512, 368)]
# (hidden, expert rank of q/k/v): LLaMA-2-7B with Libra's rank (hidden / 4), and the CPU sixteenth.
GPU_ATTENTION, CPU_ATTENTION = (4096, 1024), (256, 64)
BRIDGE_RANK = 8
CPU_REPS = dict(warmup=2, reps=6)


def _flops(n_text, n_vision, d_in, d_out, rank):
    return 3 * (2 * n_text * d_in * d_out + 2 * n_vision * rank * (d_in + d_out))


@pytest.mark.parametrize("mix", range(2))
def test_fused_attention_input_projection(benchmark, record, device, mix):
    """q, k, v and the bridge A factors: one routed_projections call on packed weights against five routed_linear
    calls (both with the "auto" backend)."""
    gpu = device.type == "cuda"
    mix_name, rows, n_text = (GPU_MIXES if gpu else CPU_MIXES)[mix]
    hidden, rank = GPU_ATTENTION if gpu else CPU_ATTENTION
    dtype = torch.bfloat16 if gpu else torch.float32
    make = lambda *s: (torch.randn(*s, device=device, dtype=dtype) / s[-1] ** 0.5).requires_grad_()
    x = make(rows, hidden)
    w_text = [make(hidden, hidden) for _ in range(3)] + [make(BRIDGE_RANK, hidden) for _ in range(2)]
    w_a = [make(rank, hidden) for _ in range(3)] + [make(BRIDGE_RANK, hidden) for _ in range(2)]
    w_b = [make(hidden, rank) for _ in range(3)] + [None, None]
    leaves = [x] + w_text + w_a + w_b[:3]
    grads = [torch.randn(rows, w.shape[0], device=device, dtype=dtype) for w in w_text]

    def separate():
        outs = [routed_linear(x, n_text, t, a, b) for t, a, b in zip(w_text, w_a, w_b)]
        return torch.autograd.grad(outs, leaves, grads)

    def fused():
        return torch.autograd.grad(routed_projections(x, n_text, w_text, w_a, w_b), leaves, grads)

    rounds = 1 if device.type == "cuda" else 2
    separate_label = "5 routed_linear calls"
    results = best_of_rounds({separate_label: separate, "routed_projections, unpacked": fused}, device, rounds,
                             CPU_REPS)
    with torch.no_grad():
        pack_rows(w_text), pack_rows(w_a)
    # the separate calls again, interleaved with the packed run (they do not use the packing): the better time counts
    again = best_of_rounds({separate_label: separate, "routed_projections, packed": fused}, device, rounds, CPU_REPS)
    if again[separate_label]["ms"] < results[separate_label]["ms"]:
        results[separate_label] = again[separate_label]
    results["routed_projections, packed"] = again["routed_projections, packed"]
    benchmark.pedantic(fused, rounds=3, warmup_rounds=1)
    base = results[separate_label]["ms"]
    flops = 3 * _flops(n_text, rows - n_text, hidden, hidden, rank) + 2 * _flops(n_text, rows - n_text, hidden,
                                                                                 BRIDGE_RANK, BRIDGE_RANK)
    for label, result in results.items():
        record("routed_projections", dict(op="q,k,v + bridge A fwd+bwd", shape=mix_name, dtype=str(dtype)[6:],
                                          impl=label, **result, tflops=flops / result["ms"] / 1e9,
                                          ratio=result["ms"] / base, baseline=separate_label))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
