"""Helpers shared by the tests and the benchmarks: the one tolerance rule, random inputs in Libra's layouts, and
a spawn-based process-group runner for distributed checks on gloo.

Tolerance rule (docs/operators.md, "Tolerance rule and tests"; flash-attn's): a kernel's error against a float64
reference may be at most ``ERROR_FACTOR`` times the error of the PyTorch reference computed in the same low precision,
plus a floor that scales with the magnitude of the result (``FLOORS[dtype]``).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

import torch

ERROR_FACTOR = 2.0
# dtype -> (absolute floor, floor relative to the largest |reference| value)
FLOORS = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 8e-3),
}


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close_to_ref(actual: torch.Tensor, reference: torch.Tensor, same_precision_reference: torch.Tensor | None,
                        dtype: torch.dtype, name: str = "output") -> None:
    """Assert ``actual`` is as close to the float64 ``reference`` as PyTorch itself manages in ``dtype``.

    ``same_precision_reference`` is the PyTorch reference computed in ``dtype`` (None when ``actual`` is itself the
    reference path, which then must match within the floor alone).
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if not torch.isfinite(actual.detach()).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    atol, rtol = FLOORS[dtype]
    scale = reference.detach().double().abs().max().item() if reference.numel() else 0.0
    allowed = atol + rtol * scale
    if same_precision_reference is not None:
        allowed += ERROR_FACTOR * max_abs_error(same_precision_reference, reference)
    error = max_abs_error(actual, reference)
    if error > allowed:
        raise AssertionError(f"{name}: max abs error {error:.3e} exceeds the allowed {allowed:.3e} for {dtype} "
                             f"(max |reference| = {scale:.3e})")


def random_vision_mask(batch: int, length: int, mix: str = "random", generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """bool [B, N] vision mask. ``mix``: "random" (one image span of random length and place per row, lengths 0..N),
    "text" (no vision token), "vision" (all vision), "start" / "middle" / "end" (an image span of about half the row
    at that place)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    if mix == "vision":
        mask[:] = True
    elif mix in ("start", "middle", "end"):
        span = max(1, length // 2)
        start = {"start": 0, "middle": (length - span) // 2, "end": length - span}[mix]
        mask[:, start:start + span] = True
    elif mix == "random":
        for b in range(batch):
            span = int(torch.randint(0, length + 1, (), generator=generator))
            start = int(torch.randint(0, length - span + 1, (), generator=generator))
            mask[b, start:start + span] = True
    elif mix != "text":
        raise ValueError(f"unknown mix {mix!r}")
    return mask.to(device)


def random_labels(n_text: int, n_vision: int, vocab: int, vision_vocab: int, codebooks: int,
                  ignore_fraction: float = 0.2, ignore_index: int = -100,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [C, T] labels in Libra's combined id space for a sorted layout (text rows first), with a fraction of
    targets set to ignore_index (the same text positions in every codebook row)."""
    text = torch.randint(0, vocab, (n_text,), generator=generator)
    text = torch.where(torch.rand(n_text, generator=generator) < ignore_fraction, ignore_index, text)
    vision = torch.randint(vocab, vocab + vision_vocab, (codebooks, n_vision), generator=generator)
    vision = torch.where(torch.rand(codebooks, n_vision, generator=generator) < ignore_fraction, ignore_index, vision)
    return torch.cat([text.expand(codebooks, n_text), vision], dim=1).contiguous()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_in_process_group(fn: Callable, world_size: int = 2, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a gloo process group.
    ``fn`` must be a module-level function; an exception in any rank is re-raised here with its traceback."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, errors), nprocs=world_size,
                           start_method="spawn")
    except mp.ProcessRaisedException:
        pass
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        raise AssertionError("\n".join(f"rank {rank} failed:\n{text}" for rank, text in sorted(failures)))


def check_against_reference(op: Callable, reference: Callable, inputs: dict, dtype: torch.dtype,
                            grad_inputs: tuple[str, ...] = (), name: str = "") -> None:
    """Compare ``op(**inputs)`` in ``dtype`` with ``reference`` in float64, output and gradients.

    ``inputs`` holds float64 tensors (cast to ``dtype`` for the run; non-floating tensors and other values are
    passed as they are). The gradients of ``grad_inputs`` under a random cotangent are compared too, each with the
    tolerance rule of :func:`assert_close_to_ref` against the reference run in ``dtype``.
    """
    cotangent = None

    def run(fn, run_dtype):
        nonlocal cotangent
        leaves = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().to(run_dtype).requires_grad_(key in grad_inputs)
            leaves[key] = value
        out = fn(**leaves)
        if cotangent is None:
            cotangent = torch.randn(out.shape, dtype=torch.float64, device=out.device)
        grads = {}
        if grad_inputs:
            wanted = [leaves[key] for key in grad_inputs]
            values = torch.autograd.grad(out, wanted, cotangent.to(out.dtype), allow_unused=True)
            grads = {key: (g if g is not None else torch.zeros_like(leaves[key]))
                     for key, g in zip(grad_inputs, values)}
        return out.detach(), grads

    expected, expected_grads = run(reference, torch.float64)
    actual, actual_grads = run(op, dtype)
    same = None if dtype == torch.float64 else run(reference, dtype)
    prefix = f"{name}: " if name else ""
    assert_close_to_ref(actual, expected, None if same is None else same[0], dtype, f"{prefix}output")
    for key in grad_inputs:
        assert_close_to_ref(actual_grads[key], expected_grads[key], None if same is None else same[1][key], dtype,
                            f"{prefix}grad of {key}")


def assert_graph_replays_like_eager(fn: Callable, args: tuple, grad: torch.Tensor, replays: int = 2) -> None:
    """Capture ``fn(*args)`` (float32 CUDA leaves) with ``torch.cuda.make_graphed_callables`` and replay it on fresh
    inputs: output and every input gradient must equal an eager call of ``fn`` within the float32 floor (the same
    kernels on the same inputs). Replayed more than once, so the graph cannot depend on state left by the capture."""
    graphed = torch.cuda.make_graphed_callables(fn, args)
    for _ in range(replays):
        fresh = [t.detach().clone().normal_().requires_grad_() for t in args]
        out = graphed(*fresh)
        out.backward(grad)
        eager_leaves = [t.detach().requires_grad_() for t in fresh]
        expected = fn(*eager_leaves)
        expected.backward(grad)
        assert_close_to_ref(out, expected, None, torch.float32, "graphed output")
        for i, (got, want) in enumerate(zip(fresh, eager_leaves)):
            assert_close_to_ref(got.grad, want.grad, None, torch.float32, f"graphed grad {i}")
