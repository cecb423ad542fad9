"""Deterministic, resumable sampling for one DP replica.

Each epoch has one global permutation of the dataset (seeded by the run's seed and the epoch number, equal on every
rank); DP replica ``r`` of ``d`` reads positions ``r, r+d, r+2d, ...`` of it (the tail that does not fill a whole
round is dropped so that replicas stay in step). TP ranks of a replica have the same ``dp_rank`` and therefore read
the same samples. The state is (epoch, cursor), so a resumed run continues with exactly the same indices.
"""

from __future__ import annotations

import torch


class ResumableSampler:
    """Infinite iterator of dataset indices for DP replica ``dp_rank`` of ``dp_size``.

    Args:
        num_samples: dataset length (> 0).
        seed: the run's seed; the permutation of epoch e is drawn from seed·1_000_003 + e.
        dp_rank, dp_size: this replica and the number of replicas.
        shuffle: False keeps dataset order (still split across replicas).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"ResumableSampler: num_samples must be a positive int, got {num_samples!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"ResumableSampler: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if num_samples < dp_size:
            raise ValueError(f"ResumableSampler: num_samples ({num_samples}) is smaller than dp_size ({dp_size})")
        self.num_samples, self.seed, self.dp_rank, self.dp_size, self.shuffle = (num_samples, seed, dp_rank, dp_size,
                                                                                 shuffle)
        self.per_replica = num_samples // dp_size
        self.epoch = 0
        self.cursor = 0  # positions of this replica's share of the current epoch already handed out
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                perm = torch.randperm(self.num_samples, generator=generator)
            else:
                perm = torch.arange(self.num_samples)
            self._order = perm[self.dp_rank:self.per_replica * self.dp_size:self.dp_size].tolist()
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> int:
        order = self._epoch_order()
        if self.cursor >= len(order):
            self.epoch += 1
            self.cursor = 0
            self._order = None
            order = self._epoch_order()
        index = order[self.cursor]
        self.cursor += 1
        return index

    def state_dict(self) -> dict:
        """{"epoch", "cursor"} (plus the settings, checked on load)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "num_samples": self.num_samples, "seed": self.seed,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a sampler with the same dataset, seed and dp_size)."""
        for key in ("num_samples", "seed", "dp_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"ResumableSampler.load_state_dict: {key} was {state[key]} in the saved state, "
                                 f"is {getattr(self, key)} now; the data order cannot be resumed exactly")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = None
