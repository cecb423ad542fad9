"""Rotary positions: Libra's 2d positions follow the worked example (docs/model.md §6) and reduce to 1d
without images (docs/model.md §14, item 7); the 1d positions follow the running count of real tokens under left
padding."""

import torch
from model_fixtures import make_batch, randomize_parameters

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM
from libra_model.modules.rope import libra_1d_position_ids, libra_2d_position_ids, rotary_cos_sin


def test_2d_positions_worked_example():
    R = 24
    # <s> BOI codes(576) EOI "\n" w
    vi = torch.tensor([[R * R + 2, 0, *range(1, R * R + 1), R * R + 1, R * R + 2, R * R + 2]])
    positions, running = libra_2d_position_ids(vi, R)
    rows, cols = positions[0, 0], positions[0, 1]
    assert (rows[0].item(), cols[0].item()) == (0, 0)
    assert (rows[1].item(), cols[1].item()) == (1, 1)
    for r in (1, 7, 24):
        for c in (1, 13, 24):
            k = 1 + (1 + R * (r - 1) + (c - 1))
            assert (rows[k].item(), cols[k].item()) == (1 + r, 1 + c)
    eoi = 2 + R * R
    assert (rows[eoi].item(), cols[eoi].item()) == (26, 26)
    assert (rows[eoi + 1].item(), cols[eoi + 1].item()) == (27, 27)
    assert (rows[eoi + 2].item(), cols[eoi + 2].item()) == (28, 28)
    assert running.item() == 29
    # Continuing from the running sum gives the same positions as one call.
    first, state = libra_2d_position_ids(vi[:, :300], R)
    rest, _ = libra_2d_position_ids(vi[:, 300:], R, start=state)
    assert torch.equal(torch.cat([first, rest], -1), positions)


def test_1d_positions_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert libra_1d_position_ids(mask, 2, 5, "cpu").tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert libra_1d_position_ids(None, 1, 3, "cpu", start=torch.tensor([4])).tolist() == [[4, 5, 6]]


def test_2d_tables_alternate_components_over_heads():
    positions = torch.tensor([[[3, 4], [7, 9]]])  # [B=1, 2, N=2]: rows (3, 4), cols (7, 9)
    cos, _ = rotary_cos_sin(positions, 8, 10000.0, torch.float64, num_heads=4)
    ref_rows, _ = rotary_cos_sin(positions[:, 0], 8, 10000.0, torch.float64)
    ref_cols, _ = rotary_cos_sin(positions[:, 1], 8, 10000.0, torch.float64)
    assert torch.equal(cos[:, :, 0::2], ref_rows.expand(-1, -1, 2, -1))
    assert torch.equal(cos[:, :, 1::2], ref_cols.expand(-1, -1, 2, -1))


def test_2d_rope_model_reduces_to_1d_without_images_and_differs_with_them():
    config = LibraConfig.tiny()
    torch.manual_seed(0)
    one = LibraForCausalLM(config, backend="torch").double().eval()
    randomize_parameters(one)
    two = LibraForCausalLM(LibraConfig.tiny(use_2d_rope=True), backend="torch").double().eval()
    two.load_state_dict(one.state_dict())
    text = make_batch(config, 2, 18, images=[[], []], padding=[0, 3])
    image = make_batch(config, 2, 18, images=[[2], [5]])
    with torch.no_grad():
        inputs = {k: text[k] for k in ("input_ids", "vision_indices", "attention_mask")}
        torch.testing.assert_close(two(**inputs).logits, one(**inputs).logits, rtol=0, atol=0)
        inputs = {k: image[k] for k in ("input_ids", "vision_indices", "attention_mask")}
        diff = (two(**inputs).logits - one(**inputs).logits).nan_to_num(0).abs().max()
    assert diff > 1e-6


def _pack(pieces, length, fill):
    """Concatenate 1-row pieces [.., n] along the last dim and pad to ``length`` with ``fill``."""
    row = torch.cat(pieces, -1)
    pad = torch.full((*row.shape[:-1], length - row.shape[-1]), fill, dtype=row.dtype)
    return torch.cat([row, pad], -1)


def test_packed_positions_restart_at_each_document_1d_and_2d():
    R = 3
    text, boi, eoi = R * R + 2, 0, R * R + 1
    image = [boi, *range(1, R * R + 1), eoi]
    documents = [torch.tensor([[text, *image, text, text]]),   # an image after the first token
                 torch.tensor([[text]]),                        # a one-token document
                 torch.tensor([[*image, text]]),                # an image at the document's start
                 torch.tensor([[text, text, *image]])]          # an image at the document's end
    length = sum(d.shape[1] for d in documents) + 3
    vision = _pack(documents, length, text)
    doc_ids = _pack([torch.full(d.shape, i) for i, d in enumerate(documents)], length, -1)
    packed_2d, _ = libra_2d_position_ids(vision, R, document_ids=doc_ids)
    alone_2d = [libra_2d_position_ids(d, R)[0] for d in documents]
    assert torch.equal(packed_2d, _pack(alone_2d, length, 1))
    packed_1d = libra_1d_position_ids(None, 1, length, "cpu", document_ids=doc_ids)
    alone_1d = [torch.arange(d.shape[1])[None] for d in documents]
    assert torch.equal(packed_1d, _pack(alone_1d, length, 1))
    # one document per row = the unpacked positions
    whole = torch.zeros(1, length, dtype=torch.int64)
    assert torch.equal(libra_2d_position_ids(vision, R, document_ids=whole)[0], libra_2d_position_ids(vision, R)[0])
