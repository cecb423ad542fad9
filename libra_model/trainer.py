"""The Libra trainer: Megatron-style TP with DP on top, gradient accumulation, float32 master weights, DCP
checkpoints with exact resume, progress lines with tokens/s and an MFU estimate, ``metrics.jsonl``, TensorBoard when
installed, and a caption generated for held-out images at the end.

``TrainConfig`` holds every setting (flat keys, so a YAML file and ``--set key=value`` address them the same way).
Its defaults are the embedded default run: a tiny Libra trained on generated coloured shapes with captions, which
takes a few minutes on a laptop CPU and shows a clearly falling loss. ``configs/pretrain.yaml`` and
``configs/sft.yaml`` hold the paper's two stages (its Table 4; docs/parallel.md, "The trainer and its
settings").

Step structure (``libra_model.train_step``): each DP replica draws ``global_batch_size / dp`` samples per step
as ``grad_accum`` micro-batches of ``micro_batch_size``; the loss is Libra's loss over the whole global batch
(``loss_normalization: global_tokens``) unless ``mean_of_microbatches`` is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from libra_model.config import LibraConfig
from libra_model.memory import shards_gradients
from libra_model.optim import MasterAdamW, warmup_cosine_lr
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.parallel.distributed_optimizer import REDUCE_DTYPES, DistributedMasterAdamW
from libra_model.parallel.mesh import ParallelState, init_parallel, seed_everything
from libra_model.train_step import NORMALIZATIONS, train_step

logger = logging.getLogger("libra_model.trainer")
PRECISIONS = ("auto", "fp32", "bf16")
_FLOAT_FIELDS = ("lr", "min_lr", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                 "max_grad_norm", "dist_timeout_s")


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the embedded default run (see the module docstring)."""

    # model
    model: str = "tiny"  # "tiny" | "libra_11b" (LibraConfig presets) | a directory holding a Libra config.json
    model_overrides: dict = field(default_factory=lambda: {"vocab_size": 128, "hidden_size": 128,
                                                           "intermediate_size": 256})
    init_libra: str | None = None  # a Libra HF checkpoint directory to start from (released or ours)
    init_llama: str | None = None  # a LLaMA-2 HF directory: language weights from it, vision parts initialised
    processor: str | None = None  # a processor directory; None (shapes only): generate one in output_dir
    backend: str = "auto"
    # data
    dataset: str = "shapes"  # "shapes" | "webdataset" | "coco" | "llava"
    data_shards: str | list | None = None
    data_annotation_file: str | None = None
    data_image_root: str | None = None
    data_num_samples: int = 20000  # size of the generated shapes set
    max_length: int | None = None  # truncation after image splicing (700 in pretraining, 2048 in SFT)
    caption_eos: bool = True  # end captions with a target EOS so generation stops (the paper's pretraining: false)
    prefetch: int = 0
    pack_sequences: bool = False  # pack samples into rows of max_length tokens (null: max_position_embeddings)
    pack_buffer: int = 256  # samples packed together (libra_model.data.packing.pack_documents)
    # optimisation
    max_steps: int = 800
    global_batch_size: int = 32
    micro_batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int | None = None  # None: warmup_ratio · max_steps
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    loss_normalization: str = "global_tokens"
    label_smoothing: float = 0.0  # passed to the model's loss (LibraForCausalLM.loss)
    z_loss_weight: float = 0.0
    frozen_language: bool = False  # stage 1: only parameters named "*vision*" train
    precision: str = "auto"  # "auto" = bf16 compute on CUDA, fp32 on the CPU; master weights are always fp32
    activation_checkpointing: str | bool = False  # "full" (true) | "selective" | false (modules/recompute.py)
    seed: int = 42
    tp: int = 1
    distributed_optimizer: bool | None = None  # shard masters + AdamW moments over DP (ZeRO-1); None: when dp > 1
    grad_reduce_dtype: str = "fp32"  # dtype of the DP gradient reduction: "fp32" | "bf16" (distributed optimizer)
    shard_gradients: bool = False  # ZeRO-2: keep 1/dp of the fp32 gradients, reduce-scatter every micro-batch
    sequence_parallel: bool = False  # with tp > 1: norms, adds and dropout on a 1/tp shard of the rows
    # output
    output_dir: str = "runs/default"
    log_every: int = 10
    save_every: int = 100
    keep_last: int | None = 2  # keep this many newest checkpoints (>= 1), null: keep all
    save_frozen: bool = True
    resume: bool = False
    resume_fresh_if_none: bool = False  # with resume: start from scratch when no checkpoint verifies (else stop)
    max_skipped_updates: int = 5  # consecutive non-finite steps (skipped updates) that stop the run
    dist_timeout_s: float = 600.0  # collective timeout of the process group: a stalled rank ends the job
    export_hf: bool = True
    caption_samples: int = 3
    caption_max_new_tokens: int = 24
    # held-out evaluation (libra_model.eval.heldout): val_loss and, for caption data, caption metrics
    eval_every: int = 0  # steps between evaluations; 0: only after the last step
    eval_samples: int = 32  # held-out samples (and images captioned); 0 turns evaluation off
    eval_data: str | list | None = None  # held-out annotation file (coco/llava) or shards (webdataset)
    tensorboard: bool = True
    debug_checks: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (types, ranges and the relations between settings)."""
        def number(name, low=None, high=None, *, low_open=False, high_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig: {name} must be a finite number{' or null' if optional else ''}, "
                                 f"got {value!r}")
            too_low = low is not None and (value <= low if low_open else value < low)
            too_high = high is not None and (value >= high if high_open else value > high)
            if too_low or too_high:
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
                raise ValueError(f"TrainConfig: {name} must be in {span}, got {value!r}")

        def integer(name, low, *, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a positive int" if low == 1 else f"an int >= {low}"
                raise ValueError(f"TrainConfig: {name} must be {kind}{' or null' if optional else ''}, got {value!r}")

        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "save_every", "tp",
                     "data_num_samples", "max_skipped_updates"):
            integer(name, 1)
        integer("keep_last", 1, optional=True)
        integer("max_length", 1, optional=True)
        integer("warmup_steps", 0, optional=True)
        for name in ("prefetch", "seed", "caption_samples", "caption_max_new_tokens"):
            integer(name, 0)
        if self.micro_batch_size > self.global_batch_size:
            raise ValueError(f"TrainConfig: micro_batch_size ({self.micro_batch_size}) must be <= global_batch_size "
                             f"({self.global_batch_size})")
        if self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"TrainConfig: warmup_steps ({self.warmup_steps}) must be <= max_steps "
                             f"({self.max_steps})")
        for name in ("eval_every", "eval_samples"):
            integer(name, 0)
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"TrainConfig: loss_normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.loss_normalization!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        number("label_smoothing", 0.0, 1.0)
        number("z_loss_weight", 0.0)
        number("lr", 0.0, low_open=True)
        number("min_lr", 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        number("warmup_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("adam_beta1", 0.0, 1.0, high_open=True)
        number("adam_beta2", 0.0, 1.0, high_open=True)
        number("adam_eps", 0.0, low_open=True)
        number("max_grad_norm", 0.0, low_open=True, optional=True)
        number("dist_timeout_s", 0.0, low_open=True)
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"TrainConfig: model_overrides must be a mapping, got {self.model_overrides!r}")
        if self.distributed_optimizer is not None and not isinstance(self.distributed_optimizer, bool):
            raise ValueError(f"TrainConfig: distributed_optimizer must be true, false or null (true when dp > 1), "
                             f"got {self.distributed_optimizer!r}")
        if self.grad_reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"TrainConfig: grad_reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, "
                             f"got {self.grad_reduce_dtype!r}")
        if self.grad_reduce_dtype != "fp32" and self.distributed_optimizer is False:
            raise ValueError("TrainConfig: grad_reduce_dtype=bf16 needs the distributed optimizer "
                             "(set distributed_optimizer=true or leave it null)")
        if not isinstance(self.shard_gradients, bool):
            raise ValueError(f"TrainConfig: shard_gradients must be true or false, got {self.shard_gradients!r}")
        if self.shard_gradients and self.distributed_optimizer is False:
            raise ValueError("TrainConfig: shard_gradients=true needs the distributed optimizer (set "
                             "distributed_optimizer=true or leave it null, and run with dp > 1), or set "
                             "shard_gradients=false")
        from libra_model.modules.recompute import check_mode

        check_mode(self.activation_checkpointing)
        if self.pack_sequences and self.prefetch:
            raise ValueError("TrainConfig: pack_sequences needs prefetch 0 (the packer reads its buffer in order)")
        if isinstance(self.pack_buffer, bool) or not isinstance(self.pack_buffer, int) or self.pack_buffer <= 0:
            raise ValueError(f"TrainConfig: pack_buffer must be a positive int, got {self.pack_buffer!r}")
        if self.init_libra and self.init_llama:
            raise ValueError("TrainConfig: give init_libra or init_llama, not both")
        from libra_model.data.pipeline import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig: dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in ("caption_eos", "frozen_language", "sequence_parallel", "pack_sequences", "save_frozen", "resume",
                     "resume_fresh_if_none", "export_hf", "tensorboard", "debug_checks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig: {name} must be true or false, got {getattr(self, name)!r}")

    def uses_distributed_optimizer(self, dp: int) -> bool:
        """Whether a run with ``dp`` data-parallel replicas shards its optimizer state (null: when dp > 1)."""
        return dp > 1 if self.distributed_optimizer is None else bool(self.distributed_optimizer) and dp > 1

    @classmethod
    def from_sources(cls, path: str | None = None, overrides: dict | None = None) -> TrainConfig:
        """Defaults, then the YAML file at ``path`` (a flat mapping of these keys), then ``overrides``. Unknown keys
        raise ValueError naming them."""
        values: dict = {}
        if path is not None:
            import yaml

            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"TrainConfig: {path} must hold a mapping of settings")
            values.update(loaded)
        values.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown} (known: {sorted(known)})")
        if "model_overrides" in values and values["model_overrides"] is None:
            values["model_overrides"] = {}
        for name in _FLOAT_FIELDS:
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    raise ValueError(f"TrainConfig: {name} must be a number, got {values[name]!r}") from None
        config = cls(**values)
        config.validate()
        return config


def parse_set(items: list[str]) -> dict:
    """``["lr=1e-4", "tp=2", "model_overrides={hidden_size: 128}"]`` -> a dict, values parsed as YAML scalars."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:
                parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


