"""Activation checkpointing of the decoder layers: ``"full"`` recomputes a whole layer in backward and keeps only
its input; ``"selective"`` recomputes the cheap operations of a layer (the norms and residual adds, RoPE, the layout
gathers, the copies and concatenations, the collectives) and keeps the outputs of the expensive ones (the
projections' GEMMs, bridge attention, the SwiGLU down projection), so backward redoes no GEMM and no attention;
``False`` keeps everything.

Selective uses torch's selective activation checkpointing (a policy per dispatched operator, see
:data:`KEPT_OPS`). The SwiGLU product itself is never kept in any mode: ``routed_swiglu`` recomputes it in its own
backward.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("full", "selective", False)


def check_mode(mode) -> str | bool:
    """Validate an activation checkpointing setting: "full" | "selective" | False (True means "full")."""
    if mode is True:
        return "full"
    if mode is False or mode is None:
        return False
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing must be 'full', 'selective' or false, got {mode!r}")
    return mode


def _kept_ops() -> frozenset:
    """The operators whose outputs selective checkpointing keeps: GEMMs and attention (every backend's)."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
           aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default}
    for name in ("routed_projections", "routed_linear", "routed_linear_grouped", "routed_swiglu", "bridge_attention"):
        ops.add(getattr(torch.ops.libra, name).default)
    return frozenset(ops)


@functools.lru_cache(maxsize=1)
def kept_ops() -> frozenset:
    """:func:`_kept_ops`, built once (the libra operators must be registered, i.e. ``libra_kernels`` imported)."""
    import libra_kernels  # noqa: F401  (registers torch.ops.libra.*)

    return _kept_ops()


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of :func:`kept_ops`, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in kept_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def run_layer(layer, h: torch.Tensor, ctx, mode: str | bool) -> torch.Tensor:
    """``layer(h, ctx)`` under activation checkpointing ``mode`` (non-reentrant, so inputs that do not require
    gradients, such as the frozen embeddings' output in stage 1, work)."""
    if mode is False:
        return layer(h, ctx)
    if mode == "full":
        return checkpoint(layer, h, ctx, use_reentrant=False)
    return checkpoint(layer, h, ctx, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, selective_policy))
