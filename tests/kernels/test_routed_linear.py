from collections import Counter

import pytest
import torch
from backends import ROUTED_LINEAR, ROUTED_LINEAR_GROUPED

from libra_kernels import pack_rows, routed_linear
from libra_kernels.ops import routed_linear as linear_module
from libra_kernels.ops.routed_linear import routed_linear_ref
from libra_kernels.testing import assert_close_to_ref, assert_graph_replays_like_eager, check_against_reference


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


# ---- the "cpp" backend specifically: no routing work inside, and no GEMM for a frozen weight

CPP = pytest.mark.skipif("cpp" not in ROUTED_LINEAR, reason="C++ extension not built")
# Ops that would mean a gather/scatter, a concatenation, a data-dependent shape, a device-to-host read or an extra
# copy of a [T, ...] tensor.
ROUTING_OPS = {"aten::index", "aten::index_select", "aten::index_put_", "aten::index_add_", "aten::gather",
               "aten::scatter", "aten::scatter_add_", "aten::cat", "aten::nonzero", "aten::item",
               "aten::_local_scalar_dense", "aten::masked_select", "aten::masked_scatter_", "aten::where",
               "aten::copy_", "aten::_to_copy", "aten::clone"}


def dispatched_ops(fn):
    """Counter of every op the dispatcher ran during fn(), including the ATen calls made inside C++ kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(event.name for event in prof.events())


def leaves(rows, n_text, d_in, d_out, rank, requires=(True, True, True, True)):
    inputs = make_inputs(rows, n_text, d_in, d_out, rank)
    tensors = [inputs[k] for k in ("x", "w_text", "w_vision_a", "w_vision_b")]
    return [None if t is None else t.float().requires_grad_(r) for t, r in zip(tensors, requires)]


@CPP
@pytest.mark.parametrize("rank", [7, None])
@pytest.mark.parametrize("n_text", [0, 9, 31])
def test_cpp_runs_only_gemms_on_slices(rank, n_text):
    x, w_text, a, b = leaves(31, n_text, 12, 10, rank)
    grad = torch.randn(31, 10)

    def step():
        routed_linear(x, n_text, w_text, a, b, backend="cpp").backward(grad)

    ops = dispatched_ops(step)
    assert not ROUTING_OPS & set(ops), sorted(ROUTING_OPS & set(ops))
    n_vision = 31 - n_text
    # forward: the text GEMM, A (and B); backward: dx and dW of each slice, plus dB and d_low for a low-rank expert.
    # A slice without rows runs no GEMM.
    forward = (n_text > 0) + (n_vision > 0) * (1 if rank is None else 2)
    backward = 2 * (n_text > 0) + (n_vision > 0) * (2 if rank is None else 4)
    assert ops["aten::mm"] == forward + backward, ops


@CPP
@pytest.mark.parametrize("rank", [5, None])
def test_frozen_weights_cost_no_gemm(rank):
    """Stage 1 freezes the text weight: its dW GEMM must not run (counted), and the op returns [0] for it."""
    def backward_gemms(requires):
        x, w_text, a, b = leaves(23, 8, 12, 10, rank, requires)
        y = routed_linear(x, 8, w_text, a, b, backend="cpp")
        return dispatched_ops(lambda: y.backward(torch.randn_like(y)))["aten::mm"]

    trained = backward_gemms((True, True, True, True))
    frozen_text = backward_gemms((True, False, True, True))
    frozen_input = backward_gemms((False, False, True, True))
    assert trained - frozen_text == 1  # dW_text
    assert frozen_text - frozen_input == 2  # dx of the text slice and of the vision slice
    x, w_text, a, b = leaves(23, 8, 12, 10, rank, (False,) * 4)
    y, low = torch.ops.libra.routed_linear_fwd(x, 8, w_text, a, b)
    grads = torch.ops.libra.routed_linear_bwd(torch.randn_like(y), x, low, 8, w_text, a, b, [True, False, True, True])
    assert grads[1].numel() == 0 and grads[0].shape == x.shape and grads[2].shape == a.shape
    if b is not None:
        assert grads[3].shape == b.shape


@CPP
def test_cpp_matches_torch_backend_exactly_in_float64():
    inputs = make_inputs(45, 17, 21, 19, 6)
    cpp = routed_linear(**inputs, backend="cpp")
    torch.testing.assert_close(cpp, routed_linear(**inputs, backend="torch"), rtol=1e-13, atol=1e-13)


@CPP
@pytest.mark.parametrize("rank", [3, None])
def test_opcheck_cpp_kernels(rank):
    x, w_text, a, b = leaves(10, 4, 8, 6, rank, (False,) * 4)
    torch.library.opcheck(torch.ops.libra.routed_linear_fwd, (x, 4, w_text, a, b))
    y, low = torch.ops.libra.routed_linear_fwd(x, 4, w_text, a, b)
    torch.library.opcheck(torch.ops.libra.routed_linear_bwd,
                          (torch.randn_like(y), x, low, 4, w_text, a, b, [True, True, False, b is not None]))


def test_auto_picks_cpp_when_built():
    assert linear_module.TABLE.resolve("auto", torch.device("cpu")) == ("cpp" if "cpp" in ROUTED_LINEAR else "torch")


# ---- gpu tier: no synchronisation and CUDA-graph capture of the C++ op

def cuda_leaves(rank, dtype=torch.bfloat16):
    tensors = leaves(1031, 97, 512, 384, rank)
    return [None if t is None else t.detach().to("cuda", dtype).requires_grad_() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [96, None])
def test_cuda_forward_backward_never_synchronises(rank):
    x, w_text, a, b = cuda_leaves(rank)
    grad = torch.randn(1031, 384, device="cuda", dtype=torch.bfloat16)
    routed_linear(x, 97, w_text, a, b, backend="cpp").backward(grad)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routed_linear(x, 97, w_text, a, b, backend="cpp").backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [96, None])
def test_cuda_graph_capture(rank):
    x, w_text, a, b = cuda_leaves(rank, torch.float32)
    args = tuple(t for t in (x, w_text, a, b) if t is not None)
    fn = lambda x, w_text, a, *b: routed_linear(x, 97, w_text, a, *b, backend="cpp")
    grad = torch.randn(1031, 384, device="cuda")
    assert_graph_replays_like_eager(fn, args, grad)


@pytest.mark.parametrize("backend", ROUTED_LINEAR)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("rank", [3, None])
def test_only_the_input_needs_a_gradient(backend, compiled, rank):
    """Every weight frozen: the backward returns no placeholder outputs (which would alias each other)."""
    x, w_text, a, b = leaves(12, 5, 8, 6, rank, (True, False, False, False))
    fn = lambda x: routed_linear(x, 5, w_text, a, b, backend=backend)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad = torch.randn(12, 6)
    fn(x).backward(grad)
    expected = x.detach().double().requires_grad_()
    routed_linear_ref(expected, 5, w_text.double(), a.double(), None if b is None else b.double()).backward(
        grad.double())
    assert_close_to_ref(x.grad, expected.grad, None, torch.float32, "grad of x")


# ---- the grouped form: x [G, T, in], one text and one dense vision weight per group (attention's bridge B factors)

def make_grouped_inputs(groups, rows, n_text, d_in, d_out):
    """float64 inputs: x as a [T, G, in] buffer (the layout attention hands over; the op sees its [G, T, in] view),
    the weights as separate tensors w_text0.., w_vision0.."""
    f64 = dict(dtype=torch.float64)
    inputs = dict(x=torch.randn(rows, groups, d_in, **f64), n_text=n_text)
    for g in range(groups):
        inputs[f"w_text{g}"] = torch.randn(d_out, d_in, **f64) / d_in**0.5
        inputs[f"w_vision{g}"] = torch.randn(d_out, d_in, **f64) / d_in**0.5
    return inputs


def grouped_call(backend, packed, rows_outer=True):
    """routed_linear on the grouped inputs of make_grouped_inputs (packing the weight lists when asked)."""
    def call(x, n_text, **weights):
        groups = x.shape[1]
        w_text = [weights[f"w_text{g}"] for g in range(groups)]
        w_vision = [weights[f"w_vision{g}"] for g in range(groups)]
        if packed:
            pack_rows(w_text)
            pack_rows(w_vision)
        x = x.transpose(0, 1) if rows_outer else x.transpose(0, 1).contiguous()
        return routed_linear(x, n_text, w_text, w_vision, backend=backend)
    return call


def grouped_ref(x, n_text, **weights):
    groups = x.shape[1]
    return routed_linear_ref(x.transpose(0, 1), n_text, [weights[f"w_text{g}"] for g in range(groups)],
                             [weights[f"w_vision{g}"] for g in range(groups)])


GROUPED_SHAPES = [(2, 37, 14, 13, 11), (1, 29, 11, 13, 7), (2, 31, 0, 9, 17), (2, 31, 31, 9, 17), (3, 23, 9, 8, 5),
                  (2, 0, 0, 4, 6)]


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("groups,rows,n_text,d_in,d_out", GROUPED_SHAPES)
def test_grouped_matches_reference(backend, dtype, packed, groups, rows, n_text, d_in, d_out):
    inputs = make_grouped_inputs(groups, rows, n_text, d_in, d_out)
    grads = ("x",) + tuple(k for k in inputs if k.startswith("w_"))
    check_against_reference(grouped_call(backend, packed), grouped_ref, inputs, dtype, grad_inputs=grads)


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
def test_grouped_contiguous_input_and_stacked_weights(backend):
    """x as a contiguous [G, T, in] tensor and the weights as [G, out, in] tensors give the same as the reference."""
    inputs = make_grouped_inputs(2, 19, 7, 6, 5)
    x = inputs["x"].transpose(0, 1).contiguous().requires_grad_()
    w_text = torch.stack([inputs["w_text0"], inputs["w_text1"]]).requires_grad_()
    w_vision = torch.stack([inputs["w_vision0"], inputs["w_vision1"]]).requires_grad_()
    y = routed_linear(x, 7, w_text, w_vision, backend=backend)
    assert y.shape == (2, 19, 5) and y.is_contiguous()
    expected = routed_linear_ref(x, 7, w_text, w_vision)
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w_text, w_vision), grad)
    want = torch.autograd.grad(expected, (x, w_text, w_vision), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_non_contiguous_weights(backend, groups):
    """Transposed (column-major) weights cannot be packed: the per-group GEMMs still give the reference."""
    x = torch.randn(groups, 17, 6, dtype=torch.float64)
    w_text = [torch.randn(6, 5, dtype=torch.float64).T for _ in range(groups)]
    w_vision = [torch.randn(6, 5, dtype=torch.float64).T for _ in range(groups)]
    torch.testing.assert_close(routed_linear(x, 8, w_text, w_vision, backend=backend),
                               routed_linear_ref(x, 8, w_text, w_vision), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_reference_matches_row_formula(groups):
    inputs = make_grouped_inputs(groups, 23, 9, 14, 11)
    expected = torch.stack([linear_by_rows(inputs["x"][:, g], 9, inputs[f"w_text{g}"], inputs[f"w_vision{g}"])
                            for g in range(groups)])
    torch.testing.assert_close(grouped_ref(**inputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("trained", [("w_text0", "w_vision0", "w_vision1"), ("x", "w_text1"), ("x",),
                                     ("w_vision0", "w_vision1")])
def test_grouped_only_some_require_grad(backend, packed, trained):
    """Gradients of exactly the inputs that require them, each equal to the float64 reference."""
    inputs = make_grouped_inputs(2, 21, 8, 7, 6)
    leaves = {k: v.float().requires_grad_(k in trained) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    y = grouped_call(backend, packed)(**leaves)
    grad = torch.randn(y.shape)
    y.backward(grad)
    ref_leaves = {k: v.detach().requires_grad_(k in trained) if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
    grouped_ref(**ref_leaves).backward(grad.double())
    for key, leaf in leaves.items():
        if not isinstance(leaf, torch.Tensor):
            continue
        if key in trained:
            assert_close_to_ref(leaf.grad, ref_leaves[key].grad, None, torch.float32, f"grad of {key}")
        else:
            assert leaf.grad is None, key


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_gradcheck_float64(backend, packed):
    inputs = make_grouped_inputs(2, 9, 4, 5, 3)
    keys = [k for k in inputs if k != "n_text"]
    if packed:  # once, before gradcheck takes hold of the tensors it perturbs
        pack_rows([inputs["w_text0"], inputs["w_text1"]])
        pack_rows([inputs["w_vision0"], inputs["w_vision1"]])
    call = grouped_call(backend, False)

    def fn(*tensors):
        return call(n_text=4, **dict(zip(keys, tensors)))

    assert torch.autograd.gradcheck(fn, tuple(inputs[k].requires_grad_() for k in keys))


@pytest.mark.parametrize("backend", ROUTED_LINEAR_GROUPED)
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_opcheck(backend, packed):
    inputs = make_grouped_inputs(2, 10, 4, 8, 6)
    x = inputs["x"].float().transpose(0, 1).requires_grad_()
    w_text = [inputs[f"w_text{g}"].float().requires_grad_() for g in range(2)]
    w_vision = [inputs[f"w_vision{g}"].float().requires_grad_() for g in range(2)]
    if packed:
        pack_rows(w_text)
        pack_rows(w_vision)
    torch.library.opcheck(torch.ops.libra.routed_linear_grouped, (x, 4, w_text, w_vision, backend))


def test_grouped_compiles_fullgraph():
    inputs = make_grouped_inputs(2, 10, 4, 8, 6)
    weights = {k: v.float() for k, v in inputs.items() if k.startswith("w_")}
    call = grouped_call("auto", False)
    compiled = torch.compile(lambda x: call(x, 4, **weights), fullgraph=True, backend="eager")
    x = inputs["x"].float()
    torch.testing.assert_close(compiled(x), grouped_ref(x, 4, **weights))


@pytest.mark.parametrize("bad,error,match", [
    (dict(w_vision_b=torch.randn(6, 3)), ValueError, "w_vision_b must be None"),
    (dict(w_text=[torch.randn(6, 8)]), ValueError, r"w_text must hold one weight per group \(G = x.shape\[0\] = 2\)"),
    (dict(w_text=torch.randn(6, 8)), ValueError, r"w_text must be a \[G, out, in\] tensor"),
    (dict(w_vision_a="w"), TypeError, r"w_vision_a must be a \[G, out, in\] tensor or a list"),
    (dict(w_vision_a=[torch.randn(6, 8), torch.randn(5, 8)]), ValueError, r"w_vision_a\[1\] must have shape \(6, 8\)"),
    (dict(w_text=[torch.randn(6, 8), torch.randn(6, 7)]), ValueError, r"w_text\[1\] must have shape \(6, 8\)"),
    (dict(w_text=[torch.randn(6, 8), torch.randn(6, 8, dtype=torch.float64)]), TypeError,
     r"w_text\[1\] must have the dtype of x"),
    (dict(n_text=6), ValueError, r"n_text must be in \[0, 5\]"),
    (dict(x=torch.randn(0, 5, 8), w_text=[], w_vision_a=[]), ValueError, "at least one group"),
    (dict(x=torch.randn(2, 5, 8, 1)), ValueError, "x must have 2 dimensions"),
])
def test_grouped_bad_input(bad, error, match):
    args = dict(x=torch.randn(2, 5, 8), n_text=2, w_text=[torch.randn(6, 8), torch.randn(6, 8)],
                w_vision_a=[torch.randn(6, 8), torch.randn(6, 8)], w_vision_b=None)
    args.update(bad)
    with pytest.raises(error, match=match):
        routed_linear(**args)


GROUPED_CPP = pytest.mark.skipif("cpp" not in ROUTED_LINEAR_GROUPED, reason="C++ extension not built")


def grouped_leaves(groups, rows, n_text, requires, packed=True):
    inputs = make_grouped_inputs(groups, rows, n_text, 12, 10)
    x = inputs["x"].float().requires_grad_(requires[0]).transpose(0, 1)
    w_text = [inputs[f"w_text{g}"].float().requires_grad_(requires[1]) for g in range(groups)]
    w_vision = [inputs[f"w_vision{g}"].float().requires_grad_(requires[2]) for g in range(groups)]
    if packed:
        pack_rows(w_text)
        pack_rows(w_vision)
    return x, w_text, w_vision


@GROUPED_CPP
@pytest.mark.parametrize("n_text", [0, 9, 31])
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_cpp_runs_one_batched_gemm_per_product(n_text, packed):
    """Packed: forward one bmm per modality, backward one per modality for dX and for dW; unpacked: one mm per
    group for the products that read the weights. No copy, gather or concatenation; dx has x's strides."""
    x, w_text, w_vision = grouped_leaves(2, 31, n_text, (True, True, True), packed)
    grad = torch.randn(2, 31, 10)
    forward = dispatched_ops(lambda: routed_linear(x, n_text, w_text, w_vision, backend="cpp"))
    y = routed_linear(x, n_text, w_text, w_vision, backend="cpp")
    backward = dispatched_ops(lambda: y.backward(grad))
    for ops in (forward, backward):
        assert not ROUTING_OPS & set(ops), sorted(ROUTING_OPS & set(ops))
    slices = (n_text > 0) + (n_text < 31)
    weight_gemm = (1, 0) if packed else (0, 2)  # (bmm, mm) of one product that reads the weights
    assert (forward["aten::bmm"], forward["aten::mm"]) == (slices * weight_gemm[0], slices * weight_gemm[1])
    assert (backward["aten::bmm"], backward["aten::mm"]) == (slices * (weight_gemm[0] + 1), slices * weight_gemm[1])
    leaf = x._base
    assert leaf.grad.shape == leaf.shape and leaf.grad.is_contiguous()


