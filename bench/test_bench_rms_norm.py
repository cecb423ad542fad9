"""Routed RMSNorm forward+backward: each backend against the eager reference (``routed_rms_norm_ref``)."""

import pytest
import torch
from common import measure, peak_memory_mib

from libra_kernels import routed_rms_norm, routed_rms_norm_ref
from libra_kernels.ops.rms_norm import TABLE

# (name, T, n_text, D): the pre and sft mixes of PERF.md; a quarter of the rows on the CPU to keep the suite quick.
GPU_SHAPES = [("pre", 5120, 512, 4096), ("sft", 4096, 2949, 4096)]
CPU_SHAPES = [("pre/4", 1280, 128, 4096), ("sft/4", 1024, 737, 4096)]


def _fwd_bwd(fn, x, w_text, w_vision, grad):
    def step():
        for t in (x, w_text, w_vision):
            t.grad = None
        fn(x, w_text, w_vision).backward(grad)
    return step


@pytest.mark.parametrize("shape", range(2))
def test_routed_rms_norm(benchmark, record, device, shape):
    name, rows, n_text, width = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)
    x, w_text, w_vision = make(rows, width), make(width), make(width)
    grad = torch.randn(rows, width, device=device, dtype=dtype)
    candidates = {"eager reference": lambda x, wt, wv: routed_rms_norm_ref(x, n_text, wt, wv)}
    for backend, kernel in TABLE.kernels.items():
        if not kernel.unavailable(device):
            candidates[f"libra {backend}"] = (lambda b: lambda x, wt, wv: routed_rms_norm(x, n_text, wt, wv,
                                                                                       backend=b))(backend)
    results = {}
    for label, fn in candidates.items():
        step = _fwd_bwd(fn, x, w_text, w_vision, grad)
        results[label] = dict(measure(step, device), peak_mib=peak_memory_mib(step, device))
    fastest = "libra " + TABLE.resolve("auto", device)
    benchmark.pedantic(_fwd_bwd(candidates[fastest], x, w_text, w_vision, grad), rounds=5, warmup_rounds=1)
    base = results["eager reference"]["ms"]
    for label, result in results.items():
        record("routed_rms_norm", dict(op="routed_rms_norm fwd+bwd", shape=name, dtype=str(dtype).split(".")[-1],
                                       impl=label, **result, ratio=result["ms"] / base, baseline="eager reference"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
