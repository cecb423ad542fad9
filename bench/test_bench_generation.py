"""Decoding throughput: tokens/s at batch 1, 8 and 32 and the prefill time, for the eager path (general cache,
every step through the model's forward), the static text cache (eager) and the compiled static decode step.

Prompt: one image (578 positions) after ``<s>`` and 40 text tokens, left-padded batch; 32 new text tokens, no EOS.
Decode time per step = (generate time - prefill time) / (new tokens - 1), each a median of synchronised calls (the
decoding loop synchronises every step, so a host clock around a whole call is what a user waits).
GPU: configs/bench_1b.yaml and LLaMA-2-7B dimensions in bfloat16, with the fraction of the memory-bandwidth bound
(bytes read per step: the text path's weights plus the cache / the GPU's bandwidth; ``LIBRA_HBM_GBPS`` overrides
the table below). CPU: bench_1b's geometry with an eighth of the widths and 4 layers, float32 (the first compile of
each batch takes minutes on a small CPU).
"""

import os
import statistics
import time

import pytest
import torch
import yaml

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "bench_1b.yaml")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
CPU_SHRINK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=2,
                  contiguous_signal_size=128)
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}
BATCHES = (1, 8, 32)
IMPLS = {"eager": dict(cache="dynamic"), "static": dict(cache="static"),
         "compiled": dict(cache="static", compile=True)}
TEXT_TOKENS, NEW_TOKENS = 40, 32
_EAGER_MS: dict = {}


def _config(name: str, device: torch.device) -> LibraConfig:
    with open(CONFIG) as handle:
        overrides = dict(yaml.safe_load(handle)["model_overrides"])
    overrides.pop("torch_dtype", None)
    if name == "7b":
        overrides.update(LLAMA_7B)
    if device.type == "cpu":
        overrides.update(CPU_SHRINK)
    return LibraConfig.tiny(**overrides)


def _model(name: str, device: torch.device) -> LibraForCausalLM:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LibraForCausalLM(_config(name, device))
    return model.to(dtype).eval()


def _prompt(config: LibraConfig, batch: int, device: torch.device):
    """input_ids, vision_indices, attention_mask, contiguous_signal of ``<s>``, one image, text; every other row
    is left-padded by three tokens."""
    image, codebooks = config.max_vision_token_length, config.vision_codebook_num
    length = 3 + 1 + image + TEXT_TOKENS
    ids = torch.randint(3, config.vocab_size, (batch, length))[None].repeat(codebooks, 1, 1)
    vision = torch.full((batch, length), image)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pad = 3 if b % 2 else 0
        ids[:, b, :pad], mask[b, :pad] = config.pad_token_id, 0
        ids[:, b, pad] = config.bos_token_id
        start = pad + 1
        ids[:, b, start:start + image] = torch.randint(config.vocab_size, config.vocab_size + config.num_codes,
                                                       (codebooks, image))
        ids[:, b, start], ids[:, b, start + image - 1] = config.boi_token_id, config.eoi_token_id
        vision[b, start:start + image] = torch.arange(image)
    is_code = (vision >= 1) & (vision <= image - 2)
    signal = torch.randn(batch, length, config.contiguous_signal_size) * is_code[..., None]
    return [t.to(device) for t in (ids, vision, mask, signal)]


def _time(fn, device: torch.device, reps: int = 3) -> float:
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up (and compilation)
    return statistics.median(once() for _ in range(reps))


def _bytes_per_step(model: LibraForCausalLM, batch: int, capacity: int) -> int:
    """Weights a text decoding step reads (the LLaMA linears and norms and the text head; one embedding row is
    negligible) plus the static cache's keys and values."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "vision" not in n and "embed_tokens" not in n)
    config = model.config
    cache = 2 * config.num_hidden_layers * batch * capacity * config.kv_dim * model.lm_head.weight.element_size()
    return weights + cache


def _bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("LIBRA_HBM_GBPS"):
        return float(os.environ["LIBRA_HBM_GBPS"])
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dims", ["1b", "7b"])
def test_generation(dims, batch, impl, device, record):
    if dims == "7b" and device.type != "cuda":
        pytest.skip("7B dimensions are benchmarked on a GPU only")
    model = _model(dims, device)
    config = model.config
    args = _prompt(config, batch, device)
    args[3] = args[3].to(model.lm_head.weight.dtype)
    options = IMPLS[impl]

    def prefill():
        with torch.no_grad():
            model.generate(*args, max_new_tokens=1, eos_token_id=[], **options)

    def generate():
        model.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=[], **options)

    start = time.perf_counter()
    generate()  # the first call compiles (compiled) or allocates
    first_call_s = time.perf_counter() - start
    prefill_ms = _time(prefill, device)
    total_ms = _time(generate, device)
    step_ms = (total_ms - prefill_ms) / (NEW_TOKENS - 1)
    if step_ms <= 0:
        pytest.fail(f"timing noise: generate ({total_ms:.0f} ms) measured faster than its prefill "
                    f"({prefill_ms:.0f} ms); rerun on a quiet machine")
    tokens_per_s = batch * 1e3 / step_ms
    key = (dims, batch)
    if impl == "eager":
        _EAGER_MS[key] = step_ms
    from libra_model.decoding import bucket_length

    capacity = bucket_length(args[0].shape[-1] + NEW_TOKENS)
    moved = _bytes_per_step(model, batch, capacity)
    bandwidth = _bandwidth_gbps(device)
    row = {"op": "generation", "shape": f"{dims} B={batch} prompt={args[0].shape[-1]}",
           "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""), "impl": impl, "ms": step_ms,
           "tokens_per_s": tokens_per_s, "prefill_ms": prefill_ms, "first_call_s": first_call_s,
           "gbps": moved / step_ms / 1e6, "baseline": "eager",
           "ratio": _EAGER_MS[key] / step_ms if key in _EAGER_MS else None}
    if bandwidth:
        row["bound_tokens_per_s"] = batch * bandwidth * 1e9 / moved
        row["bound_fraction"] = tokens_per_s / row["bound_tokens_per_s"]
    print(f"\n{row['shape']} {impl}: {tokens_per_s:.1f} tokens/s, {step_ms:.2f} ms/step, prefill {prefill_ms:.1f} ms,"
          f" first call {first_call_s:.1f} s" + (f", {row['bound_fraction']:.0%} of the bandwidth bound"
                                                if bandwidth else ""))
    record("generation", row)
