"""The memory planner's computation: what one GPU holds when the trainer runs a config at a given TP × DP, and
settings that fit. ``libra_model.plan`` is its command line (with the trainer's model config and freezing rule);
the trainer calls :func:`plan_memory` itself at start. Nothing here is a hand formula:

* the state (compute-dtype weights, the float32 gradient buffers, the optimizer state = float32 masters and both
  AdamW moments) comes from the model built on the meta device, frozen and placed by the trainer's own rules
  (``freeze_language_``, the TP plan of every parameter's name); the optimizer state is divided over DP when
  ``distributed_optimizer`` is on (its default: dp > 1; ZeRO-1's reduced 1/dp gradient shard beside the full
  buffers is left out); with ``shard_gradients`` (ZeRO-2) the gradients are this
  rank's 1/dp shard plus the distributed optimizer's bound on its transient bucket buffers (the buckets laid out by
  the optimizer's own ``bucket_layout``);
* the activations come from tracing the model on the meta device at the config's micro-batch and length (each
  sample holds one image, the rest text): the bytes saved for backward, deduplicated by storage, of a model with
  one and with two decoder layers give the per-layer and the fixed part; the checkpointing mode then decides what
  is kept ("full": each layer's input, plus one layer while it is recomputed; "selective": each layer's input and
  the outputs of the operators that selective checkpointing keeps, plus one layer's recomputed rest).

An allowance for the CUDA context, NCCL's buffers and the allocator is added (:data:`ALLOWANCE_GIB`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libra_model.parallel.distributed_optimizer import DEFAULT_BUCKET_ELEMENTS, bucket_layout, transient_grad_bytes

GIB = 1024 ** 3
ALLOWANCE_GIB = 2.5  # CUDA context (~0.5-1 GiB), NCCL communicators and buffers, allocator slack


@dataclass
class MemoryPlan:
    """Bytes per GPU of one configuration (see the module docstring); ``fits`` compares ``total`` with
    ``gpu_memory``."""

    tp: int
    dp: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    allowance: int
    gpu_memory: int | None
    settings: dict

    @property
    def total(self) -> int:
        """Every part together, in bytes."""
        return self.weights + self.grads + self.optimizer + self.activations + self.allowance

    @property
    def fits(self) -> bool | None:
        """True when the total fits the GPU memory (None when no GPU memory was given)."""
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def summary(self) -> dict:
        """The JSON line: sizes in GiB (3 decimals) and ``fits``."""
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {"weights_gib": gib(self.weights), "grads_gib": gib(self.grads), "optimizer_gib": gib(self.optimizer),
                "activations_gib": gib(self.activations), "total_gib": gib(self.total), "fits": self.fits}


# ------------------------------------------------------------------------------------------------------- state
def compute_dtype(cfg, device_type: str = "cuda") -> torch.dtype:
    """The trainer's compute dtype for ``cfg.precision`` on ``device_type`` ("auto": bf16 on CUDA, fp32 elsewhere)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device_type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def _meta_model(config, frozen_language: bool, freeze):
    """The model on the meta device; ``freeze`` (the trainer's ``freeze_language_``) applied for stage 1."""
    from libra_model.model import LibraForCausalLM

    with torch.device("meta"):
        model = LibraForCausalLM(config)
    if frozen_language:
        if freeze is None:
            raise ValueError("plan: frozen_language is set but no freezing rule was given (pass freeze=)")
        freeze(model)
    return model


def _local_shape(model, name: str, param: torch.Tensor, tp: int, sequence_parallel: bool) -> tuple[int, ...]:
    """The shape of this parameter on one TP rank (the TP plan's rule for its name)."""
    rule = model.tensor_parallel_rule(name, sequence_parallel=sequence_parallel)
    shape = list(param.shape)
    if rule.shard_dim is not None and tp > 1:
        if shape[rule.shard_dim] % tp:
            raise ValueError(f"plan: {name} has {shape[rule.shard_dim]} entries along dim {rule.shard_dim}, "
                             f"not divisible by tp={tp}")
        shape[rule.shard_dim] //= tp
    return tuple(shape)


