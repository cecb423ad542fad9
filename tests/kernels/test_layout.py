import pytest
import torch

from libra_kernels import ModalityLayout
from libra_kernels.testing import random_vision_mask


@pytest.mark.parametrize("mix", ["random", "text", "vision", "start", "middle", "end"])
def test_sorted_order_and_round_trip(mix):
    mask = random_vision_mask(3, 17, mix)
    layout = ModalityLayout.from_vision_mask(mask)
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


def test_from_vision_indices():
    vision_indices = torch.tensor([[578, 0, 1, 577, 578], [578, 578, 578, 578, 578]])
    layout = ModalityLayout.from_vision_indices(vision_indices, 578)
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
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
