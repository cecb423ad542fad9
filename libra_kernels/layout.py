"""The sorted modality layout (DESIGN.md §2): text rows first, then vision rows, each in (batch, position) order."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModalityLayout:
    """Where every token of a [B, N] batch lives in the sorted [T, ...] residual stream (T = B·N).

    Attributes:
        n_text, n_vision: Python ints, the sizes of the two groups (n_text + n_vision = T).
        sort_index: int64 [T]; sorted row r holds the token at flat position ``sort_index[r]`` (= b·N + n).
        row_of: int64 [B, N]; the sorted row of token (b, n), the inverse permutation of ``sort_index``.
        vision_mask: bool [B, N]; True at vision tokens.

    Build it on the host (the collator knows where images are), so no operator needs a device-to-host sync to route.
    Indices are int64 because ``torch.gather`` and friends require it.
    """

    n_text: int
    n_vision: int
    sort_index: torch.Tensor
    row_of: torch.Tensor
    vision_mask: torch.Tensor

    @classmethod
    def from_vision_mask(cls, vision_mask: torch.Tensor) -> ModalityLayout:
        """Layout of a bool [B, N] mask (True = vision token). Reads the vision count back once if on a GPU."""
        if not isinstance(vision_mask, torch.Tensor):
            raise TypeError(f"ModalityLayout: vision_mask must be a torch.Tensor, got {type(vision_mask).__name__}")
        if vision_mask.dtype != torch.bool or vision_mask.dim() != 2:
            raise ValueError(f"ModalityLayout: vision_mask must be a bool [B, N] tensor, got {vision_mask.dtype} "
                             f"{tuple(vision_mask.shape)}")
        flat = vision_mask.reshape(-1)
        # A stable sort on the 0/1 flag keeps (batch, position) order inside each group.
        sort_index = torch.argsort(flat.to(torch.int8), stable=True)
        row_of = torch.empty_like(sort_index)
        row_of[sort_index] = torch.arange(flat.numel(), device=flat.device)
        n_vision = int(flat.sum())
        return cls(n_text=flat.numel() - n_vision, n_vision=n_vision, sort_index=sort_index,
                   row_of=row_of.view(vision_mask.shape), vision_mask=vision_mask)

    @classmethod
    def from_vision_indices(cls, vision_indices: torch.Tensor, max_vision_token_length: int) -> ModalityLayout:
        """Layout of Libra's int [B, N] ``vision_indices`` (values < max_vision_token_length are vision tokens)."""
        if not isinstance(vision_indices, torch.Tensor) or vision_indices.dtype.is_floating_point:
            raise TypeError("ModalityLayout: vision_indices must be an integer torch.Tensor")
        if vision_indices.dim() != 2:
            raise ValueError(f"ModalityLayout: vision_indices must be [B, N], got {tuple(vision_indices.shape)}")
        if isinstance(max_vision_token_length, bool) or not isinstance(max_vision_token_length, int) \
                or max_vision_token_length <= 0:
            raise ValueError(f"ModalityLayout: max_vision_token_length must be a positive int, "
                             f"got {max_vision_token_length!r}")
        return cls.from_vision_mask(vision_indices < max_vision_token_length)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, N) of the batch this layout describes."""
        return tuple(self.vision_mask.shape)

    @property
    def num_tokens(self) -> int:
        """T = B·N."""
        return self.n_text + self.n_vision

    @property
    def positions(self) -> torch.Tensor:
        """int64 [T]: the sequence position n of each sorted row (for RoPE)."""
        return self.sort_index % self.vision_mask.shape[1]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [T, ...] in sorted order (differentiable)."""
        batch, length = self.shape
        if x.shape[:2] != (batch, length):
            raise ValueError(f"ModalityLayout.sort: x must start with the layout's shape ({batch}, {length}), "
                             f"got {tuple(x.shape)}")
        return x.reshape(batch * length, *x.shape[2:]).index_select(0, self.sort_index)

    def unsort(self, y: torch.Tensor) -> torch.Tensor:
        """[T, ...] in sorted order -> [B, N, ...] (differentiable)."""
        batch, length = self.shape
        if y.shape[0] != batch * length:
            raise ValueError(f"ModalityLayout.unsort: y must have {batch * length} rows, got {tuple(y.shape)}")
        return y.index_select(0, self.row_of.reshape(-1)).view(batch, length, *y.shape[1:])

    def to(self, device: torch.device | str) -> ModalityLayout:
        """The same layout with its index tensors on ``device``."""
        return ModalityLayout(self.n_text, self.n_vision, self.sort_index.to(device), self.row_of.to(device),
                              self.vision_mask.to(device))