# ------------------------------------------------------------------------------------------------------ FLOPs
def step_flops(config: LibraConfig, n_text: int, n_vision: int, sequences: list[int], frozen_language: bool,
               tp: int = 1) -> float:
    """Model FLOPs of one forward+backward over a micro-batch with ``n_text``/``n_vision`` tokens and the given
    sequence lengths (Libra's real FLOPs: text rows through the dense LLaMA weights, vision rows through the
    low-rank experts; docs/performance.md's counting). Backward costs 2× forward for trained weights and 1× (input
    gradient only) for frozen ones. Divided by ``tp`` (each rank does its share)."""
    hidden, inner, kv = config.hidden_size, config.intermediate_size, config.kv_dim
    rank = config.expert_rank
    text_macs = hidden * hidden * 2 + 2 * hidden * kv + 3 * hidden * inner
    vision_macs = (rank(hidden) * 2 * hidden * 2 + 2 * rank(kv) * (hidden + kv) + 2 * rank(inner) * (hidden + inner)
                   + rank(hidden) * (inner + hidden))
    bridge_macs = 2 * config.bridge_rank * (hidden + kv)
    layers = config.num_hidden_layers
    text_mult = 4 if frozen_language else 6  # 2 FLOPs per MAC × (forward + 1 or 2 backward GEMMs)
    flops = layers * (text_mult * n_text * text_macs + 6 * n_vision * vision_macs + 6 * (n_text + n_vision)
                      * bridge_macs)
    heads_dim = config.num_attention_heads * config.head_dim
    flops += layers * sum(3.5 * 4 * length * length * heads_dim / 2 for length in sequences)
    flops += text_mult * n_text * hidden * config.vocab_size
    flops += 6 * n_vision * hidden * (config.vision_vocab_size * config.vision_codebook_num + 2 * hidden)
    return flops / tp


