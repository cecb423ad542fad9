"""Sequence packing for training: several encoded samples (documents) share a row of ``max_length`` tokens.

Instruction-tuning samples are mostly far shorter than the row, so a padded batch spends most of its compute on
padding. :class:`PackedLoader` reads a buffer of encoded samples in the sampler's order, places them into rows with
:func:`pack_documents` (first-fit decreasing, then a seeded local search that empties rows; the result depends only
on the buffer) and hands out batches of ``micro_batch_size`` rows. A sample is never split:
it is whole in one row (the encoder already truncated it to ``max_length``; an image it cuts stays in its sample),
so no image crosses a document or a row.

:class:`PackedCollate` turns rows of samples into the host batch of a
:class:`~libra_model.data.pipeline.HostCollate` plus ``document_ids`` int64 [B, N] (the document of each token within
its row, from 0; -1 at padding) and ``num_documents``; the model then keeps attention, RoPE positions and labels
inside each document. The first position of every document is never a target (it is BOS, and would be predicted
from the previous document).

Resuming is exact: the state is the sampler state and skip counts from before the current buffer was read, plus the
number of its rows already handed out; a resumed loader re-reads the same buffer, packs it the same way and skips
those rows.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from libra_model.data.loader import SampleError, SkipStats


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths``: longest first, each into the first bin it fits (ties: lower index first).
    Every length must be in [1, capacity]. Bins are returned in the order they were opened, each bin's indices in
    placement order."""
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"first_fit_decreasing: item {i} has length {n}, outside [1, {capacity}] (truncate "
                             f"samples to max_length before packing)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


# Local-search proposals per sample in the buffer: at 128 the search costs about 0.05 s per 256 samples in Python
# and takes the useful fraction of LLaVA-like rows from 0.92 (first-fit decreasing) to about 0.97
# (bench/test_bench_packing.py).
SEARCH_STEPS_PER_ITEM = 128


def pack_documents(lengths: list[int], capacity: int, *, steps: int | None = None, seed: int = 0
                   ) -> list[list[int]]:
    """Bins of indices into ``lengths`` (every index in exactly one bin, each bin's lengths summing to at most
    ``capacity``), in few bins.

    First-fit decreasing, then ``steps`` (default ``SEARCH_STEPS_PER_ITEM`` per item) seeded random proposals: move
    one item to another bin, or swap two items of different bins, accepted when it fits and does not decrease the sum
    of the squared bin fills. That sum grows as items gather in fuller bins, so the emptier bins drain and vanish;
    first-fit decreasing alone strands many rows of this workload's 600-800-token image samples two to a row where a
    rearrangement fits three. Deterministic given the arguments; never more bins than first-fit decreasing.
    """
    bins = first_fit_decreasing(lengths, capacity)
    steps = SEARCH_STEPS_PER_ITEM * len(lengths) if steps is None else steps
    if len(bins) < 2 or steps <= 0:
        return bins
    rng = random.Random(seed)
    fill = [sum(lengths[i] for i in b) for b in bins]
    for _ in range(steps):
        a, b = rng.randrange(len(bins)), rng.randrange(len(bins))
        if a == b or not bins[a]:
            continue
        ia = rng.randrange(len(bins[a]))
        x = lengths[bins[a][ia]]
        if not bins[b] or rng.random() < 0.5:
            # move: (fa - x)^2 + (fb + x)^2 >= fa^2 + fb^2  <=>  fb + x >= fa
            if fill[b] + x <= capacity and fill[b] + x >= fill[a]:
                bins[b].append(bins[a].pop(ia))
                fill[a] -= x
                fill[b] += x
            continue
        ib = rng.randrange(len(bins[b]))
        d = x - lengths[bins[b][ib]]  # a swap moves d tokens from a to b
        if fill[b] + d <= capacity and fill[a] - d <= capacity and d * (fill[b] - fill[a] + d) >= 0:
            bins[a][ia], bins[b][ib] = bins[b][ib], bins[a][ia]
            fill[a] -= d
            fill[b] += d
    return [b for b in bins if b]


def concatenate_samples(samples):
    """One ``EncodedSample`` holding ``samples`` back to back, and the int64 [n] document id of each position.
    The first position of every document after the first loses its target (it would be predicted across the
    boundary); image indices are renumbered over the row's images."""
    from libra_model.text import EncodedSample

    image_index, images_before, pixels = [], 0, []
    for sample in samples:
        image_index.append(torch.where(sample.image_index >= 0, sample.image_index + images_before, -1))
        if sample.num_images:
            pixels.append(sample.pixel_values)
            images_before += sample.num_images
    target = torch.cat([s.target_mask for s in samples]).clone()
    starts = torch.tensor([0] + [len(s) for s in samples]).cumsum(0)[:-1]
    target[starts] = False
    documents = torch.cat([torch.full((len(s),), d, dtype=torch.int64) for d, s in enumerate(samples)])
    row = EncodedSample(ids=torch.cat([s.ids for s in samples]),
                        vision_indices=torch.cat([s.vision_indices for s in samples]), target_mask=target,
                        image_index=torch.cat(image_index), pixel_values=torch.cat(pixels) if pixels else None)
    return row, documents


