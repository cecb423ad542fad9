"""GPU tier: every operator's backends on CUDA against the float64 reference on the CPU inputs."""

import pytest
import torch

from libra_kernels import bridge_attention, discrete_token_cross_entropy, routed_linear, routed_rms_norm
from libra_kernels.ops import bridge_attention as attention_module
from libra_kernels.ops import cross_entropy, rms_norm
from libra_kernels.ops import routed_linear as linear_module
from libra_kernels.testing import check_against_reference, random_labels, random_vision_mask

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def cuda_backends(table):
    return [name for name, kernel in table.kernels.items() if not kernel.unavailable(CUDA)] if \
        torch.cuda.is_available() else ["torch"]


def on_cuda(inputs):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@pytest.mark.parametrize("backend", cuda_backends(rms_norm.TABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_rms_norm(backend, dtype):
    f64 = dict(dtype=torch.float64)
    inputs = on_cuda(dict(x=torch.randn(1029, 4096, **f64), n_text=311, w_text=torch.randn(4096, **f64),
                          w_vision=torch.randn(4096, **f64)))
    check_against_reference(lambda **kw: routed_rms_norm(**kw, backend=backend), rms_norm.routed_rms_norm_ref,
                            inputs, dtype, grad_inputs=("x", "w_text", "w_vision"))


@pytest.mark.parametrize("backend", cuda_backends(linear_module.TABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_linear(backend, dtype):
    f64 = dict(dtype=torch.float64)
    inputs = on_cuda(dict(x=torch.randn(1031, 512, **f64), n_text=97, w_text=torch.randn(384, 512, **f64) / 23,
                          w_vision_a=torch.randn(96, 512, **f64) / 23, w_vision_b=torch.randn(384, 96, **f64) / 10))
    check_against_reference(lambda **kw: routed_linear(**kw, backend=backend), linear_module.routed_linear_ref,
                            inputs, dtype, grad_inputs=("x", "w_text", "w_vision_a", "w_vision_b"))


@pytest.mark.parametrize("backend", cuda_backends(attention_module.TABLE))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bridge_attention(backend, dtype):
    f64 = dict(dtype=torch.float64)
    inputs = dict(q=torch.randn(2, 333, 8, 128, **f64))
    for name in ("k", "v", "k_bridge", "v_bridge"):
        inputs[name] = torch.randn(2, 333, 4, 128, **f64)
    inputs["vision_mask"] = random_vision_mask(2, 333, "middle")
    check_against_reference(lambda **kw: bridge_attention(**kw, backend=backend), attention_module.bridge_attention_ref,
                            on_cuda(inputs), dtype, grad_inputs=("q", "k", "v", "k_bridge", "v_bridge"))


@pytest.mark.parametrize("backend", cuda_backends(cross_entropy.TABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_discrete_token_cross_entropy(backend, dtype):
    f64 = dict(dtype=torch.float64)
    inputs = on_cuda(dict(h=torch.randn(1100, 256, **f64), n_text=300, w_text=torch.randn(32000, 256, **f64) / 16,
                          w_vision=torch.randn(2, 514, 256, **f64) / 16,
                          labels=random_labels(300, 800, 32000, 514, 2)))
    check_against_reference(lambda **kw: discrete_token_cross_entropy(**kw, backend=backend),
                            cross_entropy.discrete_token_cross_entropy_ref, inputs, dtype,
                            grad_inputs=("h", "w_text", "w_vision"))
