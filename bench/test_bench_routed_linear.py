"""Routed projections forward+backward (every weight trained) on the sorted layout, against:

- "pre-sorted GEMMs": the same GEMMs on pre-sorted contiguous rows under plain autograd (the floor; PERF.md target
  routed_linear / this <= 1.05);
- "index_select": rows gathered by index, the GEMMs, the results put back with index_copy (sequence order);
- "boolean mask": the reference implementation's x[mask] gather and y[mask] = ... scatter (a host sync each).

Also the fused attention input projection (q, k, v and the two bridge A factors in one GEMM per modality,
``routed_projections`` on packed weights) against five routed_linear calls.

GPU: the PERF.md pre and sft mixes at LLaMA-2-7B sizes in bfloat16. CPU: an eighth of the rows and a sixteenth of
the widths, float32, so the suite runs on a development machine (CPU numbers are not performance targets; on a shared
machine they vary by tens of percent, hence the best of two interleaved rounds).
"""

import pytest
import torch
from common import measure, peak_memory_mib

from libra_kernels import routed_linear
from libra_kernels.ops.routed_linear import TABLE
from libra_kernels.ops.routed_projections import pack_rows, routed_projections

# (name, T, n_text): pre = 8 rows of 640 tokens with one 578-token image each; sft = 2 rows of 2048, one image each.
GPU_MIXES = [("pre", 5120, 8 * (640 - 578)), ("sft", 4096, 2 * (2048 - 578))]
CPU_MIXES = [("pre/8", 640, 62), ("sft/8", 512, 368)]
# (name, in, out, rank): LLaMA-2-7B's q/k/v/o, gate/up and down with Libra's expert ranks (out / 4).
GPU_PROJECTIONS = [("q/k/v/o", 4096, 4096, 1024), ("gate/up", 4096, 11008, 2752), ("down", 11008, 4096, 1024)]
CPU_PROJECTIONS = [("q/k/v/o", 256, 256, 64), ("gate/up", 256, 688, 172), ("down", 688, 256, 64)]
BRIDGE_RANK = 8
CPU_REPS = dict(warmup=2, reps=6)


def _setup(device):
    gpu = device.type == "cuda"
    return (GPU_MIXES if gpu else CPU_MIXES), (GPU_PROJECTIONS if gpu else CPU_PROJECTIONS), \
        (torch.bfloat16 if gpu else torch.float32)


def _flops(n_text, n_vision, d_in, d_out, rank):
    return 3 * (2 * n_text * d_in * d_out + 2 * n_vision * rank * (d_in + d_out))


def _candidates(x, n_text, w_text, a, b, grad):
    """name -> a function running forward+backward once (gradients returned, not accumulated)."""
    rows = x.shape[0]
    weights = (w_text, a, b)
    mask = torch.zeros(rows, dtype=torch.bool, device=x.device)
    mask[n_text:] = True
    # A sequence order in which the two groups interleave, as they do before sorting.
    order = torch.randperm(rows, device=x.device)
    text_index, vision_index = order[:n_text].sort().values, order[n_text:].sort().values
    seq_mask = torch.zeros(rows, dtype=torch.bool, device=x.device)
    seq_mask[vision_index] = True
    x_text = x[:n_text].detach().clone().requires_grad_()
    x_vision = x[n_text:].detach().clone().requires_grad_()
    grad_text, grad_vision = grad[:n_text].contiguous(), grad[n_text:].contiguous()

    def presorted():
        y_text = x_text @ w_text.T
        y_vision = (x_vision @ a.T) @ b.T
        return torch.autograd.grad([y_text, y_vision], (x_text, x_vision) + weights, [grad_text, grad_vision])

    def index_select():
        y_text = x.index_select(0, text_index) @ w_text.T
        y_vision = (x.index_select(0, vision_index) @ a.T) @ b.T
        y = x.new_zeros(rows, w_text.shape[0]).index_copy(0, text_index, y_text).index_copy(0, vision_index, y_vision)
        return torch.autograd.grad(y, (x,) + weights, grad)

    def boolean_mask():
        y = x.new_zeros(rows, w_text.shape[0])
        y[~seq_mask] = x[~seq_mask] @ w_text.T
        y[seq_mask] = (x[seq_mask] @ a.T) @ b.T
        return torch.autograd.grad(y, (x,) + weights, grad)

    candidates = {"pre-sorted GEMMs": presorted}
    for backend, kernel in TABLE.kernels.items():
        if not kernel.unavailable(x.device):
            candidates[f"libra {backend}"] = (lambda name: lambda: torch.autograd.grad(
                routed_linear(x, n_text, w_text, a, b, backend=name), (x,) + weights, grad))(backend)
    candidates.update({"index_select + index_copy": index_select, "boolean mask (reference)": boolean_mask})
    return candidates


