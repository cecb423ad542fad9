"""The Libra language model on the sorted modality layout (docs/model.md §1-§8).

The residual stream lives in sorted [T, hidden] order (text rows first, then vision rows, each in (batch, position)
order); every routed operator is a pair of plain operations on two contiguous slices, attention alone works in
sequence order. All compute goes through the ``libra_kernels`` operators with the model's ``backend`` switch, so
``backend="torch"`` is the model's own reference path. Parameter names are those of the released checkpoints
(docs/model.md §13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from libra_kernels import ModalityLayout, discrete_token_cross_entropy, routed_rms_norm
from libra_model import hf_checkpoint
from libra_model.config import LibraConfig
from libra_model.modules.attention import AttentionContext, LibraAttention
from libra_model.modules.cache import BridgeKVCache
from libra_model.modules.embedding import LibraEmbeddings
from libra_model.modules.heads import vision_predictors_2d
from libra_model.modules.layers import RMSNorm, check_backend, linear, op_backend
from libra_model.modules.mlp import LibraMLP
from libra_model.modules.recompute import check_mode, run_layer
from libra_model.modules.rope import libra_1d_position_ids, libra_2d_position_ids, rotary_cos_sin
from libra_model.modules.tensor_parallel import (
    SequenceShard,
    TPRule,
    gather_from_sequence_shard,
    scatter_to_sequence_shard,
    tp_rule,
)

IGNORE_INDEX = -100


@dataclass
class LibraOutput:
    """Result of a forward pass.

    loss: float32 scalar (float64 for a float64 model) or None. logits: [C, B, N, V + Vv] (model dtype) or None;
    -inf where a position cannot predict (the other modality). hidden_states: the final normed hidden states
    [T, hidden] in sorted order. head_inputs: what the heads read, [T, hidden] ("1d": the hidden states) or
    [T, 2·hidden] ("2d": the neighbour predictors at vision rows, [h ; 0] at text rows). layout: the ModalityLayout
    used. past_key_values: the cache, when one was passed.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    head_inputs: torch.Tensor | None = None
    layout: ModalityLayout | None = None
    past_key_values: BridgeKVCache | None = None


