"""bridge_attention with ``document_ids`` (packed rows): each document attends only to itself, exactly as if it ran
alone in its own row; padding (-1) is never attended. Checked against running the documents one by one (float64),
values and every gradient."""

import pytest
import torch
from backends import BRIDGE_ATTENTION

from libra_kernels import bridge_attention
from libra_kernels.ops.bridge_attention import bridge_attention_ref
from libra_kernels.testing import random_vision_mask

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def document_ids_from_lengths(rows, length):
    """int64 [B, N] from per-row document lengths (padding after the last document gets -1)."""
    ids = torch.full((len(rows), length), -1, dtype=torch.int64)
    for b, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            ids[b, start:start + n] = d
            start += n
    return ids


def random_inputs(batch, length, heads, kv_heads, dim, mix, seed):
    generator = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    tensors = [torch.randn(batch, length, heads, dim, generator=generator, **f64)]
    tensors += [torch.randn(batch, length, kv_heads, dim, generator=generator, **f64) for _ in range(4)]
    return [t.requires_grad_() for t in tensors], random_vision_mask(batch, length, mix)


def one_by_one(tensors, vision_mask, document_ids, n_queries):
    """Each document of each row alone (its own row, no padding) through the reference; outputs scattered back
    into [B, Nq, H, D] (zeros at padding). Queries are the last ``n_queries`` positions."""
    q, k, v, kb, vb = tensors
    n_keys = k.shape[1]
    offset = n_keys - n_queries
    out = torch.zeros(q.shape, dtype=q.dtype)
    rows = []
    for b in range(k.shape[0]):
        row = torch.zeros(q.shape[1:], dtype=q.dtype)
        for d in range(int(document_ids[b].max()) + 1):
            keys = (document_ids[b] == d).nonzero().flatten()
            start, end = int(keys[0]), int(keys[-1]) + 1
            q_start = max(start, offset)
            if q_start >= end:
                continue
            doc_q = q[b:b + 1, q_start - offset:end - offset]
            piece = bridge_attention_ref(doc_q, k[b:b + 1, start:end], v[b:b + 1, start:end], kb[b:b + 1, start:end],
                                         vb[b:b + 1, start:end], vision_mask[b:b + 1, start:end], causal=True)
            row = torch.cat([row[:q_start - offset], piece[0], row[end - offset:]])
        rows.append(row)
    out = torch.stack(rows)
    return out


CASES = {
    # rows of document lengths in a row of 13 tokens: several documents, one-token documents, a document that
    # fills its row, padding at the end, a row of padding only
    "mixed": ([[5, 1, 4], [13], [1, 1, 1, 1], []], 13),
    "odd": ([[2, 7, 3], [6, 6]], 13),
    # several 16-key tiles (the interpreter's tile): tiles with no same-document pair are skipped, boundaries
    # inside tiles are masked
    "tiles": ([[20, 3, 17, 9], [1, 40, 5], [49], [7, 33]], 49),
}


@pytest.mark.parametrize("backend", BRIDGE_ATTENTION)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mix", ["random", "text", "vision"])
@pytest.mark.parametrize("gqa", [(4, 4), (4, 2)])
def test_packed_rows_equal_documents_one_by_one(backend, case, mix, gqa):
    rows, length = CASES[case]
    document_ids = document_ids_from_lengths(rows, length)
    tensors, vision_mask = random_inputs(len(rows), length, *gqa, 8, mix, seed=hash((case, mix, gqa)) % 1000)
    out = bridge_attention(*tensors, vision_mask, document_ids=document_ids, backend=backend)
    expected = one_by_one(tensors, vision_mask, document_ids, length)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, tensors, grad)
    want = torch.autograd.grad(expected, tensors, grad)
    for name, g, w in zip(("q", "k", "v", "k_bridge", "v_bridge"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("n_queries", [1, 4])
def test_fewer_queries_than_keys(n_queries):
    rows, length = [[3, 6, 2], [8, 4]], 12
    document_ids = document_ids_from_lengths(rows, length)
    tensors, vision_mask = random_inputs(2, length, 2, 1, 4, "random", seed=n_queries)
    tensors[0] = tensors[0][:, -n_queries:].detach().requires_grad_()
    out = bridge_attention(*tensors, vision_mask, document_ids=document_ids, backend="torch")
    torch.testing.assert_close(out, one_by_one(tensors, vision_mask, document_ids, n_queries), rtol=1e-10, atol=1e-10)


def test_document_ids_with_key_padding_mask_and_gradcheck():
    rows, length = [[2, 3], [4, 1]], 6
    document_ids = document_ids_from_lengths(rows, length)
    tensors, vision_mask = random_inputs(2, length, 2, 2, 3, "random", seed=3)
    padding = document_ids >= 0
    out = bridge_attention(*tensors, vision_mask, document_ids=document_ids, key_padding_mask=padding,
                           backend="torch")
    torch.testing.assert_close(out, one_by_one(tensors, vision_mask, document_ids, length), rtol=1e-10, atol=1e-10)
    assert (out[0, 5] == 0).all()  # a padding query has no key: a zero output
    fn = lambda *t: bridge_attention(*t, vision_mask, document_ids=document_ids, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)


def test_one_document_is_plain_attention():
    tensors, vision_mask = random_inputs(2, 9, 4, 2, 8, "random", seed=5)
    whole = torch.zeros(2, 9, dtype=torch.int64)
    torch.testing.assert_close(bridge_attention(*tensors, vision_mask, document_ids=whole, backend="torch"),
                               bridge_attention(*tensors, vision_mask, backend="torch"), rtol=0, atol=0)


def test_opcheck_with_document_ids():
    tensors, vision_mask = random_inputs(2, 7, 4, 2, 8, "random", seed=1)
    t = [x.detach().float().requires_grad_() for x in tensors]
    document_ids = document_ids_from_lengths([[3, 4], [2, 2]], 7)
    torch.library.opcheck(torch.ops.libra.bridge_attention, (*t, vision_mask, None, document_ids, True, 0.35, "torch"))


def test_bad_document_ids():
    tensors, vision_mask = random_inputs(1, 5, 2, 2, 4, "random", seed=0)
    with pytest.raises(TypeError, match="document_ids"):
        bridge_attention(*tensors, vision_mask, document_ids=torch.zeros(1, 5), backend="torch")
    with pytest.raises(ValueError, match="document_ids"):
        bridge_attention(*tensors, vision_mask, document_ids=torch.zeros(1, 4, dtype=torch.int64), backend="torch")


@pytest.mark.parametrize("backend", [b for b in BRIDGE_ATTENTION if b != "torch"])
def test_non_causal_documents_match_the_torch_kernel(backend):
    rows, length = [[20, 3, 17, 9], [1, 40, 5]], 49
    document_ids = document_ids_from_lengths(rows, length)
    tensors, vision_mask = random_inputs(2, length, 4, 2, 8, "random", seed=9)
    out = bridge_attention(*tensors, vision_mask, causal=False, document_ids=document_ids, backend=backend)
    ref = bridge_attention(*tensors, vision_mask, causal=False, document_ids=document_ids, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
