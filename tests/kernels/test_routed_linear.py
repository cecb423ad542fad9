import pytest
import torch
from backends import ROUTED_LINEAR

from libra_kernels import routed_linear
from libra_kernels.ops.routed_linear import routed_linear_ref
from libra_kernels.testing import check_against_reference


def linear_by_rows(x, n_text, w_text, w_vision_a, w_vision_b=None):
    """Independent float64 formula, one row at a time."""
    rows = []
    for r in range(x.shape[0]):
        if r < n_text:
            rows.append(w_text @ x[r])
        else:
            low = w_vision_a @ x[r]
            rows.append(low if w_vision_b is None else w_vision_b @ low)
    return torch.stack(rows) if rows else x.new_empty(0, w_text.shape[0])


def make_inputs(rows, n_text, d_in, d_out, rank):
    f64 = dict(dtype=torch.float64)
    inputs = dict(x=torch.randn(rows, d_in, **f64), n_text=n_text, w_text=torch.randn(d_out, d_in, **f64) / d_in**0.5)
    if rank is None:
        inputs.update(w_vision_a=torch.randn(d_out, d_in, **f64) / d_in**0.5, w_vision_b=None)
    else:
        inputs.update(w_vision_a=torch.randn(rank, d_in, **f64) / d_in**0.5,
                      w_vision_b=torch.randn(d_out, rank, **f64) / rank**0.5)
    return inputs


SHAPES = [(59, 20, 97, 45, 13), (61, 0, 33, 17, 5), (61, 61, 33, 17, 5), (1, 0, 16, 16, 4), (0, 0, 8, 8, 2),
          (40, 17, 25, 31, None)]


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,n_text,d_in,d_out,rank", SHAPES)
def test_matches_reference(backend, dtype, rows, n_text, d_in, d_out, rank):
    inputs = make_inputs(rows, n_text, d_in, d_out, rank)
    grads = ("x", "w_text", "w_vision_a") + (() if rank is None else ("w_vision_b",))
    check_against_reference(lambda **kw: routed_linear(**kw, backend=backend), routed_linear_ref, inputs, dtype,
                            grad_inputs=grads)


@pytest.mark.parametrize("rank", [6, None])
def test_reference_matches_row_formula(rank):
    inputs = make_inputs(23, 9, 14, 11, rank)
    torch.testing.assert_close(routed_linear_ref(**inputs), linear_by_rows(**inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
@pytest.mark.parametrize("rank", [3, None])
def test_gradcheck_float64(backend, rank):
    inputs = make_inputs(9, 4, 6, 5, rank)
    tensors = [inputs[k].requires_grad_() for k in ("x", "w_text", "w_vision_a", "w_vision_b") if inputs[k] is not None]
    fn = lambda *t: routed_linear(t[0], 4, *t[1:], backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(tensors))


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
def test_frozen_text_weight_gets_no_gradient(backend):
    x = torch.randn(12, 8, requires_grad=True)
    w_text = torch.randn(6, 8)
    a, b = torch.randn(3, 8, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    routed_linear(x, 5, w_text, a, b, backend=backend).square().sum().backward()
    assert w_text.grad is None and a.grad is not None and b.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
@pytest.mark.parametrize("rank", [3, None])
def test_opcheck(backend, rank):
    inputs = {k: (v.float().requires_grad_() if isinstance(v, torch.Tensor) else v)
              for k, v in make_inputs(10, 4, 8, 6, rank).items()}
    torch.library.opcheck(torch.ops.libra.routed_linear, (inputs["x"], 4, inputs["w_text"], inputs["w_vision_a"],
                                                          inputs["w_vision_b"], backend))


def test_compiles_fullgraph():
    inputs = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(10, 4, 8, 6, 3).items()}
    x = inputs.pop("x")
    compiled = torch.compile(lambda x: routed_linear(x, **inputs), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), routed_linear_ref(x, **inputs))


@pytest.mark.parametrize("bad,error,match", [
    (dict(x=torch.randn(4)), ValueError, "x must have 2 dimensions"),
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(n_text=9), ValueError, "n_text must be in"),
    (dict(w_text=torch.randn(6, 7)), ValueError, "w_text must have shape"),
    (dict(w_vision_a=torch.randn(3, 7)), ValueError, "w_vision_a must have shape"),
    (dict(w_vision_b=torch.randn(5, 3)), ValueError, "w_vision_b must have shape"),
    (dict(w_vision_b=None), ValueError, r"w_vision_a must have shape \(6, 8\)"),
    (dict(w_vision_b=torch.randn(6, 3, dtype=torch.bfloat16)), TypeError, "w_vision_b must have the dtype of x"),
])
def test_bad_input(bad, error, match):
    args = dict(x=torch.randn(5, 8), n_text=2, w_text=torch.randn(6, 8), w_vision_a=torch.randn(3, 8),
                w_vision_b=torch.randn(6, 3))
    args.update(bad)
    with pytest.raises(error, match=match):
        routed_linear(**args)
