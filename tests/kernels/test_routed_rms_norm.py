from collections import Counter

import pytest
import torch
from backends import RMS_NORM

from libra_kernels import routed_rms_norm
from libra_kernels.ops import routed_rms_norm as norm_module
from libra_kernels.ops.routed_rms_norm import routed_rms_norm_ref
from libra_kernels.testing import assert_close_to_ref, assert_graph_replays_like_eager, check_against_reference


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


SHAPES = [(59, 97, 20), (13, 64, 0), (13, 64, 13), (1, 123, 1), (0, 32, 0), (300, 33, 123), (200, 40, 64),
          (130, 24, 129)]


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,width,n_text", SHAPES)
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
    (dict(residual=torch.randn(4, 7)), ValueError, "residual must have shape"),
    (dict(residual=torch.randn(4, 8, dtype=torch.float64)), TypeError, "residual must have the dtype of x"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend="triton"), ValueError, "has no 'triton' backend"),
])
def test_bad_input(bad, error, match):
    args = dict(x=torch.randn(4, 8), n_text=2, w_text=torch.randn(8), w_vision=torch.randn(8), eps=1e-6)
    args.update(bad)
    backend = args.pop("backend", "auto")
    with pytest.raises(error, match=match):
        routed_rms_norm(**args, backend=backend)


# ---- the fused residual add: h = x + residual, y = norm(h), both returned

def stacked(fn):
    """One tensor [2, T, D] of (y, h) so the tolerance rule judges both outputs and both feed the gradients."""
    return lambda **kw: torch.stack(fn(**kw))


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,width,n_text", SHAPES)
def test_residual_add_matches_reference(backend, dtype, rows, width, n_text):
    inputs = dict(make_inputs(rows, width, n_text), residual=torch.randn(rows, width, dtype=torch.float64) * 2)
    op = stacked(lambda **kw: routed_rms_norm(**kw, eps=1e-6, backend=backend))
    check_against_reference(op, stacked(lambda **kw: routed_rms_norm_ref(**kw, eps=1e-6)), inputs, dtype,
                            grad_inputs=("x", "residual", "w_text", "w_vision"))


@pytest.mark.parametrize("backend", RMS_NORM)
def test_residual_add_sum_is_the_eager_add(backend):
    x, residual = torch.randn(37, 29, dtype=torch.bfloat16), torch.randn(37, 29, dtype=torch.bfloat16)
    w = torch.randn(29, dtype=torch.bfloat16)
    y, h = routed_rms_norm(x, 5, w, w, 1e-6, residual, backend=backend)
    assert torch.equal(h, x + residual)  # rounded exactly like the eager add it replaces
    assert_close_to_ref(y, routed_rms_norm_ref(h.double(), 5, w.double(), w.double()),
                        routed_rms_norm_ref(h, 5, w, w), torch.bfloat16)


@pytest.mark.parametrize("backend", RMS_NORM)
def test_residual_add_gradcheck_float64(backend):
    x, _, wt, wv = make_inputs(9, 11, 4).values()
    residual = torch.randn(9, 11, dtype=torch.float64)
    args = tuple(t.requires_grad_() for t in (x, residual, wt, wv))
    fn = lambda x, r, wt, wv: routed_rms_norm(x, 4, wt, wv, 1e-6, r, backend=backend)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", RMS_NORM)
def test_residual_add_with_only_one_output_used(backend):
    x, residual = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    w_text, w_vision = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    _, h = routed_rms_norm(x, 3, w_text, w_vision, 1e-6, residual, backend=backend)
    h.sum().backward()  # only the new residual stream reaches the loss
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(residual.grad, torch.ones_like(x))
    assert w_text.grad is None or not w_text.grad.any()


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_residual_add(backend, requires_grad):
    x, residual = torch.randn(10, 24, requires_grad=requires_grad), torch.randn(10, 24, requires_grad=requires_grad)
    w_text, w_vision = torch.randn(24, requires_grad=requires_grad), torch.randn(24, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.libra.routed_add_rms_norm, (x, residual, 3, w_text, w_vision, 1e-6, backend))


# ---- the "cpp" kernels specifically

CPP = pytest.mark.skipif("cpp" not in RMS_NORM, reason="C++ extension not built")
ROUTING_OPS = {"aten::index", "aten::index_select", "aten::index_put_", "aten::index_add_", "aten::gather",
               "aten::scatter", "aten::scatter_add_", "aten::cat", "aten::nonzero", "aten::item",
               "aten::_local_scalar_dense", "aten::masked_select", "aten::where", "aten::copy_", "aten::clone"}


