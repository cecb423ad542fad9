"""Libra's attention block on the sorted layout: routed q/k/v projections, bridge terms from the adapter of each
token's own modality, RoPE and the fused bridge attention in sequence order, routed output projection
(LIBRA.md §3.1).

Tensor parallelism: the block calls "f" (``copy_to_tp_region``) on its replicated normed input once, before any
projection, and "g" (``reduce_from_tp_region``) on the output of the o projection. Head counts are read from the
(possibly sharded) weight shapes at run time, so a TP layer only has to hand it sharded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from libra_kernels import ModalityLayout, bridge_attention, routed_linear
from libra_model.config import LibraConfig
from libra_model.modules.cache import BridgeKVCache, StaticBridgeKVCache
from libra_model.modules.layers import LibraLinear, linear, op_backend, routed_dropout
from libra_model.modules.rope import apply_rotary
from libra_model.parallel.comm import copy_to_tp_region, reduce_from_tp_region


@dataclass
class AttentionContext:
    """What every layer's attention needs about the batch (built once per forward).

    layout: the sorted layout of the B·N new tokens. cos, sin: RoPE tables [B, N, 1|H, d] in the model dtype.
    vision_mask: bool [B, L] over all keys (L = cached + N). key_padding_mask: bool [B, L] or None.
    cache: the bridge KV cache, the static text cache or None. decode_slot: int64 [] (on the device) on a text
    decoding step with the static cache: the slot the new tokens (all text, one per row) are written to.
    """

    layout: ModalityLayout
    cos: torch.Tensor
    sin: torch.Tensor
    vision_mask: torch.Tensor
    key_padding_mask: torch.Tensor | None
    cache: BridgeKVCache | StaticBridgeKVCache | None = None
    decode_slot: torch.Tensor | None = None


class LibraAttention(nn.Module):
    """Attention of one decoder layer with the names of LIBRA.md Appendix A (``q_proj``..``o_proj``,
    ``vision_{q,k,v,o}_proj``, ``vision_{k,v}_bridge_on_{language,vision}``)."""

    def __init__(self, config: LibraConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        hidden, kv_dim, rank = config.hidden_size, config.kv_dim, config.expert_rank
        self.head_dim = config.head_dim
        self.q_proj, self.k_proj = linear(hidden, hidden), linear(hidden, kv_dim)
        self.v_proj, self.o_proj = linear(hidden, kv_dim), linear(hidden, hidden)
        self.vision_q_proj = LibraLinear(hidden, hidden, rank(hidden))
        self.vision_k_proj = LibraLinear(hidden, kv_dim, rank(kv_dim))
        self.vision_v_proj = LibraLinear(hidden, kv_dim, rank(kv_dim))
        self.vision_o_proj = LibraLinear(hidden, hidden, rank(hidden))
        if config.use_bridge:
            for name in ("k", "v"):
                for side in ("language", "vision"):
                    setattr(self, f"vision_{name}_bridge_on_{side}", LibraLinear(hidden, kv_dim, config.bridge_rank))
        self.tp_group = None
        self.backend: str | dict = "auto"

    def _project(self, x: torch.Tensor, n_text: int, dense: nn.Linear, expert: LibraLinear) -> torch.Tensor:
        """Routed projection [T, in] -> [T, out]; in addition_mode the dense map runs on every row and the expert
        is added on the vision rows (LIBRA.md §2.4)."""
        backend = op_backend(self.backend, "routed_linear")
        if not self.config.addition_mode:
            return routed_linear(x, n_text, dense.weight, expert.weight_A, expert.weight_B, backend=backend)
        y = routed_linear(x, x.shape[0], dense.weight, expert.weight_A, expert.weight_B, backend=backend)
        delta = routed_linear(x[n_text:], 0, dense.weight, expert.weight_A, expert.weight_B, backend=backend)
        return torch.cat([y[:n_text], y[n_text:] + delta])

    def _bridge(self, x: torch.Tensor, n_text: int, name: str) -> torch.Tensor:
        """Bridge term [T, kv_dim] of each token from the adapter of its own modality (two rank-r routed maps)."""
        backend = op_backend(self.backend, "routed_linear")
        on_language, on_vision = getattr(self, f"vision_{name}_bridge_on_language"), \
            getattr(self, f"vision_{name}_bridge_on_vision")
        low = routed_linear(x, n_text, on_language.weight_A, on_vision.weight_A, backend=backend)
        return routed_linear(low, n_text, on_language.weight_B, on_vision.weight_B, backend=backend)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x: [T, hidden] normed hidden states in sorted order (model dtype). Returns [T, hidden] in sorted order
        (the partial sums of this rank's heads all-reduced when ``tp_group`` is set)."""
        layout, n_text = ctx.layout, ctx.layout.n_text
        batch, length = layout.shape
        x = copy_to_tp_region(x, self.tp_group)
        q = self._project(x, n_text, self.q_proj, self.vision_q_proj)
        k = self._project(x, n_text, self.k_proj, self.vision_k_proj)
        v = self._project(x, n_text, self.v_proj, self.vision_v_proj)
        if self.config.use_bridge:
            k_bridge, v_bridge = self._bridge(x, n_text, "k"), self._bridge(x, n_text, "v")
        else:
            k_bridge = v_bridge = torch.zeros_like(k)

        def heads(t: torch.Tensor) -> torch.Tensor:
            # [T, h·d] sorted -> [B, N, h, d] in sequence order; h is the local head count of this weight shard.
            return layout.unsort(t).view(batch, length, -1, self.head_dim)

        q, k, k_bridge = (apply_rotary(heads(t), ctx.cos, ctx.sin) for t in (q, k, k_bridge))
        v, v_bridge = heads(v), heads(v_bridge)
        if ctx.decode_slot is not None:
            # Text decoding on the static cache: its keys and values are already as a text query sees them.
            out = ctx.cache.attend(self.layer_idx, q, k, v, ctx.decode_slot)
        else:
            if ctx.cache is not None:
                k, k_bridge, v, v_bridge = ctx.cache.update(self.layer_idx, k, k_bridge, v, v_bridge)
            out = bridge_attention(q, k, v, k_bridge, v_bridge, ctx.vision_mask, causal=True,
                                   key_padding_mask=ctx.key_padding_mask,
                                   backend=op_backend(self.backend, "bridge_attention"))
        out = layout.sort(out.reshape(batch, length, -1))
        out = self._project(out, n_text, self.o_proj, self.vision_o_proj)
        out = reduce_from_tp_region(out, self.tp_group)
        return routed_dropout(out, n_text, self.config.resid_pdrop, self.config.vision_resid_pdrop, self.training)
