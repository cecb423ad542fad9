"""Routed projections forward+backward (every weight trained) on the sorted layout, against:

- "pre-sorted GEMMs": the same GEMMs on pre-sorted contiguous rows under plain autograd (the floor; docs/performance.md
  target routed_linear / this <= 1.05);
- "index_select": rows gathered by index, the GEMMs, the results put back with index_copy (sequence order);
- "boolean mask": the reference implementation's x[mask] gather and y[mask] = ... scatter (a host sync each).

The fused attention input projection (``routed_projections``) is benchmarked in test_bench_routed_projections.py.
``test_routed_linear_grouped``: the grouped form on attention's k and v bridge B factors (x the [2, T, 8] view of a
[T, 2, 8] buffer, dense [kv_dim, 8] weights per bridge and modality), packed and unpacked, against two
``routed_linear`` calls (one per bridge, as before the grouped form) and the same GEMMs on pre-sorted rows.

GPU: the docs/performance.md pre and sft mixes at LLaMA-2-7B sizes in bfloat16. CPU: an eighth of the rows and a
sixteenth of the widths, float32, so the suite runs on a development machine (CPU numbers are not performance targets;
on a shared machine they vary by tens of percent, hence the best of two interleaved rounds).
"""

import pytest
import torch
from common import best_of_rounds

from libra_kernels import pack_rows, routed_linear
from libra_kernels.ops.routed_linear import GROUPED_TABLE, TABLE

# (name, T, n_text): pre = 8 rows of 640 tokens with one 578-token image each; sft = 2 rows of 2048, one image each.
GPU_MIXES = [("pre", 5120, 8 * (640 - 578)), ("sft", 4096, 2 * (2048 - 578))]
CPU_MIXES = [("pre/8", 640, 62), ("sft/8", 512, 368)]
# (name, in, out, rank): LLaMA-2-7B's q/k/v/o, gate/up and down with Libra's expert ranks (out / 4).
GPU_PROJECTIONS = [("q/k/v/o", 4096, 4096, 1024), ("gate/up", 4096, 11008, 2752), ("down", 11008, 4096, 1024)]
CPU_PROJECTIONS = [("q/k/v/o", 256, 256, 64), ("gate/up", 256, 688, 172), ("down", 688, 256, 64)]
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
    results = best_of_rounds(candidates, device, 1 if device.type == "cuda" else 2, CPU_REPS)
    fastest = "libra " + TABLE.resolve("auto", device)
    benchmark.pedantic(candidates[fastest], rounds=3, warmup_rounds=1)
    base = results["pre-sorted GEMMs"]["ms"]
    flops = _flops(n_text, rows - n_text, d_in, d_out, rank)
    for label, result in results.items():
        record("routed_linear", dict(op=f"routed_linear {name} fwd+bwd", shape=mix_name, dtype=str(dtype)[6:],
                                     impl=label, **result, tflops=flops / result["ms"] / 1e9,
                                     ratio=result["ms"] / base, baseline="pre-sorted GEMMs"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})


# the bridge B factors: kv_dim outputs from the rank-8 products (LLaMA-2-7B: kv_dim 4096; CPU: a sixteenth)
GPU_BRIDGE, CPU_BRIDGE = (4096, 8), (256, 8)


@pytest.mark.parametrize("mix", range(2))
def test_routed_linear_grouped(benchmark, record, device, mix):
    mixes, _, dtype = _setup(device)
    mix_name, rows, n_text = mixes[mix]
    kv_dim, rank = GPU_BRIDGE if device.type == "cuda" else CPU_BRIDGE
    make = lambda *s: (torch.randn(*s, device=device, dtype=dtype) / s[-1] ** 0.5).requires_grad_()
    buffer = make(rows, 2, rank)
    x = buffer.transpose(0, 1)
    language, vision = [make(kv_dim, rank) for _ in range(2)], [make(kv_dim, rank) for _ in range(2)]
    packed_language = [w.detach().clone().requires_grad_() for w in language]
    packed_vision = [w.detach().clone().requires_grad_() for w in vision]
    pack_rows(packed_language)
    pack_rows(packed_vision)
    grad = torch.randn(2, rows, kv_dim, device=device, dtype=dtype)
    grads = grad.unbind(0)
    x_text, x_vision = (buffer.detach()[:n_text].clone().requires_grad_(),
                        buffer.detach()[n_text:].clone().requires_grad_())

    def presorted():
        ys = [t for g in range(2) for t in (x_text[:, g] @ language[g].T, x_vision[:, g] @ vision[g].T)]
        cotangents = [t for g in range(2) for t in (grad[g, :n_text], grad[g, n_text:])]
        return torch.autograd.grad(ys, [x_text, x_vision, *language, *vision], cotangents)

    candidates = {"pre-sorted GEMMs": presorted}
    for backend, kernel in GROUPED_TABLE.kernels.items():
        if kernel.unavailable(device):
            continue
        for label, (wl, wv) in (("packed", (packed_language, packed_vision)), ("unpacked", (language, vision))):
            candidates[f"libra {backend} grouped, {label}"] = (lambda name, wl, wv: lambda: torch.autograd.grad(
                routed_linear(x, n_text, wl, wv, backend=name), [buffer, *wl, *wv], grad))(backend, wl, wv)
        candidates[f"libra {backend}, one call per bridge"] = (lambda name: lambda: torch.autograd.grad(
            [routed_linear(x[g], n_text, language[g], vision[g], backend=name) for g in range(2)],
            [buffer, *language, *vision], list(grads)))(backend)
    results = best_of_rounds(candidates, device, 1 if device.type == "cuda" else 2, CPU_REPS)
    fastest = f"libra {GROUPED_TABLE.resolve('auto', device)} grouped, packed"
    benchmark.pedantic(candidates[fastest], rounds=3, warmup_rounds=1)
    base = results["pre-sorted GEMMs"]["ms"]
    for label, result in results.items():
        record("routed_linear_grouped", dict(op="bridge B factors (k, v) fwd+bwd", shape=mix_name,
                                             dtype=str(dtype)[6:], impl=label, **result, ratio=result["ms"] / base,
                                             baseline="pre-sorted GEMMs"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