def document_lengths(host: dict) -> list[int]:
    """Real tokens of each sequence of a host batch (each packed document separately, attention stays inside it)."""
    documents = host.get("document_ids")
    if documents is None:
        return host["attention_mask"].sum(-1).tolist()
    counts = torch.stack([(documents == d).sum(-1) for d in range(int(documents.max()) + 1)])
    return [n for n in counts.flatten().tolist() if n]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU: the dense bf16 datasheet figure of known GPUs, else a measured
    GEMM throughput (so on a CPU the "MFU" is relative to what a large matmul achieves there)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
        for key, value in table.items():
            if key in name:
                return (value if dtype == torch.bfloat16 else value / 2), f"{name} datasheet"
    size = 1024 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    # The best of several short rounds: one round taken while other work holds the cores would understate the peak
    # (and let the reported MFU pass 100% once they are free).
    best, reps = math.inf, 10
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * reps / best, f"measured {size}³ {str(dtype)[6:]} GEMM (best of 5 rounds)"


# ------------------------------------------------------------------------------------------------------ setup
def _model_config(cfg: TrainConfig) -> LibraConfig:
    overrides = dict(cfg.model_overrides)
    if cfg.model == "tiny":
        return LibraConfig.tiny(**overrides)
    if cfg.model == "libra_11b":
        return LibraConfig.libra_11b(**overrides)
    if os.path.isdir(cfg.model):
        return LibraConfig.from_pretrained(cfg.model, **overrides)
    raise ValueError(f"TrainConfig: model must be 'tiny', 'libra_11b' or a directory with a config.json, "
                     f"got {cfg.model!r}")


