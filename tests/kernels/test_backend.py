import subprocess
import sys

import pytest
import torch

from libra_kernels import _ext, routed_linear, routed_rms_norm
from libra_kernels.ops import bridge_attention
from libra_kernels.ops import discrete_token_cross_entropy as cross_entropy
from libra_kernels.ops import routed_linear as routed_linear_module
from libra_kernels.ops import routed_rms_norm as rms_norm

TABLES = [rms_norm.TABLE, routed_linear_module.TABLE, bridge_attention.TABLE, cross_entropy.TABLE]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.op_name)
def test_auto_resolves_to_a_runnable_backend(table):
    name = table.resolve("auto", torch.device("cpu"))
    assert name in table.kernels and not table.kernels[name].unavailable(torch.device("cpu"))


def test_cpp_is_auto_on_cpu_when_built():
    expected = "cpp" if _ext.cpp_extension_loaded() else "torch"
    assert rms_norm.TABLE.resolve("auto", torch.device("cpu")) == expected


def test_environment_prefers_a_backend(monkeypatch):
    monkeypatch.setenv("LIBRA_BACKEND", "torch")
    assert rms_norm.TABLE.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("LIBRA_BACKEND", "triton")  # the norm has no Triton kernel: auto's usual order applies
    assert rms_norm.TABLE.resolve("auto", torch.device("cpu")) == ("cpp" if _ext.cpp_extension_loaded() else "torch")
    monkeypatch.setenv("LIBRA_BACKEND", "fast")
    with pytest.raises(ValueError, match="LIBRA_BACKEND"):
        rms_norm.TABLE.resolve("auto", torch.device("cpu"))


def test_explicit_backend_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="has no 'triton' backend"):
        routed_rms_norm(x, 2, torch.ones(8), torch.ones(8), backend="triton")
    with pytest.raises(TypeError, match="backend must be a string"):
        routed_linear(x, 2, torch.ones(3, 8), torch.ones(3, 8), backend=None)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_load_error", "No module named 'libra_kernels._C'")
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        routed_rms_norm(torch.randn(4, 8), 2, torch.ones(8), torch.ones(8), backend="cpp")
    with pytest.raises(RuntimeError, match="not built"):
        _ext.require_cpp_extension("the test")
    # auto falls back to the reference
    assert rms_norm.TABLE.resolve("auto", torch.device("cpu")) == "torch"


def test_package_imports_without_extension():
    code = ("import sys; sys.modules['libra_kernels._C'] = None\n"
            "import torch, libra_kernels\n"
            "assert not libra_kernels.cpp_extension_loaded()\n"
            "y = libra_kernels.routed_rms_norm(torch.randn(3, 4), 1, torch.ones(4), torch.ones(4))\n"
            "print(tuple(y.shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 4)"
