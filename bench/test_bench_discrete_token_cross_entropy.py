"""Discrete-token softmax forward+backward: the fused operator against, in the same run, Libra's reference
(concatenated logits padded with -inf), a per-modality eager loss with float32 logits
(``discrete_token_cross_entropy_ref``) and, when importable, Liger's and Cut Cross-Entropy's fused linear
cross-entropies applied per modality (they are not dependencies). Ratios are against the fastest of the
per-modality baselines (docs/performance.md: target <= 0.85); memory is compared with Cut Cross-Entropy's when it runs
(target <= 1.0)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from common import measure, peak_memory_mib

from libra_kernels import discrete_token_cross_entropy, discrete_token_cross_entropy_ref
from libra_kernels.ops.discrete_token_cross_entropy import TABLE
from libra_kernels.testing import random_labels

# (name, T, n_text, hidden, V, Vv, C): the pre and sft mixes of docs/performance.md with LLaMA-2-7B heads; small ones on
# the CPU.
GPU_SHAPES = [("pre", 5120, 512, 4096, 32000, 514, 2), ("sft", 4096, 2949, 4096, 32000, 514, 2)]
CPU_SHAPES = [("pre/small", 640, 64, 256, 4000, 514, 2), ("sft/small", 512, 369, 256, 4000, 514, 2)]
PER_MODALITY_BASELINES = ("per-modality eager (fp32 logits)", "liger fused linear CE per modality",
                          "cut cross-entropy per modality")


def concatenated_logits_loss(h, n_text, w_text, w_vision, labels):
    """Libra's reference (docs/model.md §7-§8): [C, T, V + Vv] logits, -inf outside the row's modality, one
    cross-entropy per codebook in float32, averaged over codebooks."""
    text = h[:n_text] @ w_text.T
    losses = []
    for c in range(w_vision.shape[0]):
        vision = h[n_text:] @ w_vision[c].T
        logits = torch.cat([F.pad(text, (0, vision.shape[1]), value=float("-inf")),
                            F.pad(vision, (text.shape[1], 0), value=float("-inf"))])
        losses.append(F.cross_entropy(logits.float(), labels[c]))
    return torch.stack(losses).mean()


def per_modality(fused_sum):
    """Libra's mean loss from a fused linear cross-entropy ``fused_sum(h, weight, targets) -> summed loss``, called
    once for the text rows and once per codebook."""
    def loss(h, n_text, w_text, w_vision, labels):
        vocab = w_text.shape[0]
        text = fused_sum(h[:n_text], w_text, labels[0, :n_text])
        means = []
        for c in range(w_vision.shape[0]):
            target = labels[c, n_text:]
            vision = fused_sum(h[n_text:], w_vision[c], target.where(target == -100, target - vocab))
            means.append((text + vision) / (labels[c] != -100).sum().clamp(min=1))
        return torch.stack(means).mean()
    return loss


def _liger():
    module = importlib.import_module("liger_kernel.transformers.functional")
    return per_modality(lambda h, w, t: module.liger_fused_linear_cross_entropy(h, w, t, reduction="sum"))


def _cut_cross_entropy():
    module = importlib.import_module("cut_cross_entropy")
    return per_modality(lambda h, w, t: module.linear_cross_entropy(h, w, t, reduction="sum"))


def _candidates(device):
    """label -> loss function, or the reason it cannot run here."""
    candidates = {"reference concatenated logits": concatenated_logits_loss,
                  "per-modality eager (fp32 logits)": discrete_token_cross_entropy_ref}
    for label, make in (("liger fused linear CE per modality", _liger),
                        ("cut cross-entropy per modality", _cut_cross_entropy)):
        if device.type != "cuda":
            candidates[label] = "skipped: needs a CUDA device"
            continue
        try:
            candidates[label] = make()
        except ImportError as error:
            candidates[label] = f"skipped: not installed ({error.name})"
    for backend, kernel in TABLE.kernels.items():
        if not kernel.unavailable(device):
            candidates[f"libra {backend}"] = (lambda b: lambda *a: discrete_token_cross_entropy(*a, backend=b))(backend)
    return candidates


def _fwd_bwd(fn, leaves, n_text, labels):
    def step():
        for t in leaves:
            t.grad = None
        fn(leaves[0], n_text, leaves[1], leaves[2], labels).backward()
    return step


@pytest.mark.parametrize("shape", range(2))
def test_discrete_token_cross_entropy(benchmark, record, device, shape):
    name, rows, n_text, hidden, vocab, vision_vocab, codebooks = (GPU_SHAPES if device.type == "cuda"
                                                                  else CPU_SHAPES)[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_()
    h = make(rows, hidden)
    w_text, w_vision = make(vocab, hidden, scale=hidden**-0.5), make(codebooks, vision_vocab, hidden,
                                                                     scale=hidden**-0.5)
    labels = random_labels(n_text, rows - n_text, vocab, vision_vocab, codebooks, ignore_fraction=0.1).to(device)
    results, skipped = {}, {}
    for label, fn in _candidates(device).items():
        if isinstance(fn, str):
            skipped[label] = fn
            print(f"\n{label}: {fn}")
            continue
        step = _fwd_bwd(fn, (h, w_text, w_vision), n_text, labels)
        try:
            results[label] = dict(measure(step, device), peak_mib=peak_memory_mib(step, device))
        except Exception as error:  # an outside package that fails on these shapes must not hide our numbers
            if label not in PER_MODALITY_BASELINES[1:]:
                raise
            skipped[label] = f"skipped: failed ({type(error).__name__}: {error})"[:200]
            print(f"\n{label}: {skipped[label]}")
    # Pretraining reality: the text head is frozen, so the fused operator does no text dW work at all.
    frozen = _fwd_bwd(lambda *a: discrete_token_cross_entropy(*a), (h, w_text.detach(), w_vision), n_text, labels)
    results["libra auto, frozen text head"] = dict(measure(frozen, device), peak_mib=peak_memory_mib(frozen, device))
    fastest = "libra " + TABLE.resolve("auto", device)
    benchmark.pedantic(_fwd_bwd(_candidates(device)[fastest], (h, w_text, w_vision), n_text, labels), rounds=3,
                       warmup_rounds=1)
    present = [label for label in PER_MODALITY_BASELINES if label in results]
    baseline = min(present, key=lambda label: results[label]["ms"])
    cce = results.get("cut cross-entropy per modality")
    for label, result in results.items():
        row = dict(op="discrete_token_cross_entropy fwd+bwd", shape=name, dtype=str(dtype).split(".")[-1],
                   impl=label, **result, ratio=result["ms"] / results[baseline]["ms"], baseline=baseline)
        if cce is not None and result["peak_mib"] is not None:
            row["memory_ratio_vs_cce"] = result["peak_mib"] / cce["peak_mib"]
        record("discrete_token_cross_entropy", row)
    for label, reason in skipped.items():
        record("discrete_token_cross_entropy", dict(op="discrete_token_cross_entropy fwd+bwd", shape=name,
                                                    dtype=str(dtype).split(".")[-1], impl=f"{label} ({reason})"))
    benchmark.extra_info.update({k: v["ms"] for k, v in results.items()}, skipped=skipped)
