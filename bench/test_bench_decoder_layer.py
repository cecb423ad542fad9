"""One whole Libra decoder layer (fastest backends) against transformers' LlamaDecoderLayer with SDPA, forward+backward
with every weight trained, at the pre and sft mixes of docs/performance.md (LLaMA-2-7B dimensions).

Tracked on every machine:
- kernels: the ATen kernels one forward+backward dispatches, those inside the C++ operators included, the fused
  attention operators counted as one kernel each (bench/common.py ``kernel_census``); and how many are GEMMs. The
  count does not depend on the widths, so it is taken at small widths with the same mix;
- saved bytes: what autograd keeps for backward (parameters excluded), at the full shapes on the meta device;
- executed GEMM FLOPs over the useful ones (3x the forward projections: dX and dW of every map, nothing on the
  rows a map does not route).

On a GPU, also the fwd+bwd time and peak memory in bfloat16 at the full shapes (targets: time <= 1.0x LLaMA at
pre, <= 1.15x at sft, peak memory <= 1.0x; kernels <= 1.10x, saved bytes <= 0.85x at pre and <= 0.90x at sft).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from common import kernel_census, measure, peak_memory_mib, saved_bytes

from libra_kernels import ModalityLayout
from libra_model.config import LibraConfig
from libra_model.model import LibraDecoderLayer
from libra_model.modules.attention import AttentionContext
from libra_model.modules.rope import rotary_cos_sin

# name, batch, tokens per sequence, image position (one image of 578 tokens)
MIXES = [("pre", 8, 640, 1), ("sft", 2, 2048, 35)]
IMAGE = 578
FULL_DIMS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
# Kernel counts do not depend on the widths or the row counts (as long as both groups are non-empty).
COUNT_DIMS = dict(hidden_size=256, intermediate_size=688, num_attention_heads=2)
COUNT_MIXES = {"pre": (2, 80, 1, 60), "sft": (1, 128, 35, 36)}


def vision_mask(batch: int, length: int, start: int, image: int) -> torch.Tensor:
    """bool [B, N]: one image of ``image`` tokens at position ``start`` in every sequence."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, start:start + image] = True
    return mask


def libra_case(dims: dict, mask: torch.Tensor, device, dtype):
    """(layer, step inputs): a Libra decoder layer with random weights, the sorted input and its context."""
    config = LibraConfig.libra_11b(num_hidden_layers=1, **dims)
    with torch.device(device):
        layer = LibraDecoderLayer(config, 0).to(dtype)
    if device != "meta":
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    if hasattr(layer, "pack_"):
        layer.pack_()
    batch, length = mask.shape
    layout = ModalityLayout.from_vision_mask(mask).to(device)
    positions = torch.arange(length).expand(batch, length)
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, dtype)
    ctx = AttentionContext(layout, cos.to(device), sin.to(device), layout.vision_mask, None)
    h = torch.randn(batch * length, config.hidden_size, dtype=dtype).to(device).requires_grad_()
    return layer, (lambda: layer(h, ctx)), h


def llama_case(dims: dict, mask: torch.Tensor, device, dtype):
    """(layer, forward, input): transformers' LlamaDecoderLayer with SDPA at the same dims."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(num_key_value_heads=dims["num_attention_heads"], rms_norm_eps=1e-6, **dims)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        layer = LlamaDecoderLayer(config, 0).to(dtype)
    if device != "meta":
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    batch, length = mask.shape
    positions = torch.arange(length).expand(batch, length)
    x = torch.randn(batch, length, config.hidden_size, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    cos, sin = cos.to(device), sin.to(device)
    h = x.to(device).requires_grad_()

    def forward():
        with _flash_sdpa_on_meta(device):
            out = layer(h, attention_mask=None, position_ids=positions.to(device), position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    return layer, forward, h


@contextlib.contextmanager
def _flash_sdpa_on_meta(device):
    """On the meta device, SDPA would pick its math backend (which saves the score matrix); route it to the flash
    kernel, which saves what the GPU's flash and cuDNN backends save (q, k, v, out, logsumexp)."""
    if device != "meta":
        yield
        return
    original = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise ValueError("the meta-device census runs causal attention without a mask")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                           scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def fwd_bwd(forward):
    """A step: forward, then backward with a fixed upstream gradient."""
    def step():
        out = forward()
        out.backward(torch.ones_like(out))
    return step


