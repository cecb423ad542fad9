"""The KV caches of decoding: the general bridge KV cache, in the form the fused bridge attention reads, and the
static cache of text decoding, in the form plain attention reads (docs/model.md).

General cache (:class:`BridgeKVCache`): per layer it keeps the rotated keys k and the rotated key bridge terms
k_bridge, the values v and the value bridge terms v_bridge, all [B, L, Hkv, d] in sequence order, each bridge term
from the adapter of its own token's modality; shared by all layers it keeps the vision flags and the key padding
mask [B, L]. A query then sees k + c·k_bridge and v + c·v_bridge with c = [its modality differs from the key's],
exactly the two key sets and the rebuilt value sets of the reference, without storing either twice. Buffers are
preallocated to a capacity and grown when exceeded. It serves any mix of query modalities (decoding inside an image
included).

Static cache (:class:`StaticBridgeKVCache`): when every new query is a text token (image-to-text answers), the
keys and values it sees do not depend on the query any more: k + k_bridge and v + v_bridge at vision positions, k
and v at text positions. The static cache stores just that one K and one V per layer, preallocated once to a fixed
[B, Hkv, capacity, d], so a decode step writes one slot in place and runs plain attention: no growth, no bridge
terms, fixed shapes for a compiled (CUDA-graph) step.
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

    def reorder(self, index: torch.Tensor) -> None:
        """Make row r of the cache a copy of the old row ``index[r]`` (int64 [B']; B' may differ from B): beam
        search's reordering of its hypotheses, and the expansion of a prefilled batch to its beams."""
        def pick(t):
            return None if t is None else t.index_select(0, index)

        self.layers = [None if b is None else [pick(t) for t in b] for b in self.layers]
        self._vision, self._padding, self._hidden = pick(self._vision), pick(self._padding), pick(self._hidden)
        self.rope_start = pick(self.rope_start)

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


class StaticBridgeKVCache:
    """Preallocated cache of the keys and values as a text query sees them, for text decoding (module docstring).

    Per layer ``keys[layer]`` and ``values[layer]`` are [B, Hkv, capacity, d] in the model dtype (rotated keys);
    ``valid`` is bool [B, capacity] (True at real, filled positions); ``rope_start`` int64 [B] is the RoPE position
    of the next token. Filled by one prefill, ``model(..., past_key_values=cache)`` (which runs the prompt's own
    bridge attention and stores the text view of its keys and values), or by :meth:`fill_from` a general cache;
    then every text decoding step writes slot ``length`` of each layer with :meth:`attend`. A batch smaller than B
    fills the first rows; the other rows stay inert (one valid slot, so their attention stays finite).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        if min(num_layers, batch_size, capacity, num_kv_heads, head_dim) <= 0:
            raise ValueError("StaticBridgeKVCache: num_layers, batch_size, capacity, num_kv_heads and head_dim must "
                             f"be positive, got {(num_layers, batch_size, capacity, num_kv_heads, head_dim)}")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.num_layers, self.batch_size, self.capacity = num_layers, batch_size, capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self._rope_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        if torch.device(device).type == "cuda":
            # Fixed addresses: a CUDA-graph step may then update the buffers in place (no copy, no re-recording).
            for t in (*self.keys, *self.values, self.valid):
                torch._dynamo.mark_static_address(t)
        self.length = 0
        self._pending = 0
        self._rows = batch_size
        self.rope_cos: torch.Tensor | None = None  # [capacity, d] tables of positions 0..capacity-1 (set_rope)
        self.rope_sin: torch.Tensor | None = None

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Keep the RoPE tables [capacity, d] of positions 0..capacity-1 (a text token's position never exceeds
        its slot), so a decode step gathers its rows instead of computing angles (a compiled step would otherwise
        recompute them inside its attention loops)."""
        self.rope_cos, self.rope_sin = cos, sin
        if cos.device.type == "cuda":
            torch._dynamo.mark_static_address(cos)
            torch._dynamo.mark_static_address(sin)

    def matches(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache has exactly these dimensions (so it can be reused by another call)."""
        k = self.keys[0]
        return (self.num_layers, self.batch_size, self.capacity, k.shape[1], k.shape[3], k.dtype) == \
            (num_layers, batch_size, capacity, num_kv_heads, head_dim, dtype) and k.device == torch.device(device)

    def reset(self) -> None:
        """Forget every position (the buffers are kept; stale entries are masked out by ``valid``)."""
        self.valid.zero_()
        self._rope_start.zero_()
        self.length = self._pending = 0
        self._rows = self.batch_size

    @property
    def rope_start(self) -> torch.Tensor:
        """int64 [B]: the RoPE position of each row's next token (kept in one buffer; setting writes its first
        rows)."""
        return self._rope_start

    @rope_start.setter
    def rope_start(self, value: torch.Tensor) -> None:
        self._rope_start[:value.shape[0]] = value

    def _check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ValueError(f"StaticBridgeKVCache: {self.length} + {n} positions exceed the capacity "
                             f"{self.capacity}; allocate a larger cache")

    # ------------------------------------------------------------------ prefill (through the model's forward)
    def begin(self, vision_mask: torch.Tensor, key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start the prefill of bool [b, n] masks (b <= B): the prompt attends only to itself, so the returned
        masks are the given ones."""
        rows, n = vision_mask.shape
        if self.length != 0:
            raise ValueError("StaticBridgeKVCache: the cache is filled by one prefill; decode steps go through "
                             "attend() (reset() the cache to start again)")
        if rows > self.batch_size:
            raise ValueError(f"StaticBridgeKVCache: batch {rows} exceeds the cache's batch size {self.batch_size}")
        self._check_room(n)
        self.valid.zero_()
        self.valid[:rows, :n] = key_padding_mask
        self.valid[rows:, 0] = True
        self._vision_new = vision_mask
        self._pending, self._rows = n, rows
        return vision_mask, key_padding_mask

    def update(self, layer: int, k: torch.Tensor, k_bridge: torch.Tensor, v: torch.Tensor,
               v_bridge: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the text view of the prompt's [b, n, Hkv, d] entries; return them unchanged (the prompt's own
        bridge attention reads them)."""
        if k.shape[1] != self._pending:
            raise ValueError(f"StaticBridgeKVCache.update: expected {self._pending} new positions, got {k.shape[1]}")
        vision = self._vision_new[:, :, None, None]
        rows, n = k.shape[:2]
        self.keys[layer][:rows, :, :n] = torch.where(vision, k + k_bridge, k).transpose(1, 2)
        self.values[layer][:rows, :, :n] = torch.where(vision, v + v_bridge, v).transpose(1, 2)
        return k, k_bridge, v, v_bridge

    def update_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The "2d" heads' history: text head inputs never look back, so nothing is kept (the prompt's own hidden
        states [b, n, D] are returned)."""
        return hidden

    def end(self) -> None:
        """Commit the positions added by the prefill."""
        self.length += self._pending
        self._pending = 0
        self._vision_new = None

    def fill_from(self, cache: BridgeKVCache) -> None:
        """Take over a general cache (after decoding vision tokens, once every next query is text): its keys and
        values in the text view, its padding mask and RoPE state."""
        rows, length = cache.vision_mask.shape
        if rows > self.batch_size:
            raise ValueError(f"StaticBridgeKVCache.fill_from: batch {rows} exceeds the batch size {self.batch_size}")
        self.reset()
        self._check_room(length)
        vision = cache.vision_mask[:, :, None, None]
        for layer in range(self.num_layers):
            k, k_bridge, v, v_bridge = cache.layer(layer)
            self.keys[layer][:rows, :, :length] = torch.where(vision, k + k_bridge, k).transpose(1, 2)
            self.values[layer][:rows, :, :length] = torch.where(vision, v + v_bridge, v).transpose(1, 2)
        self.valid[:rows, :length] = cache.key_padding_mask
        self.valid[rows:, 0] = True
        self.rope_start[:rows] = cache.rope_start
        self.length, self._rows = length, rows

    # ------------------------------------------------------------------ text decoding steps
    def open_slot(self, slot: torch.Tensor) -> None:
        """Mark cache slot ``slot`` (int64 [] on the cache's device, = ``length``) valid for every row: the new
        token is real and attends to itself."""
        self.valid[:, slot.view(1)] = True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               slot: torch.Tensor) -> torch.Tensor:
        """One text decoding step of layer ``layer``: write the new token's k, v [B, 1, Hkv, d] at ``slot`` and
        attend q [B, 1, H, d] to every valid slot. Returns [B, 1, H, d] in q's dtype."""
        keys, values = self.keys[layer], self.values[layer]
        # Indexed assignment (index_put_), which the compiler keeps in place: a functional copy of the whole cache
        # per step would cost more than the step.
        keys[:, :, slot.view(1)] = k.transpose(1, 2)
        values[:, :, slot.view(1)] = v.transpose(1, 2)
        batch, _, heads, dim = q.shape
        # One query per row: two batched matrix-vector products (the query heads of a kv head side by side) read
        # K and V once; scores in q's dtype, the softmax in float32, as the bridge attention does.
        grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim)
        scores = (grouped @ keys.transpose(-1, -2)).float() * dim ** -0.5
        scores = scores.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        out = torch.softmax(scores, dim=-1).to(values.dtype) @ values
        return out.reshape(batch, 1, heads, dim)

    def advance(self) -> None:
        """Count the slot written by the last decoding step."""
        self.length += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Make row r a copy of the old row ``index[r]`` for r < len(index) (int64, on the cache's device): beam
        search's reordering, and the expansion of a prefilled batch to its beams. The buffers keep their
        addresses."""
        rows = index.shape[0]
        if rows > self.batch_size:
            raise ValueError(f"StaticBridgeKVCache.reorder: {rows} rows exceed the batch size {self.batch_size}")
        for t in (*self.keys, *self.values):
            t[:rows] = t.index_select(0, index)
        self.valid[:rows] = self.valid.index_select(0, index)
        self.valid[rows:] = False
        self.valid[rows:, 0] = True
        self._rope_start[:rows] = self._rope_start.index_select(0, index)
        self._rows = rows
