import pytest
import torch
import torch.nn.functional as F
from backends import runnable

from libra_kernels.ops import routed_swiglu as module
from libra_kernels.ops.routed_linear import routed_linear_ref
from libra_kernels.ops.routed_swiglu import routed_swiglu, routed_swiglu_ref
from libra_kernels.testing import assert_close_to_ref, check_against_reference

BACKENDS = runnable(module.TABLE)
# rows, n_text, inner, out, rank (None: a dense vision weight): odd sizes, all text, all vision, empty
SHAPES = [(37, 15, 23, 19, 5), (29, 0, 17, 11, 3), (29, 29, 17, 11, 3), (0, 0, 9, 7, 2), (1, 0, 8, 5, 2),
          (21, 8, 13, 9, None)]


def make_inputs(rows, n_text, inner, out, rank):
    f64 = dict(dtype=torch.float64)
    # gate and up as the two column halves of one [T, 2·inner] buffer, as the MLP hands them over
    gate_up = torch.randn(rows, 2 * inner, **f64)
    inputs = dict(gate=gate_up[:, :inner], up=gate_up[:, inner:], n_text=n_text,
                  w_text=torch.randn(out, inner, **f64) / inner**0.5)
    if rank is None:
        inputs["w_vision_a"] = torch.randn(out, inner, **f64) / inner**0.5
    else:
        inputs["w_vision_a"] = torch.randn(rank, inner, **f64) / inner**0.5
        inputs["w_vision_b"] = torch.randn(out, rank, **f64) / rank**0.5
    return inputs


def grad_names(inputs):
    return tuple(k for k in inputs if k != "n_text")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    inputs = make_inputs(*shape)
    check_against_reference(lambda **kw: routed_swiglu(**kw, backend=backend), routed_swiglu_ref, inputs, dtype,
                            grad_inputs=grad_names(inputs))


def test_reference_is_the_eager_mlp_tail():
    inputs = make_inputs(*SHAPES[0])
    g, u = inputs["gate"], inputs["up"]
    want = routed_linear_ref(F.silu(g) * u, inputs["n_text"], inputs["w_text"], inputs["w_vision_a"],
                             inputs["w_vision_b"])
    assert torch.equal(routed_swiglu_ref(**inputs), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    inputs = make_inputs(9, 4, 6, 5, 2)
    names = grad_names(inputs)
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in inputs.items()}

    def fn(*tensors):
        return routed_swiglu(**dict(leaves, **dict(zip(names, tensors))), backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(leaves[k] for k in names))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_only_gate_up_and_the_rank_r_activation(backend):
    rows, n_text, inner, out, rank = 40, 10, 32, 16, 4
    inputs = make_inputs(rows, n_text, inner, out, rank)
    leaves = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in
              inputs.items()}
    gate_up = torch.randn(rows, 2 * inner, requires_grad=True)
    leaves["gate"], leaves["up"] = gate_up[:, :inner], gate_up[:, inner:]
    weights = {leaves["w_text"].untyped_storage()._cdata, leaves["w_vision_a"].untyped_storage()._cdata,
               leaves["w_vision_b"].untyped_storage()._cdata}
    kept = {}

    def pack(t):
        if t.untyped_storage()._cdata not in weights:
            kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = routed_swiglu(**leaves, backend=backend)
    # the gate/up buffer (its views share one storage) and low [T - n_text, r]; nothing of width `inner` else
    assert sorted(kept.values()) == sorted([rows * 2 * inner * 4, (rows - n_text) * rank * 4])
    y.sum().backward()
    assert gate_up.grad is not None and leaves["w_vision_b"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weights_get_no_gradient_and_cost_no_gemm(backend):
    inputs = make_inputs(20, 8, 12, 6, 3)
    leaves = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    leaves["gate"] = leaves["gate"].requires_grad_()
    leaves["up"] = leaves["up"].requires_grad_()
    leaves["w_vision_a"].requires_grad_()
    y = routed_swiglu(**leaves, backend=backend)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(torch.randn_like(y))
    mms = [e for e in prof.events() if e.name == "aten::mm"]
    # dx text, d_low, dx vision, dA: no dW_text, no dB (frozen)
    assert len(mms) == 4
    assert leaves["w_text"].grad is None and leaves["w_vision_b"].grad is None
    assert leaves["w_vision_a"].grad is not None and leaves["gate"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    inputs = make_inputs(10, 4, 8, 6, 2)
    args = [inputs[k].detach().float().contiguous().requires_grad_(requires_grad)
            for k in ("gate", "up")] + [4] + [inputs[k].float().requires_grad_(requires_grad)
                                              for k in ("w_text", "w_vision_a", "w_vision_b")]
    torch.library.opcheck(torch.ops.libra.routed_swiglu, (*args, backend))


def test_compiles_fullgraph():
    inputs = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(10, 4, 8, 6, 2).items()}
    compiled = torch.compile(lambda g, u: routed_swiglu(g, u, 4, inputs["w_text"], inputs["w_vision_a"],
                                                        inputs["w_vision_b"]), fullgraph=True, backend="eager")
    got = compiled(inputs["gate"], inputs["up"])
    assert_close_to_ref(got, routed_swiglu_ref(**inputs), None, torch.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda g, u, w: routed_swiglu(g, u[:, :3], 2, *w), ValueError, "up"),
    (lambda g, u, w: routed_swiglu(g, u.double(), 2, *w), TypeError, "up"),
    (lambda g, u, w: routed_swiglu(g, u, 9, *w), ValueError, "n_text"),
    (lambda g, u, w: routed_swiglu(g, u, 2, w[0][:, :3], *w[1:]), ValueError, "w_text"),
    (lambda g, u, w: routed_swiglu(g, u, 2, *w, backend="nope"), ValueError, "backend"),
    (lambda g, u, w: routed_swiglu(g.long(), u.long(), 2, *w), TypeError, "x"),
])
def test_bad_input(call, error, match):
    g, u = torch.randn(5, 4), torch.randn(5, 4)
    w = (torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2))
    with pytest.raises(error, match=match):
        call(g, u, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    for shape in SHAPES:
        inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(*shape).items()}
        check_against_reference(lambda **kw: routed_swiglu(**kw), routed_swiglu_ref, inputs, dtype,
                                grad_inputs=grad_names(inputs))
