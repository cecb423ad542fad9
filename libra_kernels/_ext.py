"""Lazy loading of the compiled extension ``libra_kernels._C`` (the C++ operators of ``torch.ops.libra``).

``import libra_kernels`` never fails because the extension is missing: only asking for the "cpp" backend does,
with an error that says how to build it.
"""

from __future__ import annotations

import torch

_loaded: bool | None = None
_load_error: str = ""

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(after `pip install -r requirements.txt`)"
)


def cpp_extension_loaded() -> bool:
    """True when ``libra_kernels._C`` imports, which registers its operators with the dispatcher."""
    global _loaded, _load_error
    if _loaded is None:
        try:
            from libra_kernels import _C  # noqa: F401
        except ImportError as error:
            _loaded, _load_error = False, str(error)
        else:
            _loaded = True
    return _loaded


def require_cpp_extension(what: str) -> None:
    """Raise RuntimeError naming ``what`` and the build command when the extension is not available."""
    if not cpp_extension_loaded():
        raise RuntimeError(f"{what} needs the C++ extension libra_kernels._C, which is not built ({_load_error}); "
                           f"{BUILD_HINT}.")


def has_kernel(op_name: str, device: torch.device) -> bool:
    """True when ``torch.ops.libra.<op_name>`` has a kernel for the dispatch key of ``device`` (CPU or CUDA)."""
    if not cpp_extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"libra::{op_name}", key)


def cpp_kernel_unavailable(op_name: str):
    """The ``unavailable(device)`` check of a "cpp" backend whose kernel is ``torch.ops.libra.<op_name>``: returns
    why it cannot run on a device ("" when it can)."""
    def unavailable(device: torch.device) -> str:
        if not cpp_extension_loaded():
            return f"the C++ extension is not built; {BUILD_HINT}"
        if not has_kernel(op_name, device):
            return f"the C++ extension has no {device.type} kernel for {op_name}"
        return ""
    return unavailable
