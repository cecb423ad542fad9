"""Libra's attention block on the sorted layout: routed q/k/v projections, bridge terms from the adapter of each
token's own modality, RoPE and the fused bridge attention in sequence order, routed output projection
(docs/model.md §5).

The q/k/v maps and the bridges' A factors run as one ``routed_projections`` (one GEMM per modality once
:meth:`LibraAttention.pack_` has packed their weights), the k and v bridges' B factors as one grouped
``routed_linear`` (one batched GEMM per modality, packed likewise); RoPE of q, k and the key bridge term is one
``rotary``.

Tensor parallelism: the block calls "f" (``copy_to_tp_region``) on its replicated normed input once, before any
projection, and "g" (``reduce_from_tp_region``) on the output of the o projection; under sequence parallelism
(``ctx.sequence_shard``) an all-gather of the shard's rows and a reduce-scatter back to them take their places.
Head counts are read from the (possibly sharded) weight shapes at run time, so a TP layer only has to hand it
sharded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from libra_kernels import ModalityLayout, bridge_attention, pack_rows, rotary, routed_linear, routed_projections
from libra_model.config import LibraConfig
from libra_model.modules.cache import BridgeKVCache, StaticBridgeKVCache
from libra_model.modules.layers import LibraLinear, linear, op_backend, routed_dropout
from libra_model.modules.tensor_parallel import SequenceShard, enter_tp_region, exit_tp_region


@dataclass
class AttentionContext:
    """What every layer's attention needs about the batch (built once per forward).

    layout: the sorted layout of the B·N new tokens. cos, sin: RoPE tables [B, N, 1|H, d] in the model dtype.
    vision_mask: bool [B, L] over all keys (L = cached + N). key_padding_mask: bool [B, L] or None.
    cache: the bridge KV cache, the static text cache or None. decode_slot: int64 [] (on the device) on a text
    decoding step with the static cache: the slot the new tokens (all text, one per row) are written to.
    sequence_shard: this TP rank's rows of the residual stream under sequence parallelism, or None (every rank holds
    all rows). document_ids: int [B, N] for packed rows (attention never crosses documents) or None.
    """

    layout: ModalityLayout
    cos: torch.Tensor
    sin: torch.Tensor
    vision_mask: torch.Tensor
    key_padding_mask: torch.Tensor | None
    cache: BridgeKVCache | StaticBridgeKVCache | None = None
    decode_slot: torch.Tensor | None = None
    sequence_shard: SequenceShard | None = None
    document_ids: torch.Tensor | None = None


class LibraAttention(nn.Module):
    """Attention of one decoder layer with the released checkpoint names (docs/model.md §13: ``q_proj``..``o_proj``,
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

    def _bridge_factors(self) -> tuple[list[LibraLinear], list[LibraLinear]]:
        """The bridge adapters of the language side and of the vision side, k then v (empty without bridges)."""
        if not self.config.use_bridge:
            return [], []
        return ([getattr(self, f"vision_{name}_bridge_on_language") for name in "kv"],
                [getattr(self, f"vision_{name}_bridge_on_vision") for name in "kv"])

    def _input_maps(self) -> tuple[list, list, list]:
        """(text weights, vision A factors, vision B factors) of the maps of the normed input that run as one
        ``routed_projections``: q, k, v (unless addition_mode), then the k and v bridges' A factors (a bridge's
        rank-r product is the map's output; its B factors follow in :meth:`_bridge_up`)."""
        language, vision = self._bridge_factors()
        w_text = [a.weight_A for a in language]
        w_a, w_b = [a.weight_A for a in vision], [None] * len(vision)
        if not self.config.addition_mode:
            dense = (self.q_proj, self.k_proj, self.v_proj)
            experts = (self.vision_q_proj, self.vision_k_proj, self.vision_v_proj)
            w_text = [m.weight for m in dense] + w_text
            w_a, w_b = [e.weight_A for e in experts] + w_a, [e.weight_B for e in experts] + w_b
        return w_text, w_a, w_b

    def _bridge_b_factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The B factors [kv_dim, r] of the k and v bridges: (language side, vision side), empty without bridges."""
        language, vision = self._bridge_factors()
        return [a.weight_B for a in language], [a.weight_B for a in vision]

    def pack_(self) -> None:
        """Put the text weights of :meth:`_input_maps` in one buffer and their vision A factors in another, and the
        k and v bridges' B factors of each side in one buffer per side (the parameters become row blocks of it;
        values, names and shapes unchanged), so they run as one GEMM per modality. Call it after the weights reached
        their device, dtype and (tensor-parallel) shard."""
        w_text, w_a, _ = self._input_maps()
        if w_text:
            pack_rows(w_text)
            pack_rows(w_a)
        for factors in self._bridge_b_factors():
            if factors:
                pack_rows(factors)

    def _dense_plus_expert(self, x: torch.Tensor, n_text: int, dense: nn.Linear, expert: LibraLinear
                           ) -> torch.Tensor:
        """addition_mode (docs/model.md §4): the dense map on every row, the expert added on the vision rows; plain
        linears, since nothing is routed."""
        y = F.linear(x, dense.weight)
        delta = F.linear(F.linear(x[n_text:], expert.weight_A), expert.weight_B)
        return torch.cat([y[:n_text], y[n_text:] + delta])

    def _bridge_up(self, lows: torch.Tensor, layout: ModalityLayout) -> list[torch.Tensor]:
        """The bridge terms (k, v), each [B, N, kv_dim] in sequence order, from their rank-r products ``lows``
        [2, T, r] (sorted rows): each row through the B factor of its own modality, both bridges in one grouped
        ``routed_linear``, then unsorted group by group (whose backward hands the op one gradient without a copy)."""
        language, vision = self._bridge_b_factors()
        terms = routed_linear(lows, layout.n_text, language, vision,
                              backend=op_backend(self.backend, "routed_linear"))
        return layout.unsort_groups(terms)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x: [T, hidden] normed hidden states in sorted order (model dtype); under sequence parallelism only the
        rows of ``ctx.sequence_shard``. Returns the same rows, sorted (the partial sums of this rank's heads
        all-reduced, or reduce-scattered to the shard, when ``tp_group`` is set)."""
        layout, n_text = ctx.layout, ctx.layout.n_text
        batch, length = layout.shape
        shard = ctx.sequence_shard
        x = enter_tp_region(x, self.tp_group, shard)
        w_text, w_a, w_b = self._input_maps()
        outputs = routed_projections(x, n_text, w_text, w_a, w_b,
                                     backend=op_backend(self.backend, "routed_projections")) if w_text else []
        if self.config.addition_mode:
            q, k, v = (self._dense_plus_expert(x, n_text, dense, expert) for dense, expert in
                       ((self.q_proj, self.vision_q_proj), (self.k_proj, self.vision_k_proj),
                        (self.v_proj, self.vision_v_proj)))
        else:
            q, k, v, outputs = *outputs[:3], outputs[3:]
        def heads(t: torch.Tensor) -> torch.Tensor:
            # [T, h·d] sorted -> [B, N, h, d] in sequence order; h is the local head count of this weight shard.
            return layout.unsort(t).view(batch, length, -1, self.head_dim)

        def rope(*tensors: torch.Tensor) -> list[torch.Tensor]:
            return rotary(list(tensors), ctx.cos, ctx.sin, backend=op_backend(self.backend, "rotary"))

        if self.config.use_bridge:
            # The rank-r products leave the wide q/k/v buffer in one small copy, a [T, 2, r] buffer seen as [2, T, r]:
            # the B factors' backward keeps its input, and a view would keep the whole [T, q+k+v] buffer alive until
            # then. The grouped op reads and returns the gradient of that layout, so backward needs no copy here.
            rows, rank = outputs[0].shape
            lows = torch.cat(outputs, dim=1).view(rows, len(outputs), rank).transpose(0, 1)
            k_bridge, v_bridge = (t.view(batch, length, -1, self.head_dim) for t in self._bridge_up(lows, layout))
            # RoPE is linear: the key bridge term is rotated like k, all three in one operator
            q, k, k_bridge = rope(heads(q), heads(k), k_bridge)
        else:
            q, k = rope(heads(q), heads(k))
            k_bridge = v_bridge = torch.zeros_like(k)
        v = heads(v)
        if ctx.decode_slot is not None:
            # Text decoding on the static cache: its keys and values are already as a text query sees them.
            out = ctx.cache.attend(self.layer_idx, q, k, v, ctx.decode_slot)
        else:
            if ctx.cache is not None:
                k, k_bridge, v, v_bridge = ctx.cache.update(self.layer_idx, k, k_bridge, v, v_bridge)
            out = bridge_attention(q, k, v, k_bridge, v_bridge, ctx.vision_mask, causal=True,
                                   key_padding_mask=ctx.key_padding_mask, document_ids=ctx.document_ids,
                                   backend=op_backend(self.backend, "bridge_attention"))
        out = layout.sort(out.reshape(batch, length, -1))
        if self.config.addition_mode:
            out = self._dense_plus_expert(out, n_text, self.o_proj, self.vision_o_proj)
        else:
            out = routed_linear(out, n_text, self.o_proj.weight, self.vision_o_proj.weight_A,
                                self.vision_o_proj.weight_B, backend=op_backend(self.backend, "routed_linear"))
        out = exit_tp_region(out, self.tp_group, shard)
        n_out = n_text if shard is None else shard.local_text
        return routed_dropout(out, n_out, self.config.resid_pdrop, self.config.vision_resid_pdrop, self.training)
