"""Parameter holders with the released checkpoint names, and the small helpers every block shares.

The modules here only own parameters (``weight``; ``weight_A``/``weight_B``) under the names of the
released checkpoints (docs/model.md §13); the routed computation is done by the blocks with the ``libra_kernels``
operators on the sorted layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The model's backend switch is the library's: the blocks import it from here.
from libra_kernels.backend import OPS as OPS
from libra_kernels.backend import check_backend as check_backend
from libra_kernels.backend import op_backend as op_backend


class RMSNorm(nn.Module):
    """Holds one RMSNorm weight [dim] (initialised to ones) under its checkpoint name; the routed norms call
    ``routed_rms_norm`` with a text and a vision weight (the module has no forward of its own)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class LibraLinear(nn.Module):
    """Holds Libra's low-rank linear map y = B (A x), no bias: ``weight_A`` [rank, in], ``weight_B`` [out, rank];
    the blocks call the routed operators with these weights (the module has no forward of its own)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_A = nn.Parameter(torch.empty(rank, in_features))
        self.weight_B = nn.Parameter(torch.empty(out_features, rank))

    def extra_repr(self) -> str:
        """in/out features and rank."""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free nn.Linear (LLaMA and Libra projections have no bias)."""
    return nn.Linear(in_features, out_features, bias=False)


def routed_dropout(x: torch.Tensor, n_text: int, p_text: float, p_vision: float, training: bool) -> torch.Tensor:
    """Dropout with one rate for the text rows [0, n_text) and another for the vision rows of a sorted [T, ...]
    tensor; the identity when not training or both rates are 0 (the release)."""
    if not training or (p_text == 0.0 and p_vision == 0.0):
        return x
    return torch.cat([F.dropout(x[:n_text], p_text, True), F.dropout(x[n_text:], p_vision, True)])
