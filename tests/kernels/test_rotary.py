import pytest
import torch
from backends import runnable

from libra_kernels.ops import rotary as module
from libra_kernels.ops.rotary import rotary, rotary_ref
from libra_kernels.testing import assert_close_to_ref, check_against_reference

BACKENDS = runnable(module.TABLE)
# batch, length, heads of q, k (and k_bridge), head dim, per-head tables (2d RoPE)
SHAPES = [(2, 7, 4, 2, 16, False), (1, 5, 3, 3, 10, True), (1, 0, 2, 2, 8, False), (3, 1, 2, 1, 6, False)]


def tables(batch, length, heads, dim):
    """LLaMA-style tables [B, N, heads, d] of random positions (both halves of the angles equal)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.randint(0, 50, (batch, length, heads, 1)).double() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def make_inputs(batch, length, heads, kv_heads, dim, per_head):
    f64 = dict(dtype=torch.float64)
    cos, sin = tables(batch, length, heads if per_head else 1, dim)
    return dict(q=torch.randn(batch, length, heads, dim, **f64), k=torch.randn(batch, length, kv_heads, dim, **f64),
                kb=torch.randn(batch, length, kv_heads, dim, **f64), cos=cos, sin=sin)


def flat(fn):
    """One flat tensor from the three rotated tensors, for the tolerance helper."""
    return lambda q, k, kb, cos, sin: torch.cat([t.reshape(-1) for t in fn([q, k, kb], cos, sin)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    if shape[5] and shape[2] != shape[3]:
        pytest.skip("per-head tables need one head count")
    inputs = make_inputs(*shape)
    check_against_reference(flat(lambda xs, c, s: rotary(xs, c, s, backend=backend)), flat(rotary_ref), inputs,
                            dtype, grad_inputs=("q", "k", "kb"))


def test_reference_rotates_each_pair_of_halves():
    inputs = make_inputs(*SHAPES[0])
    q, cos, sin = inputs["q"], inputs["cos"], inputs["sin"]
    half = q.shape[-1] // 2
    got = rotary_ref([q], cos, sin)[0]
    c, s = cos[..., :half], sin[..., :half]  # equal halves: a rotation of (x1, x2) by each frequency's angle
    want = torch.cat([q[..., :half] * c - q[..., half:] * s, q[..., half:] * c + q[..., :half] * s], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_and_only_asked_gradients(backend):
    inputs = make_inputs(1, 3, 2, 1, 4, False)
    q, k = inputs["q"].requires_grad_(), inputs["k"]
    assert torch.autograd.gradcheck(lambda q: rotary([q, k], inputs["cos"], inputs["sin"], backend=backend)[0], (q,))
    out = rotary([q, k], inputs["cos"], inputs["sin"], backend=backend)
    out[0].sum().backward()
    assert q.grad is not None and k.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_only_the_tables(backend):
    inputs = {k: v.float() for k, v in make_inputs(*SHAPES[0]).items()}
    xs = [inputs[n].requires_grad_() for n in ("q", "k", "kb")]
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.untyped_storage()._cdata) or t, lambda t: t):
        rotary(xs, inputs["cos"], inputs["sin"], backend=backend)
    assert kept == {inputs["cos"].untyped_storage()._cdata, inputs["sin"].untyped_storage()._cdata}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    inputs = {k: v.float() for k, v in make_inputs(*SHAPES[0]).items()}
    xs = [inputs[n].requires_grad_() for n in ("q", "k", "kb")]
    torch.library.opcheck(torch.ops.libra.rotary, (xs, inputs["cos"], inputs["sin"], backend))


def test_compiles_fullgraph():
    inputs = {k: v.float() for k, v in make_inputs(*SHAPES[0]).items()}
    compiled = torch.compile(lambda q, k: rotary([q, k], inputs["cos"], inputs["sin"]), fullgraph=True,
                             backend="eager")
    got = compiled(inputs["q"], inputs["k"])
    assert_close_to_ref(got[0], rotary_ref([inputs["q"]], inputs["cos"], inputs["sin"])[0], None, torch.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, c, s: rotary(q, c, s), TypeError, "list"),
    (lambda q, c, s: rotary([q], c[..., :3], s[..., :3]), ValueError, "cos"),
    (lambda q, c, s: rotary([q], c[:, :2], s[:, :2]), ValueError, "xs\\[0\\]"),
    (lambda q, c, s: rotary([q.double()], c, s), TypeError, "cos"),
    (lambda q, c, s: rotary([q, q[..., 0]], c, s), ValueError, "xs\\[1\\]"),
])
def test_bad_input(call, error, match):
    q, cos, sin = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
    with pytest.raises(error, match=match):
        call(q, cos, sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    for shape in SHAPES[:1] + SHAPES[2:]:
        inputs = {k: v.cuda() for k, v in make_inputs(*shape).items()}
        check_against_reference(flat(lambda xs, c, s: rotary(xs, c, s)), flat(rotary_ref), inputs, dtype,
                                grad_inputs=("q", "k", "kb"))