def _run(candidates, device, rounds):
    """Median time per candidate, the best of ``rounds`` interleaved rounds (a shared CPU is noisy)."""
    results = {}
    for _ in range(rounds):
        for label, step in candidates.items():
            result = measure(step, device, **({} if device.type == "cuda" else CPU_REPS))
            if label not in results or result["ms"] < results[label]["ms"]:
                results[label] = result
    for label, step in candidates.items():
        results[label]["peak_mib"] = peak_memory_mib(step, device)
    return results


@pytest.mark.parametrize("mix", range(2))
@pytest.mark.parametrize("projection", range(3))
def test_routed_linear(benchmark, record, device, mix, projection):
    mixes, projections, dtype = _setup(device)
    mix_name, rows, n_text = mixes[mix]
    name, d_in, d_out, rank = projections[projection]
    make = lambda *s: (torch.randn(*s, device=device, dtype=dtype) / s[-1] ** 0.5).requires_grad_()
    x, w_text, a, b = make(rows, d_in), make(d_out, d_in), make(rank, d_in), make(d_out, rank)
    grad = torch.randn(rows, d_out, device=device, dtype=dtype)
    candidates = _candidates(x, n_text, w_text, a, b, grad)
    results = _run(candidates, device, rounds=1 if device.type == "cuda" else 2)
    fastest = "libra " + TABLE.resolve("auto", device)
    benchmark.pedantic(candidates[fastest], rounds=3, warmup_rounds=1)
    base = results["pre-sorted GEMMs"]["ms"]
    flops = _flops(n_text, rows - n_text, d_in, d_out, rank)
    for label, result in results.items():
        record("routed_linear", dict(op=f"routed_linear {name} fwd+bwd", shape=mix_name, dtype=str(dtype)[6:],
                                     impl=label, **result, tflops=flops / result["ms"] / 1e9,
                                     ratio=result["ms"] / base, baseline="pre-sorted GEMMs"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})


@pytest.mark.parametrize("mix", range(2))
def test_fused_attention_input_projection(benchmark, record, device, mix):
    """q, k, v and the bridge A factors: one routed_projections call on packed weights against five routed_linear
    calls (both with the "auto" backend)."""
    mixes, projections, dtype = _setup(device)
    mix_name, rows, n_text = mixes[mix]
    _, hidden, _, rank = projections[0]
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
    results = _run({separate_label: separate, "routed_projections, unpacked": fused}, device, rounds)
    with torch.no_grad():
        pack_rows(w_text), pack_rows(w_a)
    # the separate calls again, interleaved with the packed run (they do not use the packing): the better time counts
    again = _run({separate_label: separate, "routed_projections, packed": fused}, device, rounds)
    if again[separate_label]["ms"] < results[separate_label]["ms"]:
        results[separate_label] = again[separate_label]
    results["routed_projections, packed"] = again["routed_projections, packed"]
    benchmark.pedantic(fused, rounds=3, warmup_rounds=1)
    base = results[separate_label]["ms"]
    flops = 3 * _flops(n_text, rows - n_text, hidden, hidden, rank) + 2 * _flops(n_text, rows - n_text, hidden,
                                                                                 BRIDGE_RANK, BRIDGE_RANK)
    for label, result in results.items():
        record("routed_linear", dict(op="q,k,v + bridge A fwd+bwd", shape=mix_name, dtype=str(dtype)[6:],
                                     impl=label, **result, tflops=flops / result["ms"] / 1e9,
                                     ratio=result["ms"] / base, baseline=separate_label))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