class LibraDecoderLayer(nn.Module):
    """One decoder layer: routed norms around bridge attention and the routed MLP (docs/model.md §4)."""

    def __init__(self, config: LibraConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.self_attn = LibraAttention(config, layer_idx)
        self.mlp = LibraMLP(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.vision_input_layernorm = RMSNorm(hidden, eps)
        self.vision_post_attention_layernorm = RMSNorm(hidden, eps)
        self.backend: str | dict = "auto"

    def _norm(self, h: torch.Tensor, n_text: int, text: RMSNorm, vision: RMSNorm,
              residual: torch.Tensor | None = None):
        return routed_rms_norm(h, n_text, text.weight, vision.weight, self.config.rms_norm_eps, residual,
                               backend=op_backend(self.backend, "routed_rms_norm"))

    def pack_(self) -> None:
        """Pack the weights that run as one GEMM per modality (attention's q/k/v and bridge A factors, the MLP's
        gate/up); see :meth:`LibraForCausalLM.pack_projections_`."""
        self.self_attn.pack_()
        self.mlp.pack_()

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """h: [T, hidden] residual stream in sorted order (under sequence parallelism the rows of
        ``ctx.sequence_shard``). Returns the updated rows."""
        n_text, shard = ctx.layout.n_text, ctx.sequence_shard
        n_local = n_text if shard is None else shard.local_text  # the norms and the adds run on the local rows
        attn = self.self_attn(self._norm(h, n_local, self.input_layernorm, self.vision_input_layernorm), ctx)
        # One pass adds the attention output to the residual stream and normalises the sum (h kept once).
        x, h = self._norm(attn, n_local, self.post_attention_layernorm, self.vision_post_attention_layernorm, h)
        return h + self.mlp(x, n_text, shard)


class LibraModel(LibraEmbeddings):
    """The decoder (``model.*`` names): routed embeddings, the layers, the routed final norm."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        self.config = config
        self._init_embeddings(config)
        self.layers = nn.ModuleList(LibraDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.activation_checkpointing: str | bool = False  # "full" | "selective" | False (modules/recompute.py)
        self.tp_group = None
        self.backend: str | dict = "auto"

    def forward(self, input_ids: torch.Tensor, layout: ModalityLayout, ctx: AttentionContext,
                contiguous_signal: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids int64 [C, B, N]; contiguous_signal [B, N, cs] or None. Returns the final routed-normed hidden
        states [T, hidden] in sorted order (all rows, also under sequence parallelism)."""
        h = self.embed(input_ids, layout, contiguous_signal)
        shard = ctx.sequence_shard
        n_local = layout.n_text
        if shard is not None:
            # Sequence parallelism: from here to the final norm each TP rank holds its shard of the rows.
            h = scatter_to_sequence_shard(h, shard, self.tp_group)
            n_local = shard.local_text
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else False
        for layer in self.layers:
            h = run_layer(layer, h, ctx, mode)
        h = routed_rms_norm(h, n_local, self.norm.weight, self.vision_norm.weight, self.config.rms_norm_eps,
                            backend=op_backend(self.backend, "routed_rms_norm"))
        if shard is not None:
            # The loss reduces its input's gradient over TP itself: each rank's gradient is already the whole one.
            h = gather_from_sequence_shard(h, shard, self.tp_group, grad_is_partial=False)
        return h


class LibraVisionHead(nn.Module):
    """The per-codebook output heads ``vision_lm_head.heads.{c}`` (Linear hidden -> Vv each; 2·hidden in "2d")."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        width = config.hidden_size * (2 if config.vision_prediction_mode == "2d" else 1)
        self.heads = nn.ModuleList(linear(width, config.vision_vocab_size) for _ in range(config.vision_codebook_num))

    def stacked_weight(self) -> torch.Tensor:
        """[C, Vv, width]: the heads' weights stacked (differentiable), as the loss operator takes them."""
        return torch.stack([head.weight for head in self.heads])


class LibraForCausalLM(nn.Module):
    """Libra: the decoder plus the text head ``lm_head`` and the codebook heads ``vision_lm_head``.

    ``backend`` ("auto" | "torch" | "triton" | "cpp", or a dict {operator: backend}) is passed to every operator.
    ``lm_head_tp_group`` is handed to the loss as its ``process_group`` (a vocab-parallel text head).
    ``check_input_values`` (default True) runs the value checks of the inputs (one device-to-host read per
    forward); a trainer whose collator already guarantees them can turn it off to keep the step free of syncs.
    """

    def __init__(self, config: LibraConfig, backend: str | dict = "auto"):
        super().__init__()
        if not isinstance(config, LibraConfig):
            raise TypeError(f"LibraForCausalLM: config must be a LibraConfig, got {type(config).__name__}")
        self.config = config
        self.model = LibraModel(config)
        self.lm_head = linear(config.hidden_size, config.vocab_size)
        self.vision_lm_head = LibraVisionHead(config)
        # Only read in "2d" mode; kept so that released checkpoints load and the parameter count matches.
        self.vision_hidden_placeholder = nn.Parameter(torch.empty(config.hidden_size))
        if config.vision_prediction_mode == "1d":
            # Only "2d" reads it: frozen in "1d", so optimisers and DDP never see a parameter without a gradient.
            self.vision_hidden_placeholder.requires_grad_(False)
        self.lm_head_tp_group = None
        self.sequence_parallel = False
        self.check_input_values = True
        self.set_backend(backend)
        self.init_weights()
        self._packed = False
        self.register_load_state_dict_post_hook(LibraForCausalLM._repack_after_load)

    # ------------------------------------------------------------------------------------------ setup
    def set_backend(self, backend: str | dict) -> None:
        """Use ``backend`` for every operator of every block from now on."""
        backend = check_backend(backend)
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = backend

    @property
    def backend(self) -> str | dict:
        """The operator backend switch in use."""
        return self.model.backend

    def activation_checkpointing_enable(self, enabled: str | bool = True) -> None:
        """Activation checkpointing of the decoder layers: "full" (or True) recomputes each layer in backward,
        "selective" only its cheap operations (the norms, adds, RoPE, copies; GEMM and attention outputs are kept),
        False keeps everything (``libra_model.modules.recompute``)."""
        self.model.activation_checkpointing = check_mode(enabled)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """HF's name for :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(enabled)

    # ------------------------------------------------------------------------------------------ tensor parallelism
    @staticmethod
    def tensor_parallel_rule(name: str, sequence_parallel: bool = False) -> TPRule:
        """How the parameter called ``name`` (its full dotted name) is placed over a TP group: the model's sharding
        plan (``libra_model.modules.tensor_parallel.TP_RULES``; with ``sequence_parallel`` the residual stream's
        norm weights get TP-partial gradients). Raises ValueError for a parameter of an attention or MLP block
        that the plan does not cover."""
        return tp_rule(name, sequence_parallel)

    def set_tensor_parallel_group(self, group, sequence_parallel: bool = False) -> None:
        """Run the attention and MLP blocks as TP blocks over ``group`` and use a vocab-parallel text head (the
        loss's ``process_group``); None = no tensor parallelism. ``sequence_parallel``: between the blocks each
        rank keeps only its shard of the rows (training and full forwards; decoding with a cache keeps all rows);
        its norm weights then hold TP-partial gradients. The weights must already be this rank's shards
        (``libra_model.parallel.tp_plan.shard_model_`` does both)."""
        for module in self.modules():
            if hasattr(module, "tp_group"):
                module.tp_group = group
        self.lm_head_tp_group = group
        self.sequence_parallel = bool(sequence_parallel) and group is not None and dist.get_world_size(group) > 1

    def sequence_shard(self, layout: ModalityLayout) -> SequenceShard | None:
        """This rank's :class:`SequenceShard` of ``layout``'s rows under sequence parallelism, else None."""
        if not self.sequence_parallel:
            return None
        group = self.lm_head_tp_group
        return SequenceShard(layout.n_text, layout.n_vision, dist.get_world_size(group), dist.get_rank(group))

    def pack_projections_(self) -> LibraForCausalLM:
        """Pack, in every layer, the weights that then run as one GEMM per modality: attention's q/k/v text weights
        and the bridges' language A factors in one buffer, the vision A factors in another; the MLP's gate/up
        likewise. Parameters keep their names, shapes, values and ``requires_grad`` (each becomes a row block of its
        buffer), so state dicts and checkpoints keep the released layout. Call it after the model reached its
        device and dtype and after tensor-parallel sharding (each rank packs its own shards), before creating the
        optimizer; ``load_state_dict`` keeps the packing (with ``assign=True`` the model packs again). Returns
        the model."""
        for layer in self.model.layers:
            layer.pack_()
        self._packed = True
        return self

    @staticmethod
    def _repack_after_load(module, incompatible_keys) -> None:
        # load_state_dict(assign=True) puts the loaded tensors in place of the packed parameters: pack them again.
        if getattr(module, "_packed", False):
            module.pack_projections_()

    def init_weights(self, only: set[str] | None = None) -> None:
        """Initialise parameters as docs/model.md §12 describes (all of them, or only the names in ``only``): low-rank A
        ~ N(0, σ²); B ~ N(0, σ²) for experts, B = 0 for bridges (and for every low-rank B in addition_mode); norm
        weights 1; embeddings, heads, the signal projector, the LLaMA linears and the placeholder ~ N(0, σ²)."""
        std = self.config.initializer_range
        with torch.no_grad():
            for module_name, module in self.named_modules():
                for param_name, param in module.named_parameters(recurse=False):
                    full_name = f"{module_name}.{param_name}" if module_name else param_name
                    if only is not None and full_name not in only:
                        continue
                    if isinstance(module, RMSNorm):
                        param.fill_(1.0)
                    elif param_name == "weight_B" and ("_bridge_on_" in module_name or self.config.addition_mode):
                        param.zero_()
                    else:
                        param.normal_(0.0, std)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, vision_indices: torch.Tensor, attention_mask: torch.Tensor | None = None,
                contiguous_signal: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool | None = None, layout: ModalityLayout | None = None,
                past_key_values: BridgeKVCache | None = None, position_ids: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX, document_ids: torch.Tensor | None = None) -> LibraOutput:
        """Run the model.

        Args:
            input_ids: int64 [C, B, N] in the combined id space (text ids in [0, V) identical in all C rows; row c
                of a vision position holds V + its id in codebook c; BOI/EOI are V+Vv-2 / V+Vv-1).
            vision_indices: int [B, N]: 0 = BOI, 1..R² codes, R²+1 = EOI, max_vision_token_length = text/padding.
            attention_mask: [B, N] (nonzero/True = real token) or None (all real). With a mask, RoPE positions are
                the running count of real tokens minus one (left padding works).
            contiguous_signal: float [B, N, contiguous_signal_size] or None (zeros).
            labels: int64 [C, B, N] or None. Shifted inside like HF (position n predicts label n+1); values are
                ids of the combined space or ``ignore_index``; a cross-modal target raises ValueError.
            return_logits: build the [C, B, N, V + Vv] logits (default: only when no labels are given).
            layout: a precomputed ModalityLayout of ``vision_indices`` (from the collator) or None.
            past_key_values: a BridgeKVCache to read and extend (incremental decoding) or None.
            position_ids: int64 [B, N] (or [B, 2, N] with use_2d_rope) to override the computed positions.
            document_ids: int [B, N] or None: packed rows (training only, no cache), the document of each token
                within its row numbered from 0 in row order, -1 at padding. Attention never crosses documents,
                RoPE positions (1d and 2d) restart at each document and no label is predicted across a boundary,
                so every document computes what it would alone. Images must not be split between documents.
        Returns:
            LibraOutput with ``loss`` (when labels are given), ``logits`` (when asked), the sorted final hidden
            states and the layout.
        """
        config = self.config
        _check_inputs(config, input_ids, vision_indices, attention_mask, contiguous_signal, labels, layout,
                      self.check_input_values)
        _check_document_ids(document_ids, vision_indices, past_key_values)
        if layout is None:
            layout = ModalityLayout.from_vision_indices(vision_indices, config.max_vision_token_length)
        cache = past_key_values
        ctx = self._attention_context(vision_indices, attention_mask, layout, cache, position_ids, document_ids)
        hidden = self.model(input_ids, layout, ctx, contiguous_signal)
        head_inputs = self._head_inputs(hidden, layout, vision_indices, cache)
        if cache is not None:
            cache.end()
        loss = None
        if labels is not None:
            loss = self.loss(head_inputs, layout, labels, ignore_index=ignore_index, document_ids=document_ids)
        if return_logits is None:
            return_logits = labels is None
        logits = self.logits(head_inputs, layout) if return_logits else None
        return LibraOutput(loss=loss, logits=logits, hidden_states=hidden, head_inputs=head_inputs, layout=layout,
                           past_key_values=cache)

    def _head_inputs(self, hidden, layout, vision_indices, cache) -> torch.Tensor:
        """The heads' input rows [T, hidden] ("1d") or [T, 2·hidden] ("2d", docs/model.md §7), sorted."""
        if self.config.vision_prediction_mode == "1d":
            return hidden
        sequence = layout.unsort(hidden)
        if cache is not None:
            sequence = cache.update_hidden(sequence)
        predictors = vision_predictors_2d(sequence, vision_indices.long(), self.vision_hidden_placeholder,
                                          self.config.image_feature_resolution)
        return layout.sort(predictors)

    def _attention_context(self, vision_indices, attention_mask, layout, cache, position_ids,
                           document_ids=None) -> AttentionContext:
        config = self.config
        batch, length = layout.shape
        device = vision_indices.device
        mask = None if attention_mask is None else attention_mask != 0
        start = cache.rope_start if cache is not None and cache.length else None
        if config.use_2d_rope:
            computed, running = libra_2d_position_ids(vision_indices, config.image_feature_resolution, mask, start,
                                                      document_ids)
        else:
            computed = libra_1d_position_ids(mask, batch, length, device, start, document_ids)
            running = computed.new_full((batch,), length) if mask is None else mask.sum(-1)
            if start is not None:
                running = running + start
        if cache is not None:
            cache.rope_start = running
        positions = computed if position_ids is None else position_ids
        heads = self.model.layers[0].self_attn.q_proj.weight.shape[0] // config.head_dim if config.use_2d_rope \
            else None
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = rotary_cos_sin(positions.to(device), config.head_dim, config.rope_theta, dtype, heads)
        if cache is not None:
            padding = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
            vision_all, padding_all = cache.begin(layout.vision_mask, padding)
            return AttentionContext(layout, cos, sin, vision_all, padding_all, cache)
        if document_ids is not None:
            # Padding is document -1, which no query attends: the padding mask adds nothing (and the fused kernel's
            # document variant is built and checked without it).
            mask = None
        return AttentionContext(layout, cos, sin, layout.vision_mask, mask, None, document_ids=document_ids,
                                sequence_shard=self.sequence_shard(layout))

    # ------------------------------------------------------------------------------------------ heads
    def _text_head_weight(self, width: int) -> torch.Tensor:
        """The text head [V, width]: ``lm_head.weight`` zero-padded on the right when the head inputs are wider
        ("2d" mode, where text rows are [h ; 0]), so one loss call serves both modalities."""
        weight = self.lm_head.weight
        return weight if width == weight.shape[1] else F.pad(weight, (0, width - weight.shape[1]))

    @staticmethod
    def mask_document_starts(labels: torch.Tensor, document_ids: torch.Tensor | None,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Unshifted labels [C, B, N] with ``ignore_index`` at the first position of every document of packed rows
        (``document_ids`` [B, N]; unchanged when None): such a label would be predicted from the previous
        document's last token."""
        if document_ids is None:
            return labels
        start = torch.zeros_like(document_ids, dtype=torch.bool)
        start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return labels.masked_fill(start.to(labels.device)[None], ignore_index)

    @staticmethod
    def shift_labels(labels: torch.Tensor, layout: ModalityLayout, ignore_index: int = IGNORE_INDEX,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unshifted labels int64 [C, B, N] -> the loss's targets [C, T] in sorted order: position n predicts label
        n+1 (in sequence order, like HF), the last position of each sequence (and, with ``document_ids``, of each
        packed document) gets ``ignore_index``."""
        labels = LibraForCausalLM.mask_document_starts(labels, document_ids, ignore_index)
        codebooks, batch, length = labels.shape
        shifted = torch.cat([labels[..., 1:], labels.new_full((codebooks, batch, 1), ignore_index)], dim=-1)
        return shifted.reshape(codebooks, batch * length).index_select(1, layout.sort_index.to(labels.device))

    @staticmethod
    def target_counts(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [C]: the number of valid (not ignored) targets of each codebook row of unshifted labels
        [C, B, N] (the first position of a sequence, and of each packed document, is never a target). Stays on
        the labels' device."""
        labels = LibraForCausalLM.mask_document_starts(labels, document_ids, ignore_index)
        return (labels[..., 1:] != ignore_index).sum(dim=(1, 2))

    def loss(self, hidden: torch.Tensor, layout: ModalityLayout, labels: torch.Tensor,
             ignore_index: int = IGNORE_INDEX, *, target_counts: torch.Tensor | None = None, reduction: str = "mean",
             label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
             document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Libra's loss (docs/model.md) from the sorted head inputs [T, width] (``LibraOutput.head_inputs``) and
        unshifted labels int64 [C, B, N]: :meth:`shift_labels`, then the fused discrete-token cross entropy (the
        text head, zero-padded to the width in "2d" mode, on text rows; codebook c's head on vision rows).

        Args:
            target_counts: None, or int [C] valid-target counts of a larger batch this one is part of (the global
                batch of a training step, see :meth:`target_counts`): the result is then this batch's share
                (1/C) Σ_c S_c / N_c of that batch's loss, so the shares of all its parts add up to its mean loss.
                Only with reduction "mean".
            reduction: "mean" (Libra's loss: per codebook row, the mean over its valid targets, then the mean
                over rows), "sum" or "none" ([C, T] per target, sorted order, 0 where ignored).
            label_smoothing, z_loss_weight: passed to the loss operator.
            document_ids: int [B, N] of packed rows or None: no target across a document boundary.
        Returns:
            float32 (float64 for a float64 model): a scalar, or [C, T] for "none". Label values are checked (one
            device-to-host read) unless ``check_input_values`` is False.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"LibraForCausalLM.loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        codebooks = labels.shape[0]
        if target_counts is not None:
            if reduction != "mean":
                raise ValueError("LibraForCausalLM.loss: target_counts normalises a mean; use reduction='mean'")
            if not isinstance(target_counts, torch.Tensor) or target_counts.shape != (codebooks,) \
                    or target_counts.dtype.is_floating_point:
                raise ValueError(f"LibraForCausalLM.loss: target_counts must be an integer tensor [C={codebooks}] "
                                 "(LibraForCausalLM.target_counts of the whole batch)")
        targets = self.shift_labels(labels, layout, ignore_index, document_ids)
        grid = discrete_token_cross_entropy(
            hidden, layout.n_text, self._text_head_weight(hidden.shape[-1]), self.vision_lm_head.stacked_weight(),
            targets, ignore_index=ignore_index, reduction="none" if target_counts is not None else reduction,
            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, process_group=self.lm_head_tp_group,
            check_label_values=self.check_input_values,
            backend=op_backend(self.backend, "discrete_token_cross_entropy"))
        if target_counts is None:
            return grid
        counts = target_counts.to(device=grid.device, dtype=grid.dtype).clamp(min=1)
        return (grid.sum(1) / counts).sum() / codebooks

    def _text_logits(self, h: torch.Tensor) -> torch.Tensor:
        # Text rows of "2d" head inputs are [h ; 0]: the first half alone gives the same logits.
        logits = F.linear(h[..., :self.lm_head.weight.shape[1]], self.lm_head.weight)
        group = self.lm_head_tp_group
        if group is not None:
            if dist.get_world_size(group) > 1:
                # A vocab-parallel head holds a slice of the vocabulary: gather the slices (inference only).
                parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, logits.contiguous(), group=group)
                logits = torch.cat(parts, dim=-1)
        return logits

    def logits(self, hidden: torch.Tensor, layout: ModalityLayout) -> torch.Tensor:
        """Full logits [C, B, N, V + Vv] (model dtype) from the sorted head inputs [T, width]: text positions get
        the text head's logits and -inf over the codebook ids (the same in every row c), vision positions in row c
        get -inf over the text ids and codebook c's logits."""
        config, n_text = self.config, layout.n_text
        batch, length = layout.shape
        codebooks, vocab = config.vision_codebook_num, config.vocab_size
        out = hidden.new_full((codebooks, hidden.shape[0], config.total_vocab_size), float("-inf"))
        out[:, :n_text, :vocab] = self._text_logits(hidden[:n_text])
        for c, head in enumerate(self.vision_lm_head.heads):
            out[c, n_text:, vocab:] = F.linear(hidden[n_text:], head.weight)
        return out.index_select(1, layout.row_of.reshape(-1)).view(codebooks, batch, length, -1)

    def last_logits(self, hidden: torch.Tensor, layout: ModalityLayout) -> torch.Tensor:
        """Logits [C, B, V + Vv] of the last position of every sequence (what decoding needs), with the same -inf
        convention as :meth:`logits`, without building the full tensor. ``hidden``: the sorted head inputs."""
        config = self.config
        vocab = config.vocab_size
        rows = layout.row_of[:, -1]
        h = hidden.index_select(0, rows)  # [B, hidden]
        is_vision = layout.vision_mask[:, -1]
        text = self._text_logits(h)
        out = h.new_full((config.vision_codebook_num, h.shape[0], config.total_vocab_size), float("-inf"))
        for c, head in enumerate(self.vision_lm_head.heads):
            vision = F.linear(h, head.weight)
            out[c, :, :vocab] = torch.where(is_vision[:, None], float("-inf"), text)
            out[c, :, vocab:] = torch.where(is_vision[:, None], vision, float("-inf"))
        return out

    # ------------------------------------------------------------------------------------------ helpers
    def num_parameters(self) -> int:
        """Total number of parameter elements."""
        return sum(p.numel() for p in self.parameters())

    def generate(self, *args, **kwargs):
        """Batched decoding with the bridge KV cache: see :func:`libra_model.decoding.generate`."""
        from libra_model.decoding import generate

        return generate(self, *args, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write config.json and safetensors shards: see :func:`libra_model.hf_checkpoint.save_pretrained`."""
        hf_checkpoint.save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> LibraForCausalLM:
        """Load a released Libra checkpoint or one of our saves: see
        :func:`libra_model.hf_checkpoint.load_pretrained`."""
        return hf_checkpoint.load_pretrained(cls, directory, **kwargs)

    @classmethod
    def from_llama(cls, llama_dir, **kwargs) -> LibraForCausalLM:
        """A Libra whose language part is an HF LLaMA checkpoint: see
        :func:`libra_model.hf_checkpoint.load_from_llama`."""
        return hf_checkpoint.load_from_llama(cls, llama_dir, **kwargs)


def load_libra(directory, **kwargs) -> LibraForCausalLM:
    """``LibraForCausalLM.from_pretrained(directory, **kwargs)`` (keyword arguments: dtype, device, strict,
    strict_config, backend, config overrides)."""
    return LibraForCausalLM.from_pretrained(directory, **kwargs)


def init_from_llama(llama_dir, **kwargs) -> LibraForCausalLM:
    """``LibraForCausalLM.from_llama(llama_dir, **kwargs)`` (keyword arguments: dtype, device, backend,
    copy_eos_to_pad, config overrides for the vision side)."""
    return LibraForCausalLM.from_llama(llama_dir, **kwargs)


def _check_document_ids(document_ids, vision_indices, cache) -> None:
    """Type, shape and device of the packed-row ``document_ids`` (values are the collator's job: no host read)."""
    if document_ids is None:
        return
    name = "LibraForCausalLM"
    if not isinstance(document_ids, torch.Tensor) or document_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: document_ids must be an int32/int64 tensor [B, N] (-1 at padding) or None")
    if document_ids.shape != vision_indices.shape:
        raise ValueError(f"{name}: document_ids must be [B, N] = {tuple(vision_indices.shape)} like vision_indices, "
                         f"got {tuple(document_ids.shape)}")
    if document_ids.device != vision_indices.device:
        raise ValueError(f"{name}: document_ids is on {document_ids.device}, vision_indices on "
                         f"{vision_indices.device}")
    if cache is not None:
        raise ValueError(f"{name}: document_ids (packed rows) is a training input; decoding with past_key_values "
                         "takes one sequence per row")


def _check_inputs(config: LibraConfig, input_ids, vision_indices, attention_mask, contiguous_signal, labels,
                  layout, check_values: bool = True) -> None:
    """Shape/dtype checks (TypeError/ValueError naming the argument) and, when ``check_values``, one combined
    device-to-host read for the value checks: the modality of the ids must agree with vision_indices, ids must be
    in range and text ids equal across the codebook rows."""
    name = "LibraForCausalLM"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
        raise TypeError(f"{name}: input_ids must be an int64 tensor [C, B, N]")
    if input_ids.dim() != 3 or input_ids.shape[0] != config.vision_codebook_num:
        raise ValueError(f"{name}: input_ids must be [C={config.vision_codebook_num}, B, N], "
                         f"got {tuple(input_ids.shape)}")
    _, batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"{name}: input_ids is empty ([C, B, N] = {tuple(input_ids.shape)}); a forward needs at "
                         "least one sequence (B >= 1) of at least one token (N >= 1)")
    if not isinstance(vision_indices, torch.Tensor) or vision_indices.dtype.is_floating_point \
            or vision_indices.dtype == torch.bool:
        raise TypeError(f"{name}: vision_indices must be an integer tensor [B, N]")
    if tuple(vision_indices.shape) != (batch, length):
        raise ValueError(f"{name}: vision_indices must be [B, N] = {(batch, length)} like input_ids, "
                         f"got {tuple(vision_indices.shape)}")
    if vision_indices.device != input_ids.device:
        raise ValueError(f"{name}: vision_indices is on {vision_indices.device}, input_ids on {input_ids.device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"{name}: attention_mask must be a [B, N] = {(batch, length)} tensor or None")
    if contiguous_signal is not None:
        if not isinstance(contiguous_signal, torch.Tensor) or not contiguous_signal.is_floating_point():
            raise TypeError(f"{name}: contiguous_signal must be a floating tensor [B, N, cs] or None")
        if tuple(contiguous_signal.shape) != (batch, length, config.contiguous_signal_size):
            raise ValueError(f"{name}: contiguous_signal must be [B, N, {config.contiguous_signal_size}] = "
                             f"{(batch, length, config.contiguous_signal_size)}, got {tuple(contiguous_signal.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"{name}: labels must be an int64 tensor [C, B, N] or None")
        if labels.shape != input_ids.shape:
            raise ValueError(f"{name}: labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
    if layout is not None and (not isinstance(layout, ModalityLayout) or layout.shape != (batch, length)):
        raise ValueError(f"{name}: layout must be a ModalityLayout of shape {(batch, length)}")
    if not check_values:
        return
    vocab, limit = config.vocab_size, config.max_vision_token_length
    is_vision = vision_indices < limit
    ids_vision = input_ids >= vocab
    problems = torch.stack([
        ((vision_indices < 0) | (vision_indices > limit)).any(),
        (ids_vision != is_vision[None]).any(),
        ((input_ids < 0) | (input_ids >= config.total_vocab_size)).any(),
        ((input_ids != input_ids[:1]) & ~is_vision[None]).any(),
    ]).tolist()
    messages = (f"vision_indices must be in [0, {limit}]",
                f"input_ids and vision_indices disagree on which positions are vision tokens (ids >= {vocab} must be "
                f"exactly where vision_indices < {limit})",
                f"input_ids must be in [0, {config.total_vocab_size})",
                "text positions must hold the same id in every codebook row of input_ids")
    for bad, message in zip(problems, messages):
        if bad:
            raise ValueError(f"{name}: {message}")