@GROUPED_CPP
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_frozen_weights_cost_no_gemm(packed):
    def backward_gemms(requires):
        x, w_text, w_vision = grouped_leaves(2, 23, 8, requires, packed)
        y = routed_linear(x, 8, w_text, w_vision, backend="cpp")
        ops = dispatched_ops(lambda: y.backward(torch.randn_like(y)))
        return ops["aten::bmm"] + ops["aten::mm"]

    trained = backward_gemms((True, True, True))
    frozen_text = backward_gemms((True, False, True))
    frozen_input = backward_gemms((False, False, True))
    assert trained - frozen_text == 1  # the text dW, one bmm for both groups
    assert frozen_text - frozen_input == (2 if packed else 4)  # dx of the text slice and of the vision slice
    x, w_text, w_vision = grouped_leaves(2, 23, 8, (False, False, False), packed)
    y = torch.ops.libra.routed_linear_grouped_fwd(x, 8, w_text, w_vision)
    dx, d_text, d_vision = torch.ops.libra.routed_linear_grouped_bwd(torch.randn_like(y), x, 8, w_text, w_vision,
                                                                    [True, False, True])
    assert d_text.numel() == 0 and dx.shape == x.shape and dx.stride() == x.stride()
    assert d_vision.shape == (2, 10, 12)


