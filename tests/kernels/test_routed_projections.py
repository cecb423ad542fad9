from collections import Counter

import pytest
import torch
from backends import runnable

from libra_kernels.ops import routed_projections as module
from libra_kernels.ops.routed_linear import routed_linear_ref
from libra_kernels.ops.routed_projections import pack_rows, routed_projections, routed_projections_ref
from libra_kernels.testing import assert_close_to_ref, check_against_reference

BACKENDS = runnable(module.TABLE)
CPP = pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")

# Attention's maps in miniature: q [out, r], k and v [kv, r_kv], then the two bridges' A factors (rank 3, no B).
MAPS = [(24, 6), (10, 4), (10, 4), (3, None), (3, None)]


def make_inputs(rows, n_text, d_in, maps=MAPS):
    """Flat dict of float64 tensors (x, t<i>, a<i>, b<i>) so the tolerance helper casts and differentiates each."""
    f64 = dict(dtype=torch.float64)
    inputs = dict(x=torch.randn(rows, d_in, **f64), n_text=n_text)
    for i, (out, rank) in enumerate(maps):
        inputs[f"t{i}"] = torch.randn(out, d_in, **f64) / d_in**0.5
        inputs[f"a{i}"] = torch.randn(rank or out, d_in, **f64) / d_in**0.5
        if rank is not None:
            inputs[f"b{i}"] = torch.randn(out, rank, **f64) / rank**0.5
    return inputs


def split(inputs, maps=MAPS):
    weights = [[inputs[f"{k}{i}"] for i in range(len(maps))] for k in ("t", "a")]
    return inputs["x"], inputs["n_text"], weights[0], weights[1], [inputs.get(f"b{i}") for i in range(len(maps))]


def concatenated(fn, maps=MAPS):
    """One [T, sum out] tensor from a list-returning function of the flat inputs (for the tolerance helper)."""
    return lambda **kw: torch.cat(fn(*split(kw, maps)), dim=1)


SHAPES = [(59, 20, 33), (61, 0, 17), (61, 61, 17), (1, 0, 16), (0, 0, 8), (37, 36, 25)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,n_text,d_in", SHAPES)
def test_matches_reference(backend, packed, dtype, rows, n_text, d_in):
    inputs = make_inputs(rows, n_text, d_in)

    def op(x, n_text, w_text, w_a, w_b):
        if packed:  # pack copies of the leaves so the gradient still reaches the leaves themselves
            w_text, w_a = [t.clone() for t in w_text], [a.clone() for a in w_a]
            pack_rows(w_text), pack_rows(w_a)
        return routed_projections(x, n_text, w_text, w_a, w_b, backend=backend)

    grads = tuple(k for k in inputs if k != "n_text")
    check_against_reference(concatenated(op), concatenated(routed_projections_ref), inputs, dtype, grad_inputs=grads)


def test_reference_is_one_routed_linear_per_map():
    x, n_text, w_text, w_a, w_b = split(make_inputs(23, 9, 14))
    for got, (t, a, b) in zip(routed_projections_ref(x, n_text, w_text, w_a, w_b), zip(w_text, w_a, w_b)):
        assert torch.equal(got, routed_linear_ref(x, n_text, t, a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    maps = [(5, 2), (3, None)]
    inputs = make_inputs(9, 4, 6, maps)
    keys = [k for k in inputs if k != "n_text"]

    def fn(*tensors):
        kw = dict(zip(keys, tensors), n_text=4)
        return torch.cat(routed_projections(*split(kw, maps), backend=backend), dim=1)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k].requires_grad_() for k in keys))


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_views_of_one_buffer(backend):
    x, n_text, w_text, w_a, w_b = split({k: (v.float() if isinstance(v, torch.Tensor) else v)
                                         for k, v in make_inputs(13, 5, 8).items()})
    outs = routed_projections(x, n_text, w_text, w_a, w_b, backend=backend)
    assert [o.shape for o in outs] == [(13, 24), (13, 10), (13, 10), (13, 3), (13, 3)]
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_one_freezing(backend):
    """q/k/v text weights frozen, the bridge A factors (on language) and the vision expert trained."""
    inputs = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(17, 6, 8).items()}
    x, n_text, w_text, w_a, w_b = split(inputs)
    x.requires_grad_()
    for t in w_text[3:] + w_a + [b for b in w_b if b is not None]:
        t.requires_grad_()
    outs = routed_projections(x, n_text, w_text, w_a, w_b, backend=backend)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    assert all(t.grad is None for t in w_text[:3])
    assert all(t.grad is not None for t in w_text[3:] + w_a + [b for b in w_b if b is not None])
    assert x.grad is not None


