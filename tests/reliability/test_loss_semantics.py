"""The loss operator gives the same result on every backend for the same input: NaN/inf in ignored rows (as
``torch.nn.functional.cross_entropy``: an ignored row does not contribute), strided inputs, and empty batches."""

import pytest
import torch
import torch.nn.functional as F

from libra_kernels import discrete_token_cross_entropy
from libra_kernels.ops.discrete_token_cross_entropy import TABLE

# Every backend that runs on the CPU here ("cpp" needs the built extension).
BACKENDS = [name for name, kernel in TABLE.kernels.items() if not kernel.unavailable(torch.device("cpu"))]
IGNORE = -100


def _reference(h, n_text, w_text, w_vision, labels, reduction):
    """Libra's loss in float64 straight from F.cross_entropy per head (ignore_index handled by torch itself)."""
    vocab = w_text.shape[0]
    grids = []
    text = F.cross_entropy(h[:n_text] @ w_text.T, labels[0, :n_text], ignore_index=IGNORE, reduction="none")
    for c in range(w_vision.shape[0]):
        target = labels[c, n_text:].where(labels[c, n_text:] == IGNORE, labels[c, n_text:] - vocab)
        vision = F.cross_entropy(h[n_text:] @ w_vision[c].T, target, ignore_index=IGNORE, reduction="none")
        grids.append(torch.cat([text, vision]))
    grid = torch.stack(grids)
    valid = labels != IGNORE
    if reduction == "none":
        return grid
    if reduction == "sum":
        return grid.sum()
    return (grid.sum(1) / valid.sum(1).clamp(min=1)).mean()


def _inputs(seed, rows=23, n_text=9, hidden=12, vocab=17, codebooks=2, vision_vocab=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=dtype)
    w_text = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5
    w_vision = torch.randn(codebooks, vision_vocab, hidden, generator=g, dtype=dtype) * 0.5
    labels = torch.empty(codebooks, rows, dtype=torch.int64)
    labels[:, :n_text] = torch.randint(0, vocab, (n_text,), generator=g)
    labels[:, n_text:] = torch.randint(vocab, vocab + vision_vocab, (codebooks, rows - n_text), generator=g)
    return h, n_text, w_text, w_vision, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_ignored_rows_do_not_contribute(backend, reduction, bad):
    h, n_text, w_text, w_vision, labels = _inputs(3)
    ignored = [1, 4, 12, 20]  # two text rows, two vision rows
    labels[:, ignored] = IGNORE
    h[1] = bad
    h[4, 3] = bad
    h[12, :5] = bad
    h[20, -1] = bad
    clean = h.clone()
    clean[ignored] = 0
    expected = _reference(clean, n_text, w_text, w_vision, labels, reduction)
    # F.cross_entropy itself ignores them, NaN or not.
    torch.testing.assert_close(_reference(h, n_text, w_text, w_vision, labels, reduction), expected)

    h_req, wt, wv = (t.clone().requires_grad_() for t in (h, w_text, w_vision))
    loss = discrete_token_cross_entropy(h_req, n_text, wt, wv, labels, reduction=reduction, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(loss).all()
    weight = torch.randn(loss.shape, dtype=loss.dtype) if reduction == "none" else torch.tensor(1.0).double()
    (loss * weight).sum().backward()

    ref_h, ref_wt, ref_wv = (t.clone().requires_grad_() for t in (clean, w_text, w_vision))
    (_reference(ref_h, n_text, ref_wt, ref_wv, labels, reduction) * weight).sum().backward()
    assert torch.equal(h_req.grad[ignored], torch.zeros_like(h_req.grad[ignored]))  # exact zeros, not 0·NaN
    torch.testing.assert_close(h_req.grad, ref_h.grad, rtol=1e-9, atol=1e-12)


def test_every_backend_gives_the_same_dw_with_nan_in_an_ignored_row():
    """dW = dlogitsᵀ·h is a GEMM, so a NaN in h reaches dW (0·NaN) on every backend alike."""
    if len(BACKENDS) < 2:
        pytest.skip("only one backend built")
    h, n_text, w_text, w_vision, labels = _inputs(5)
    labels[:, 2] = IGNORE
    h[2, 1] = float("nan")
    grads = []
    for backend in BACKENDS:
        wt, wv = w_text.clone().requires_grad_(), w_vision.clone().requires_grad_()
        discrete_token_cross_entropy(h, n_text, wt, wv, labels, backend=backend).backward()
        grads.append((wt.grad, wv.grad))
    for wt_grad, wv_grad in grads[1:]:
        torch.testing.assert_close(wt_grad, grads[0][0], equal_nan=True)
        torch.testing.assert_close(wv_grad, grads[0][1], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_inputs_are_accepted_and_exact(backend, dtype):
    h, n_text, w_text, w_vision, labels = _inputs(7, dtype=dtype)
    strided = {
        "h": h.T.contiguous().T,  # column-major
        "w_text": w_text.T.contiguous().T,
        "w_vision": w_vision.transpose(1, 2).contiguous().transpose(1, 2),
        "labels": labels.T.contiguous().T,
    }
    assert not any(t.is_contiguous() for t in strided.values())
    results = []
    for args in ((h, w_text, w_vision, labels), tuple(strided[k] for k in ("h", "w_text", "w_vision", "labels"))):
        hh, wt, wv = (t.detach().clone() if t.is_contiguous() else t.detach() for t in args[:3])
        hh, wt, wv = hh.requires_grad_(), wt.requires_grad_(), wv.requires_grad_()
        loss = discrete_token_cross_entropy(hh, n_text, wt, wv, args[3], backend=backend)
        loss.backward()
        results.append((loss, hh.grad, wt.grad, wv.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    expected = _reference(h.double(), n_text, w_text.double(), w_vision.double(), labels, "mean")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][0].double(), expected, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_empty_outputs(backend, reduction):
    h, _, w_text, w_vision, _ = _inputs(9)
    h = h[:0].clone().requires_grad_()
    labels = torch.empty(w_vision.shape[0], 0, dtype=torch.int64)
    wt, wv = w_text.clone().requires_grad_(), w_vision.clone().requires_grad_()
    loss = discrete_token_cross_entropy(h, 0, wt, wv, labels, reduction=reduction, backend=backend)
    assert loss.shape == ((w_vision.shape[0], 0) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert h.grad.shape == (0, h.shape[1])
    assert torch.equal(wt.grad, torch.zeros_like(wt)) and torch.equal(wv.grad, torch.zeros_like(wv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["all_text", "all_vision"])
def test_extreme_modality_mixes_with_ignored_nan_rows(backend, mix):
    rows = 11
    n_text = rows if mix == "all_text" else 0
    h, _, w_text, w_vision, labels = _inputs(11, rows=rows, n_text=n_text)
    labels[:, 3] = IGNORE
    h[3] = float("nan")
    clean = h.clone()
    clean[3] = 0
    loss = discrete_token_cross_entropy(h, n_text, w_text, w_vision, labels, backend=backend)
    torch.testing.assert_close(loss, _reference(clean, n_text, w_text, w_vision, labels, "mean"))
