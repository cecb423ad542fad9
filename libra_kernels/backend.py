"""The one backend switch of the library: ``backend="auto" | "torch" | "triton" | "cpp"``.

``BACKENDS`` are the backend names; ``OPS`` the operators a per-operator switch (a dict {operator: backend}, as the
model takes) may name. Each operator, and the modality layout, owns a :class:`KernelTable` listing the backends it
implements and the order "auto" tries them in on each device type. ``LIBRA_BACKEND`` in the environment changes
what "auto" means for a whole run: the named backend is used wherever the operator has it for the device, and the
usual order applies elsewhere. :func:`check_backend` validates a switch and :func:`op_backend` reads one
operator's backend from it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cpp")
OPS = ("routed_linear", "routed_projections", "routed_swiglu", "routed_rms_norm", "rotary", "bridge_attention",
       "discrete_token_cross_entropy")


def op_backend(backend: str | dict, op: str) -> str:
    """The backend name for ``op``: ``backend`` is one name for every operator or a dict {operator: name} (missing
    operators use "auto")."""
    if isinstance(backend, str):
        return backend
    return backend.get(op, "auto")


def check_backend(backend) -> str | dict:
    """Validate a backend switch: "auto" | "torch" | "triton" | "cpp", or a dict {operator in OPS: that}. Returns
    the name, or a copy of the dict; raises ValueError for an unknown name or operator, TypeError for another type."""
    names = ("auto",) + BACKENDS
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


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of an operator.

    ``forward``/``backward`` are plain functions (called inside the registered op); ``unavailable`` returns why the
    backend cannot run on a device now (an empty string when it can). ``backward`` is None for a kernel whose
    gradient autograd derives by itself (the modality layout's row permutation).
    """

    forward: Callable
    backward: Callable | None
    unavailable: Callable[[torch.device], str]


def load_triton_kernels(module: str) -> tuple[object | None, Callable[[torch.device], str]]:
    """Import the Triton kernel module ``module`` of an operator. Returns the module (None when Triton cannot be
    imported: the package works without it, only the "triton" backend is then unavailable) and the backend's
    ``unavailable`` check: Triton kernels run on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1``."""
    try:
        kernels = importlib.import_module(module)
        missing = ""
    except ImportError as error:
        kernels, missing = None, f"triton cannot be imported ({error})"

    def unavailable(device: torch.device) -> str:
        if kernels is None:
            return missing
        if device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRETED):
            return ""
        return ("Triton kernels run on CUDA devices, or on the CPU when TRITON_INTERPRET=1 is set before "
                "libra_kernels is imported")

    return kernels, unavailable


def always_available(device: torch.device) -> str:
    """The ``unavailable`` check of a backend that runs on every device (the PyTorch reference)."""
    return ""


class KernelTable:
    """The backends of one operator and the order in which "auto" tries them per device type."""

    def __init__(self, op_name: str, auto_order: dict[str, tuple[str, ...]]):
        self.op_name = op_name
        self.auto_order = auto_order
        self.kernels: dict[str, Kernel] = {}

    def register(self, backend: str, kernel: Kernel) -> None:
        """Add (or replace) the kernel of ``backend``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.kernels[backend] = kernel

    def get(self, backend: str) -> Kernel:
        """The kernel of an already resolved backend name."""
        try:
            return self.kernels[backend]
        except KeyError:
            names = ", ".join(map(repr, ("auto", *self.kernels)))
            raise ValueError(f"{self.op_name} has no {backend!r} backend: backend must be one of {names}") from None

    @torch.compiler.assume_constant_result
    def resolve(self, backend: str, device: torch.device) -> str:
        """Turn the user's ``backend`` argument into the name of a backend that can run on ``device``.

        Raises ValueError for an unknown name or one this operator lacks, RuntimeError when the named backend
        exists but cannot run here (for example the C++ extension is not built, or Triton without a GPU).
        Under torch.compile the answer is computed once at trace time and baked into the graph.
        """
        if not isinstance(backend, str):
            raise TypeError(f"{self.op_name}: backend must be a string, got {type(backend).__name__}")
        if backend == "auto":
            return self._auto(device)
        if backend not in BACKENDS:
            raise ValueError(f"{self.op_name}: backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                             f"got {backend!r}")
        reason = self.get(backend).unavailable(device)
        if reason:
            raise RuntimeError(f"{self.op_name}: backend {backend!r} cannot run on {device.type}: {reason}")
        return backend

    def _auto(self, device: torch.device) -> str:
        preferred = os.environ.get("LIBRA_BACKEND", "auto")
        if preferred != "auto" and preferred not in BACKENDS:
            choices = ", ".join(map(repr, BACKENDS))
            raise ValueError(f"LIBRA_BACKEND must be one of 'auto', {choices}; got {preferred!r}")
        candidates = ((preferred,) if preferred != "auto" else ()) + self.auto_order.get(device.type, ())
        for name in candidates + ("torch",):
            kernel = self.kernels.get(name)
            if kernel is not None and not kernel.unavailable(device):
                return name
        raise RuntimeError(f"{self.op_name}: no backend can run on {device.type}")