def shards_gradients(cfg, dp: int) -> bool:
    """Whether a run of ``cfg`` at ``dp`` keeps sharded gradients (ZeRO-2); ValueError when ``shard_gradients`` is
    set where the distributed optimizer is off (dp = 1, or ``distributed_optimizer`` false), as the trainer does."""
    if not getattr(cfg, "shard_gradients", False):
        return False
    if not cfg.uses_distributed_optimizer(dp):
        raise ValueError(f"TrainConfig: shard_gradients=true needs the distributed optimizer over dp > 1, which is off "
                         f"at dp={dp} (distributed_optimizer={cfg.distributed_optimizer}); set shard_gradients=false, "
                         "or run with more data-parallel replicas")
    return True


def bucket_sizes(params: list[tuple[bool, int, int]], dp: int, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
                 ) -> list[int]:
    """The padded sizes of the distributed optimizer's gradient buckets with sharded gradients, from (TP-partial?,
    local elements, ndim) of the trainable parameters in registration order (the optimizer's ``bucket_layout``)."""
    return [padded for _, _, padded in bucket_layout(params, dp, bucket_elements, shard_gradients=True)]


def state_bytes(cfg, config, tp: int, dp: int, device_type: str = "cuda", *, freeze=None) -> dict[str, int]:
    """Per-GPU bytes of the weights, the gradient buffers and the optimizer state (module docstring), from the
    model (``config``, frozen by ``freeze`` when ``cfg.frozen_language``) on the meta device. Returns
    {"weights", "grads", "optimizer"} (ints)."""
    if config.num_attention_heads % tp or config.kv_heads % tp:
        raise ValueError(f"plan: tp={tp} must divide the {config.num_attention_heads} query and {config.kv_heads} "
                         "key/value heads")
    dtype = compute_dtype(cfg, device_type)
    model = _meta_model(config, cfg.frozen_language, freeze)
    sequence_parallel = bool(cfg.sequence_parallel) and tp > 1
    weights = trainable = 0
    numels = []  # (TP-partial gradient?, local elements, ndim) of the trainable parameters, in registration order
    for name, param in model.named_parameters():
        numel = math.prod(_local_shape(model, name, param, tp, sequence_parallel))
        weights += numel * dtype.itemsize
        if param.requires_grad:
            trainable += numel
            partial = tp > 1 and model.tensor_parallel_rule(name, sequence_parallel=sequence_parallel).partial_grad
            numels.append((partial, numel, param.dim()))
    master = 4  # float32 masters, gradient buffers and AdamW moments
    optimizer = trainable * master * 2 + (trainable * master if dtype != torch.float32 else 0)
    grads = trainable * master
    if cfg.uses_distributed_optimizer(dp):
        # Masters (kept apart from the parameters even in fp32) and both moments sharded over DP. ZeRO-1's 1/dp
        # reduced gradient shard, beside its full buffers, is not counted here.
        optimizer = math.ceil(3 * trainable * master / dp)
    if shards_gradients(cfg, dp):
        buckets = bucket_sizes(numels, dp)
        reduce_itemsize = 2 if cfg.grad_reduce_dtype == "bf16" else master
        grads = sum(buckets) // dp * master + transient_grad_bytes(buckets, dp, reduce_itemsize)
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


# ------------------------------------------------------------------------------------------------- activations
class _KeptOutputs(TorchDispatchMode):
    """Adds up the output bytes of the operators that selective checkpointing keeps (by storage)."""

    def __init__(self, kept):
        super().__init__()
        self.kept, self.storages = kept, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.kept:
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    self.storages[storage._cdata] = storage.nbytes()
        return out


def _sample_layout(config, batch: int, length: int):
    """A batch of ``batch`` samples of ``length`` positions, each with one image (as many vision positions as fit)
    after a short text prefix, the rest text; its layout, with index tensors on the meta device."""
    from libra_kernels import ModalityLayout

    vision_indices = torch.full((batch, length), config.text_vision_index, dtype=torch.int64)
    image = min(config.max_vision_token_length, max(0, length - 2))
    vision_indices[:, 1:1 + image] = torch.arange(image)
    layout = ModalityLayout.from_vision_indices(vision_indices, config.max_vision_token_length, backend="torch")
    meta = ModalityLayout(layout.n_text, layout.n_vision, layout.sort_index.to("meta"), layout.row_of.to("meta"),
                          layout.vision_mask.to("meta"), backend="torch")
    return vision_indices, meta


