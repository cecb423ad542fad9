"""The sorted modality layout: text rows first, then vision rows, each in (batch, position) order.

Two implementations, chosen by the library's one backend switch (:class:`libra_kernels.backend.KernelTable`,
``backend="auto" | "torch" | "cpp"``, ``LIBRA_BACKEND`` included): the C++ ops ``torch.ops.libra.modality_layout``
(the layout built on the device in one pass, no host synchronisation inside) and ``torch.ops.libra.permute_rows``
(the sort/unsort gathers, whose backward is the gather by the inverse permutation), used when the extension is
built; and a PyTorch fallback (argsort and index_select).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_kernels import _ext
from libra_kernels.backend import Kernel, KernelTable, always_available


def _build_torch(vision_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = vision_mask.reshape(-1)
    # A stable sort on the 0/1 flag keeps (batch, position) order inside each group.
    sort_index = torch.argsort(flat.to(torch.int8), stable=True)
    row_of = torch.empty_like(sort_index)
    row_of[sort_index] = torch.arange(flat.numel(), device=flat.device)
    n_vision = flat.sum()
    counts = torch.stack([flat.numel() - n_vision, n_vision])
    return sort_index, row_of.view(vision_mask.shape), counts


def _permute_torch(x: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


def _cpp_unavailable(device: torch.device) -> str:
    return _ext.cpp_kernel_unavailable("modality_layout")(device) or _ext.cpp_kernel_unavailable("permute_rows")(device)


def _build_cpp(vision_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.libra.modality_layout(vision_mask)


def _permute_cpp(x: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor) -> torch.Tensor:
    return torch.ops.libra.permute_rows(x, index, inverse_index)


# TABLE builds the layout and picks the layout's backend; PERMUTE_TABLE holds the same backends' row permutation
# (sort and unsort). Neither has a backward kernel: building is not differentiable, and autograd differentiates each
# permutation by itself (the C++ op's gradient, registered below, is the gather by the inverse).
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cpp",)}
TABLE = KernelTable("ModalityLayout", auto_order=_AUTO_ORDER)
TABLE.register("torch", Kernel(_build_torch, None, always_available))
TABLE.register("cpp", Kernel(_build_cpp, None, _cpp_unavailable))
PERMUTE_TABLE = KernelTable("permute_rows", auto_order=_AUTO_ORDER)
PERMUTE_TABLE.register("torch", Kernel(_permute_torch, None, always_available))
PERMUTE_TABLE.register("cpp", Kernel(_permute_cpp, None, _cpp_unavailable))


def resolve_backend(backend: str, device: torch.device) -> str:
    """The layout implementation for ``device``: "cpp" or "torch" (``KernelTable.resolve``: ValueError for an unknown
    name, RuntimeError when "cpp" cannot run there)."""
    return TABLE.resolve(backend, device)


def build_layout(vision_mask: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout tensors of a bool [B, N] mask, on its device, with nothing read back to the host:
    (sort_index int64 [T], row_of int64 [B, N], counts int64 [2] = (n_text, n_vision))."""
    return TABLE.get(resolve_backend(backend, vision_mask.device)).forward(vision_mask)


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor, backend: str = "auto"
                 ) -> torch.Tensor:
    """out[r] = x[index[r]] for x [T, ...] of any dtype (differentiable); index int64 [T] is a permutation and
    inverse_index its inverse (the backward gathers with it)."""
    return PERMUTE_TABLE.get(resolve_backend(backend, x.device)).forward(x, index, inverse_index)


