"""Routed RMSNorm forward+backward: each backend against the eager reference (``routed_rms_norm_ref``), without and
with the residual add that precedes every decoder-layer norm (fused: ``routed_rms_norm(..., residual=h)``; eager:
``h = x + residual`` then the norm). The kernel is memory-bound, so the GB/s column counts the bytes every
implementation must move at least: read x (and the residual), write y (and h); read dy, x (and dh), write dx."""

import pytest
import torch
from common import measure, peak_memory_mib

from libra_kernels import routed_rms_norm, routed_rms_norm_ref
from libra_kernels.ops.routed_rms_norm import TABLE

# (name, T, n_text, D): the docs/performance.md pre and sft mixes; a quarter of the rows on the CPU to keep the suite
# quick.
GPU_SHAPES = [("pre", 5120, 8 * (640 - 578), 4096), ("sft", 4096, 2 * (2048 - 578), 4096)]
CPU_SHAPES = [("pre/4", 1280, 124, 4096), ("sft/4", 1024, 735, 4096)]


def _add_then_norm(x, residual, n_text, w_text, w_vision, backend):
    h = x + residual
    return routed_rms_norm(h, n_text, w_text, w_vision, backend=backend), h


def _step(fn, inputs, grads):
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, leaves, grads[:len(outs)])
    return step


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", range(2))
def test_routed_rms_norm(benchmark, record, device, shape, residual):
    name, rows, n_text, width = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)
    inputs = (make(rows, width), make(width), make(width)) + ((make(rows, width),) if residual else ())
    grads = (torch.randn(rows, width, device=device, dtype=dtype), torch.randn(rows, width, device=device, dtype=dtype))
    if residual:
        candidates = {"eager add + eager reference": lambda x, wt, wv, r: routed_rms_norm_ref(x, n_text, wt, wv,
                                                                                            residual=r)}
        for backend, kernel in TABLE.kernels.items():
            if not kernel.unavailable(device):
                candidates[f"libra {backend}, fused add"] = (lambda b: lambda x, wt, wv, r: routed_rms_norm(
                    x, n_text, wt, wv, 1e-6, r, backend=b))(backend)
                candidates[f"eager add + libra {backend}"] = (lambda b: lambda x, wt, wv, r: _add_then_norm(
                    x, r, n_text, wt, wv, b))(backend)
        baseline, fastest = "eager add + eager reference", f"libra {TABLE.resolve('auto', device)}, fused add"
    else:
        candidates = {"eager reference": lambda x, wt, wv: routed_rms_norm_ref(x, n_text, wt, wv)}
        for backend, kernel in TABLE.kernels.items():
            if not kernel.unavailable(device):
                candidates[f"libra {backend}"] = (lambda b: lambda x, wt, wv: routed_rms_norm(x, n_text, wt, wv,
                                                                                           backend=b))(backend)
        baseline, fastest = "eager reference", f"libra {TABLE.resolve('auto', device)}"
    results = {}
    for label, fn in candidates.items():
        step = _step(fn, inputs, grads)
        results[label] = dict(measure(step, device), peak_mib=peak_memory_mib(step, device))
    benchmark.pedantic(_step(candidates[fastest], inputs, grads), rounds=5, warmup_rounds=1)
    base = results[baseline]["ms"]
    # forward: x (+ residual) in, y (+ h) out; backward: dy (+ dh), x in, dx out
    tensors = (2 + 2 * residual) + (3 + residual)
    min_bytes = tensors * rows * width * inputs[0].element_size()
    op = "routed_rms_norm" + (" + residual add" if residual else "") + " fwd+bwd"
    for label, result in results.items():
        record("routed_rms_norm", dict(op=op, shape=name, dtype=str(dtype).split(".")[-1], impl=label, **result,
                                       gbps=min_bytes / result["ms"] / 1e6, ratio=result["ms"] / base,
                                       baseline=baseline))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