def _trace(cfg, config, layers: int, tp: int, batch: int, length: int, dtype: torch.dtype, freeze
           ) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward of a ``layers``-layer model on the meta device, with this
    rank's TP shapes (and sequence shard). Returns {"saved", "kept", "layer_input"} in bytes."""
    from libra_model.modules.recompute import kept_ops
    from libra_model.modules.tensor_parallel import SequenceShard

    config = dataclasses.replace(config, num_hidden_layers=layers)
    model = _meta_model(config, cfg.frozen_language, freeze)
    sequence_parallel = bool(cfg.sequence_parallel) and tp > 1
    for module_name, module in model.named_modules():
        for local, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{local}" if module_name else local
            shape = _local_shape(model, name, param, tp, sequence_parallel)
            setattr(module, local, torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype),
                                                      requires_grad=param.requires_grad))
    model.train()
    vision_indices, layout = _sample_layout(config, batch, length)
    vision_indices = vision_indices.to("meta")
    ctx = model._attention_context(vision_indices, None, layout, None, None)
    if sequence_parallel:
        ctx = dataclasses.replace(ctx, sequence_shard=SequenceShard(layout.n_text, layout.n_vision, tp, 0))
    ids = torch.zeros(config.vision_codebook_num, batch, length, dtype=torch.int64, device="meta")
    signal = torch.empty(batch, length, config.contiguous_signal_size, device="meta", dtype=dtype)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    inputs: dict[int, int] = {}

    def record_input(module, args):
        storage = args[0].untyped_storage()
        inputs[storage._cdata] = storage.nbytes()

    hooks = [layer.register_forward_pre_hook(record_input) for layer in model.model.layers]
    mode = _KeptOutputs(kept_ops())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        hidden = model.model(ids, layout, ctx, signal)
        heads = model._head_inputs(hidden, layout, vision_indices, None)
        model.loss(heads, layout, ids)
    for hook in hooks:
        hook.remove()
    return {"saved": sum(saved.values()), "kept": sum(mode.storages.values()),
            "layer_input": max(inputs.values()) if inputs else 0}


def activation_bytes(cfg, config, tp: int, device_type: str = "cuda", *, freeze=None) -> int:
    """Per-GPU bytes kept for backward over one micro-batch of ``cfg.micro_batch_size`` × the config's length
    (``max_length``, else the model's context) under ``cfg.activation_checkpointing``."""
    from libra_model.modules.recompute import check_mode

    dtype = compute_dtype(cfg, device_type)
    length = cfg.max_length or config.max_position_embeddings
    one = _trace(cfg, config, 1, tp, cfg.micro_batch_size, length, dtype, freeze)
    two = _trace(cfg, config, 2, tp, cfg.micro_batch_size, length, dtype, freeze)
    layer = {key: two[key] - one[key] for key in ("saved", "kept")}
    fixed = one["saved"] - layer["saved"]
    layers = config.num_hidden_layers
    mode = check_mode(cfg.activation_checkpointing)
    if mode is False:
        return fixed + layers * layer["saved"]
    if mode == "full":
        return fixed + layers * one["layer_input"] + layer["saved"]
    kept = one["layer_input"] + layer["kept"]
    return fixed + layers * kept + max(0, layer["saved"] - kept)


