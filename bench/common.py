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
