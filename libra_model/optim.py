"""AdamW with float32 master weights and float32 gradient buffers, and the warm-up + cosine schedule of the
paper's Table 4 (docs/parallel.md, "The trainer and its settings"): betas (0.9, 0.99), eps 1e-8, weight decay 0.01
not on norm weights or biases, linear warm-up then cosine decay to 0).

The model's parameters may be bfloat16 (the compute dtype); each trainable one then gets a float32 master copy
that AdamW updates and that is copied back after every step. Gradients of every micro-batch are added, in float32,
into two flat buffers (TP-partial parameters and the rest) by a post-accumulate hook, so accumulation does not lose
bf16 precision and the per-step reduction (``parallel.grads``) is one collective per buffer. Frozen parameters
(``requires_grad`` False) get no buffer, no master copy and no optimizer state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from libra_model.parallel.grads import clip_coefficient, global_grad_norm, reduce_gradients_
from libra_model.parallel.tp_plan import is_tp_partial, is_tp_sharded

ADAMW_BETAS = (0.9, 0.99)
ADAMW_EPS = 1e-8


def warmup_cosine_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak_lr`` over ``warmup_steps``
    (the first step already uses peak_lr/warmup_steps, so no step is wasted at lr 0), then cosine decay to
    ``min_lr`` at ``total_steps``."""
    if step < 0 or total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"warmup_cosine_lr: need step >= 0, total_steps > 0, warmup_steps >= 0; got step={step}, "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for norm weights and biases (and any 1-D parameter of a norm), which AdamW does not decay."""
    return "norm" in name.rsplit(".", 1)[0].lower() or name.endswith("bias")


class MasterAdamW:
    """AdamW over the trainable parameters of ``model`` with float32 masters and float32 flat gradient buffers.

    Args:
        model: the (already TP-sharded) model. Parameters with ``requires_grad`` False are ignored.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``lr`` is overwritten by :meth:`step`'s argument).
        master_dtype: dtype of the master weights, the gradient buffers and the AdamW state (float32; float64 in
            parity tests).
        initial_masters: name -> full-precision values to start the masters from (when the model's parameters were
            already rounded to a lower compute dtype); default: the parameters themselves.

    Per step: ``backward`` of each micro-batch (the hooks fill the buffers), between :meth:`start_micro_batch` and
    :meth:`finish_micro_batch` (no-ops here; the interface both optimizers share) → :meth:`reduce` → :meth:`clip_` →
    :meth:`step` → :meth:`zero_grad`. Names are the model's parameter names, in sorted order everywhere.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-4, betas: tuple[float, float] = ADAMW_BETAS,
                 eps: float = ADAMW_EPS, weight_decay: float = 0.01, master_dtype: torch.dtype = torch.float32,
                 initial_masters: dict[str, torch.Tensor] | None = None):
        named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if not named:
            raise ValueError("MasterAdamW: the model has no trainable parameter (every requires_grad is False)")
        self.names = [n for n, _ in named]
        self.params = dict(named)
        self.master_dtype = master_dtype
        device = named[0][1].device
        partial = [(n, p) for n, p in named if is_tp_partial(p)]
        other = [(n, p) for n, p in named if not is_tp_partial(p)]
        self.partial_buffer = torch.zeros(sum(p.numel() for _, p in partial), dtype=master_dtype, device=device)
        self.other_buffer = torch.zeros(sum(p.numel() for _, p in other), dtype=master_dtype, device=device)
        self.main_grads: dict[str, torch.Tensor] = {}
        for buffer, group in ((self.partial_buffer, partial), (self.other_buffer, other)):
            offset = 0
            for name, param in group:
                self.main_grads[name] = buffer[offset:offset + param.numel()].view(param.shape)
                offset += param.numel()
        self.masters: dict[str, torch.Tensor] = {}
        initial_masters = initial_masters or {}
        for name, param in named:
            if param.dtype == master_dtype:
                self.masters[name] = param
            else:
                start = initial_masters.get(name, param).detach()
                if start.shape != param.shape:
                    raise ValueError(f"MasterAdamW: initial_masters[{name!r}] has shape {tuple(start.shape)}, the "
                                     f"parameter {tuple(param.shape)}")
                self.masters[name] = nn.Parameter(start.to(device=param.device, dtype=master_dtype).clone(),
                                                  requires_grad=False)
            param.register_post_accumulate_grad_hook(self._accumulate_hook(name))
        decay = [self.masters[n] for n in self.names if not no_weight_decay(n, self.params[n])]
        no_decay = [self.masters[n] for n in self.names if no_weight_decay(n, self.params[n])]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
        for name in self.names:
            # Eager state, so a checkpoint can be loaded into it in place before the first step.
            master = self.masters[name]
            self.optimizer.state[master] = {"step": torch.zeros((), dtype=torch.float32),
                                            "exp_avg": torch.zeros_like(master, memory_format=torch.preserve_format),
                                            "exp_avg_sq": torch.zeros_like(master,
                                                                           memory_format=torch.preserve_format)}

    def _accumulate_hook(self, name: str):
        main = self.main_grads[name]

        def hook(param: torch.Tensor) -> None:
            main.add_(param.grad)
            param.grad = None

        return hook

    # ------------------------------------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        """Zero both gradient buffers (call after :meth:`step`)."""
        self.partial_buffer.zero_()
        self.other_buffer.zero_()

    def start_micro_batch(self, last: bool) -> None:
        """Called before each micro-batch's backward (``last``: the step's last one). Nothing to do: this optimizer
        reduces its buffers only in :meth:`reduce` (the distributed optimizer starts its bucket reductions here)."""

    def finish_micro_batch(self) -> None:
        """Called after each micro-batch's backward. Nothing to do (the distributed optimizer with sharded gradients
        finishes the micro-batch's bucket reductions here)."""

    def reduce(self, parallel) -> None:
        """The one deferred reduction of the step (``parallel``: a ``ParallelState``)."""
        reduce_gradients_(self.partial_buffer, self.other_buffer, dp_group=parallel.dp_group,
                          world_group=parallel.world_group, tp_group=parallel.tp_group)

    def grad_norm(self, parallel) -> torch.Tensor:
        """The full model's gradient L2 norm (float32 scalar, equal on every rank); call after :meth:`reduce`."""
        sharded = [self.main_grads[n] for n in self.names if is_tp_sharded(self.params[n])]
        replicated = [self.main_grads[n] for n in self.names if not is_tp_sharded(self.params[n])]
        return global_grad_norm(sharded, replicated, tp_group=parallel.tp_group, tp_rank=parallel.tp_rank)

    def clip_(self, parallel, max_norm: float | None) -> torch.Tensor:
        """Compute the global gradient norm and scale the buffers to at most ``max_norm`` (None: no clipping).
        Returns the norm before clipping."""
        norm = self.grad_norm(parallel)
        if max_norm is not None:
            coefficient = clip_coefficient(norm, max_norm).to(self.master_dtype)
            self.partial_buffer.mul_(coefficient)
            self.other_buffer.mul_(coefficient)
        return norm

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step at learning rate ``lr`` from the (reduced, clipped) buffers; masters are copied back into
        lower-precision model parameters."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name in self.names:
            self.masters[name].grad = self.main_grads[name]
        self.optimizer.step()
        for name in self.names:
            master, param = self.masters[name], self.params[name]
            master.grad = None
            if master is not param:
                param.copy_(master)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank allocates for training state: "weights" (the trainable parameters), "grads" (the flat
        gradient buffers), "optimizer" (separate masters, when the parameters have a lower dtype, and both moments)."""
        size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
        state = [s[k] for s in self.named_state().values() for k in ("exp_avg", "exp_avg_sq")]
        masters = [self.masters[n] for n in self.names if self.masters[n] is not self.params[n]]
        return {"weights": size(self.params.values()), "grads": size([self.partial_buffer, self.other_buffer]),
                "optimizer": size(masters) + size(state)}

    # ------------------------------------------------------------------------------------------ checkpoint
    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {"exp_avg", "exp_avg_sq", "step"} (the live AdamW state tensors, for checkpointing in place)."""
        return {name: self.optimizer.state[self.masters[name]] for name in self.names}

    def master_params(self) -> dict[str, torch.Tensor]:
        """name -> float master tensor (the parameter itself when it already has the master dtype)."""
        return dict(self.masters)

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """Copy the masters into the model's parameters (after loading masters from a checkpoint)."""
        for name in self.names:
            if self.masters[name] is not self.params[name]:
                self.params[name].copy_(self.masters[name])