def float_leaves(rows, n_text, d_in, requires_grad):
    inputs = {k: (v.float().requires_grad_(requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in make_inputs(rows, n_text, d_in).items()}
    return split(inputs)


@CPP
@pytest.mark.parametrize("packed", [False, True])
def test_cpp_gemm_count(packed):
    """Packed: one GEMM per modality for all text weights / all A factors. Unpacked: one per weight. No copies but
    the bridges' rank-3 outputs, no gather, no concatenation either way."""
    x, n_text, w_text, w_a, w_b = float_leaves(29, 11, 12, True)
    if packed:
        with torch.no_grad():
            pack_rows(w_text), pack_rows(w_a)
    grads = [torch.randn(29, t.shape[0]) for t in w_text]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outs = routed_projections(x, n_text, w_text, w_a, w_b, backend="cpp")
    forward = Counter(e.name for e in prof.events())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(outs, grads)
    backward = Counter(e.name for e in prof.events())
    maps, low_rank = len(MAPS), sum(rank is not None for _, rank in MAPS)
    fused = 1 if packed else maps
    assert forward["aten::mm"] == 2 * fused + low_rank
    # the two maps without B copy their A product (vision rows) into the output, and back for the gradient
    assert forward["aten::copy_"] == maps - low_rank
    # dx: one GEMM (packed) or a chain per modality; every weight its own dW; dB and d_low per B factor
    dx_gemms = 2 if packed else 2 * maps
    assert backward["aten::mm"] + backward["aten::addmm_"] == dx_gemms + 2 * maps + 2 * low_rank
    for name in ("aten::index", "aten::index_select", "aten::gather", "aten::nonzero", "aten::item",
                 "aten::_local_scalar_dense", "aten::masked_select"):
        assert forward[name] == 0 and backward[name] == 0, name
    # the split views' gradients are joined by autograd (SplitWithSizesBackward), outside the op
    assert forward["aten::cat"] == 0


@CPP
def test_cpp_matches_torch_backend_in_float64():
    x, n_text, w_text, w_a, w_b = split(make_inputs(31, 12, 19))
    pack_rows(w_text)
    for got, want in zip(routed_projections(x, n_text, w_text, w_a, w_b, backend="cpp"),
                         routed_projections(x, n_text, w_text, w_a, w_b, backend="torch")):
        assert_close_to_ref(got, want, None, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    x, n_text, w_text, w_a, w_b = float_leaves(10, 4, 8, requires_grad)
    has_b = [int(b is not None) for b in w_b]
    torch.library.opcheck(torch.ops.libra.routed_projections,
                          (x, n_text, w_text, w_a, [b for b in w_b if b is not None], has_b, backend))


@CPP
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_cpp_kernels(packed):
    x, n_text, w_text, w_a, w_b = float_leaves(10, 4, 8, False)
    if packed:
        pack_rows(w_text), pack_rows(w_a)
    listed_b, has_b = [b for b in w_b if b is not None], [int(b is not None) for b in w_b]
    torch.library.opcheck(torch.ops.libra.routed_projections_fwd, (x, n_text, w_text, w_a, listed_b, has_b))
    y, low = torch.ops.libra.routed_projections_fwd(x, n_text, w_text, w_a, listed_b, has_b)
    needs = ([True, False, True, False, True], [True] * 5, [True, False, True])
    torch.library.opcheck(torch.ops.libra.routed_projections_bwd,
                          (torch.randn_like(y), x, low, n_text, w_text, w_a, listed_b, has_b, True, *needs))


def test_compiles_fullgraph():
    x, n_text, w_text, w_a, w_b = float_leaves(10, 4, 8, False)
    compiled = torch.compile(lambda x: routed_projections(x, n_text, w_text, w_a, w_b), fullgraph=True,
                             backend="eager")
    for got, want in zip(compiled(x), routed_projections_ref(x, n_text, w_text, w_a, w_b)):
        assert_close_to_ref(got, want.double(), want, torch.float32)


def test_pack_rows_shares_storage_and_keeps_values():
    params = [torch.nn.Parameter(torch.randn(r, 6)) for r in (4, 3, 5)]
    before = [p.detach().clone() for p in params]
    buffer = pack_rows(params)
    assert buffer.shape == (12, 6)
    assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with torch.no_grad():
        params[1].add_(1)  # an optimizer step in place is seen through the buffer
    assert torch.equal(buffer[4:7], before[1] + 1)


@pytest.mark.parametrize("call,error,match", [
    (lambda t: pack_rows([]), ValueError, "must not be empty"),
    (lambda t: pack_rows([t, torch.randn(3)]), TypeError, r"tensors\[1\] must be a 2-D"),
    (lambda t: pack_rows([t, torch.randn(3, 5)]), ValueError, r"tensors\[1\] must have the columns"),
    (lambda t: routed_projections(torch.randn(5, 4), 2, t, [t], [None]), TypeError, "w_text must be a list"),
    (lambda t: routed_projections(torch.randn(5, 4), 2, [t], [t, t], [None]), ValueError, "of one length"),
    (lambda t: routed_projections(torch.randn(5, 4), 2, [], [], []), ValueError, "non-empty"),
    (lambda t: routed_projections(torch.randn(5, 4), 2, [t], [torch.randn(2, 4)], [torch.randn(6, 3)]),
     ValueError, "w_vision_b must have shape"),
    (lambda t: routed_projections(torch.randn(5, 4), 7, [t], [t], [None]), ValueError, "n_text must be in"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(6, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_matches_reference_without_synchronising(packed):
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(1031, 97, 512).items()}

    def op(x, n_text, w_text, w_a, w_b):
        if packed:
            w_text, w_a = [t.clone() for t in w_text], [a.clone() for a in w_a]
            pack_rows(w_text), pack_rows(w_a)
        return routed_projections(x, n_text, w_text, w_a, w_b, backend="cpp")

    grads = tuple(k for k in inputs if k != "n_text")
    check_against_reference(concatenated(op), concatenated(routed_projections_ref), inputs, torch.bfloat16,
                            grad_inputs=grads)
    x, n_text, w_text, w_a, w_b = split({k: (v.bfloat16().requires_grad_() if isinstance(v, torch.Tensor) else v)
                                         for k, v in inputs.items()})
    op(x, n_text, w_text, w_a, w_b)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = op(x, n_text, w_text, w_a, w_b)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiled", [False, True])
def test_only_the_input_needs_a_gradient(backend, compiled):
    """Every weight frozen: the backward returns no placeholder outputs (which would alias each other)."""
    x, n_text, w_text, w_a, w_b = float_leaves(12, 5, 8, False)
    x.requires_grad_()
    fn = lambda x: torch.cat(routed_projections(x, n_text, w_text, w_a, w_b, backend=backend), dim=1)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = fn(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = x.detach().double().requires_grad_()
    doubled = [[None if t is None else t.double() for t in ws] for ws in (w_text, w_a, w_b)]
    torch.cat(routed_projections_ref(expected, n_text, *doubled), dim=1).backward(grad.double())
    assert_close_to_ref(x.grad, expected.grad, None, torch.float32, "grad of x")
