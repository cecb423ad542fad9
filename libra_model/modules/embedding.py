"""Libra's routed input embedding with the hybrid signal fusion (docs/model.md §3), on the sorted layout.

Text rows: ``embed_tokens`` of row 0 of the ids. Vision rows: the per-codebook tables concatenated in codebook
order, then (``concat_signals``) ``W_sig · RMSNorm_sig([e ; c])`` with c the continuous CLIP feature of the patch
(zero where no signal is given), or (not ``concat_signals``) ``e + W_sig' c`` on every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from libra_kernels import ModalityLayout, routed_rms_norm
from libra_model.config import LibraConfig
from libra_model.modules.layers import RMSNorm, linear, op_backend, routed_dropout


class LibraEmbeddings(nn.Module):
    """Owns nothing itself: the parameters live on the decoder (``model.embed_tokens``, ``model.vision_embed_tokens``,
    ``model.vision_signal_norm``, ``model.vision_contiguous_signal_processor``) to keep the released names; this
    mixin adds them and the routed embedding computation."""

    def _init_embeddings(self, config: LibraConfig) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = nn.ModuleList(
            nn.Embedding(config.vision_vocab_size, config.vision_embed_dim) for _ in range(config.vision_codebook_num))
        if config.concat_signals:
            width = config.hidden_size + config.contiguous_signal_size
            if config.norm_signals:
                self.vision_signal_norm = RMSNorm(width, config.rms_norm_eps)
            self.vision_contiguous_signal_processor = linear(width, config.hidden_size)
        else:
            self.vision_contiguous_signal_processor = linear(config.contiguous_signal_size, config.hidden_size)

    def embed(self, input_ids: torch.Tensor, layout: ModalityLayout,
              contiguous_signal: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of the new tokens in sorted order.

        Args:
            input_ids: int64 [C, B, N] (text ids in [0, V) equal across rows; row c of a vision position holds
                V + its id in codebook c). layout: the sorted layout of the B·N tokens.
            contiguous_signal: float [B, N, cs] or None (zeros).
        Returns:
            [T, hidden] in the dtype of ``embed_tokens``.
        """
        config: LibraConfig = self.config
        n_text = layout.n_text
        codebooks, batch, length = input_ids.shape
        flat_ids = input_ids.reshape(codebooks, batch * length)
        text_ids = flat_ids[0].index_select(0, layout.sort_index[:n_text])
        vision_rows = layout.sort_index[n_text:]
        vision_ids = flat_ids.index_select(1, vision_rows) - config.vocab_size  # [C, n_vision]
        # padding_idx keeps the pad row's gradient zero, as nn.Embedding(padding_idx=pad) does in LLaMA.
        text = F.embedding(text_ids, self.embed_tokens.weight, padding_idx=config.pad_token_id)
        vision = torch.cat([F.embedding(vision_ids[c], table.weight)
                            for c, table in enumerate(self.vision_embed_tokens)], dim=-1)
        dtype = vision.dtype
        backend = self.backend
        if contiguous_signal is not None:
            signal_flat = contiguous_signal.reshape(batch * length, -1).to(dtype)
        if config.concat_signals:
            if contiguous_signal is None:
                signal = vision.new_zeros(vision.shape[0], config.contiguous_signal_size)
            else:
                signal = signal_flat.index_select(0, vision_rows)
            fused = torch.cat([vision, signal], dim=-1)
            if config.norm_signals:
                weight = self.vision_signal_norm.weight
                fused = routed_rms_norm(fused, 0, weight, weight, config.rms_norm_eps,
                                        backend=op_backend(backend, "routed_rms_norm"))
            # vision rows only: nothing is routed, a plain linear
            vision = F.linear(fused, self.vision_contiguous_signal_processor.weight)
            embeddings = torch.cat([text, vision])
        else:
            embeddings = torch.cat([text, vision])
            if contiguous_signal is not None:
                # The reference adds W c at every position (c is zero at text positions).
                signal = layout.sort(signal_flat.view(batch, length, -1))
                embeddings = embeddings + F.linear(signal, self.vision_contiguous_signal_processor.weight)
        return routed_dropout(embeddings, n_text, config.embd_pdrop, config.vision_embd_pdrop, self.training)
