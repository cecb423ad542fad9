import pytest
import torch
import torch.nn.functional as F
from backends import CROSS_ENTROPY

from libra_kernels import discrete_token_cross_entropy
from libra_kernels.ops.cross_entropy import discrete_token_cross_entropy_ref
from libra_kernels.testing import check_against_reference, random_labels


def loss_by_concatenated_logits(h, n_text, w_text, w_vision, labels, ignore_index=-100, reduction="mean"):
    """Independent float64 formula of LIBRA.md §5.1/5.3: [C, T, V + Vv] logits padded with -inf, one standard
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


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, reduction, shape):
    inputs = make_inputs(*shape)
    op = lambda **kw: discrete_token_cross_entropy(**kw, reduction=reduction, backend=backend)
    ref = lambda **kw: discrete_token_cross_entropy_ref(**kw, reduction=reduction)
    check_against_reference(op, ref, inputs, dtype, grad_inputs=("h", "w_text", "w_vision"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_concatenated_logits(reduction, shape):
    inputs = make_inputs(*shape)
    expected = loss_by_concatenated_logits(**inputs, reduction=reduction)
    actual = discrete_token_cross_entropy_ref(**inputs, reduction=reduction)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_mean_is_libra_per_modality_formula():
    """LIBRA.md §5.3: with the same ignore pattern in every codebook row,
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
                                                        backend=backend)
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
def test_frozen_text_head_gets_no_gradient(backend):
    inputs = make_inputs(6, 7, 8, 15, 5, 2)
    h, w_vision = inputs["h"].float().requires_grad_(), inputs["w_vision"].float().requires_grad_()
    w_text = inputs["w_text"].float()
    discrete_token_cross_entropy(h, 6, w_text, w_vision, inputs["labels"], backend=backend).backward()
    assert w_text.grad is None and h.grad is not None and w_vision.grad is not None


@pytest.mark.parametrize("backend", CROSS_ENTROPY)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(backend, reduction):
    inputs = make_inputs(6, 7, 8, 15, 5, 2)
    h, w_text, w_vision = (inputs[k].float().requires_grad_() for k in ("h", "w_text", "w_vision"))
    torch.library.opcheck(torch.ops.libra.discrete_token_cross_entropy,
                          (h, 6, w_text, w_vision, inputs["labels"], -100, reduction, backend))


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
def test_bad_labels(labels, error, match):
    h, w_text, w_vision = torch.randn(7, 4), torch.randn(10, 4), torch.randn(2, 5, 4)
    with pytest.raises(error, match=match):
        discrete_token_cross_entropy(h, 3, w_text, w_vision, labels)


@pytest.mark.parametrize("change,error,match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(w_vision=torch.randn(5, 4)), ValueError, "w_vision must have 3 dimensions"),
    (dict(w_text=torch.randn(10, 3)), ValueError, "w_text must have shape"),
    (dict(h=torch.randn(7, 4, dtype=torch.float64)), TypeError, "w_text must have the dtype of h"),
    (dict(n_text=8), ValueError, "n_text must be in"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
])
def test_bad_arguments(change, error, match):
    args = dict(h=torch.randn(7, 4), n_text=3, w_text=torch.randn(10, 4), w_vision=torch.randn(2, 5, 4),
                labels=random_labels(3, 4, 10, 5, 2))
    args.update(change)
    with pytest.raises(error, match=match):
        discrete_token_cross_entropy(**args)
