"""Packed rows (``document_ids``): several documents share a row, and each computes exactly what it computes alone
(logits), the packed loss equals the loss of the same documents as a padded batch, and so does every gradient
(float64; 1d and 2d RoPE, "1d" and "2d" prediction; documents with and without images, one-token documents, a
document that fills its row, an image at a document's start and at its end)."""

import pytest
import torch
from model_fixtures import make_batch, randomize_parameters

from libra_kernels.ops import bridge_attention
from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM

L = LibraConfig.tiny().max_vision_token_length  # positions of one image (BOI, codes, EOI)


def build(backend, **overrides):
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny(num_hidden_layers=2, **overrides), backend=backend).to(torch.float64)
    randomize_parameters(model)
    return model


def documents(config, seed):
    """(length, image starts) of each document, as single-row batches."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, []), (1, []), (L + 4, [2]), (L, [0]), (L + 3, [3]), (5, [])]  # image mid / at start / at end
    return [make_batch(config, 1, n, images=[starts], generator=generator) for n, starts in shapes]


def pack(config, docs, rows):
    """Put documents ``rows[b]`` (lists of indices into ``docs``) into rows of a common length; right padding."""
    length = max(sum(docs[i]["input_ids"].shape[-1] for i in row) for row in rows) + 2
    C, B = config.vision_codebook_num, len(rows)
    out = {"input_ids": torch.full((C, B, length), config.pad_token_id, dtype=torch.long),
           "vision_indices": torch.full((B, length), config.max_vision_token_length, dtype=torch.long),
           "attention_mask": torch.zeros(B, length, dtype=torch.long),
           "contiguous_signal": torch.zeros(B, length, config.contiguous_signal_size),
           "labels": torch.full((C, B, length), -100, dtype=torch.long),
           "document_ids": torch.full((B, length), -1, dtype=torch.long)}
    for b, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row):
            doc = docs[i]
            n = doc["input_ids"].shape[-1]
            cols = slice(start, start + n)
            for key in ("input_ids", "labels"):
                out[key][:, b, cols] = doc[key][:, 0]
            out["vision_indices"][b, cols] = doc["vision_indices"][0]
            out["contiguous_signal"][b, cols] = doc["contiguous_signal"][0]
            out["attention_mask"][b, cols] = 1
            out["document_ids"][b, cols] = d
            start += n
    out["contiguous_signal"] = out["contiguous_signal"].double()
    return out


def forward(model, batch, packed):
    inputs = {k: batch[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")}
    if packed:
        inputs["document_ids"] = batch["document_ids"]
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=batch["labels"], return_logits=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


BACKENDS = ["torch", "auto"] + ([{"bridge_attention": "triton"}] if not
                                 bridge_attention.TABLE.get("triton").unavailable(torch.device("cpu")) else [])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("overrides", [{}, {"use_2d_rope": True}, {"use_2d_rope": True, "vision_prediction_mode": "2d"},
                                       {"num_key_value_heads": 2}])
def test_packed_rows_equal_the_documents_alone(backend, overrides):
    model = build(backend, **overrides)
    config = model.config
    docs = documents(config, seed=len(overrides))
    rows = [[0, 1, 2], [3, 4], [5]]  # an image at a document's start after a boundary; a row with one document
    packed = pack(config, docs, rows)
    # Labels at a document's first position are predicted across the boundary: the model must ignore them itself.
    first = torch.zeros_like(packed["document_ids"], dtype=torch.bool)
    first[:, 1:] = packed["document_ids"][:, 1:] != packed["document_ids"][:, :-1]
    first &= packed["document_ids"] >= 0
    packed["labels"] = torch.where(first[None], packed["input_ids"], packed["labels"])
    out_packed, grads_packed = forward(model, packed, True)
    # the same documents, one per row (a padded batch): same loss, same gradients
    padded = pack(config, docs, [[i] for i in range(len(docs))])
    out_padded, grads_padded = forward(model, padded, False)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-10, atol=1e-12)
    assert grads_packed.keys() == grads_padded.keys()
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-8, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # each document alone: the same logits at its positions
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            doc = docs[i]
            n = doc["input_ids"].shape[-1]
            alone = model(doc["input_ids"], doc["vision_indices"], contiguous_signal=doc["contiguous_signal"].double(),
                          return_logits=True).logits
            got = out_packed.logits[:, b, start:start + n]
            finite = torch.isfinite(alone[:, 0])
            assert torch.equal(finite, torch.isfinite(got))
            torch.testing.assert_close(got[finite], alone[:, 0][finite], rtol=1e-9, atol=1e-10)
            start += n


def test_document_filling_its_row_is_the_unpacked_row():
    model = build("torch")
    config = model.config
    batch = make_batch(config, 2, L + 6, images=[[1], []], generator=torch.Generator().manual_seed(4))
    batch["contiguous_signal"] = batch["contiguous_signal"].double()
    inputs = {k: batch[k] for k in ("input_ids", "vision_indices", "contiguous_signal")}
    whole = torch.zeros(2, L + 6, dtype=torch.long)
    packed = model(**inputs, labels=batch["labels"], document_ids=whole, return_logits=True)
    plain = model(**inputs, labels=batch["labels"], return_logits=True)
    torch.testing.assert_close(packed.loss, plain.loss, rtol=0, atol=0)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=0, atol=0)


def test_target_counts_skip_document_starts():
    labels = torch.tensor([[[5, 6, 7, 8, 9, -100]]])
    docs = torch.tensor([[0, 0, 1, 1, 2, -1]])
    assert LibraForCausalLM.target_counts(labels).tolist() == [4]
    assert LibraForCausalLM.target_counts(labels, document_ids=docs).tolist() == [2]


def test_bad_document_ids():
    model = build("torch")
    batch = make_batch(model.config, 1, 6, images=[[]])
    args = (batch["input_ids"], batch["vision_indices"])
    with pytest.raises(TypeError, match="document_ids"):
        model(*args, document_ids=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="document_ids"):
        model(*args, document_ids=torch.zeros(1, 5, dtype=torch.long))
