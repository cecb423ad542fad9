import pytest
import torch
from backends import RMS_NORM

from libra_kernels import routed_rms_norm
from libra_kernels.ops.rms_norm import routed_rms_norm_ref
from libra_kernels.testing import check_against_reference


def rms_norm_by_rows(x, n_text, w_text, w_vision, eps):
    """Independent float64 formula, one row at a time."""
    rows = []
    for r in range(x.shape[0]):
        w = w_text if r < n_text else w_vision
        rows.append(w * x[r] / torch.sqrt((x[r] * x[r]).sum() / x.shape[1] + eps))
    return torch.stack(rows) if rows else x.new_empty(x.shape)


def make_inputs(rows, width, n_text):
    return dict(x=torch.randn(rows, width, dtype=torch.float64) * 3, n_text=n_text,
                w_text=torch.randn(width, dtype=torch.float64), w_vision=torch.randn(width, dtype=torch.float64))


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,width,n_text", [(59, 97, 20), (13, 64, 0), (13, 64, 13), (1, 123, 1), (0, 32, 0),
                                               (300, 33, 123)])
def test_matches_reference(backend, dtype, rows, width, n_text):
    inputs = make_inputs(rows, width, n_text)
    op = lambda **kw: routed_rms_norm(**kw, eps=1e-6, backend=backend)
    check_against_reference(op, lambda **kw: routed_rms_norm_ref(**kw, eps=1e-6), inputs, dtype,
                            grad_inputs=("x", "w_text", "w_vision"))


def test_reference_matches_row_formula():
    inputs = make_inputs(37, 29, 11)
    expected = rms_norm_by_rows(**inputs, eps=1e-6)
    torch.testing.assert_close(routed_rms_norm_ref(**inputs, eps=1e-6), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", RMS_NORM)
def test_gradcheck_float64(backend):
    x, _, wt, wv = make_inputs(7, 11, 3).values()
    args = tuple(t.requires_grad_() for t in (x, wt, wv))
    assert torch.autograd.gradcheck(lambda x, wt, wv: routed_rms_norm(x, 3, wt, wv, backend=backend), args)


@pytest.mark.parametrize("backend", RMS_NORM)
def test_frozen_weights_get_no_gradient(backend):
    x = torch.randn(9, 16, requires_grad=True)
    w_text, w_vision = torch.randn(16), torch.randn(16, requires_grad=True)
    routed_rms_norm(x, 4, w_text, w_vision, backend=backend).sum().backward()
    assert w_text.grad is None and w_vision.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    x = torch.randn(10, 24, requires_grad=requires_grad)
    w_text, w_vision = torch.randn(24, requires_grad=requires_grad), torch.randn(24, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.libra.routed_rms_norm, (x, 3, w_text, w_vision, 1e-6, backend))


@pytest.mark.skipif("cpp" not in RMS_NORM, reason="C++ extension not built")
def test_opcheck_cpp_kernels():
    x, w_text, w_vision = torch.randn(10, 24), torch.randn(24), torch.randn(24)
    torch.library.opcheck(torch.ops.libra.routed_rms_norm_fwd, (x, 3, w_text, w_vision, 1e-6))
    y, rstd = torch.ops.libra.routed_rms_norm_fwd(x, 3, w_text, w_vision, 1e-6)
    torch.library.opcheck(torch.ops.libra.routed_rms_norm_bwd, (torch.randn_like(y), x, rstd, 3, w_text, w_vision,
                                                                True, False))


def test_compiles_fullgraph():
    x, w_text, w_vision = torch.randn(10, 24), torch.randn(24), torch.randn(24)
    compiled = torch.compile(lambda x: routed_rms_norm(x, 4, w_text, w_vision), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), routed_rms_norm_ref(x, 4, w_text, w_vision))


@pytest.mark.parametrize("bad,error,match", [
    (dict(x=torch.randn(4, 8, 2)), ValueError, "x must have 2 dimensions"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be a floating tensor"),
    (dict(n_text=5), ValueError, "n_text must be in"),
    (dict(n_text=-1), ValueError, "n_text must be in"),
    (dict(n_text=2.0), TypeError, "n_text must be an int"),
    (dict(w_text=torch.randn(7)), ValueError, "w_text must have shape"),
    (dict(w_vision=torch.randn(8, dtype=torch.float64)), TypeError, "w_vision must have the dtype of x"),
    (dict(eps=0.0), ValueError, "eps must be a positive"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend="triton"), ValueError, "has no 'triton' backend"),
])
def test_bad_input(bad, error, match):
    args = dict(x=torch.randn(4, 8), n_text=2, w_text=torch.randn(8), w_vision=torch.randn(8), eps=1e-6)
    args.update(bad)
    backend = args.pop("backend", "auto")
    with pytest.raises(error, match=match):
        routed_rms_norm(**args, backend=backend)