# -------------------------------------------------------------------------------------------------------- plan
def plan_memory(cfg, config, *, tp: int | None = None, dp: int = 1, gpu_memory_gib: float | None = None,
                device_type: str = "cuda", freeze=None) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` (a ``TrainConfig``) with model ``config`` (a ``LibraConfig``) at ``tp``
    (default ``cfg.tp``) × ``dp``; ``freeze``: the trainer's stage-1 freezing rule."""
    from libra_model.modules.recompute import check_mode

    tp = cfg.tp if tp is None else tp
    if tp < 1 or dp < 1:
        raise ValueError(f"plan: tp and dp must be positive, got tp={tp}, dp={dp}")
    state = state_bytes(cfg, config, tp, dp, device_type, freeze=freeze)
    activations = activation_bytes(cfg, config, tp, device_type, freeze=freeze)
    settings = {"tp": tp, "dp": dp, "micro_batch_size": cfg.micro_batch_size,
                "activation_checkpointing": check_mode(cfg.activation_checkpointing),
                "sequence_parallel": bool(cfg.sequence_parallel) and tp > 1,
                "distributed_optimizer": cfg.uses_distributed_optimizer(dp),
                "shard_gradients": shards_gradients(cfg, dp)}
    return MemoryPlan(tp=tp, dp=dp, activations=activations, allowance=int(ALLOWANCE_GIB * GIB),
                      gpu_memory=None if gpu_memory_gib is None else int(gpu_memory_gib * GIB), settings=settings,
                      **state)


def alternatives(cfg, config, *, tp: int, dp: int, gpu_memory_gib: float, limit: int = 5, freeze=None
                 ) -> list[MemoryPlan]:
    """Plans on the same number of GPUs (tp·dp) that fit ``gpu_memory_gib``: TP up to 8 within the heads, each
    checkpointing mode, sequence parallelism, sharded gradients (where the distributed optimizer runs: dp > 1),
    smaller micro-batches (the global batch kept, the accumulation grows). The least recomputation first, then
    without sharded gradients (one gradient reduction per step, not per micro-batch), then the largest
    micro-batch."""
    gpus = tp * dp
    per_replica = lambda d: cfg.global_batch_size // d  # noqa: E731
    found = []
    for t in (1, 2, 4, 8):
        if gpus % t or config.num_attention_heads % t or config.kv_heads % t:
            continue
        d = gpus // t
        if cfg.global_batch_size % d:
            continue
        sharding = (False, True) if cfg.uses_distributed_optimizer(d) else (False,)
        for mode in (False, "selective", "full"):
            for sequence_parallel in ((False, True) if t > 1 else (False,)):
                micro, fitted = cfg.micro_batch_size, False
                while micro >= 1 and not fitted:
                    if per_replica(d) % micro == 0:
                        for shard in sharding:  # the largest micro-batch that fits, unsharded gradients if they fit
                            trial = dataclasses.replace(cfg, tp=t, micro_batch_size=micro, shard_gradients=shard,
                                                        activation_checkpointing=mode,
                                                        sequence_parallel=sequence_parallel)
                            candidate = plan_memory(trial, config, tp=t, dp=d, gpu_memory_gib=gpu_memory_gib,
                                                    freeze=freeze)
                            if candidate.fits:
                                found.append(candidate)
                                fitted = True
                                break
                    micro //= 2
    order = {False: 0, "selective": 1, "full": 2}
    found.sort(key=lambda p: (order[p.settings["activation_checkpointing"]], p.settings["shard_gradients"],
                              -p.settings["micro_batch_size"], p.tp, p.total))
    return found[:limit]


def format_plan(plan_: MemoryPlan) -> str:
    """The per-GPU table of a plan."""
    grads = ("float32 gradient shard + transient buckets" if plan_.settings.get("shard_gradients")
             else "float32 gradient buffers")
    rows = [("bf16/fp32 weights (this rank's TP shard)", plan_.weights), (grads, plan_.grads),
            ("optimizer state (fp32 masters + AdamW moments)", plan_.optimizer),
            ("activations (one micro-batch)", plan_.activations),
            ("CUDA context, NCCL, allocator allowance", plan_.allowance), ("total", plan_.total)]
    settings = ", ".join(f"{k}={v}" for k, v in plan_.settings.items())
    lines = [f"memory per GPU ({settings})"]
    lines += [f"  {label:<50} " + (f"{value / GIB:8.2f} GiB" if value >= GIB else f"{value / 2**20:8.2f} MiB")
              for label, value in rows]
    if plan_.gpu_memory is not None:
        verdict = "fits" if plan_.fits else "does NOT fit"
        lines.append(f"  {verdict} in {plan_.gpu_memory / GIB:.0f} GiB")
    return "\n".join(lines)
