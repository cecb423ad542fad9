"""Bridge attention forward and forward+backward, time and peak memory, against in the same run: causal SDPA without
bridge with its FlashAttention-2 backend and with its default backend (named in the table), one SDPA at head dim 256
through the exact single-attention form of docs/model.md §5 (the clever-user baseline, its cat/select passes included),
and the eager two-score-matrix reference. Ratios are to SDPA's default backend; the fused kernel also gets a row against
FlashAttention-2 (docs/performance.md targets: <= 1.0 x FlashAttention-2, <= 1.6 x the default, memory <= 1.5 x SDPA's).

On the GPU the docs/performance.md shapes (LLaMA-2-7B: 32 heads of 128, bf16); on the CPU small shapes of the same mixes
in float32, where the library's kernel is the "torch" backend (Triton needs a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from common import measure, peak_memory_mib
from torch.nn.attention import SDPBackend, sdpa_kernel

from libra_kernels import bridge_attention, bridge_attention_ref
from libra_kernels.ops.bridge_attention import TABLE

# name -> (batch, tokens, [image spans]); heads and head dim per device below.
GPU_SHAPES = {"pre": (8, 640, [(1, 579)]), "sft": (2, 2048, [(35, 613)]),
              "long": (1, 8192, [(100, 678), (4000, 4578)])}
CPU_SHAPES = {"pre/cpu": (2, 160, [(1, 145)]), "sft/cpu": (1, 512, [(35, 179)]),
              "long/cpu": (1, 768, [(50, 194), (400, 544)])}
FA2 = "sdpa FlashAttention-2, no bridge"


def sdpa_identity_256(q, k, v, k_bridge, v_bridge, vision_mask):
    """docs/model.md §5: bridge attention as one causal SDPA at head dim 2D, softmax scale 1/sqrt(D); [B, N, H, D]."""
    dim = q.shape[-1]
    sign = (vision_mask.to(q.dtype) * 2 - 1)[:, :, None, None]  # +1 vision, -1 text
    q2 = torch.cat([q, sign * q], dim=-1).transpose(1, 2)
    k2 = torch.cat([k + k_bridge / 2, -sign * k_bridge / 2], dim=-1).transpose(1, 2)
    v2 = torch.cat([v + v_bridge / 2, -sign * v_bridge / 2], dim=-1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=1 / math.sqrt(dim)).transpose(1, 2)
    return out[..., :dim] + sign * out[..., dim:]


def sdpa_plain(q, k, v, *_, backend=None):
    """Causal SDPA without bridge on [B, N, H, D] views (the same storage the bridge kernel reads)."""
    def run():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    if backend is None:
        return run()
    with sdpa_kernel(backend):
        return run()


def default_sdpa_backend(q) -> str:
    """Name of the backend SDPA picks by default for these [B, N, H, D] inputs."""
    try:
        qt = q.transpose(1, 2)
        return SDPBackend(torch._fused_sdp_choice(qt, qt, qt, is_causal=True)).name.lower()
    except (AttributeError, RuntimeError, ValueError):
        return "unknown"


def _steps(fn, inputs, grad):
    """(forward, forward+backward) callables; gradients by autograd.grad so nothing accumulates between calls."""
    def forward():
        return fn(*inputs)

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), inputs, grad)
    return forward, forward_backward


@pytest.mark.parametrize("shape", range(3))
def test_bridge_attention(benchmark, record, device, shape):
    on_gpu = device.type == "cuda"
    name, (batch, length, images) = list((GPU_SHAPES if on_gpu else CPU_SHAPES).items())[shape]
    heads, dim = (32, 128) if on_gpu else (4, 64)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    make = lambda: torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=True)
    q, k, v, k_bridge, v_bridge = (make() for _ in range(5))
    vision_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for start, end in images:
        vision_mask[:, start:end] = True
    grad = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)
    bridged = (q, k, v, k_bridge, v_bridge)

    ours = "libra " + TABLE.resolve("auto", device)
    default = f"sdpa {default_sdpa_backend(q)} (default), no bridge"
    candidates = {
        ours: (lambda *t: bridge_attention(*t, vision_mask), bridged),
        FA2: (lambda *t: sdpa_plain(*t, backend=SDPBackend.FLASH_ATTENTION), (q, k, v)),
        default: (sdpa_plain, (q, k, v)),
        "sdpa head-dim-256 identity (default backend)": (lambda *t: sdpa_identity_256(*t, vision_mask), bridged),
        "eager two-matrix reference": (lambda *t: bridge_attention_ref(*t, vision_mask), bridged),
    }
    for fn, inputs in candidates.values():  # one untimed call each first: library initialisation, compilation
        try:
            _steps(fn, inputs, grad)[1]()
        except (RuntimeError, torch.cuda.OutOfMemoryError):
            pass  # reported below
    results = {}
    for label, (fn, inputs) in candidates.items():
        forward, forward_backward = _steps(fn, inputs, grad)
        try:
            results[label] = {"fwd": measure(forward, device), "fwd+bwd": measure(forward_backward, device),
                              "peak_mib": peak_memory_mib(forward_backward, device)}
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # e.g. the eager reference at 8k tokens
            results[label] = {"error": str(error).splitlines()[0][:80]}
        if on_gpu:
            torch.cuda.empty_cache()
    benchmark.pedantic(_steps(*candidates[ours], grad)[1], rounds=3, warmup_rounds=1)

    flops = {"fwd": 2.0 * batch * heads * length * length * dim}  # causal: 4·B·H·N²·D / 2
    flops["fwd+bwd"] = 3.5 * flops["fwd"]
    base = results[default]
    row = dict(shape=name, dtype=str(dtype).split(".")[-1])
    for mode in ("fwd", "fwd+bwd"):
        for label, result in results.items():
            if "error" in result:
                record("bridge_attention", dict(row, op=f"bridge_attention {mode}", impl=f"{label}: {result['error']}"))
                continue
            timing = result[mode]
            record("bridge_attention", dict(row, op=f"bridge_attention {mode}", impl=label, **timing,
                                            tflops=flops[mode] / timing["ms"] / 1e9,
                                            ratio=timing["ms"] / base[mode]["ms"], baseline=default))
        if FA2 in results and "error" not in results[FA2] and "error" not in results[ours]:
            record("bridge_attention", dict(row, op=f"bridge_attention {mode}", impl=ours, **results[ours][mode],
                                            ratio=results[ours][mode]["ms"] / results[FA2][mode]["ms"],
                                            baseline=FA2))
    if on_gpu:
        for label, result in results.items():
            if "error" not in result:
                record("bridge_attention", dict(row, op="bridge_attention peak memory fwd+bwd", impl=label,
                                                peak_mib=result["peak_mib"],
                                                ratio=result["peak_mib"] / base["peak_mib"], baseline=default))
    benchmark.extra_info.update({label: r.get("fwd+bwd", {}).get("ms") for label, r in results.items()})
