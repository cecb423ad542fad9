import pytest
import torch
import torch.nn.functional as F
from backends import CROSS_ENTROPY

from libra_kernels import discrete_token_cross_entropy
from libra_kernels.ops.discrete_token_cross_entropy import discrete_token_cross_entropy_ref
from libra_kernels.testing import assert_close_to_ref, check_against_reference, random_labels

CPP = [b for b in CROSS_ENTROPY if b == "cpp"]


def loss_by_concatenated_logits(h, n_text, w_text, w_vision, labels, ignore_index=-100, reduction="mean"):
    """Independent float64 formula of docs/model.md §7-§8: [C, T, V + Vv] logits padded with -inf, one standard
    cross-entropy per codebook row, averaged over codebooks."""
    vocab, vision_vocab = w_text.shape[0], w_vision.shape[1]
    losses = []
    for c in range(w_vision.shape[0]):
        logits = torch.full((h.shape[0], vocab + vision_vocab), float("-inf"), dtype=h.dtype)
        logits[:n_text, :vocab] = h[:n_text] @ w_text.T
        logits[n_text:, vocab:] = h[n_text:] @ w_vision[c].T
        per_row = reduction if reduction != "mean" else "none"
        row = F.cross_entropy(logits, labels[c], ignore_index=ignore_index, reduction=per_row)
        if reduction == "mean":
            valid = (labels[c] != ignore_index).sum()
            row = row.sum() / valid if valid else row.sum() * 0
        losses.append(row)
    if reduction == "none":
        return torch.stack(losses)
    if reduction == "sum":
        return torch.stack(losses).sum()
    return torch.stack(losses).mean()


def loss_by_formula(h, n_text, w_text, w_vision, labels, label_smoothing, z_loss_weight, ignore_index=-100):
    """Independent float64 per-element formula with the options: lse - (1-eps) z_y - eps/K Σ z + w lse², K the
    row's own vocabulary; returns the [C, T] grid (0 at ignored targets)."""
    vocab = w_text.shape[0]
    grid = torch.zeros(labels.shape, dtype=h.dtype)
    for c in range(labels.shape[0]):
        for r in range(h.shape[0]):
            label = int(labels[c, r])
            if label == ignore_index:
                continue
            z = h[r] @ (w_text if r < n_text else w_vision[c]).T
            target = label if r < n_text else label - vocab
            lse = torch.log(torch.exp(z - z.max()).sum()) + z.max()
            grid[c, r] = (lse - (1 - label_smoothing) * z[target] - label_smoothing / len(z) * z.sum()
                          + z_loss_weight * lse**2)
    return grid


def make_inputs(n_text, n_vision, hidden, vocab, vision_vocab, codebooks, ignore=0.2):
    f64 = dict(dtype=torch.float64)
    return dict(h=torch.randn(n_text + n_vision, hidden, **f64), n_text=n_text,
                w_text=torch.randn(vocab, hidden, **f64) / hidden**0.5,
                w_vision=torch.randn(codebooks, vision_vocab, hidden, **f64) / hidden**0.5,
                labels=random_labels(n_text, n_vision, vocab, vision_vocab, codebooks, ignore))