class PackedCollate:
    """Rows (lists of ``EncodedSample``) -> the validated host batch of ``collate`` (a
    :class:`~libra_model.data.pipeline.HostCollate`: right padding, the layout) plus ``document_ids`` int64 [B, N]
    (-1 at padding) and ``num_documents`` (an int)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows) -> dict:
        """Concatenate each row's documents, collate, and attach ``document_ids``."""
        if not rows or not all(rows):
            raise ValueError("PackedCollate: rows must be a non-empty list of non-empty lists of samples")
        joined = [concatenate_samples(row) for row in rows]
        batch = self.collate([row for row, _ in joined])
        document_ids = torch.full(batch["vision_indices"].shape, -1, dtype=torch.int64)
        for b, (_, ids) in enumerate(joined):
            document_ids[b, :ids.shape[0]] = ids
        batch["document_ids"] = document_ids
        batch["num_documents"] = sum(len(row) for row in rows)
        return batch


class PackedLoader:
    """Batches of ``micro_batch_size`` packed rows of at most ``max_length`` tokens, forever (the interface of
    :class:`~libra_model.data.loader.ResumableLoader`: ``next``, ``stats``, ``state_dict``, ``load_state_dict``,
    ``close``).

    Args:
        source: indexable encoded samples (``EncodedSource``: ``source[i]`` is an ``EncodedSample`` truncated to
            ``max_length``, or raises :class:`SampleError`, counted in ``stats`` and skipped).
        sampler: ``ResumableSampler`` (deterministic given the seed; its state makes resuming exact).
        micro_batch_size: rows per batch (> 0). max_length: tokens per row (> 0).
        collate: rows -> batch (:class:`PackedCollate`).
        buffer_size: samples read and packed together (> 0; larger packs tighter).
        max_consecutive_skips: raise RuntimeError after this many bad samples in a row.
    Counters for logging (kept in the state, so they continue on resume): ``packed_documents`` and ``packed_rows``
    handed out, ``padding_tokens`` and ``row_tokens`` of those rows (``padding_fraction``).
    """

    def __init__(self, source, sampler, micro_batch_size: int, max_length: int, collate, buffer_size: int = 256,
                 stats: SkipStats | None = None, max_consecutive_skips: int = 1000):
        for name, value in (("micro_batch_size", micro_batch_size), ("max_length", max_length),
                            ("buffer_size", buffer_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PackedLoader: {name} must be a positive int, got {value!r}")
        self.source, self.sampler, self.collate = source, sampler, collate
        self.micro_batch_size, self.max_length, self.buffer_size = micro_batch_size, max_length, buffer_size
        self.stats = stats if stats is not None else getattr(source, "stats", None) or SkipStats()
        self.max_consecutive_skips = max_consecutive_skips
        self._rows: list[list] = []  # the current buffer's rows
        self._taken = 0  # rows of the current buffer handed out
        self._buffer_state = self._snapshot()
        self.packed_documents = self.packed_rows = self.padding_tokens = self.row_tokens = 0

    def _snapshot(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "skips": dict(self.stats.counts)}

    def _read_buffer(self) -> None:
        self._buffer_state, self._taken = self._snapshot(), 0
        samples, consecutive = [], 0
        while len(samples) < self.buffer_size:
            index = next(self.sampler)
            try:
                sample = self.source[index]
                consecutive = 0
            except SampleError as error:
                self.stats.add(error.reason, f"index {index}: {error.detail}")
                consecutive += 1
                if consecutive >= self.max_consecutive_skips:
                    raise RuntimeError(f"PackedLoader: {consecutive} bad samples in a row ({self.stats.summary()}); "
                                       "is the dataset readable?") from error
                continue
            if len(sample) > self.max_length:
                raise ValueError(f"PackedLoader: sample {index} has {len(sample)} tokens, more than max_length "
                                 f"{self.max_length}; encode with the same max_length")
            if len(sample):
                samples.append(sample)
        bins = pack_documents([len(s) for s in samples], self.max_length)
        self._rows = [[samples[i] for i in row] for row in bins]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.micro_batch_size:
            if self._taken >= len(self._rows):
                self._read_buffer()
            rows.append(self._rows[self._taken])
            self._taken += 1
        tokens = sum(len(s) for row in rows for s in row)
        self.packed_documents += sum(len(row) for row in rows)
        self.packed_rows += len(rows)
        self.row_tokens += len(rows) * self.max_length
        self.padding_tokens += len(rows) * self.max_length - tokens
        return self.collate(rows)

    @property
    def padding_fraction(self) -> float:
        """Padding tokens / row tokens (rows counted at ``max_length``) over the rows handed out so far."""
        return self.padding_tokens / self.row_tokens if self.row_tokens else 0.0

    def close(self) -> None:
        """Nothing runs in the background (no prefetch with packing)."""

    def state_dict(self) -> dict:
        """The sampler state and skip counts before the current buffer, and the rows of it already handed out."""
        return {"sampler": dict(self._buffer_state["sampler"]), "skips": dict(self._buffer_state["skips"]),
                "rows_taken": self._taken, "packed": True, "counters": self._counters()}

    def _counters(self) -> list[int]:
        return [self.packed_documents, self.packed_rows, self.padding_tokens, self.row_tokens]

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was taken (re-reads and re-packs that buffer)."""
        if not state.get("packed"):
            raise ValueError("PackedLoader.load_state_dict: the saved data state is not from a packed run; resume "
                             "with the same pack_sequences setting")
        self.sampler.load_state_dict(state["sampler"])
        self.stats.counts = Counter(state.get("skips", {}))
        self._rows, self._taken = [], 0
        self._buffer_state = self._snapshot()
        self.packed_documents, self.packed_rows, self.padding_tokens, self.row_tokens = (
            int(n) for n in state.get("counters", (0, 0, 0, 0)))
        taken = int(state["rows_taken"])
        if taken:
            self._read_buffer()
            self._taken = taken
