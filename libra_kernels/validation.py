"""Argument checks shared by the operators. Every failure names the argument: TypeError for a wrong type or
dtype, ValueError for a wrong shape, range or value, so nothing downstream is silently wrong."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, value, ndim: int | None = None) -> torch.Tensor:
    """``value`` must be a tensor (with ``ndim`` dimensions when given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_floating(op: str, name: str, value: torch.Tensor) -> None:
    """``value`` must be float16, bfloat16, float32 or float64."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}")


def check_like(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor of ``others`` (None entries skipped) has the dtype and device of ``reference``."""
    for name, value in others.items():
        if value is None:
            continue
        if value.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of {reference_name} ({reference.dtype}), "
                            f"got {value.dtype}")
        if value.device != reference.device:
            raise ValueError(f"{op}: {name} is on {value.device} but {reference_name} is on {reference.device}")


def check_n_text(op: str, n_text, rows: int) -> int:
    """``n_text`` is a Python int (or SymInt) in [0, rows]; rows [0, n_text) are text, the rest vision."""
    if isinstance(n_text, bool) or not isinstance(n_text, (int, torch.SymInt)):
        raise TypeError(f"{op}: n_text must be an int, got {type(n_text).__name__}")
    if isinstance(n_text, int) and not 0 <= n_text <= rows:
        raise ValueError(f"{op}: n_text must be in [0, {rows}] (the number of rows), got {n_text}")
    return n_text


def check_shape(op: str, name: str, value: torch.Tensor, expected: tuple, meaning: str = "") -> None:
    """``value.shape`` equals ``expected`` (``None`` entries match anything)."""
    ok = value.dim() == len(expected) and all(e is None or s == e for s, e in zip(value.shape, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{op}: {name} must have shape {shown}{extra}, got {tuple(value.shape)}")