@GROUPED_CPP
def test_grouped_cpp_matches_torch_backend_exactly_in_float64():
    inputs = make_grouped_inputs(2, 45, 17, 21, 19)
    for packed in (True, False):
        cpp = grouped_call("cpp", packed)(**inputs)
        torch.testing.assert_close(cpp, grouped_call("torch", packed)(**inputs), rtol=1e-13, atol=1e-13)


@GROUPED_CPP
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_opcheck_cpp_kernels(packed):
    x, w_text, w_vision = grouped_leaves(2, 10, 4, (False, False, False), packed)
    torch.library.opcheck(torch.ops.libra.routed_linear_grouped_fwd, (x, 4, w_text, w_vision))
    y = torch.ops.libra.routed_linear_grouped_fwd(x, 4, w_text, w_vision)
    torch.library.opcheck(torch.ops.libra.routed_linear_grouped_bwd,
                          (torch.randn_like(y), x, 4, w_text, w_vision, [True, True, False]))


@pytest.mark.gpu
def test_cuda_grouped_forward_backward_never_synchronises():
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1031, 2, 512, **cuda).transpose(0, 1).requires_grad_()
    w_text = [torch.randn(384, 512, **cuda).requires_grad_() for _ in range(2)]
    w_vision = [torch.randn(384, 512, **cuda).requires_grad_() for _ in range(2)]
    pack_rows(w_text)
    pack_rows(w_vision)
    grad = torch.randn(2, 1031, 384, **cuda)
    routed_linear(x, 97, w_text, w_vision, backend="cpp").backward(grad)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routed_linear(x, 97, w_text, w_vision, backend="cpp").backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