@CPP
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpp_kernel_does_no_routing_work(with_residual):
    """Both groups in one kernel call: no gather, concatenation, host read or copy of [T, D] tensors."""
    x = torch.randn(150, 40, requires_grad=True)
    residual = torch.randn(150, 40, requires_grad=True) if with_residual else None
    w_text, w_vision = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)

    def step():
        out = routed_rms_norm(x, 70, w_text, w_vision, 1e-6, residual, backend="cpp")
        out = torch.stack(out) if with_residual else out
        out.backward(torch.randn_like(out))  # a dense gradient, as in a model (a .sum() would give a broadcast one)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = Counter(event.name for event in prof.events())
    kernel_ops = {"libra::routed_add_rms_norm_fwd" if with_residual else "libra::routed_rms_norm_fwd",
                  "libra::routed_rms_norm_bwd"}
    assert all(names[op] == 1 for op in kernel_ops), names
    inside, stack = set(), [e for e in prof.events() if e.name in kernel_ops]
    while stack:  # every op the kernels dispatched, at any depth
        event = stack.pop()
        inside.add(event.name)
        stack.extend(event.cpu_children)
    assert not ROUTING_OPS & inside, sorted(ROUTING_OPS & inside)


@CPP
def test_cpp_backward_skips_unwanted_weight_grads():
    x, w_text, w_vision = torch.randn(40, 24), torch.randn(24), torch.randn(24)
    y, rstd = torch.ops.libra.routed_rms_norm_fwd(x, 13, w_text, w_vision, 1e-6)
    dx, dw_text, dw_vision = torch.ops.libra.routed_rms_norm_bwd(torch.randn_like(y), x, rstd, 13, w_text, w_vision,
                                                                  False, True)
    assert dx.shape == x.shape and dw_text.numel() == 0 and dw_vision.shape == (24,)


@CPP
def test_opcheck_cpp_residual_kernels():
    x, residual, w_text, w_vision = torch.randn(10, 24), torch.randn(10, 24), torch.randn(24), torch.randn(24)
    torch.library.opcheck(torch.ops.libra.routed_add_rms_norm_fwd, (x, residual, 3, w_text, w_vision, 1e-6))
    y, h, rstd = torch.ops.libra.routed_add_rms_norm_fwd(x, residual, 3, w_text, w_vision, 1e-6)
    torch.library.opcheck(torch.ops.libra.routed_rms_norm_bwd,
                          (torch.randn_like(y), h, rstd, 3, w_text, w_vision, True, True, torch.randn_like(y)))


def test_auto_picks_cpp_when_built():
    assert norm_module.TABLE.resolve("auto", torch.device("cpu")) == ("cpp" if "cpp" in RMS_NORM else "torch")


# ---- gpu tier: the CUDA kernel (one launch for both groups)

def cuda_inputs(rows, width, n_text, residual=False):
    inputs = make_inputs(rows, width, n_text)
    if residual:
        inputs["residual"] = torch.randn(rows, width, dtype=torch.float64)
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width,n_text", [(5120, 4096, 512), (1029, 4095, 311), (77, 97, 0), (77, 96, 77),
                                               (0, 64, 0), (3000, 8, 1500)])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_kernel_matches_reference(dtype, rows, width, n_text, residual):
    inputs = cuda_inputs(rows, width, n_text, residual)
    grads = ("x", "w_text", "w_vision") + (("residual",) if residual else ())
    op = lambda **kw: routed_rms_norm(**kw, eps=1e-6, backend="cpp")
    ref = lambda **kw: routed_rms_norm_ref(**kw, eps=1e-6)
    if residual:
        op, ref = stacked(op), stacked(ref)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=grads)


@pytest.mark.gpu
def test_cuda_never_synchronises():
    inputs = cuda_inputs(1029, 4096, 311, residual=True)
    x, residual, w_text, w_vision = (inputs[k].bfloat16().requires_grad_() for k in ("x", "residual", "w_text",
                                                                                    "w_vision"))
    fused = lambda: torch.stack(routed_rms_norm(x, 311, w_text, w_vision, 1e-6, residual, backend="cpp"))
    step = lambda: fused().sum().backward()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        routed_rms_norm(x, 311, w_text, w_vision, backend="cpp").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graph_capture():
    inputs = cuda_inputs(1029, 4096, 311, residual=True)
    args = tuple(inputs[k].float().requires_grad_() for k in ("x", "residual", "w_text", "w_vision"))
    fn = lambda x, r, wt, wv: torch.stack(routed_rms_norm(x, 311, wt, wv, 1e-6, r, backend="cpp"))
    grad = torch.randn(2, 1029, 4096, device="cuda")
    assert_graph_replays_like_eager(fn, args, grad)


@pytest.mark.parametrize("backend", RMS_NORM)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_only_the_input_needs_a_gradient(backend, compiled, with_residual):
    """Both weights frozen: the backward returns no placeholder outputs (which would alias each other)."""
    x, residual = torch.randn(9, 16, requires_grad=True), torch.randn(9, 16)
    w_text, w_vision = torch.randn(16), torch.randn(16)
    fn = lambda x: routed_rms_norm(x, 4, w_text, w_vision, 1e-6, residual if with_residual else None,
                                   backend=backend)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = fn(x)
    (torch.stack(out) if with_residual else out).sum().backward()
    expected = x.detach().double().requires_grad_()
    ref = routed_rms_norm_ref(expected, 4, w_text.double(), w_vision.double(), 1e-6,
                              residual.double() if with_residual else None)
    (torch.stack(ref) if with_residual else ref).sum().backward()
    assert_close_to_ref(x.grad, expected.grad, None, torch.float32, "grad of x")
