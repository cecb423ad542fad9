import math

import pytest
import torch
import torch.nn.functional as F
from backends import BRIDGE_ATTENTION

from libra_kernels import bridge_attention
from libra_kernels.ops.bridge_attention import bridge_attention_ref
from libra_kernels.testing import check_against_reference, random_vision_mask

# The Triton interpreter's own numpy deprecation, raised once per interpreted scalar index.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def attention_by_query(q, k, v, k_bridge, v_bridge, vision_mask, causal=True, softmax_scale=None,
                       key_padding_mask=None):
    """Independent float64 formula: an explicit loop over rows, heads and queries."""
    batch, n_queries, heads, dim = q.shape
    n_keys, group = k.shape[1], heads // k.shape[2]
    scale = softmax_scale or 1 / math.sqrt(dim)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for i in range(n_queries):
                pos = n_keys - n_queries + i
                keys = [j for j in range(n_keys) if (not causal or j <= pos)
                        and (key_padding_mask is None or key_padding_mask[b, j])]
                if not keys:
                    continue
                cross = torch.tensor([float(vision_mask[b, pos] != vision_mask[b, j]) for j in keys], dtype=q.dtype)
                k_seen = k[b, keys, kv] + cross[:, None] * k_bridge[b, keys, kv]
                v_seen = v[b, keys, kv] + cross[:, None] * v_bridge[b, keys, kv]
                weights = torch.softmax(scale * (k_seen @ q[b, i, h]), dim=0)
                out[b, i, h] = weights @ v_seen
    return out


def attention_by_head_dim_256_identity(q, k, v, k_bridge, v_bridge, vision_mask, softmax_scale=None):
    """docs/model.md §5 (the single-attention form): one causal SDPA at head dim 2D with scale 1/sqrt(D) (queries = keys
    here)."""
    heads, dim = q.shape[2], q.shape[3]
    group = heads // k.shape[2]
    k, v, k_bridge, v_bridge = (t.repeat_interleave(group, dim=2) for t in (k, v, k_bridge, v_bridge))
    sign = (vision_mask.to(q.dtype) * 2 - 1)[:, :, None, None]  # +1 vision, -1 text
    q2 = torch.cat([q, sign * q], dim=-1)
    k2 = torch.cat([k + k_bridge / 2, -sign * k_bridge / 2], dim=-1)
    v2 = torch.cat([v + v_bridge / 2, -sign * v_bridge / 2], dim=-1)
    out = F.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), is_causal=True,
                                         scale=softmax_scale or 1 / math.sqrt(dim)).transpose(1, 2)
    return out[..., :dim] + sign * out[..., dim:]


def make_inputs(batch, n_queries, n_keys, heads, kv_heads, dim, mix="random", padding=False):
    f64 = dict(dtype=torch.float64)
    inputs = dict(q=torch.randn(batch, n_queries, heads, dim, **f64))
    for name in ("k", "v", "k_bridge", "v_bridge"):
        inputs[name] = torch.randn(batch, n_keys, kv_heads, dim, **f64)
    inputs["vision_mask"] = random_vision_mask(batch, n_keys, mix)
    inputs["key_padding_mask"] = (torch.rand(batch, n_keys) < 0.8) if padding else None
    return inputs


CASES = [
    # (batch, Nq, Nk, H, Hkv, D, mix, padding, causal)
    (2, 37, 37, 4, 4, 16, "random", False, True),
    (2, 37, 37, 4, 2, 16, "random", True, True),
    (1, 29, 29, 3, 1, 8, "random", False, False),
    (2, 23, 23, 2, 2, 16, "text", False, True),
    (2, 23, 23, 2, 2, 16, "vision", True, True),
    (1, 31, 31, 2, 1, 16, "start", False, True),
    (1, 31, 31, 2, 1, 16, "middle", True, False),
    (1, 31, 31, 2, 1, 16, "end", False, True),
    (2, 5, 33, 4, 2, 16, "random", True, True),   # queries are the last 5 positions (KV cache)
    (2, 1, 17, 2, 1, 16, "middle", False, True),  # one decoding step
    (1, 0, 9, 2, 2, 8, "random", False, True),    # no queries
]