if _ext.cpp_extension_loaded():
    @torch.library.register_fake("libra::modality_layout")
    def _fake_layout(vision_mask):
        long = dict(dtype=torch.long, device=vision_mask.device)
        return (torch.empty(vision_mask.numel(), **long), torch.empty(vision_mask.shape, **long),
                torch.empty(2, **long))

    @torch.library.register_fake("libra::permute_rows")
    def _fake_permute_rows(x, index, inverse_index):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _permute_setup_context(ctx, inputs, output):
        _x, index, inverse_index = inputs
        ctx.save_for_backward(index, inverse_index)

    def _permute_backward(ctx, grad):
        index, inverse_index = ctx.saved_tensors
        # out = P x  =>  dx = P^-1 dout: a gather by the inverse permutation.
        return torch.ops.libra.permute_rows(grad, inverse_index, index), None, None

    torch.library.register_autograd("libra::permute_rows", _permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("libra::unsort_groups", mutates_args=())
def unsort_groups_op(y: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor, backend: str
                     ) -> list[torch.Tensor]:
    """Registered operator: ``[permute_rows(y[g], index, inverse_index) for g]``, G fresh [T, ...] tensors, each by
    the named backend's row permutation."""
    kernel = PERMUTE_TABLE.get(backend)
    return [kernel.forward(y[g], index, inverse_index) for g in range(y.shape[0])]


@unsort_groups_op.register_fake
def _fake_unsort_groups(y, index, inverse_index, backend):
    return [torch.empty_like(y[g], memory_format=torch.contiguous_format) for g in range(y.shape[0])]


def _unsort_groups_setup_context(ctx, inputs, output):
    y, _index, inverse_index, _backend = inputs
    ctx.save_for_backward(inverse_index)
    ctx.shape, ctx.dtype = y.shape, y.dtype
    ctx.set_materialize_grads(False)  # a group without a gradient costs a zero fill of its slice, nothing more


def _unsort_groups_backward(ctx, grads):
    (inverse_index,) = ctx.saved_tensors
    present = next((g for g in grads if g is not None), None)
    if present is None:
        return None, None, None, None
    # Each group's gradient is gathered by the inverse permutation straight into its slice of the one gradient of y:
    # G gathers, no stacking copy.
    grad_y = present.new_empty(ctx.shape, dtype=ctx.dtype)
    for g, grad in enumerate(grads):
        if grad is None:
            grad_y[g].zero_()
        else:
            torch.index_select(grad.to(ctx.dtype), 0, inverse_index, out=grad_y[g])
    return grad_y, None, None, None


unsort_groups_op.register_autograd(_unsort_groups_backward, setup_context=_unsort_groups_setup_context)


@dataclass(frozen=True)
class ModalityLayout:
    """Where every token of a [B, N] batch lives in the sorted [T, ...] residual stream (T = B·N).

    Attributes:
        n_text, n_vision: Python ints, the sizes of the two groups (n_text + n_vision = T).
        sort_index: int64 [T]; sorted row r holds the token at flat position ``sort_index[r]`` (= b·N + n).
        row_of: int64 [B, N]; the sorted row of token (b, n), the inverse permutation of ``sort_index``.
        vision_mask: bool [B, N]; True at vision tokens.
        backend: "auto", "torch" or "cpp": the implementation of ``sort``/``unsort`` (module docstring).

    Build it on the host (the collator knows where images are), so no operator needs a device-to-host sync to route.
    Built on a GPU, the layout is computed there and only the two counts come back (one sync per layout).
    Indices are int64 because ``torch.gather`` and friends require it.
    """

    n_text: int
    n_vision: int
    sort_index: torch.Tensor
    row_of: torch.Tensor
    vision_mask: torch.Tensor
    backend: str = "auto"

    @classmethod
    def from_vision_mask(cls, vision_mask: torch.Tensor, *, backend: str = "auto") -> ModalityLayout:
        """Layout of a bool [B, N] mask (True = vision token), built on the mask's device. The two group sizes are
        read back to the host once (the only synchronisation)."""
        if not isinstance(vision_mask, torch.Tensor):
            raise TypeError(f"ModalityLayout: vision_mask must be a torch.Tensor, got {type(vision_mask).__name__}")
        if vision_mask.dtype != torch.bool or vision_mask.dim() != 2:
            raise ValueError(f"ModalityLayout: vision_mask must be a bool [B, N] tensor, got {vision_mask.dtype} "
                             f"{tuple(vision_mask.shape)}")
        name = resolve_backend(backend, vision_mask.device)
        sort_index, row_of, counts = build_layout(vision_mask, name)
        n_text, n_vision = counts.tolist()
        return cls(n_text=n_text, n_vision=n_vision, sort_index=sort_index, row_of=row_of, vision_mask=vision_mask,
                   backend=name)

    @classmethod
    def from_vision_indices(cls, vision_indices: torch.Tensor, max_vision_token_length: int, *,
                            backend: str = "auto") -> ModalityLayout:
        """Layout of Libra's int [B, N] ``vision_indices`` (values < max_vision_token_length are vision tokens)."""
        if not isinstance(vision_indices, torch.Tensor) or vision_indices.dtype.is_floating_point:
            raise TypeError("ModalityLayout: vision_indices must be an integer torch.Tensor")
        if vision_indices.dim() != 2:
            raise ValueError(f"ModalityLayout: vision_indices must be [B, N], got {tuple(vision_indices.shape)}")
        if isinstance(max_vision_token_length, bool) or not isinstance(max_vision_token_length, int) \
                or max_vision_token_length <= 0:
            raise ValueError(f"ModalityLayout: max_vision_token_length must be a positive int, "
                             f"got {max_vision_token_length!r}")
        return cls.from_vision_mask(vision_indices < max_vision_token_length, backend=backend)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, N) of the batch this layout describes."""
        return tuple(self.vision_mask.shape)

    @property
    def num_tokens(self) -> int:
        """T = B·N."""
        return self.n_text + self.n_vision

    @property
    def positions(self) -> torch.Tensor:
        """int64 [T]: the sequence position n of each sorted row (for RoPE)."""
        return self.sort_index % self.vision_mask.shape[1]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [T, ...] in sorted order (differentiable; the backward is the unsort gather)."""
        batch, length = self.shape
        if x.shape[:2] != (batch, length):
            raise ValueError(f"ModalityLayout.sort: x must start with the layout's shape ({batch}, {length}), "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(batch * length, *x.shape[2:])
        return permute_rows(flat, self.sort_index, self.row_of.reshape(-1), self.backend)

    def unsort(self, y: torch.Tensor) -> torch.Tensor:
        """[T, ...] in sorted order -> [B, N, ...] (differentiable; the backward is the sort gather)."""
        batch, length = self.shape
        if y.shape[0] != batch * length:
            raise ValueError(f"ModalityLayout.unsort: y must have {batch * length} rows, got {tuple(y.shape)}")
        out = permute_rows(y, self.row_of.reshape(-1), self.sort_index, self.backend)
        return out.view(batch, length, *y.shape[1:])

    def unsort_groups(self, y: torch.Tensor) -> list[torch.Tensor]:
        """[G, T, ...] in sorted order (G groups, e.g. the output of a grouped ``routed_linear``) -> G tensors
        [B, N, ...], each like ``unsort(y[g])`` (differentiable). The backward gathers the G gradients straight into
        one [G, T, ...] gradient of y, where unbinding y and unsorting each group would stack them in one more copy."""
        batch, length = self.shape
        if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[1] != batch * length:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"ModalityLayout.unsort_groups: y must be a [G, {batch * length}, ...] tensor (G groups "
                             f"of the layout's rows), got {shape}")
        outs = unsort_groups_op(y, self.row_of.reshape(-1), self.sort_index, resolve_backend(self.backend, y.device))
        return [out.view(batch, length, *y.shape[2:]) for out in outs]

    def to(self, device: torch.device | str) -> ModalityLayout:
        """The same layout with its index tensors on ``device`` (unless "torch" was asked for, the implementation is
        picked again for that device)."""
        return ModalityLayout(self.n_text, self.n_vision, self.sort_index.to(device), self.row_of.to(device),
                              self.vision_mask.to(device), "torch" if self.backend == "torch" else "auto")