def useful_gemm_flops(dims: dict, rows: int, n_text: int, libra: bool) -> int:
    """3x the forward FLOPs of the layer's projections (dX and dW of every map), attention excluded."""
    hidden, ffn = dims["hidden_size"], dims["intermediate_size"]
    text = 2 * (4 * hidden * hidden + 3 * hidden * ffn)
    if not libra:
        return 3 * rows * text
    r_attn, r_ffn, bridge = hidden // 4, ffn // 4, 8
    vision = 2 * (4 * r_attn * 2 * hidden + 2 * r_ffn * (hidden + ffn) + (hidden // 4) * (ffn + hidden))
    # the two bridges (k, v) of each token, through its own modality's adapter: A [8, hidden], B [hidden, 8]
    bridges = 2 * 2 * bridge * 2 * hidden
    return 3 * (n_text * text + (rows - n_text) * vision + rows * bridges)


def census(name: str) -> dict:
    """Kernel and GEMM counts (small widths), saved bytes (full shapes, meta) of both layers at one mix."""
    row = {}
    batch, length, start, image = COUNT_MIXES[name]
    small_mask = vision_mask(batch, length, start, image)
    full = next(m for m in MIXES if m[0] == name)
    full_mask = vision_mask(full[1], full[2], full[3], IMAGE)
    rows, n_vision = full_mask.numel(), int(full_mask.sum())
    for label, case in (("libra", libra_case), ("llama", llama_case)):
        torch.manual_seed(0)
        layer, forward, h = case(COUNT_DIMS, small_mask, "cpu", torch.float32)
        counts = kernel_census(fwd_bwd(forward))
        small_rows, small_text = small_mask.numel(), small_mask.numel() - int(small_mask.sum())
        row[f"{label}_kernels"], row[f"{label}_gemms"] = counts["kernels"], counts["gemms"]
        row[f"{label}_gemm_flops_ratio"] = counts["gemm_flops"] / useful_gemm_flops(
            COUNT_DIMS, small_rows, small_text, label == "libra")
        row[f"{label}_by_op"] = counts["by_op"]
        layer, forward, h = case(FULL_DIMS, full_mask, "meta", torch.bfloat16)
        row[f"{label}_saved_mib"] = saved_bytes(forward, list(layer.parameters())) / 2**20
    row["kernels_ratio"] = row["libra_kernels"] / row["llama_kernels"]
    row["saved_ratio"] = row["libra_saved_mib"] / row["llama_saved_mib"]
    row["rows"], row["n_vision"] = rows, n_vision
    return row


@pytest.mark.parametrize("mix", [m[0] for m in MIXES])
def test_decoder_layer_census(benchmark, record, mix):
    """Kernels, GEMMs, saved bytes and GEMM FLOPs of one layer fwd+bwd, Libra / LLaMA (any machine)."""
    row = benchmark.pedantic(census, args=(mix,), rounds=1, iterations=1)
    for label in ("libra", "llama"):
        print(f"{mix} {label} kernels by op: {row.pop(f'{label}_by_op')}")
    record("decoder_layer_census", dict(op="decoder layer fwd+bwd", shape=mix, **row))


@pytest.mark.parametrize("mix", [m[0] for m in MIXES])
def test_decoder_layer_time(benchmark, record, device, mix):
    """fwd+bwd time and peak memory at the full shapes in bfloat16 (GPU only: CPU times mean nothing here)."""
    if device.type != "cuda":
        pytest.skip("the layer timings are measured on a GPU")
    _, batch, length, start = next(m for m in MIXES if m[0] == mix)
    mask = vision_mask(batch, length, start, IMAGE)
    results = {}
    for label, case in (("Libra decoder layer", libra_case), ("LLaMA decoder layer, SDPA", llama_case)):
        torch.manual_seed(0)
        layer, forward, h = case(FULL_DIMS, mask, "cuda", torch.bfloat16)
        step = fwd_bwd(forward)

        def clear(layer=layer, h=h):
            for p in list(layer.parameters()) + [h]:
                p.grad = None

        def timed(step=step, clear=clear):
            clear()
            step()

        results[label] = dict(measure(timed, device), peak_mib=peak_memory_mib(timed, device))
        del layer, forward, h, step
        torch.cuda.empty_cache()
    base = results["LLaMA decoder layer, SDPA"]
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
    for label, result in results.items():
        record("decoder_layer", dict(op="decoder layer fwd+bwd", shape=mix, dtype="bfloat16", impl=label, **result,
                                     ratio=result["ms"] / base["ms"], mem_ratio=result["peak_mib"] / base["peak_mib"],
                                     baseline="LLaMA decoder layer, SDPA"))