@pytest.mark.parametrize("backend", BRIDGE_ATTENTION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, dtype, case):
    *shape, mix, padding, causal = case
    inputs = make_inputs(*shape, mix=mix, padding=padding)
    op = lambda **kw: bridge_attention(**kw, causal=causal, backend=backend)
    ref = lambda **kw: bridge_attention_ref(**kw, causal=causal)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=("q", "k", "v", "k_bridge", "v_bridge"))


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_query_loop(case):
    *shape, mix, padding, causal = case
    inputs = make_inputs(*shape, mix=mix, padding=padding)
    expected = attention_by_query(**inputs, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(bridge_attention_ref(**inputs, causal=causal, softmax_scale=0.3), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mix", ["random", "text", "vision", "middle"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_reference_matches_head_dim_256_identity(mix, kv_heads):
    inputs = make_inputs(2, 41, 41, 4, kv_heads, 16, mix=mix)
    del inputs["key_padding_mask"]
    expected = attention_by_head_dim_256_identity(**inputs)
    torch.testing.assert_close(bridge_attention_ref(**inputs), expected, rtol=1e-10, atol=1e-10)


def test_zero_bridge_is_plain_attention():
    inputs = make_inputs(2, 19, 19, 4, 2, 8)
    inputs["k_bridge"].zero_()
    inputs["v_bridge"].zero_()
    q, k, v = inputs["q"], inputs["k"].repeat_interleave(2, 2), inputs["v"].repeat_interleave(2, 2)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    del inputs["key_padding_mask"]
    torch.testing.assert_close(bridge_attention(**inputs), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BRIDGE_ATTENTION)
def test_query_without_allowed_key_gets_zero(backend):
    inputs = make_inputs(1, 6, 6, 2, 2, 8)
    inputs["key_padding_mask"] = torch.tensor([[False, False, True, True, True, True]])
    out = bridge_attention(**inputs, backend=backend)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert out[0, 2:].abs().sum() > 0


@pytest.mark.parametrize("backend", BRIDGE_ATTENTION)
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(backend, causal):
    inputs = make_inputs(1, 4, 6, 2, 1, 3, padding=True)
    tensors = tuple(inputs[k].requires_grad_() for k in ("q", "k", "v", "k_bridge", "v_bridge"))
    fn = lambda *t: bridge_attention(*t, inputs["vision_mask"], causal=causal,
                                     key_padding_mask=inputs["key_padding_mask"], backend=backend)
    # Interpreted Triton kernels cost ~0.1 s a call: fast mode checks random projections of the Jacobian instead
    # of every column (still float64 finite differences against the kernels' own backward).
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BRIDGE_ATTENTION)
@pytest.mark.parametrize("padding", [False, True])
def test_opcheck(backend, padding):
    inputs = make_inputs(2, 5, 7, 4, 2, 8, padding=padding)
    t = {k: (v.float().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    torch.library.opcheck(torch.ops.libra.bridge_attention,
                          (t["q"], t["k"], t["v"], t["k_bridge"], t["v_bridge"], t["vision_mask"],
                           t["key_padding_mask"], None, True, 0.35, backend))


def test_compiles_fullgraph():
    inputs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in make_inputs(2, 7, 7, 2, 2, 8).items()}
    q = inputs.pop("q")
    compiled = torch.compile(lambda q: bridge_attention(q, **inputs), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q), bridge_attention_ref(q, **inputs))


def _bad(**changes):
    args = make_inputs(2, 5, 7, 4, 2, 8)
    args = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(q=torch.randn(2, 5, 4)), ValueError, "q must have 4 dimensions"),
    (_bad(q=torch.randn(2, 9, 4, 8)), ValueError, "Nq <= Nk"),
    (_bad(q=torch.randn(2, 5, 3, 8)), ValueError, "multiple of the number of key/value heads"),
    (_bad(k=torch.randn(2, 7, 2, 6)), ValueError, "k must have shape"),
    (_bad(v=torch.randn(2, 6, 2, 8)), ValueError, "v must have shape"),
    (_bad(k_bridge=torch.randn(2, 7, 2, 8, dtype=torch.float64)), TypeError, "k_bridge must have the dtype of q"),
    (_bad(vision_mask=torch.zeros(2, 7)), TypeError, "vision_mask must be a bool"),
    (_bad(vision_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "vision_mask must have shape"),
    (_bad(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (_bad(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (_bad(causal=1), TypeError, "causal must be a bool"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        bridge_attention(**args)
