"""Timing, provenance and the one JSON writer of the benchmark suite.

Times are medians with 20th/80th percentiles: ``triton.testing.do_bench`` on CUDA (it synchronises and flushes
L2), a synchronous wall-clock loop on the CPU. Every record carries the device, library versions, git commit and
a UTC timestamp, and is written by :func:`write_results`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.environ.get("LIBRA_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> dict:
    """Time ``fn`` (which must do all its work before returning on the CPU) -> {"ms", "p20_ms", "p80_ms"}."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"ms": statistics.median(times), "p20_ms": quantiles[1], "p80_ms": quantiles[7]}


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def best_of_rounds(candidates: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                   cpu_reps: dict | None = None) -> dict[str, dict]:
    """Median time per candidate, the best of ``rounds`` interleaved rounds (a shared CPU is noisy), with its peak
    memory; ``cpu_reps`` ({"warmup", "reps"}) replaces measure's defaults on the CPU."""
    results = {}
    for _ in range(rounds):
        for label, step in candidates.items():
            result = measure(step, device, **({} if device.type == "cuda" else (cpu_reps or {})))
            if label not in results or result["ms"] < results[label]["ms"]:
                results[label] = result
    for label, step in candidates.items():
        results[label]["peak_mib"] = peak_memory_mib(step, device)
    return results


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    """Device, versions, commit and time of a benchmark run."""
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "commit": _git_commit(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_results(name: str, device: torch.device, rows: list[dict]) -> str:
    """Write ``rows`` with the run's provenance to ``<RESULTS_DIR>/<name>-<device>.json``; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{device.type}.json")
    with open(path, "w") as f:
        json.dump({"provenance": provenance(device), "results": rows}, f, indent=2)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (missing values shown as '-')."""
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table)


# ---- what a step dispatches and keeps: the CPU-measurable side of the layer targets

# ATen ops that launch no kernel: views, metadata, allocations without a fill.
NO_KERNEL_OPS = frozenset(
    "aten::" + name for name in (
        "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand",
        "narrow", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "alias", "detach",
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unbind", "chunk", "lift_fresh",
        "resolve_conj", "resolve_neg", "_has_compatible_shallow_copy_type", "result_type", "is_nonzero",
        "view_as", "expand_as", "contiguous", "numpy_T", "_local_scalar_dense", "set_", "resize_", "item",
        "as_strided_", "to", "unflatten", "flatten", "movedim", "diagonal", "_nested_tensor_from_mask_left_aligned"))
GEMM_OPS = frozenset("aten::" + name for name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "mv",
                                                        "addmv", "dot"))
# Operators counted as one kernel each, whatever they dispatch inside on the CPU: those whose GPU path is one fused
# launch forward and one backward (bridge attention, whose CPU fallback loops over head chunks; the RoPE of q, k and
# k_bridge, whose CPU fallback is a few ATen ops per tensor), and SDPA's fused attention.
OPAQUE_PREFIXES = ("libra::bridge_attention", "libra::rotary", "aten::_scaled_dot_product",
                   "aten::_efficient_attention", "aten::_flash_attention", "aten::_cudnn_attention")


def _gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM event from its recorded input shapes (0 when they cannot be read)."""
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) in (2, 3)]
    try:
        if name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            a, b = mats[-2], mats[-1]
            if name == "aten::mm":
                a, b = mats[0], mats[1]
            return 2 * a[0] * a[1] * b[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (mats[0], mats[1]) if name == "aten::bmm" else (mats[-2], mats[-1])
            return 2 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError):
        return 0
    return 0


def kernel_census(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once under the profiler and count the ATen kernels it dispatches, including those inside C++
    operators: every leaf ATen or libra op except views, metadata, bare allocations and no-op casts; a GEMM or a fused
    attention operator (``OPAQUE_PREFIXES``) counts as one kernel whatever it dispatches inside on the CPU (one
    launch on a GPU). Returns {"kernels", "gemms", "gemm_flops", "by_op"}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    counts: dict[str, int] = {}
    gemms = flops = 0

    def opaque(event) -> bool:
        return event.name.startswith(OPAQUE_PREFIXES) or event.name in GEMM_OPS

    def is_kernel(event) -> bool:
        # a libra C++ operator that dispatches no ATen kernel inside is one kernel itself (the fused norm, the
        # layout's gathers); one that does is counted by what it dispatches
        return event.name.startswith(("aten::", "libra::")) and event.name not in NO_KERNEL_OPS

    def inside_opaque(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if opaque(parent):
                return True
            parent = parent.cpu_parent
        return False

    def launches_below(event) -> bool:
        return any(is_kernel(child) or opaque(child) or launches_below(child) for child in event.cpu_children)

    for event in prof.events():
        if inside_opaque(event):
            continue
        if not opaque(event) and (not is_kernel(event) or launches_below(event)):
            continue
        counts[event.name] = counts.get(event.name, 0) + 1
        if event.name in GEMM_OPS:
            gemms += 1
            flops += _gemm_flops(event.name, event.input_shapes)
    return {"kernels": sum(counts.values()), "gemms": gemms, "gemm_flops": flops,
            "by_op": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the activations autograd keeps for backward while ``fn`` (a forward) runs: every saved tensor's
    storage counted once (a view keeps its whole buffer), the tensors of ``exclude`` (the parameters) left out.
    Works on meta tensors, so full-size shapes cost no memory."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
