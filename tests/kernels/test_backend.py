import subprocess
import sys

import pytest
import torch
from backends import RMS_NORM, ROUTED_LINEAR

from libra_kernels import _ext, routed_linear, routed_rms_norm
from libra_kernels.ops import bridge_attention
from libra_kernels.ops import discrete_token_cross_entropy as cross_entropy
from libra_kernels.ops import routed_linear as routed_linear_module
from libra_kernels.ops import routed_projections as routed_projections_module
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


# ---- one convention for the gradients not asked for: every registered backward op returns its own [0] tensor

def _check_placeholders(grads, needs, name):
    grads = list(grads)
    assert len(grads) == len(needs), f"{name}: one output per gradient"
    for i, (grad, need) in enumerate(zip(grads, needs)):
        assert (grad.numel() > 0) == need, f"{name}: output {i} (need={need}) has shape {tuple(grad.shape)}"
        if not need:
            assert grad.shape == (0,), f"{name}: an unrequested gradient must be an empty [0] tensor"
    pointers = [g.untyped_storage().data_ptr() for g in grads if g.numel() > 0]
    assert len(set(pointers)) == len(pointers), f"{name}: outputs alias each other"


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
@pytest.mark.parametrize("needs", [(True, False, True, False), (False, True, False, True), (False, False, True, True)])
def test_routed_linear_backward_returns_empty_placeholders(backend, needs):
    x, w_text, a, b = torch.randn(7, 5), torch.randn(6, 5), torch.randn(3, 5), torch.randn(6, 3)
    low = x[4:] @ a.T
    grads = routed_linear_module.routed_linear_backward_op(torch.randn(7, 6), x, low, 4, w_text, a, b, list(needs),
                                                           backend)
    _check_placeholders(grads, needs, f"routed_linear_backward {backend}")


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("needs", [(False, True), (True, False), (False, False)])
def test_routed_rms_norm_backward_returns_empty_placeholders(backend, needs):
    x = torch.randn(9, 8)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    grads = rms_norm.routed_rms_norm_backward_op(torch.randn(9, 8), x, rstd, 3, torch.randn(8), torch.randn(8),
                                                 *needs, backend)
    _check_placeholders(grads, (True, *needs), f"routed_rms_norm_backward {backend}")


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
def test_routed_projections_backward_returns_empty_placeholders(backend):
    x = torch.randn(7, 5)
    w_text, w_a = [torch.randn(6, 5), torch.randn(2, 5)], [torch.randn(3, 5), torch.randn(2, 5)]
    w_b = [torch.randn(6, 3)]  # the second map (a bridge A factor) has no B
    low = torch.cat([x[4:] @ w_a[0].T, x[4:] @ w_a[1].T], 1)
    need_x, need_w_text, need_a, need_b = False, [True, False], [False, True], [False]
    grads = routed_projections_module.routed_projections_backward_op(torch.randn(7, 8), x, low, 4, w_text, w_a, w_b,
                                                                     [1, 0], need_x, need_w_text, need_a, need_b,
                                                                     backend)
    _check_placeholders(grads, [need_x, *need_w_text, *need_a, *need_b], f"routed_projections_backward {backend}")
