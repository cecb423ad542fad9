"""pytest-benchmark settings of the suite: ``pytest bench/ --benchmark`` runs it; without the flag the benchmark
tests are skipped, so a plain ``pytest bench/`` costs nothing."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the Libra benchmark suite (timings against the baselines, JSON under bench/results)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest bench/ --benchmark`")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """The device benchmarked: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_RESULTS: dict[str, list[dict]] = {}
TABLE_COLUMNS = ["op", "shape", "dtype", "impl", "ms", "p20_ms", "p80_ms", "peak_mib", "tflops", "gbps", "ratio",
                 "mem_ratio", "baseline", "libra_kernels", "llama_kernels", "kernels_ratio", "libra_gemms",
                 "llama_gemms", "libra_saved_mib", "llama_saved_mib", "saved_ratio", "libra_gemm_flops_ratio",
                 "llama_gemm_flops_ratio", "tokens_per_s", "mfu"]


@pytest.fixture(scope="session")
def record(device):
    """``record(suite, row)`` collects a result row; at the end of the run each suite's rows are printed as a table
    and written with their provenance to bench/results/<suite>-<device>.json (bench/common.py)."""
    def add(suite: str, row: dict) -> None:
        _RESULTS.setdefault(suite, []).append(row)
    add.device = device
    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from common import format_table, write_results

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for suite, rows in _RESULTS.items():
        path = write_results(suite, device, rows)
        columns = [c for c in TABLE_COLUMNS if any(c in row for row in rows)]
        terminalreporter.write_sep("-", f"{suite} ({device.type}) -> {path}")
        terminalreporter.write_line(format_table(rows, columns))
