"""Sequence packing (libra_model.data.packing): first-fit decreasing and the local search after it, whole samples
per row, deterministic and exactly resumable, and the packed host batch (document ids, no target at a document's
first position)."""

import pytest
import torch

from libra_model.data import ResumableSampler, SampleError
from libra_model.data.packing import PackedLoader, concatenate_samples, first_fit_decreasing, pack_documents
from libra_model.text import EncodedSample


def test_first_fit_decreasing():
    lengths = [3, 9, 4, 7, 1, 6, 2, 8]
    bins = first_fit_decreasing(lengths, 10)
    assert bins == [[1, 4], [7, 6], [3, 0], [5, 2]]  # 9+1, 8+2, 7+3, 6+4
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert first_fit_decreasing([10, 10], 10) == [[0], [1]]  # a document that fills its row
    with pytest.raises(ValueError, match="max_length"):
        first_fit_decreasing([11], 10)


def fewest_bins(lengths, capacity):
    """The optimum bin count, by exhaustive search (small inputs only)."""
    order, best = sorted(lengths, reverse=True), [len(lengths)]

    def place(k, fills):
        if len(fills) >= best[0]:
            return
        if k == len(order):
            best[0] = len(fills)
            return
        for j, f in enumerate(fills):
            if f + order[k] <= capacity and f not in fills[:j]:
                fills[j] += order[k]
                place(k + 1, fills)
                fills[j] -= order[k]
        place(k + 1, fills + [order[k]])

    place(0, [])
    return best[0]


def test_pack_documents_beats_first_fit_decreasing():
    import random

    # first-fit decreasing opens 3 rows (11+6, 6+5+4+4, 4); two rows hold everything (11+5+4, 6+6+4+4)
    lengths = [4, 5, 11, 6, 4, 4, 6]
    assert len(first_fit_decreasing(lengths, 20)) == 3
    bins = pack_documents(lengths, 20)
    assert len(bins) == 2 and sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 20 for b in bins)
    assert pack_documents(lengths, 20) == bins  # deterministic
    assert pack_documents(lengths, 20, steps=0) == first_fit_decreasing(lengths, 20)
    assert pack_documents([20], 20) == [[0]] and pack_documents([], 20) == []

    rng = random.Random(0)
    suboptimal = reached = 0
    for _ in range(600):
        lengths = [rng.randint(4, 11) for _ in range(rng.randint(1, 10))]
        bins = pack_documents(lengths, 20)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b and sum(lengths[i] for i in b) <= 20 for b in bins)
        ffd, best = len(first_fit_decreasing(lengths, 20)), fewest_bins(lengths, 20)
        assert best <= len(bins) <= ffd
        if ffd > best:
            suboptimal += 1
            reached += len(bins) == best
    # first-fit decreasing misses the optimum on a few percent of these; the search recovers most of them
    assert suboptimal >= 10 and reached >= 0.8 * suboptimal, (suboptimal, reached)
    with pytest.raises(ValueError, match="max_length"):
        pack_documents([21], 20)


def sample(n, image_at=None, image_length=4, tag=0):
    vision = torch.full((n,), image_length + 9, dtype=torch.long)
    image_index = torch.full((n,), -1, dtype=torch.long)
    pixels = None
    if image_at is not None:
        vision[image_at:image_at + image_length] = torch.arange(image_length)
        image_index[image_at:image_at + image_length] = 0
        pixels = torch.full((1, 3, 2, 2), float(tag))
    ids = torch.arange(n) + 100 * tag
    return EncodedSample(ids=ids, vision_indices=vision, target_mask=torch.ones(n, dtype=torch.bool),
                         image_index=image_index, pixel_values=pixels)


def test_concatenate_samples_keeps_images_whole_and_drops_boundary_targets():
    row, documents = concatenate_samples([sample(3, tag=1), sample(6, image_at=2, tag=2), sample(5, image_at=0, tag=3)])
    assert documents.tolist() == [0] * 3 + [1] * 6 + [2] * 5
    assert row.target_mask.tolist() == [False, True, True, False] + [True] * 5 + [False] + [True] * 4
    assert row.image_index.tolist() == [-1] * 5 + [0] * 4 + [1] * 4 + [-1]
    assert row.pixel_values[:, 0, 0, 0].tolist() == [2.0, 3.0]


class Lengths:
    """Encoded samples of pseudo-random lengths; every 7th index is unreadable."""

    def __init__(self, count=200, max_length=32):
        generator = torch.Generator().manual_seed(0)
        self.lengths = torch.randint(1, max_length + 1, (count,), generator=generator).tolist()

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        if i % 7 == 6:
            raise SampleError("corrupt_image", str(i))
        return sample(self.lengths[i], tag=i)


def collate_ids(rows):
    return [[int(s.ids[0]) // 100 for s in row] for row in rows]


def make(buffer_size=16):
    return PackedLoader(Lengths(), ResumableSampler(200, seed=3), micro_batch_size=3, max_length=32,
                        collate=collate_ids, buffer_size=buffer_size)


@pytest.mark.parametrize("batches_before", [0, 1, 5, 11])
def test_packed_loader_resumes_exactly(batches_before):
    loader = make()
    for _ in range(batches_before):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(12)]
    resumed = make()
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(12)] == expected
    assert resumed.state_dict() == loader.state_dict()
    assert resumed.stats.counts == loader.stats.counts


def test_packed_loader_packs_whole_samples_deterministically():
    first, second = make(), make()
    batches = [next(first) for _ in range(30)]
    assert batches == [next(second) for _ in range(30)]
    lengths = Lengths().lengths
    seen = [i for batch in batches for row in batch for i in row]
    assert len(seen) == len(set(seen)) or first.sampler.epoch > 0  # no sample twice within an epoch
    assert all(i % 7 != 6 for i in seen)
    for batch in batches:
        for row in batch:
            assert sum(lengths[i] for i in row) <= 32
    assert first.packed_rows == 90 and first.packed_documents == len(seen)
    assert 0 < first.padding_fraction < 0.2
    assert first.stats.counts["corrupt_image"] > 0
    with pytest.raises(ValueError, match="packed"):
        make().load_state_dict({"sampler": first.sampler.state_dict(), "skips": {}})
