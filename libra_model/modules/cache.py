"""The bridge KV cache (LIBRA.md §3.4) in the form the fused bridge attention reads.

Per layer it keeps the rotated keys k and the rotated key bridge terms k_bridge, the values v and the value bridge
terms v_bridge, all [B, L, Hkv, d] in sequence order, each bridge term from the adapter of its own token's modality;
shared by all layers it keeps the vision flags and the key padding mask [B, L]. A query then sees k + c·k_bridge and
v + c·v_bridge with c = [its modality differs from the key's], exactly the two key sets and the rebuilt value sets
of the reference, without storing either twice. Buffers are preallocated to a capacity and grown when exceeded.
"""

from __future__ import annotations

import torch


class BridgeKVCache:
    """Growing per-layer cache of (k, k_bridge, v, v_bridge) plus the shared vision flags and padding mask.

    Use: ``begin(vision_mask, key_padding_mask)`` once per forward with the new tokens' [B, n] masks, then every
    layer calls ``update(layer, k, k_bridge, v, v_bridge)`` with its new [B, n, Hkv, d] entries and gets the full
    [B, L, Hkv, d] views, then ``end()``. ``length`` is the number of cached positions.
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self._pending = 0
        self.layers: list[list[torch.Tensor] | None] = [None] * num_layers
        self._vision: torch.Tensor | None = None
        self._padding: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        # RoPE state after the cached positions, int64 [B]: the count of real tokens (1d) or the running sum of
        # position increments (2d); set by the model.
        self.rope_start: torch.Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        """B of the cached batch (None before the first forward)."""
        return None if self._vision is None else self._vision.shape[0]

    @staticmethod
    def _write(buffer: torch.Tensor | None, new: torch.Tensor, start: int, capacity: int) -> torch.Tensor:
        end = start + new.shape[1]
        if buffer is None or buffer.shape[1] < end:
            size = max(capacity, end, 2 * (buffer.shape[1] if buffer is not None else 0))
            grown = new.new_zeros((new.shape[0], size, *new.shape[2:]))
            if buffer is not None:
                grown[:, :start] = buffer[:, :start]
            buffer = grown
        buffer[:, start:end] = new
        return buffer

    def begin(self, vision_mask: torch.Tensor, key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' bool [B, n] vision flags and padding mask (True = real token); returns both
        masks over all L = length + n positions."""
        if self._vision is not None and vision_mask.shape[0] != self._vision.shape[0]:
            raise ValueError(f"BridgeKVCache: batch size {vision_mask.shape[0]} differs from the cached "
                             f"{self._vision.shape[0]}")
        n = vision_mask.shape[1]
        self._vision = self._write(self._vision, vision_mask, self.length, self.capacity)
        self._padding = self._write(self._padding, key_padding_mask, self.length, self.capacity)
        self._pending = n
        end = self.length + n
        return self._vision[:, :end], self._padding[:, :end]

    def update(self, layer: int, k: torch.Tensor, k_bridge: torch.Tensor, v: torch.Tensor,
               v_bridge: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store layer ``layer``'s new entries (each [B, n, Hkv, d]) and return the four full [B, L, Hkv, d] views."""
        if k.shape[1] != self._pending:
            raise ValueError(f"BridgeKVCache.update: expected {self._pending} new positions, got {k.shape[1]}")
        buffers = self.layers[layer] or [None] * 4
        buffers = [self._write(b, t, self.length, self.capacity) for b, t in zip(buffers, (k, k_bridge, v, v_bridge))]
        self.layers[layer] = buffers
        end = self.length + self._pending
        return tuple(b[:, :end] for b in buffers)

    def update_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Store the new positions' final hidden states [B, n, D] (needed by the "2d" heads, which look back at
        earlier positions) and return all [B, L, D]."""
        if hidden.shape[1] != self._pending:
            raise ValueError(f"BridgeKVCache.update_hidden: expected {self._pending} new positions, "
                             f"got {hidden.shape[1]}")
        self._hidden = self._write(self._hidden, hidden, self.length, self.capacity)
        return self._hidden[:, :self.length + self._pending]

    def end(self) -> None:
        """Commit the positions added by the current forward."""
        self.length += self._pending
        self._pending = 0

    def layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The committed (k, k_bridge, v, v_bridge) of one layer, each [B, length, Hkv, d]."""
        return tuple(b[:, :self.length] for b in self.layers[layer])

    @property
    def vision_mask(self) -> torch.Tensor:
        """bool [B, length]: the modality of each cached position."""
        return self._vision[:, :self.length]

    @property
    def key_padding_mask(self) -> torch.Tensor:
        """bool [B, length]: True at real (not padded) cached positions."""
        return self._padding[:, :self.length]