def freeze_language_(model) -> int:
    """Stage 1: every parameter whose name lacks "vision" stops requiring gradients (nothing is
    unfrozen). Returns the number of frozen parameter elements."""
    frozen = 0
    for name, param in model.named_parameters():
        if "vision" not in name:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _build_model(cfg: TrainConfig, config: LibraConfig, parallel: ParallelState, dtype: torch.dtype):
    from libra_model.model import LibraForCausalLM
    from libra_model.parallel.tp_plan import shard_model_

    if cfg.init_libra:
        model = LibraForCausalLM.from_pretrained(cfg.init_libra, dtype=torch.float32, backend=cfg.backend).train()
    elif cfg.init_llama:
        model = LibraForCausalLM.from_llama(cfg.init_llama, dtype=torch.float32, backend=cfg.backend,
                                            **cfg.model_overrides)
    else:
        # Every rank builds the same full weights from the same seed, then keeps its slice (docs/parallel.md, "Mesh and
        # groups").
        model = LibraForCausalLM(config, backend=cfg.backend)
    if cfg.frozen_language:
        freeze_language_(model)
    model.activation_checkpointing_enable(cfg.activation_checkpointing)
    model = model.to(device=parallel.device)
    shard_model_(model, parallel.tp_group, sequence_parallel=cfg.sequence_parallel)
    master = None
    if dtype != torch.float32:
        # Compute-dtype parameters; MasterAdamW keeps float32 masters of the trainable ones.
        master = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.to(dtype)
    # Once on the device, in the compute dtype and sharded: each rank packs its own shards.
    model.pack_projections_()
    return model, master


@contextlib.contextmanager
def _preserved_rng():
    """Restore the Python, NumPy and torch CPU random states on exit."""
    state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # numpy is optional here
        np, np_state = None, None
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)
    if np is not None:
        np.random.set_state(np_state)


def _build_processor(cfg: TrainConfig, config: LibraConfig, parallel: ParallelState):
    from libra_model.processor import LibraProcessor

    directory = cfg.processor
    if directory is None:
        if cfg.dataset != "shapes":
            raise ValueError(f"TrainConfig: processor (a processor directory) is required for dataset "
                             f"{cfg.dataset!r}; only the generated shapes set can use a generated processor")
        from libra_model.data.shapes import ShapesCaptions
        from libra_model.tiny import build_tiny_processor_dir

        # A processor in the real formats with a tokenizer trained on the shapes captions and a random CLIP and
        # quantiser sized from the model config: enough to learn the shapes set, and to benchmark any model size.
        directory = os.path.join(cfg.output_dir, "processor")
        if parallel.is_main and not os.path.isfile(os.path.join(directory, "processor_config.json")):
            # Only rank 0 builds it: keep the random streams untouched, so every rank (DP replicas included) still
            # builds the same initial weights afterwards.
            with _preserved_rng():
                build_tiny_processor_dir(directory, config, texts=ShapesCaptions.vocabulary_text(), seed=cfg.seed)
        parallel.barrier()
    return LibraProcessor.from_pretrained(directory, config, device=parallel.device, torch_dtype=torch.float32)


