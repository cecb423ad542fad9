"""The modality layout: building it from a vision mask, and sorting [B, N, D] hidden states into the [T, D] layout
and back, forward+backward, for each backend of ``ModalityLayout`` against the boolean-mask gathers a plain
implementation uses (``x[~mask]``, ``x[mask]`` and the scatter back). Sorting is a row permutation, so the GB/s
column counts the bytes any implementation moves: read and write every row once per gather, forward and backward.

GPU: the pre and sft mixes (docs/performance.md) at LLaMA-2-7B width in bfloat16. CPU: a quarter of the rows,
float32 (not a performance target).
"""

import pytest
import torch
from common import measure, peak_memory_mib

from libra_kernels import ModalityLayout
from libra_kernels.ops.modality_layout import TABLE

# (name, B, N, image length, D): pre = 8 rows of 640 tokens, one image each; sft = 2 rows of 2048, one image each.
GPU_SHAPES = [("pre", 8, 640, 578, 4096), ("sft", 2, 2048, 578, 4096)]
CPU_SHAPES = [("pre/4", 2, 640, 578, 4096), ("sft/4", 1, 1024, 289, 4096)]


def _mask(batch, length, image, device):
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for b in range(batch):
        start = (7 * b + 5) % (length - image)
        mask[b, start:start + image] = True
    return mask


def _boolean_mask_round_trip(x, mask):
    """Text rows then vision rows by boolean indexing, then the scatter back into sequence order."""
    flat, flags = x.reshape(-1, x.shape[-1]), mask.reshape(-1)
    sorted_rows = torch.cat([flat[~flags], flat[flags]])
    out = torch.empty_like(flat)
    n_text = int((~flags).sum())
    out = out.index_put((~flags,), sorted_rows[:n_text]).index_put((flags,), sorted_rows[n_text:])
    return out.view_as(x)


@pytest.mark.parametrize("shape", range(2))
def test_modality_layout(benchmark, record, device, shape):
    name, batch, length, image, width = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mask = _mask(batch, length, image, device)
    x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    candidates = {"boolean mask + index_put": lambda: torch.autograd.grad(_boolean_mask_round_trip(x, mask), x, grad)}
    builds = {}
    for backend, kernel in TABLE.kernels.items():
        if kernel.unavailable(device):
            continue
        layout = ModalityLayout.from_vision_mask(mask, backend=backend)
        candidates[f"libra {backend}"] = (lambda lay: lambda: torch.autograd.grad(lay.unsort(lay.sort(x)), x, grad))(
            layout)
        builds[f"libra {backend}"] = (lambda b: lambda: ModalityLayout.from_vision_mask(mask, backend=b))(backend)
    results = {label: dict(measure(step, device), peak_mib=peak_memory_mib(step, device))
               for label, step in candidates.items()}
    fastest = f"libra {TABLE.resolve('auto', device)}"
    benchmark.pedantic(candidates[fastest], rounds=5, warmup_rounds=1)
    base = results["boolean mask + index_put"]["ms"]
    # sort and unsort forward, their two gathers backward: four row permutations, each reading and writing T rows
    min_bytes = 4 * 2 * batch * length * width * x.element_size()
    for label, result in results.items():
        record("modality_layout", dict(op="sort + unsort fwd+bwd", shape=name, dtype=str(dtype).split(".")[-1],
                                       impl=label, **result, gbps=min_bytes / result["ms"] / 1e6,
                                       ratio=result["ms"] / base, baseline="boolean mask + index_put"))
    for label, build in builds.items():
        record("modality_layout", dict(op="ModalityLayout.from_vision_mask", shape=name, dtype="bool", impl=label,
                                       **measure(build, device)))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()})
