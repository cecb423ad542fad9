"""Libra's routed SwiGLU MLP on the sorted layout (LIBRA.md §2.1): the LLaMA gate/up/down on text rows, the
low-rank experts on vision rows (always routed, also in addition_mode, as in the reference).

Tensor parallelism: "f" on the replicated normed input, "g" on the output of the down projection; the local
intermediate width follows from the (possibly sharded) weight shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from libra_kernels import routed_linear
from libra_model.config import LibraConfig
from libra_model.modules.layers import LibraLinear, linear, op_backend, routed_dropout
from libra_model.modules.tensor_parallel import copy_to_tp_region, reduce_from_tp_region


class LibraMLP(nn.Module):
    """MLP of one decoder layer: ``{gate,up,down}_proj`` and ``vision_{gate,up,down}_proj`` (Appendix A)."""

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

    def forward(self, x: torch.Tensor, n_text: int) -> torch.Tensor:
        """x: [T, hidden] normed, sorted (rows [0, n_text) text). Returns [T, hidden] sorted."""
        backend = op_backend(self.backend, "routed_linear")
        x = copy_to_tp_region(x, self.tp_group)

        def project(t, dense, expert):
            return routed_linear(t, n_text, dense.weight, expert.weight_A, expert.weight_B, backend=backend)

        inner = F.silu(project(x, self.gate_proj, self.vision_gate_proj)) * project(x, self.up_proj,
                                                                                     self.vision_up_proj)
        out = reduce_from_tp_region(project(inner, self.down_proj, self.vision_down_proj), self.tp_group)
        return routed_dropout(out, n_text, self.config.resid_pdrop, self.config.vision_resid_pdrop, self.training)
