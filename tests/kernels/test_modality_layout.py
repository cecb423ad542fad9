from collections import Counter

import pytest
import torch

from libra_kernels import ModalityLayout, cpp_extension_loaded
from libra_kernels.ops.modality_layout import build_layout, permute_rows, resolve_backend
from libra_kernels.testing import random_vision_mask

BACKENDS = ["torch"] + (["cpp"] if resolve_backend("auto", torch.device("cpu")) == "cpp" else [])
CPP = pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["random", "text", "vision", "start", "middle", "end"])
def test_sorted_order_and_round_trip(backend, mix):
    mask = random_vision_mask(3, 17, mix)
    layout = ModalityLayout.from_vision_mask(mask, backend=backend)
    assert layout.backend == backend
    assert layout.n_vision == int(mask.sum()) and layout.n_text + layout.n_vision == 51
    x = torch.randn(3, 17, 5, requires_grad=True)
    sorted_x = layout.sort(x)
    # text rows first, then vision rows, each group in (batch, position) order
    flat_mask = mask.reshape(-1)
    expected_order = [i for i in range(51) if not flat_mask[i]] + [i for i in range(51) if flat_mask[i]]
    assert layout.sort_index.tolist() == expected_order
    assert torch.equal(sorted_x, x.reshape(51, 5)[expected_order])
    assert not flat_mask[layout.sort_index[:layout.n_text]].any() and flat_mask[layout.sort_index[layout.n_text:]].all()
    assert torch.equal(layout.unsort(sorted_x), x)
    assert torch.equal(layout.sort_index[layout.row_of.reshape(-1)], torch.arange(51))
    assert torch.equal(layout.positions, torch.tensor(expected_order) % 17)
    layout.unsort(sorted_x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_vision_indices(backend):
    vision_indices = torch.tensor([[578, 0, 1, 577, 578], [578, 578, 578, 578, 578]])
    layout = ModalityLayout.from_vision_indices(vision_indices, 578, backend=backend)
    assert (layout.n_text, layout.n_vision) == (7, 3)
    assert layout.sort_index.tolist() == [0, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    assert layout.row_of.tolist() == [[0, 7, 8, 9, 1], [2, 3, 4, 5, 6]]


@pytest.mark.parametrize("call,error,match", [
    (lambda: ModalityLayout.from_vision_mask(torch.zeros(2, 3)), ValueError, "bool"),
    (lambda: ModalityLayout.from_vision_mask([[True]]), TypeError, "torch.Tensor"),
    (lambda: ModalityLayout.from_vision_indices(torch.zeros(2, 3), 578), TypeError, "integer"),
    (lambda: ModalityLayout.from_vision_indices(torch.zeros(3, dtype=torch.long), 578), ValueError, r"\[B, N\]"),
    (lambda: ModalityLayout.from_vision_indices(torch.zeros(2, 3, dtype=torch.long), 0), ValueError, "positive"),
    (lambda: ModalityLayout.from_vision_mask(torch.zeros(2, 3, dtype=torch.bool)).sort(torch.zeros(3, 2)),
     ValueError, "layout's shape"),
    (lambda: ModalityLayout.from_vision_mask(torch.zeros(2, 3, dtype=torch.bool)).unsort(torch.zeros(5, 2)),
     ValueError, "6 rows"),
    (lambda: ModalityLayout.from_vision_mask(torch.zeros(2, 3, dtype=torch.bool), backend="triton"), ValueError,
     "backend must be one of"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (5, 97), (2, 1200)])
@pytest.mark.parametrize("mix", ["random", "text", "vision"])
def test_backends_build_the_same_layout(shape, mix):
    mask = random_vision_mask(*shape, mix) if shape[1] else torch.zeros(shape, dtype=torch.bool)
    expected = build_layout(mask, "torch")
    for backend in BACKENDS:
        got = build_layout(mask, backend)
        assert [t.dtype for t in got] == [torch.long] * 3
        for g, e in zip(got, expected):
            assert torch.equal(g, e), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,trailing", [(torch.float32, (7,)), (torch.bfloat16, (3, 5)), (torch.int64, ()),
                                            (torch.bool, (13,)), (torch.int8, (3,)), (torch.float64, (0,))])
def test_permute_rows_any_dtype(backend, dtype, trailing):
    rows = 41
    x = (torch.randn(rows, *trailing) * 10).to(dtype)
    index = torch.randperm(rows)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(rows)
    out = permute_rows(x, index, inverse, backend)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, x[index])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_unsort_gradcheck_float64(backend):
    layout = ModalityLayout.from_vision_mask(random_vision_mask(3, 7, "random"), backend=backend)
    x = torch.randn(3, 7, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(21, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layout.sort, (x,))
    assert torch.autograd.gradcheck(layout.unsort, (y,))


@CPP
def test_cpp_sort_backward_is_a_gather():
    """The gradient of a permutation is the inverse permutation: no scatter, no atomics, no zero fill."""
    layout = ModalityLayout.from_vision_mask(random_vision_mask(4, 33, "random"), backend="cpp")
    x = torch.randn(4, 33, 16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layout.sort(x).backward(torch.randn(132, 16))
    names = Counter(event.name for event in prof.events())
    assert names["libra::permute_rows"] == 2, names
    forbidden = {"aten::index_select", "aten::index_add_", "aten::index_put_", "aten::scatter", "aten::zeros",
                 "aten::zero_", "aten::nonzero", "aten::item", "aten::_local_scalar_dense"}
    assert not forbidden & set(names), sorted(forbidden & set(names))


@CPP
def test_cpp_rejects_an_index_out_of_range():
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.libra.permute_rows(torch.randn(3, 2), torch.tensor([0, 3, 1]), torch.tensor([0, 2, 1]))


@CPP
def test_opcheck_layout_ops():
    mask = random_vision_mask(3, 11, "random")
    torch.library.opcheck(torch.ops.libra.modality_layout, (mask,))
    layout = ModalityLayout.from_vision_mask(mask, backend="cpp")
    for requires_grad in (False, True):
        x = torch.randn(33, 4, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.libra.permute_rows, (x, layout.sort_index, layout.row_of.reshape(-1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_compiles_fullgraph(backend):
    layout = ModalityLayout.from_vision_mask(random_vision_mask(2, 9, "random"), backend=backend)
    x = torch.randn(2, 9, 4)
    compiled = torch.compile(lambda x: layout.unsort(layout.sort(x) * 2), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x * 2)


def test_auto_uses_the_extension_when_built():
    assert resolve_backend("auto", torch.device("cpu")) == ("cpp" if cpp_extension_loaded() else "torch")


# ---- gpu tier

@pytest.mark.gpu
@pytest.mark.parametrize("mix", ["random", "text", "vision", "middle"])
def test_cuda_layout_matches_cpu_without_synchronising(mix):
    mask = random_vision_mask(8, 640, mix)
    expected = build_layout(mask, "torch")
    cuda_mask = mask.cuda()
    build_layout(cuda_mask, "cpp")  # warm-up (first-call allocations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = build_layout(cuda_mask, "cpp")
        layout_tensors = (got[0], got[1].reshape(-1))
        x = torch.randn(8, 640, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        sorted_x = permute_rows(x.view(-1, 4096), *layout_tensors, "cpp")
        sorted_x.backward(torch.ones_like(sorted_x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)
    assert torch.equal(sorted_x.cpu(), x.detach().view(-1, 4096).cpu()[expected[0]])
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.gpu
def test_cuda_layout_object_round_trip():
    layout = ModalityLayout.from_vision_mask(random_vision_mask(2, 2048, "middle").cuda())
    assert layout.backend == "cpp"
    x = torch.randn(2, 2048, 33, device="cuda")  # 132-byte rows: the 4-byte copy path
    assert torch.equal(layout.unsort(layout.sort(x)), x)
    y = torch.randn(2, 2048, 3, device="cuda", dtype=torch.float16)  # 6-byte rows: the 2-byte copy path
    assert torch.equal(layout.unsort(layout.sort(y)), y)


# ---- unsort_groups: G groups of sorted rows unsorted at once, one gradient tensor back

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["random", "text", "vision"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_unsort_groups_is_unsort_of_each_group(backend, mix, groups):
    layout = ModalityLayout.from_vision_mask(random_vision_mask(3, 13, mix), backend=backend)
    y = torch.randn(groups, 39, 2, 5, dtype=torch.float64, requires_grad=True)
    outs = layout.unsort_groups(y)
    assert len(outs) == groups
    reference = torch.randn(groups, 39, 2, 5, dtype=torch.float64).copy_(y.detach()).requires_grad_()
    expected = [layout.unsort(reference[g]) for g in range(groups)]
    grads = [torch.randn(3, 13, 2, 5, dtype=torch.float64) for _ in range(groups)]
    for out, want in zip(outs, expected):
        assert out.shape == (3, 13, 2, 5) and out.is_contiguous() and torch.equal(out, want)
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(expected, grads)
    assert torch.equal(y.grad, reference.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsort_groups_group_without_gradient(backend):
    """A group whose output gets no gradient contributes zeros, the others their gather."""
    layout = ModalityLayout.from_vision_mask(random_vision_mask(2, 9, "random"), backend=backend)
    y = torch.randn(2, 18, 4, requires_grad=True)
    first, _second = layout.unsort_groups(y)
    grad = torch.randn(2, 9, 4)
    first.backward(grad)
    assert torch.equal(y.grad[0], layout.sort(grad)) and torch.equal(y.grad[1], torch.zeros(18, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsort_groups_gradcheck_and_compile(backend):
    layout = ModalityLayout.from_vision_mask(random_vision_mask(3, 7, "random"), backend=backend)
    y = torch.randn(2, 21, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: tuple(layout.unsort_groups(y)), (y,))
    compiled = torch.compile(lambda y: [t * 2 for t in layout.unsort_groups(y)], fullgraph=True, backend="eager")
    for got, want in zip(compiled(y.detach()), layout.unsort_groups(y.detach())):
        assert torch.equal(got, want * 2)
    torch.library.opcheck(torch.ops.libra.unsort_groups,
                          (y, layout.row_of.reshape(-1), layout.sort_index, layout.backend))


@CPP
def test_cpp_unsort_groups_backward_gathers_into_one_gradient():
    """Forward: one permute_rows per group; backward: one gather per group written into the gradient of y, no
    stacking or concatenation copy."""
    layout = ModalityLayout.from_vision_mask(random_vision_mask(4, 33, "random"), backend="cpp")
    y = torch.randn(2, 132, 16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outs = layout.unsort_groups(y)
    assert Counter(event.name for event in prof.events())["libra::permute_rows"] == 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(outs, [torch.randn(4, 33, 16) for _ in outs])
    names = Counter(event.name for event in prof.events())
    assert names["aten::index_select"] == 2, names
    forbidden = {"aten::stack", "aten::cat", "aten::copy_", "aten::zero_", "aten::index_add_", "aten::scatter"}
    assert not forbidden & set(names), sorted(forbidden & set(names))


@pytest.mark.parametrize("bad", [torch.randn(21, 3), torch.randn(2, 20, 3), "y"])
def test_unsort_groups_bad_input(bad):
    layout = ModalityLayout.from_vision_mask(random_vision_mask(3, 7, "random"))
    with pytest.raises(ValueError, match=r"unsort_groups: y must be a \[G, 21, \.\.\.\] tensor"):
        layout.unsort_groups(bad)