class _Metrics:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, directory: str, enabled: bool, resume_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(directory, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_step and os.path.isfile(self.path):
            # Rows past the checkpoint came from the interrupted run; the resumed run writes them again.
            with open(self.path, encoding="utf-8") as handle:
                rows = [line for line in handle if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.writelines(rows)
        elif os.path.isfile(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, row: dict) -> None:
        """Append ``row`` (with "step") to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def _say(parallel: ParallelState, text: str) -> None:
    if parallel.is_main:
        print(text, flush=True)


def _check_same_batch(batch: dict, parallel: ParallelState) -> None:
    """Debug invariant: the TP ranks of a replica hold the same micro-batch (compares a checksum)."""
    if parallel.tp == 1:
        return
    checksum = torch.stack([batch["input_ids"].sum().double(), batch["labels"].sum().double()]).to(parallel.device)
    gathered = [torch.empty_like(checksum) for _ in range(parallel.tp)]
    dist.all_gather(gathered, checksum, group=parallel.tp_group)
    if not all(torch.equal(gathered[0], g) for g in gathered):
        raise AssertionError("the TP ranks of one DP replica read different batches")


# ------------------------------------------------------------------------------------------------------- run
def train(cfg: TrainConfig, parallel: ParallelState | None = None) -> dict:
    """Run training as ``cfg`` says (every rank calls it). Returns a summary: "step", "loss" (last step's),
    "first_loss", "checkpoint" (last saved), "skips" (skipped samples by reason), "skipped_updates" (steps with a
    non-finite loss or gradient norm), "captions" [(generated, true)], "evaluation" (the last held-out evaluation's
    ``val_*`` values, {} when none ran)."""
    cfg.validate()
    parallel = parallel or init_parallel(cfg.tp, timeout_s=cfg.dist_timeout_s)
    if parallel.tp != cfg.tp:
        raise ValueError(f"train: the process group has tp={parallel.tp}, the config says tp={cfg.tp}")
    seed_everything(cfg.seed)
    logging.basicConfig(level=logging.WARNING if parallel.is_main else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if parallel.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and parallel.device.type == "cuda") \
        else torch.float32
    per_replica, remainder = divmod(cfg.global_batch_size, parallel.dp)
    accum, rest = divmod(per_replica, cfg.micro_batch_size)
    if remainder or rest or accum == 0:
        raise ValueError(f"TrainConfig: global_batch_size ({cfg.global_batch_size}) must be a multiple of "
                         f"micro_batch_size ({cfg.micro_batch_size}) × dp ({parallel.dp})")
    if parallel.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(cfg), handle, indent=2)
    parallel.barrier()

    config = _model_config(cfg)
    processor = _build_processor(cfg, config, parallel)
    model, initial_masters = _build_model(cfg, config, parallel, dtype)
    model.train()
    if hasattr(model, "check_input_values"):
        # The collator builds ids, vision indices and labels consistently; the model's value checks cost a
        # device-to-host sync per forward, so they run only with debug_checks.
        model.check_input_values = cfg.debug_checks
    adamw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                 initial_masters=initial_masters)
    distributed_optimizer = cfg.uses_distributed_optimizer(parallel.dp)
    if cfg.grad_reduce_dtype != "fp32" and not distributed_optimizer:
        raise ValueError(f"TrainConfig: grad_reduce_dtype={cfg.grad_reduce_dtype} needs the distributed optimizer, "
                         f"which is off at dp={parallel.dp} (set distributed_optimizer=true)")
    shard_gradients = shards_gradients(cfg, parallel.dp)  # ValueError when set without the distributed optimizer
    if distributed_optimizer:
        optimizer = DistributedMasterAdamW(model, parallel, grad_reduce_dtype=cfg.grad_reduce_dtype,
                                           shard_gradients=shard_gradients, **adamw)
    else:
        optimizer = MasterAdamW(model, **adamw)

    from libra_model.data.loader import SkipStats
    from libra_model.data.pipeline import build_loader, build_source, model_inputs

    stats = SkipStats()
    image_size = processor.image_tokenizer.clip.config.image_size if processor.image_tokenizer is not None else 64
    source = build_source(cfg.dataset, shards=cfg.data_shards, annotation_file=cfg.data_annotation_file,
                          image_root=cfg.data_image_root, num_samples=cfg.data_num_samples, image_size=image_size,
                          seed=cfg.seed, stats=stats)
    # Packed rows are max_length tokens long; without a max_length, as long as the model's positions reach.
    max_length = cfg.max_length or (config.max_position_embeddings if cfg.pack_sequences else None)
    loader = build_loader(source, processor, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                          dp_rank=parallel.dp_rank, dp_size=parallel.dp, max_length=max_length,
                          prefetch=cfg.prefetch, caption_eos=cfg.caption_eos, pack_sequences=cfg.pack_sequences,
                          pack_buffer=cfg.pack_buffer)

    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    start_step, last_checkpoint = 0, None
    if cfg.resume:
        last_checkpoint, problems = ckpt.find_resume_checkpoint(ckpt_root, parallel)
        for problem in problems:
            _say(parallel, f"resume: checkpoint rejected: {problem}")
        if last_checkpoint is None and problems and not cfg.resume_fresh_if_none:
            raise ckpt.CheckpointError(f"resume: no checkpoint under {ckpt_root} verifies (problems above); restore "
                                       "one, or set resume_fresh_if_none=true to start from scratch")
        if last_checkpoint is None:
            _say(parallel, f"resume: no complete checkpoint under {ckpt_root}; starting from scratch")
        else:
            if problems:
                _say(parallel, f"resume: falling back to {last_checkpoint}, the newest checkpoint that verifies")
            state = ckpt.load_checkpoint(last_checkpoint, model, optimizer, parallel)
            start_step = state["step"]
            loaders = state["loaders"]
            if len(loaders) == parallel.dp:
                loader.load_state_dict(loaders[parallel.dp_rank])
            else:
                _say(parallel, f"resume: the checkpoint has {len(loaders)} DP replicas, this run {parallel.dp}: "
                               "the data order restarts (weights and optimizer state are restored)")
            _say(parallel, f"resumed from {last_checkpoint} at step {start_step}")

    metrics = _Metrics(cfg.output_dir, parallel.is_main, start_step, cfg.tensorboard)
    from libra_model.parallel.tp_plan import is_tp_sharded

    full_numel = lambda p: p.numel() * (parallel.tp if is_tp_sharded(p) else 1)
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    peak, peak_source = peak_flops(parallel.device, dtype)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * cfg.max_steps))
    _say(parallel, f"Libra training: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                   f"{total:,} parameters ({trainable:,} trained); dp={parallel.dp} tp={parallel.tp} "
                   f"({'distributed' if distributed_optimizer else 'replicated'} optimizer"
                   f"{', sharded gradients' if shard_gradients else ''}) "
                   f"on {parallel.device.type}, {str(dtype)[6:]} compute; global batch {cfg.global_batch_size} = "
                   f"{cfg.micro_batch_size} × {accum} accumulation × {parallel.dp} dp; dataset {cfg.dataset} "
                   f"({len(source):,} samples); MFU peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")

    from libra_model.memory import GIB, format_plan, plan_memory

    # The memory planner's view of this run (python -m libra_model.plan prints the same table).
    memory_plan = plan_memory(cfg, config, tp=parallel.tp, dp=parallel.dp, device_type=parallel.device.type,
                              freeze=freeze_language_)
    _say(parallel, format_plan(memory_plan))

    def save(step: int) -> str:
        loaders = [None] * parallel.dp
        if parallel.dp > 1:
            dist.all_gather_object(loaders, loader.state_dict(), group=parallel.dp_group)
        else:
            loaders = [loader.state_dict()]
        path = ckpt.save_checkpoint(ckpt_root, step, model, optimizer, parallel, {"step": step, "loaders": loaders},
                                    include_frozen=cfg.save_frozen, keep_last=cfg.keep_last)
        _say(parallel, f"saved checkpoint {path}")
        return path

    def evaluate(step: int) -> dict:
        from libra_model.eval.heldout import evaluate_heldout

        row = evaluate_heldout(cfg, model, processor, parallel, dtype, say=lambda text: _say(parallel, text))
        if row:
            metrics.log({"step": step, **row})
            _say(parallel, f"evaluation at step {step}: " + " | ".join(
                f"{key[4:]} {value:.4f}" for key, value in row.items() if isinstance(value, float)))
        return row

    first_loss = last_loss = None
    skipped_updates = consecutive_skips = 0
    window_time, window_tokens, window_flops = 0.0, 0, 0.0
    step = start_step
    for step in range(start_step + 1, cfg.max_steps + 1):
        began = time.perf_counter()
        batches, flops = [], 0.0
        for _ in range(accum):
            host = next(loader)
            layout = host["layout"]
            lengths = document_lengths(host)
            flops += step_flops(config, layout.n_text, layout.n_vision, lengths, cfg.frozen_language, parallel.tp)
            batches.append(model_inputs(processor, host, parallel.device, dtype))
        if cfg.debug_checks:
            _check_same_batch(batches[0], parallel)
        lr = warmup_cosine_lr(step - 1, peak_lr=cfg.lr, warmup_steps=warmup, total_steps=cfg.max_steps,
                              min_lr=cfg.min_lr)
        result = train_step(model, optimizer, batches, parallel, lr=lr, max_grad_norm=cfg.max_grad_norm,
                            normalization=cfg.loss_normalization, label_smoothing=cfg.label_smoothing,
                            z_loss_weight=cfg.z_loss_weight)
        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        window_time += elapsed
        window_tokens += result.tokens
        window_flops += flops
        if result.skipped:
            # A non-finite loss or gradient norm: no update was made. A few in a row are survivable (one bad
            # batch); more mean the run diverged or the weights hold NaN, and going on would only waste steps.
            skipped_updates += 1
            consecutive_skips += 1
            _say(parallel, f"step {step}: non-finite loss ({result.loss}) or gradient norm ({result.grad_norm}): "
                           f"update skipped ({consecutive_skips} in a row)")
        else:
            consecutive_skips = 0
        if parallel.device.type == "cuda" and step == min(start_step + 2, cfg.max_steps):
            allocated = torch.cuda.max_memory_allocated(parallel.device)
            planned = (memory_plan.total - memory_plan.allowance) / GIB
            _say(parallel, f"measured peak memory after {step - start_step} steps: {allocated / GIB:.2f} GiB allocated "
                           f"on rank 0 (plan without the allowance: {planned:.2f} GiB)")
        first_loss = result.loss if first_loss is None else first_loss
        last_loss = result.loss
        if step % cfg.log_every == 0 or step == start_step + 1 or step == cfg.max_steps:
            steps_in_window = max(1, step - max(start_step, step - cfg.log_every))
            tokens_per_s = window_tokens / window_time
            mfu = window_flops / window_time / peak
            row = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                   "tokens_per_s": tokens_per_s, "mfu": mfu, "step_time_s": window_time / steps_in_window,
                   "skipped_samples": loader.stats.total, "skipped_updates": skipped_updates}
            if cfg.pack_sequences:  # tokens_per_s counts real (non-padding) tokens, packed or not
                row.update(packed_documents=loader.packed_documents, padding_fraction=loader.padding_fraction)
            if result.skipped:
                row["skipped_update"] = True
            metrics.log(row)
            _say(parallel, f"step {step:>6}/{cfg.max_steps} | loss {result.loss:.4f} | lr {lr:.2e} | "
                           f"grad norm {result.grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s | MFU {100 * mfu:.2f}% | "
                           f"{1000 * window_time / steps_in_window:.0f} ms/step"
                           + (f" | {loader.packed_documents:,} packed samples, {100 * loader.padding_fraction:.1f}% "
                              "padding" if cfg.pack_sequences else "")
                           + (" | non-finite loss or gradient norm: update skipped" if result.skipped else ""))
            window_time, window_tokens, window_flops = 0.0, 0, 0.0
        if consecutive_skips >= cfg.max_skipped_updates:
            raise RuntimeError(f"train: {consecutive_skips} consecutive steps up to step {step} had a non-finite loss "
                               f"or gradient norm (max_skipped_updates={cfg.max_skipped_updates}); the last good "
                               f"checkpoint is {last_checkpoint or 'none (nothing saved yet)'}. Check the data and "
                               "the learning rate, then resume from it")
        if cfg.debug_checks:
            _debug_replicated(model, parallel)
        if cfg.eval_samples and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
        if step % cfg.save_every == 0 and step != cfg.max_steps:
            last_checkpoint = save(step)
    if step > start_step or last_checkpoint is None:
        last_checkpoint = save(step)
    loader.close()
    _say(parallel, f"data: {loader.stats.summary()}")
    if cfg.export_hf:
        export_dir = os.path.join(cfg.output_dir, "hf")
        ckpt.export_hf(model, optimizer, parallel, export_dir)
        _say(parallel, f"exported the model in the HF layout to {export_dir}")
    captions = caption_heldout(cfg, model, processor, parallel, dtype) if cfg.caption_samples else []
    evaluation = evaluate(step) if cfg.eval_samples else {}
    metrics.close()
    return {"step": step, "loss": last_loss, "first_loss": first_loss, "checkpoint": last_checkpoint,
            "skips": dict(loader.stats.counts), "skipped_updates": skipped_updates, "captions": captions,
            "evaluation": evaluation}


def _debug_replicated(model, parallel: ParallelState) -> None:
    from libra_model.parallel.grads import check_replicated_equal
    from libra_model.parallel.tp_plan import is_tp_sharded

    check_replicated_equal([(n, p) for n, p in model.named_parameters() if not is_tp_sharded(p)],
                           parallel.tp_group)


@torch.no_grad()
def caption_heldout(cfg: TrainConfig, model, processor, parallel: ParallelState, dtype: torch.dtype) -> list:
    """Greedy captions for ``cfg.caption_samples`` images, printed next to their true captions (every rank runs
    generation, since TP ranks must issue the same collectives). With the generated shapes set the images come from
    its held-out split; other datasets have no held-out split here, so their last readable samples are used (and
    labelled as such). Returns [(generated, true)]."""
    from libra_model.data.loader import SampleError
    from libra_model.data.pipeline import build_source

    if processor.image_tokenizer is None:
        return []
    image_size = processor.image_tokenizer.clip.config.image_size
    if cfg.dataset == "shapes":
        source = build_source("shapes", num_samples=max(cfg.caption_samples, 1), image_size=image_size,
                              seed=cfg.seed, split="heldout")
        indices, label = range(len(source)), "held-out image"
    else:
        source = build_source(cfg.dataset, shards=cfg.data_shards, annotation_file=cfg.data_annotation_file,
                              image_root=cfg.data_image_root)
        indices, label = range(len(source) - 1, -1, -1), "training image (no held-out split)"
    pairs = []
    model.eval()
    for index in indices:
        if len(pairs) == cfg.caption_samples:
            break
        try:
            sample = source[index]
        except SampleError:
            continue
        if sample["image"] is None:
            continue
        truth = sample["caption"] if "caption" in sample else sample["conversations"][-1]["value"]
        prompt = processor(images=[sample["image"]], texts=[""], template=None)
        prompt = {k: (v.to(parallel.device) if isinstance(v, torch.Tensor) else v) for k, v in prompt.items()}
        signal = prompt.get("contiguous_signal")
        out = model.generate(prompt["input_ids"], prompt["vision_indices"], prompt["attention_mask"],
                             None if signal is None else signal.to(dtype), max_new_tokens=cfg.caption_max_new_tokens)
        generated = processor.decode(out.new_tokens[:, 0]).split("\n")[0].strip()
        pairs.append((generated, truth))
        _say(parallel, f"{label} {index}: generated: {generated!r} | true: {truth!r}")
    model.train()
    return pairs
