"""Parameter holders with the released checkpoint names, and the small helpers every block shares.

The modules here only own parameters (``weight``; ``weight_A``/``weight_B``) under the names of LIBRA.md
Appendix A; the routed computation is done by the blocks with the ``libra_kernels`` operators on the sorted layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPS = ("routed_linear", "routed_projections", "routed_swiglu", "routed_rms_norm", "rotary", "bridge_attention",
       "discrete_token_cross_entropy")


def op_backend(backend: str | dict, op: str) -> str:
    """The backend name for ``op``: ``backend`` is one name for every operator or a dict {operator: name} (missing
    operators use "auto")."""
    if isinstance(backend, str):
        return backend
    return backend.get(op, "auto")


def check_backend(backend) -> str | dict:
    """Validate a model backend switch: "auto" | "torch" | "triton" | "cpp", or a dict {operator: that}."""
    names = ("auto", "torch", "triton", "cpp")
    if isinstance(backend, str):
        if backend not in names:
            raise ValueError(f"backend must be one of {names} or a dict {{operator: backend}}, got {backend!r}")
        return backend
    if isinstance(backend, dict):
        for op, name in backend.items():
            if op not in OPS:
                raise ValueError(f"backend: unknown operator {op!r} (operators: {OPS})")
            if name not in names:
                raise ValueError(f"backend[{op!r}] must be one of {names}, got {name!r}")
        return dict(backend)
    raise TypeError(f"backend must be a str or a dict, got {type(backend).__name__}")


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