SHAPES = [  # n_text, n_vision, hidden, V, Vv, C, ignored fraction
    (23, 41, 33, 97, 19, 2, 0.2),
    (0, 37, 16, 50, 11, 2, 0.1),     # all vision
    (37, 0, 16, 50, 11, 2, 0.1),     # all text
    (9, 13, 8, 31, 7, 3, 0.0),       # three codebooks, nothing ignored
    (5, 6, 8, 31, 7, 1, 1.0),        # everything ignored
    (0, 0, 8, 31, 7, 2, 0.0),        # T = 0
]
OPTIONS = [dict(label_smoothing=0.1), dict(label_smoothing=0.25, z_loss_weight=0.1)]


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, reduction, shape):
    inputs = make_inputs(*shape)
    op = lambda **kw: discrete_token_cross_entropy(**kw, reduction=reduction, backend=backend)
    ref = lambda **kw: discrete_token_cross_entropy_ref(**kw, reduction=reduction)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=("h", "w_text", "w_vision"))


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_options_match_reference(backend, dtype, reduction, options):
    # A small logits buffer: 7 text rows per chunk (23 = 3·7 + 2), 18 vision rows per chunk (41 = 2·18 + 5), and
    # the weight-gradient pass in blocks of ids.
    inputs = make_inputs(23, 41, 33, 97, 19, 2)
    op = lambda **kw: discrete_token_cross_entropy(**kw, **options, reduction=reduction, chunk_elements=7 * 97,
                                                   backend=backend)
    ref = lambda **kw: discrete_token_cross_entropy_ref(**kw, **options, reduction=reduction)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=("h", "w_text", "w_vision"))


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("chunk_elements", [1, 3 * 97 + 5, None])
@pytest.mark.parametrize("grad_inputs", [("h",), ("w_text", "w_vision"), ("h", "w_vision")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_boundaries(backend, chunk_elements, grad_inputs, reduction):
    """One row per chunk, chunks that do not divide T, one chunk; dh alone, dW alone (pass B), both."""
    inputs = make_inputs(29, 35, 17, 97, 19, 2)
    op = lambda **kw: discrete_token_cross_entropy(**kw, reduction=reduction, label_smoothing=0.05,
                                                   chunk_elements=chunk_elements, backend=backend)
    ref = lambda **kw: discrete_token_cross_entropy_ref(**kw, reduction=reduction, label_smoothing=0.05)
    check_against_reference(op, ref, inputs, torch.float32, grad_inputs=grad_inputs)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_returns_z_loss(backend, reduction):
    inputs = make_inputs(13, 21, 16, 41, 9, 2)
    loss, z_loss = discrete_token_cross_entropy(**inputs, reduction=reduction, z_loss_weight=0.03,
                                                return_z_loss=True, backend=backend)
    expected_loss, expected_z = discrete_token_cross_entropy_ref(**inputs, reduction=reduction, z_loss_weight=0.03,
                                                                 return_z_loss=True)
    assert_close_to_ref(loss, expected_loss, None, torch.float64, "loss")
    assert_close_to_ref(z_loss, expected_z, None, torch.float64, "z_loss")
    assert not z_loss.requires_grad
    plain = discrete_token_cross_entropy(**inputs, reduction=reduction, backend=backend)
    assert_close_to_ref(loss - z_loss, plain, None, torch.float64, "loss without its z-loss")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_concatenated_logits(reduction, shape):
    inputs = make_inputs(*shape)
    expected = loss_by_concatenated_logits(**inputs, reduction=reduction)
    actual = discrete_token_cross_entropy_ref(**inputs, reduction=reduction)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", OPTIONS + [dict(z_loss_weight=0.01)])
def test_reference_options_match_formula(options):
    inputs = make_inputs(7, 9, 8, 23, 9, 2)
    grid = loss_by_formula(**inputs, **{"label_smoothing": 0.0, "z_loss_weight": 0.0, **options})
    actual = discrete_token_cross_entropy_ref(**inputs, **options, reduction="none")
    torch.testing.assert_close(actual, grid, rtol=1e-10, atol=1e-10)


def test_mean_is_libra_per_modality_formula():
    """docs/model.md §8: with the same ignore pattern in every codebook row,
    L = [n_T · mean text CE + (1/C) Σ_c Σ_vision CE_c] / (n_T + n_V)."""
    inputs = make_inputs(11, 17, 8, 23, 9, 2, ignore=0.0)
    h, n, wt, wv, labels = inputs.values()
    text = F.cross_entropy(h[:n] @ wt.T, labels[0, :n], reduction="sum")
    vision = sum(F.cross_entropy(h[n:] @ wv[c].T, labels[c, n:] - 23, reduction="sum") for c in range(2)) / 2
    expected = (text + vision) / h.shape[0]
    torch.testing.assert_close(discrete_token_cross_entropy_ref(**inputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(backend, reduction):
    inputs = make_inputs(4, 5, 6, 9, 5, 2)
    tensors = tuple(inputs[k].requires_grad_() for k in ("h", "w_text", "w_vision"))
    fn = lambda h, wt, wv: discrete_token_cross_entropy(h, 4, wt, wv, inputs["labels"], reduction=reduction,
                                                        label_smoothing=0.1, z_loss_weight=0.05, chunk_elements=20,
                                                        backend=backend)
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_frozen_text_head_gets_no_gradient(backend):
    inputs = make_inputs(6, 7, 8, 15, 5, 2)
    h, w_vision = inputs["h"].float().requires_grad_(), inputs["w_vision"].float().requires_grad_()
    w_text = inputs["w_text"].float()
    discrete_token_cross_entropy(h, 6, w_text, w_vision, inputs["labels"], backend=backend).backward()
    assert w_text.grad is None and h.grad is not None and w_vision.grad is not None
    # The forward is told which gradients to produce and does no dW work for the frozen head.
    outputs = torch.ops.libra.discrete_token_cross_entropy(h.detach(), 6, w_text, w_vision.detach(), inputs["labels"],
                                                           -100, "mean", 0.0, 0.0, [True, False, True], 0, "", backend)
    assert outputs[3].numel() == 0 and outputs[2].shape == h.shape and outputs[4].shape == w_vision.shape


@pytest.mark.parametrize("backend", CPP)
def test_kernel_skips_weight_gradient_when_not_asked(backend):
    h, weight = torch.randn(9, 4), torch.randn(1, 11, 4)
    labels = torch.randint(0, 11, (1, 9))
    dh = torch.empty_like(h)
    _, _, d_w = torch.ops.libra.linear_cross_entropy(h, weight, labels, torch.ones(1, 9), None, dh, 0, -100, 11, 0.0,
                                                     0.0, False, 0)
    assert d_w.numel() == 0


def _count_gemms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul") for event in prof.events())


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("case,expected", [
    # Frozen text head, every head in one chunk: text logits + dh, vision logits + dh + dW; the backward only scales.
    (dict(trainable_text=False), 2 + 3),
    # A trained text head adds its dW GEMM, and no logits recompute.
    (dict(trainable_text=True), 3 + 3),
    # "none": the forward computes logits only; the backward recomputes them once per head for dh and dW.
    (dict(trainable_text=True, reduction="none"), 2 + 3 + 3),
    # 100-element buffer. Text (10 rows of 20 ids): 2 chunks of logits + dh, then dW in 2 blocks of 10 ids by logits
    # + dW. Vision (20 rows of 2 x 5 ids): 2 chunks of logits + dh, then per codebook 1 block of logits + dW.
    (dict(trainable_text=True, chunk_elements=100), 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2),
])
def test_gemm_count(backend, case, expected):
    """Three GEMMs per head when it fits one chunk, none for a frozen head's dW, text rows computed once."""
    h, w_vision = torch.randn(30, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    w_text = torch.randn(20, 8, requires_grad=case["trainable_text"])
    labels = random_labels(10, 20, 20, 5, 2)
    kwargs = dict(reduction=case.get("reduction", "mean"), chunk_elements=case.get("chunk_elements"))
    step = lambda: discrete_token_cross_entropy(h, 10, w_text, w_vision, labels, backend=backend, **kwargs).sum()\
        .backward()
    assert _count_gemms(step) == expected


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_backward_twice(backend, reduction):
    """The gradients made in the forward are scaled by copy when the graph is retained, in place otherwise."""
    inputs = make_inputs(8, 9, 8, 15, 5, 2)
    leaves = [inputs[k].float().requires_grad_() for k in ("h", "w_text", "w_vision")]
    loss = discrete_token_cross_entropy(leaves[0], 8, leaves[1], leaves[2], inputs["labels"], reduction=reduction,
                                        backend=backend).sum()
    loss.backward(torch.tensor(0.5), retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    loss.backward(torch.tensor(1.5))
    for t, first in zip(leaves, once):
        torch.testing.assert_close(t.grad, 4 * first)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_no_grad_mode(backend):
    inputs = make_inputs(8, 9, 8, 15, 5, 2)
    h = inputs["h"].float().requires_grad_()
    with torch.no_grad():
        loss = discrete_token_cross_entropy(h, 8, inputs["w_text"].float(), inputs["w_vision"].float(),
                                            inputs["labels"], backend=backend)
    assert not loss.requires_grad
    expected = discrete_token_cross_entropy_ref(**inputs)
    same_precision = discrete_token_cross_entropy_ref(
        **{**inputs, **{k: inputs[k].float() for k in ("h", "w_text", "w_vision")}})
    assert_close_to_ref(loss, expected, same_precision, torch.float32)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_torch_compile_fullgraph(backend):
    inputs = make_inputs(8, 9, 8, 15, 5, 2)
    h, w_text, w_vision = (inputs[k].float().requires_grad_() for k in ("h", "w_text", "w_vision"))
    fn = lambda h, wt, wv: discrete_token_cross_entropy(h, 8, wt, wv, inputs["labels"], label_smoothing=0.1,
                                                        backend=backend)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(h, w_text, w_vision)
    grads = torch.autograd.grad(loss, (h, w_text, w_vision))
    expected = fn(h, w_text, w_vision)
    expected_grads = torch.autograd.grad(expected, (h, w_text, w_vision))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(backend, reduction):
    inputs = make_inputs(6, 7, 8, 15, 5, 2)
    h, w_text, w_vision = (inputs[k].float().requires_grad_() for k in ("h", "w_text", "w_vision"))
    torch.library.opcheck(torch.ops.libra.discrete_token_cross_entropy,
                          (h, 6, w_text, w_vision, inputs["labels"], -100, reduction, 0.1, 0.01, [True] * 3, 0, "",
                           backend))


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("given_lse", [False, True])
def test_opcheck_kernel(backend, given_lse):
    h, weight = torch.randn(9, 4), torch.randn(2, 11, 4)
    labels = torch.randint(30, 41, (2, 9))
    lse = torch.randn(2, 9) + 3 if given_lse else None
    torch.library.opcheck(torch.ops.libra.linear_cross_entropy,
                          (h, weight, labels, torch.rand(2, 9), lse, torch.empty_like(h), 30, -100, 11, 0.1, 0.01,
                           True, 40))


def _labels_with(change):
    labels = random_labels(3, 4, 10, 5, 2, ignore_fraction=0.0)
    change(labels)
    return labels


@pytest.mark.parametrize("labels,error,match", [
    (_labels_with(lambda t: t[:, 0].fill_(11)), ValueError, "text row has a vision label"),
    (_labels_with(lambda t: t[:, 1].fill_(99)), ValueError, "text row has a label outside"),
    (_labels_with(lambda t: t[1, 2].fill_(-5)), ValueError, "text row has a label outside"),
    (_labels_with(lambda t: t[1, 0].fill_((t[0, 0] + 1) % 10)), ValueError, "same label in every codebook row"),
    (_labels_with(lambda t: t[0, 4].fill_(3)), ValueError, "vision row has a text label"),
    (_labels_with(lambda t: t[1, 5].fill_(15)), ValueError, "vision row has a label outside"),
    (torch.zeros(2, 7, dtype=torch.int32), TypeError, "labels must be int64"),
    (torch.zeros(3, 7, dtype=torch.int64), ValueError, "labels must have shape"),
])
@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_bad_labels(labels, error, match, backend):
    h, w_text, w_vision = torch.randn(7, 4), torch.randn(10, 4), torch.randn(2, 5, 4)
    with pytest.raises(error, match=match):
        discrete_token_cross_entropy(h, 3, w_text, w_vision, labels, backend=backend)


@pytest.mark.parametrize("change,error,match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(w_vision=torch.randn(5, 4)), ValueError, "w_vision must have 3 dimensions"),
    (dict(w_text=torch.randn(10, 3)), ValueError, "w_text must have shape"),
    (dict(h=torch.randn(7, 4, dtype=torch.float64)), TypeError, "w_text must have the dtype of h"),
    (dict(n_text=8), ValueError, "n_text must be in"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
    (dict(z_loss_weight=-1e-4), ValueError, "z_loss_weight must be in"),
    (dict(chunk_elements=0), ValueError, "chunk_elements must be positive"),
    (dict(chunk_elements=2.5), TypeError, "chunk_elements must be an int"),
    (dict(process_group="tp"), TypeError, "process_group must be a torch.distributed ProcessGroup"),
])
def test_bad_arguments(change, error, match):
    args = dict(h=torch.randn(7, 4), n_text=3, w_text=torch.randn(10, 4), w_vision=torch.randn(2, 5, 4),
                labels=random_labels(3, 4, 10, 5, 2))
    args.update(change)
    with pytest.raises(error, match=match):
        discrete_token_cross_entropy(**args)


# ---- gpu tier


def _cuda_backends():
    from libra_kernels.ops.discrete_token_cross_entropy import TABLE

    if not torch.cuda.is_available():
        return ["cpp"]
    return [name for name, kernel in TABLE.kernels.items() if not kernel.unavailable(torch.device("cuda"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [None, 300 * 1000 + 7])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_vocabulary_shapes(backend, dtype, chunk_elements, reduction):
    """Libra's vocabularies (32,000 text ids, two 514-id codebooks) on odd row counts, with several chunks."""
    inputs = make_inputs(301, 799, 136, 32000, 514, 2)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    op = lambda **kw: discrete_token_cross_entropy(**kw, reduction=reduction, label_smoothing=0.1,
                                                   z_loss_weight=1e-3, chunk_elements=chunk_elements, backend=backend)
    ref = lambda **kw: discrete_token_cross_entropy_ref(**kw, reduction=reduction, label_smoothing=0.1,
                                                        z_loss_weight=1e-3)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=("h", "w_text", "w_vision"))


@pytest.mark.gpu
def test_cuda_offsets_beyond_int32():
    """One chunk of 70,001 × 32,000 bf16 logits (2.24e9 elements): offsets past 2^31 must not wrap."""
    device = torch.device("cuda")
    n_text, hidden, vocab = 70001, 16, 32000
    h = torch.randn(n_text + 3, hidden, device=device, dtype=torch.float64)
    w_text = torch.randn(vocab, hidden, device=device, dtype=torch.float64) / 4
    w_vision = torch.randn(2, 514, hidden, device=device, dtype=torch.float64) / 4
    labels = random_labels(n_text, 3, vocab, 514, 2, ignore_fraction=0.1).to(device)
    # The last text rows, whose logits start past 2^31, get the largest ids.
    labels[:, n_text - 5:n_text] = vocab - 1
    leaves = [t.bfloat16().requires_grad_() for t in (h, w_text, w_vision)]
    loss = discrete_token_cross_entropy(leaves[0], n_text, leaves[1], leaves[2], labels, reduction="sum",
                                        chunk_elements=2**32, backend="cpp")
    loss.backward()
    # Float64 reference by hand, in row chunks so it fits in memory; compared on the text rows.
    hb, wb = leaves[0].detach().double(), leaves[1].detach().double()
    valid = labels[0, :n_text] != -100
    target = labels[0, :n_text].where(valid, 0)
    expected_loss = 0.0
    expected_dw = torch.zeros_like(wb)
    expected_dh = torch.zeros(n_text, hidden, device=device, dtype=torch.float64)
    for r0 in range(0, n_text, 8192):
        rows = slice(r0, min(n_text, r0 + 8192))
        logits = hb[rows] @ wb.T
        log_probs = logits.log_softmax(-1)
        ok = valid[rows].double()
        expected_loss += (-(log_probs.gather(1, target[rows, None])[:, 0]) * ok).sum().item() * 2
        grad = log_probs.exp()
        grad[torch.arange(grad.shape[0], device=device), target[rows]] -= 1
        grad *= 2 * ok[:, None]
        expected_dh[rows] = grad @ wb
        expected_dw += grad.T @ hb[rows]
    vision = discrete_token_cross_entropy_ref(hb[n_text:], 0, wb, leaves[2].detach().double(), labels[:, n_text:],
                                              reduction="sum")
    total = torch.tensor(expected_loss + vision.item(), dtype=torch.float64)
    assert_close_to_ref(loss.detach().cpu().double(), total, None, torch.bfloat16, "loss")
    assert_close_to_ref(leaves[0].grad[:n_text], expected_dh, None, torch.bfloat16, "grad of h (text rows)")
    assert_close_to_ref(leaves[1].grad, expected_dw, None, torch.bfloat16, "grad of w_text")


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_label_value_check_can_be_skipped(backend):
    inputs = make_inputs(6, 7, 8, 15, 5, 2)
    h, w_text, w_vision = (inputs[k].float() for k in ("h", "w_text", "w_vision"))
    labels = inputs["labels"]
    bad = labels.clone()
    bad[0, 0] = 15 + 3  # a codebook id on a text row
    with pytest.raises(ValueError, match="text row has a vision label"):
        discrete_token_cross_entropy(h, 6, w_text, w_vision, bad, backend=backend)
    # Trusted labels: no check, and the same loss as the checked call on valid labels.
    checked = discrete_token_cross_entropy(h, 6, w_text, w_vision, labels, backend=backend)
    trusted = discrete_token_cross_entropy(h, 6, w_text, w_vision, labels, check_label_values=False, backend=backend)
    torch.testing.assert_close(trusted, checked, rtol=0, atol=0)
