"""One decoder layer without attention (input norm, q/k/v, o, post-attention norm with the residual add, gated MLP,
residual add), forward+backward with every weight trained:

- "LLaMA dense layer": every token through the LLaMA weights (eager RMSNorm as in LLaMA, F.linear), the baseline;
- "Libra routed layer": the same layer on the sorted layout with Libra's routed ops (text rows through the LLaMA
  weights, vision rows through the low-rank expert), for each backend of the operators.

Attention is replaced by q + k + v in both (the same elementwise work), so the ratio isolates the routed part.
Libra's vision tokens need about 0.65x the FLOPs of a text token, hence the target <= 1.0 at the pre mix.
GPU: docs/performance.md pre and sft mixes at LLaMA-2-7B sizes, bfloat16. CPU: an eighth of the rows, a sixteenth of the
widths, float32 (not a performance target).
"""

import pytest
import torch
import torch.nn.functional as F
from common import measure, peak_memory_mib

from libra_kernels import routed_linear, routed_rms_norm
from libra_kernels.ops.routed_linear import TABLE
from libra_kernels.ops.routed_projections import pack_rows, routed_projections

GPU_MIXES = [("pre", 5120, 8 * (640 - 578)), ("sft", 4096, 2 * (2048 - 578))]
CPU_MIXES = [("pre/8", 640, 62), ("sft/8", 512, 368)]
# hidden, FFN, expert ranks of q/k/v/o, gate/up and down (LLaMA-2-7B and Libra's out / 4)
GPU_DIMS = (4096, 11008, 1024, 2752, 1024)
CPU_DIMS = (256, 688, 64, 172, 64)
EPS = 1e-6


def _params(dims, device, dtype):
    hidden, ffn, r_attn, r_up, r_down = dims
    make = lambda *s: (torch.randn(*s, device=device, dtype=dtype) / s[-1] ** 0.5).requires_grad_()
    ones = lambda: torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    p = {name: make(hidden, hidden) for name in ("q", "k", "v", "o")}
    p.update(gate=make(ffn, hidden), up=make(ffn, hidden), down=make(hidden, ffn), norm_in=ones(), norm_post=ones())
    for name in ("q", "k", "v", "o"):
        p[f"vision_{name}"] = (make(r_attn, hidden), make(hidden, r_attn))
    p["vision_gate"], p["vision_up"] = (make(r_up, hidden), make(ffn, r_up)), (make(r_up, hidden), make(ffn, r_up))
    p["vision_down"] = (make(r_down, ffn), make(hidden, r_down))
    p.update(vision_norm_in=ones(), vision_norm_post=ones())
    return p


def _leaves(p):
    return [t for v in p.values() for t in (v if isinstance(v, tuple) else (v,))]


def llama_rms_norm(x, weight):
    """LLaMA's eager RMSNorm: statistics in float32, cast back before the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def dense_layer(h, p):
    """[T, hidden] -> [T, hidden]: a LLaMA layer with q + k + v in place of attention."""
    x = llama_rms_norm(h, p["norm_in"])
    attn = F.linear(x, p["q"]) + F.linear(x, p["k"]) + F.linear(x, p["v"])
    h = h + F.linear(attn, p["o"])
    y = llama_rms_norm(h, p["norm_post"])
    return h + F.linear(F.silu(F.linear(y, p["gate"])) * F.linear(y, p["up"]), p["down"])


def routed_layer(h, p, n_text, backend, fused_qkv):
    """The same layer on the sorted layout with the routed ops (rows [0, n_text) text)."""
    def project(x, name):
        return routed_linear(x, n_text, p[name], *p[f"vision_{name}"], backend=backend)

    x = routed_rms_norm(h, n_text, p["norm_in"], p["vision_norm_in"], EPS, backend=backend)
    if fused_qkv:
        q, k, v = routed_projections(x, n_text, [p["q"], p["k"], p["v"]], [p[f"vision_{n}"][0] for n in "qkv"],
                                     [p[f"vision_{n}"][1] for n in "qkv"], backend=backend)
    else:
        q, k, v = (project(x, name) for name in "qkv")
    y, h = routed_rms_norm(project(q + k + v, "o"), n_text, p["norm_post"], p["vision_norm_post"], EPS, h,
                           backend=backend)
    return h + project(F.silu(project(y, "gate")) * project(y, "up"), "down")


def _flops(rows, n_text, dims):
    hidden, ffn, r_attn, r_up, r_down = dims
    text = 2 * (4 * hidden * hidden + 3 * hidden * ffn)
    vision = 2 * (4 * r_attn * 2 * hidden + 2 * r_up * (hidden + ffn) + r_down * (ffn + hidden))
    return 3 * (n_text * text + (rows - n_text) * vision), 3 * rows * text


@pytest.mark.parametrize("mix", range(2))
def test_routed_layer(benchmark, record, device, mix):
    gpu = device.type == "cuda"
    name, rows, n_text = (GPU_MIXES if gpu else CPU_MIXES)[mix]
    dims, dtype = (GPU_DIMS, torch.bfloat16) if gpu else (CPU_DIMS, torch.float32)
    p = _params(dims, device, dtype)
    with torch.no_grad():  # once, as a model would at load time, for the fused q/k/v projection
        pack_rows([p["q"], p["k"], p["v"]]), pack_rows([p[f"vision_{n}"][0] for n in "qkv"])
    h = torch.randn(rows, dims[0], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(h)
    leaves = [h] + _leaves(p)
    candidates = {"LLaMA dense layer": lambda: torch.autograd.grad(dense_layer(h, p), leaves, grad, allow_unused=True)}
    for backend, kernel in TABLE.kernels.items():
        if kernel.unavailable(device):
            continue
        for fused in (True, False):
            label = f"Libra routed layer, {backend}" + ("" if fused else ", separate q/k/v")
            candidates[label] = (lambda b, f: lambda: torch.autograd.grad(routed_layer(h, p, n_text, b, f), leaves,
                                                                          grad, allow_unused=True))(backend, fused)
    results = {}
    for _ in range(1 if gpu else 2):  # interleaved rounds, the better median counts (a shared CPU is noisy)
        for label, step in candidates.items():
            result = measure(step, device, **({} if gpu else dict(warmup=2, reps=6)))
            if label not in results or result["ms"] < results[label]["ms"]:
                results[label] = result
    for label, step in candidates.items():
        results[label]["peak_mib"] = peak_memory_mib(step, device)
    fastest = f"Libra routed layer, {TABLE.resolve('auto', device)}"
    benchmark.pedantic(candidates[fastest], rounds=3, warmup_rounds=1)
    base = results["LLaMA dense layer"]["ms"]
    routed_flops, dense_flops = _flops(rows, n_text, dims)
    for label, result in results.items():
        flops = dense_flops if label.startswith("LLaMA") else routed_flops
        record("routed_layer", dict(op="layer without attention fwd+bwd", shape=name, dtype=str(dtype)[6:],
                                    impl=label, **result, tflops=flops / result["ms"] / 1e9,
                                    ratio=result["ms"] / base, baseline="LLaMA dense layer"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
