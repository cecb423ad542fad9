"""Libra's routed SwiGLU MLP on the sorted layout (docs/model.md §4): the LLaMA gate/up/down on text rows, the
low-rank experts on vision rows (always routed, also in addition_mode, as in the reference).

Two operators: ``routed_projections`` gives gate and up (one GEMM per modality once :meth:`LibraMLP.pack_` has
packed their weights), ``routed_swiglu`` the product and the down projection, keeping only gate and up for
backward (the product is recomputed there).

Tensor parallelism: "f" on the replicated normed input, "g" on the output of the down projection (under sequence
parallelism the all-gather of the shard's rows and the reduce-scatter back to them); the local
intermediate width follows from the (possibly sharded) weight shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from libra_kernels import pack_rows, routed_projections, routed_swiglu
from libra_model.config import LibraConfig
from libra_model.modules.layers import LibraLinear, linear, op_backend, routed_dropout
from libra_model.modules.tensor_parallel import SequenceShard, enter_tp_region, exit_tp_region


class LibraMLP(nn.Module):
    """MLP of one decoder layer: ``{gate,up,down}_proj`` and ``vision_{gate,up,down}_proj`` (docs/model.md §13)."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        self.config = config
        hidden, inner, rank = config.hidden_size, config.intermediate_size, config.expert_rank
        self.gate_proj, self.up_proj, self.down_proj = linear(hidden, inner), linear(hidden, inner), \
            linear(inner, hidden)
        self.vision_gate_proj = LibraLinear(hidden, inner, rank(inner))
        self.vision_up_proj = LibraLinear(hidden, inner, rank(inner))
        self.vision_down_proj = LibraLinear(inner, hidden, rank(hidden))
        self.tp_group = None
        self.backend: str | dict = "auto"

    def pack_(self) -> None:
        """Put the gate and up text weights in one buffer and their vision A factors in another (the parameters
        become row blocks of it; values, names and shapes unchanged), so gate and up run as one GEMM per modality.
        Call it after the weights reached their device, dtype and (tensor-parallel) shard."""
        pack_rows([self.gate_proj.weight, self.up_proj.weight])
        pack_rows([self.vision_gate_proj.weight_A, self.vision_up_proj.weight_A])

    def forward(self, x: torch.Tensor, n_text: int, shard: SequenceShard | None = None) -> torch.Tensor:
        """x: [T, hidden] normed, sorted (rows [0, n_text) text), or under sequence parallelism only the rows of
        ``shard`` (``n_text`` still counts the text rows of all T). Returns the same rows, sorted."""
        x = enter_tp_region(x, self.tp_group, shard)
        gate, up = routed_projections(x, n_text, [self.gate_proj.weight, self.up_proj.weight],
                                      [self.vision_gate_proj.weight_A, self.vision_up_proj.weight_A],
                                      [self.vision_gate_proj.weight_B, self.vision_up_proj.weight_B],
                                      backend=op_backend(self.backend, "routed_projections"))
        down, expert = self.down_proj, self.vision_down_proj
        out = routed_swiglu(gate, up, n_text, down.weight, expert.weight_A, expert.weight_B,
                            backend=op_backend(self.backend, "routed_swiglu"))
        out = exit_tp_region(out, self.tp_group, shard)
        n_out = n_text if shard is None else shard.local_text
        return routed_dropout(out, n_out, self.config.resid_pdrop, self.config.vision_resid_pdrop, self.training)
