"""The fused Triton bridge attention (backend "triton") against the float64 reference, output and all five gradients.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with 16×16 tiles, so sequences of 20-60
tokens already span several query blocks and key tiles: images are placed so that plain tiles (one modality) and
bridged tiles (one query modality against other-modality keys, and mixed queries) run in both the unmasked and the
causally masked loops. The gpu tier runs the docs/performance.md shapes and each autotuning candidate.
"""

import math

import pytest
import torch

from libra_kernels import bridge_attention
from libra_kernels.ops import bridge_attention_triton as kernels
from libra_kernels.ops.bridge_attention import TABLE, bridge_attention_ref
from libra_kernels.testing import assert_close_to_ref, check_against_reference, random_vision_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRADS = ("q", "k", "v", "k_bridge", "v_bridge")
pytestmark = [
    pytest.mark.skipif(bool(TABLE.get("triton").unavailable(DEVICE)), reason="the triton backend cannot run here"),
    # The interpreter's own numpy deprecation, raised once per interpreted scalar index.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


def span_mask(batch, length, spans):
    """bool [B, N]: True on each [start, end) of ``spans`` (the same in every row)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for start, end in spans:
        mask[:, start:end] = True
    return mask


def make_inputs(batch, n_queries, n_keys, heads, kv_heads, dim, vision_mask, padding=None, device=DEVICE):
    """float64 inputs (moved to ``device``); ``vision_mask`` is a mix name of random_vision_mask or a bool tensor."""
    f64 = dict(dtype=torch.float64)
    inputs = dict(q=torch.randn(batch, n_queries, heads, dim, **f64))
    for name in ("k", "v", "k_bridge", "v_bridge"):
        inputs[name] = torch.randn(batch, n_keys, kv_heads, dim, **f64)
    if isinstance(vision_mask, str):
        vision_mask = random_vision_mask(batch, n_keys, vision_mask)
    inputs["vision_mask"] = vision_mask
    if padding == "random":
        padding = torch.rand(batch, n_keys) < 0.8
    inputs["key_padding_mask"] = padding
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def check(inputs, dtype=torch.float32, causal=True, softmax_scale=None):
    op = lambda **kw: bridge_attention(**kw, causal=causal, softmax_scale=softmax_scale, backend="triton")
    ref = lambda **kw: bridge_attention_ref(**kw, causal=causal, softmax_scale=softmax_scale)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=GRADS)


# (batch, Nq, Nk, H, Hkv, D, vision mask, padding, causal). With 16-token tiles, an image on [20, 40) of 53 tokens
# makes query block 0 all text, blocks 1-2 mixed, block 3 all text: plain tiles, tiles with one query modality and
# mixed tiles on both sides of the diagonal; [16, 48) makes block-aligned all-vision queries meet all-text keys.
CASES = {
    "odd N, GQA, every kind of tile": (2, 53, 53, 4, 2, 64, span_mask(2, 53, [(20, 40)]), None, True),
    "aligned image, all pairs of a tile bridged": (1, 61, 61, 2, 1, 64, span_mask(1, 61, [(16, 48)]), None, True),
    "non-causal, padding": (2, 53, 53, 2, 2, 64, span_mask(2, 53, [(20, 40)]), "random", False),
    # Query blocks start at positions offset + 16 i: offsets 14 and 29 put the causal diagonal at different places
    # within the key tiles (an off-by-one in the masked/unmasked split shows at one of them).
    "Nq < Nk, offset 14, padding": (2, 36, 50, 2, 1, 64, span_mask(2, 50, [(10, 33)]), "random", True),
    "Nq < Nk, offset 29": (1, 21, 50, 4, 2, 64, span_mask(1, 50, [(10, 33)]), None, True),
    "Nq < Nk, non-causal": (1, 19, 45, 2, 1, 64, "middle", None, False),
    "one decoding step": (2, 1, 39, 2, 1, 64, "random", None, True),
    "all text": (2, 37, 37, 2, 1, 64, "text", "random", True),
    "all vision": (2, 37, 37, 2, 2, 64, "vision", None, True),
    "image at start": (1, 45, 45, 3, 1, 64, "start", None, True),
    "image in the middle": (1, 45, 45, 2, 1, 64, "middle", "random", True),
    "image at end": (1, 45, 45, 2, 2, 64, "end", None, False),
    "random images per row, GQA 3": (3, 33, 33, 3, 1, 64, "random", None, True),
    "two images": (1, 59, 59, 2, 1, 64, span_mask(1, 59, [(3, 19), (30, 51)]), None, True),
    "head dim 128": (1, 23, 23, 2, 1, 128, "middle", None, True),
    "head dim 72 (padded to 128 lanes)": (1, 23, 23, 2, 1, 72, "end", "random", True),
    "head dim 3": (2, 19, 19, 2, 1, 3, "random", None, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case):
    *shape, mask, padding, causal = case
    check(make_inputs(*shape, mask, padding), causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    check(make_inputs(2, 41, 41, 2, 1, 64, span_mask(2, 41, [(9, 30)]), "random"), dtype=dtype)


def test_softmax_scale():
    check(make_inputs(1, 33, 33, 2, 1, 64, "middle"), softmax_scale=0.21)


def test_queries_without_allowed_keys():
    """The first keys are padding: queries before the first real key get zero output and zero gradients."""
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[:, :19] = False
    check(make_inputs(2, 40, 40, 2, 1, 64, "middle", padding))


def outputs_and_grads(fn, inputs, dtype, cotangent, wanted=GRADS):
    """fn(**inputs) with the floating inputs cast to ``dtype``: (output, {name: gradient} for ``wanted``)."""
    leaves = {k: (v.detach().to(dtype).requires_grad_(k in wanted) if k in GRADS else v) for k, v in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in wanted], cotangent.to(out.dtype))
    return out.detach(), dict(zip(wanted, grads))


def assert_all_close(actual, expected, same_precision, dtype):
    assert_close_to_ref(actual[0], expected[0], same_precision[0], dtype, "output")
    for name in actual[1]:
        assert_close_to_ref(actual[1][name], expected[1][name], same_precision[1][name], dtype, f"grad of {name}")


@pytest.mark.parametrize("wanted", [("q",), ("k", "v"), ("k_bridge", "v_bridge"), ("k", "v", "k_bridge", "v_bridge")])
def test_partial_gradients(wanted):
    """Only some inputs need gradients (frozen weights): the dq or the dk/dv kernel is skipped, the rest unchanged."""
    inputs = make_inputs(1, 37, 37, 4, 2, 64, span_mask(1, 37, [(5, 25)]), "random")
    cotangent = torch.randn(inputs["q"].shape, dtype=torch.float64, device=DEVICE)
    op = lambda **kw: bridge_attention(**kw, backend="triton")
    assert_all_close(outputs_and_grads(op, inputs, torch.float32, cotangent, wanted),
                     outputs_and_grads(bridge_attention_ref, inputs, torch.float64, cotangent, wanted),
                     outputs_and_grads(bridge_attention_ref, inputs, torch.float32, cotangent, wanted), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_single_modality_tiles_never_read_bridge_terms(causal):
    """Rows of one modality have no cross-modal pair, so their tiles must take the plain path, which never loads the
    bridge terms: NaN bridge terms there must not reach the output or any gradient (a masked product would spread
    them: NaN * 0 is NaN), and the bridge terms get exactly zero gradients."""
    mask = torch.stack([torch.zeros(45, dtype=torch.bool), torch.ones(45, dtype=torch.bool)])
    plain = make_inputs(2, 45, 45, 4, 2, 64, mask, "random")
    plain["k_bridge"].zero_()
    plain["v_bridge"].zero_()
    poisoned = dict(plain, k_bridge=torch.full_like(plain["k_bridge"], math.nan),
                    v_bridge=torch.full_like(plain["v_bridge"], math.nan))
    cotangent = torch.randn(plain["q"].shape, dtype=torch.float64, device=DEVICE)
    op = lambda **kw: bridge_attention(**kw, causal=causal, backend="triton")
    ref = lambda **kw: bridge_attention_ref(**kw, causal=causal)
    actual = outputs_and_grads(op, poisoned, torch.float32, cotangent)
    for name in ("k_bridge", "v_bridge"):
        assert torch.equal(actual[1].pop(name), torch.zeros_like(plain[name], dtype=torch.float32)), name
    assert_all_close(actual, outputs_and_grads(ref, plain, torch.float64, cotangent),
                     outputs_and_grads(ref, plain, torch.float32, cotangent), torch.float32)


def test_compiles_fullgraph_with_autograd():
    """torch.compile(fullgraph=True) over the public function: the registered op is opaque, its fake gives shapes."""
    inputs = make_inputs(2, 23, 23, 2, 1, 64, "middle", "random")
    leaves = {k: (v.float().requires_grad_() if k in GRADS else v) for k, v in inputs.items()}
    fn = lambda q, k, v, kb, vb: bridge_attention(q, k, v, kb, vb, leaves["vision_mask"],
                                                  key_padding_mask=leaves["key_padding_mask"], backend="triton")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    tensors = [leaves[k] for k in GRADS]
    out = compiled(*tensors)
    expected = fn(*tensors)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cotangent = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, tensors, cotangent), torch.autograd.grad(expected, tensors,
                                                                                          cotangent)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_head_dim_above_128_uses_torch_kernel():
    assert not kernels.supports(torch.empty(1, 1, 1, 144))
    check(make_inputs(1, 9, 9, 2, 1, 144, "middle"))


# ---------------------------------------------------------------------------------------------------------------
# GPU tier: docs/performance.md shapes (LLaMA-2-7B heads) against the float64 reference, every autotuning candidate,
# determinism, offsets beyond 2^31 elements.


def perf_inputs(batch, length, image_at, image_length=578, heads=32, kv_heads=32, padding=None):
    """The pre / sft layouts of docs/performance.md: one image of ``image_length`` tokens at ``image_at`` in every
    row."""
    mask = span_mask(batch, length, [(image_at, image_at + image_length)])
    return make_inputs(batch, length, length, heads, kv_heads, 128, mask, padding, device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pre_shape(dtype):
    check(perf_inputs(8, 640, 1), dtype=dtype)


@pytest.mark.gpu
def test_gpu_sft_shape():
    check(perf_inputs(2, 2048, 35), dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_sft_shape_gqa_padding_non_causal():
    padding = torch.ones(2, 2048, dtype=torch.bool)
    padding[1, 1500:] = False
    check(perf_inputs(2, 2048, 35, kv_heads=8, padding=padding), dtype=torch.bfloat16, causal=False)


@pytest.mark.gpu
def test_gpu_float32():
    check(perf_inputs(2, 333, 70, image_length=150, heads=8, kv_heads=2, padding="random"), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["fwd", "dq", "dkdv"])
def test_gpu_every_config(monkeypatch, which):
    """Each autotuning candidate at odd sizes (autotuning would only ever run the fastest)."""
    kernel = {"fwd": kernels._bridge_fwd_kernel, "dq": kernels._bridge_dq_kernel,
              "dkdv": kernels._bridge_dkdv_kernel}[which]
    inputs = perf_inputs(2, 333, 70, image_length=150, heads=8, kv_heads=2, padding="random")
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        check(inputs, dtype=torch.bfloat16)
        check(dict(inputs, q=inputs["q"][:, -97:]), dtype=torch.bfloat16)  # queries at the end (KV cache)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    inputs = perf_inputs(2, 1024, 35, heads=16, kv_heads=4)
    leaves = {k: (v.bfloat16().requires_grad_() if k in GRADS else v) for k, v in inputs.items()}
    out = bridge_attention(**leaves, backend="triton")
    cotangent = torch.randn_like(out)
    first = torch.autograd.grad(out, [leaves[k] for k in GRADS], cotangent, retain_graph=True)
    second = torch.autograd.grad(out, [leaves[k] for k in GRADS], cotangent)
    for name, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), f"grad of {name} differs between two identical backward passes"


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    """B·N·H·D > 2^31 elements: the last row (whose offsets overflow int32) against the reference on that row."""
    batch, length, heads, dim = 4100, 128, 32, 128
    assert batch * length * heads * dim > 2**31
    cuda = torch.device("cuda")
    big = {name: torch.randn(batch, length, heads, dim, device=cuda, dtype=torch.bfloat16) for name in GRADS}
    mask = span_mask(batch, length, [(40, 100)]).to(cuda)
    leaves = {name: t.requires_grad_() for name, t in big.items()}
    out = bridge_attention(**leaves, vision_mask=mask, backend="triton")
    cotangent = torch.randn(1, length, heads, dim, device=cuda, dtype=torch.float64)
    grads = torch.autograd.grad(out[-1:], list(leaves.values()), cotangent.bfloat16())
    actual = out[-1:].detach(), {name: g[-1:] for name, g in zip(GRADS, grads)}
    # Rows are independent, so the last row alone is the reference problem.
    tail = {name: t[-1:].detach().double() for name, t in big.items()}
    tail["vision_mask"] = mask[-1:]
    assert_all_close(actual, outputs_and_grads(bridge_attention_ref, tail, torch.float64, cotangent),
                     outputs_and_grads(bridge_attention_ref, tail, torch.bfloat16, cotangent), torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Compilation for the GPU without one: the interpreter cannot see what only the compiler rejects (non-constexpr
# globals, dtypes a product cannot take) nor whether the main loads stay software-pipelined.

COMPILE_FOR_SM90 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from libra_kernels.ops import bridge_attention_triton as kernels

common = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KB": "*bf16", "VB": "*bf16", "VIS": "*u8", "COUNTS": "*i32",
          "PAD": "*u8", "DSTART": "*i32", "DEND": "*i32", "LSE": "*fp32", "n_queries": "i32", "n_keys": "i32",
          "n_bucket": "i32", "scale": "fp64", "scale_log2": "fp64", "OUT": "*bf16", "DO": "*bf16", "DELTA": "*fp32",
          "DQ": "*bf16", "DK": "*bf16", "DV": "*bf16", "DKB": "*bf16", "DVB": "*bf16"}
constants = dict(HEADS=32, KV_HEADS=8, HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_PAD=True, HAS_DOC=False,
                 UPCAST=False, ACC=tl.float32, PRECISION="tf32", WITH_DQ=True)
for name in ("_bridge_fwd_kernel", "_bridge_dq_kernel", "_bridge_dkdv_kernel"):
    tuner = getattr(kernels, name)
    fn, config = tuner.fn, tuner.configs[0]
    signature = {arg: common.get(arg, "constexpr") for arg in fn.arg_names}
    consts = {arg: value for arg, value in dict(constants, **config.kwargs).items() if arg in fn.arg_names}
    # As a launch with 16-byte aligned tensors specialises: aligned pointers make the loads vectorisable.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if signature[arg][0] == "*"}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    print(name, compiled.asm["ttgir"].count("async_copy_global_to_local"))
"""


def test_kernels_compile_for_sm90_with_pipelined_loads():
    """Compile the three kernels for sm_90a (bf16, head dim 128, GQA, padding, causal) in a process without
    TRITON_INTERPRET, and check that each main loop's loads became asynchronous copies (software pipelining)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    async_copies = dict(line.split() for line in run.stdout.splitlines())
    assert set(async_copies) == {"_bridge_fwd_kernel", "_bridge_dq_kernel", "_bridge_dkdv_kernel"}
    for name, count in async_copies.items():
        assert int(count) > 0, f"{name}: no pipelined (asynchronous) loads in the compiled kernel"
