"""A resumable batch loader that skips bad samples.

Sources raise :class:`SampleError` (with a short reason such as "corrupt_image" or "missing_file") for a sample
they cannot produce; the loader counts it in :class:`SkipStats`, reports it (the first few of each reason are
logged, then only counted) and takes the next index from the sampler. Skipping is deterministic: a resumed run
skips the same samples and hands out the same batches.

Samples are produced in the calling process (the image tokenizer, a model, runs on the training device; decoding a
few small JPEGs per step is cheap next to a training step). ``prefetch`` > 0 overlaps that work with the step in a
background thread without changing the order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable

logger = logging.getLogger(__name__)


class SampleError(Exception):
    """A sample that cannot be produced; ``reason`` is a short counter key ("corrupt_image", "missing_file")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipStats:
    """Counts of skipped samples (and of unusable shards or members found while indexing) by reason."""

    def __init__(self, log_first: int = 3):
        self.counts: Counter = Counter()
        self.log_first = log_first

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` skips for ``reason``; the first ``log_first`` of each reason are logged as warnings."""
        self.counts[reason] += n
        if self.counts[reason] <= self.log_first:
            logger.warning("skipped (%s) %s", reason, detail)

    def merge(self, other: SkipStats) -> None:
        """Add ``other``'s counts to these."""
        self.counts.update(other.counts)

    @property
    def total(self) -> int:
        """Number of skips of every reason."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. "skipped 3 (corrupt_image 2, missing_file 1)", or "skipped 0"."""
        if not self.counts:
            return "skipped 0"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} ({parts})"


class ResumableLoader:
    """Batches of ``batch_size`` good samples, in the sampler's order, forever.

    Args:
        source: indexable (``source[i]`` returns a sample or raises :class:`SampleError`).
        sampler: an iterator of indices with ``state_dict``/``load_state_dict`` (``ResumableSampler``).
        batch_size: samples per batch (> 0).
        collate: list of samples -> batch (identity when None).
        stats: where skips are counted (a new :class:`SkipStats` when None; sources that index files pass theirs).
        max_consecutive_skips: raise RuntimeError after this many bad samples in a row (a broken dataset, not a few
            bad files).
        prefetch: batches prepared ahead in a background thread (0 = none).
    """

    def __init__(self, source, sampler, batch_size: int, collate: Callable | None = None,
                 stats: SkipStats | None = None, max_consecutive_skips: int = 1000, prefetch: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"ResumableLoader: batch_size must be a positive int, got {batch_size!r}")
        self.source, self.sampler, self.batch_size = source, sampler, batch_size
        self.collate = collate or (lambda samples: samples)
        self.stats = stats if stats is not None else getattr(source, "stats", None) or SkipStats()
        self.max_consecutive_skips = max_consecutive_skips
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _next_samples(self) -> tuple[list, dict]:
        samples, consecutive = [], 0
        while len(samples) < self.batch_size:
            index = next(self.sampler)
            try:
                samples.append(self.source[index])
                consecutive = 0
            except SampleError as error:
                self.stats.add(error.reason, f"index {index}: {error.detail}")
                consecutive += 1
                if consecutive >= self.max_consecutive_skips:
                    raise RuntimeError(f"ResumableLoader: {consecutive} bad samples in a row "
                                       f"({self.stats.summary()}); is the dataset readable?") from error
        return samples, {"sampler": self.sampler.state_dict(), "skips": dict(self.stats.counts)}

    def _produce(self):
        while not self._stop.is_set():
            try:
                item = self._next_samples()
                item = (self.collate(item[0]), item[1], None)
            except BaseException as error:  # handed to the consumer, which re-raises it
                item = (None, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self.prefetch <= 0:
            samples, state = self._next_samples()
            self._consumed_state = state
            return self.collate(samples)
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop.clear()
            self._thread = threading.Thread(target=self._produce, daemon=True)
            self._thread.start()
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._consumed_state = state
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (if any)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def state_dict(self) -> dict:
        """The sampler state and the skip counts as of the last batch handed out (prefetched batches are not
        counted)."""
        state = getattr(self, "_consumed_state", None)
        if state is None:
            state = {"sampler": self.sampler.state_dict(), "skips": dict(self.stats.counts)}
        return {"sampler": dict(state["sampler"]), "skips": dict(state["skips"])}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was taken."""
        self.close()
        self.sampler.load_state_dict(state["sampler"])
        self.stats.counts = Counter(state.get("skips", {}))
        self._consumed_state = {"sampler": dict(state["sampler"]), "skips": dict(self.stats.counts)}
