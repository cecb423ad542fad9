import io
import json
import os
import tarfile

import pytest
import torch
from train_helpers import read_metrics, small_config

import libra_model.trainer as trainer
from libra_model.data.shapes import ShapesCaptions
from libra_model.optim import MasterAdamW, no_weight_decay, warmup_cosine_lr
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.trainer import TrainConfig, parse_set, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------ configuration
def test_config_sources_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\nlr: 1.0e-3\nmodel_overrides: {hidden_size: 32}\n")
    config = TrainConfig.from_sources(str(path), {"lr": 5e-4})
    assert (config.max_steps, config.lr, config.model_overrides) == (7, 5e-4, {"hidden_size": 32})
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        TrainConfig.from_sources(None, {"learning_rate": 1})
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        TrainConfig.from_sources(None, {"max_steps": 0})
    with pytest.raises(ValueError, match="loss_normalization"):
        TrainConfig.from_sources(None, {"loss_normalization": "mean"})
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig.from_sources(None, {"label_smoothing": 1.5})
    with pytest.raises(ValueError, match="z_loss_weight"):
        TrainConfig.from_sources(None, {"z_loss_weight": -1.0})
    assert parse_set(["tp=2", "lr=1e-4", "data_shards=/d/{0..3}.tar", "model_overrides={a: 1}"]) == \
        {"tp": 2, "lr": 1e-4, "data_shards": "/d/{0..3}.tar", "model_overrides": {"a": 1}}
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["tp"])


def test_stage_configs_hold_the_paper_values():
    pre = TrainConfig.from_sources(os.path.join(ROOT, "configs", "pretrain.yaml"))
    sft = TrainConfig.from_sources(os.path.join(ROOT, "configs", "sft.yaml"))
    tiny = TrainConfig.from_sources(os.path.join(ROOT, "configs", "tiny.yaml"))
    assert (pre.max_steps, pre.warmup_steps, pre.global_batch_size, pre.lr) == (40000, 2000, 1280, 1e-4)
    assert (sft.max_steps, sft.warmup_steps, sft.global_batch_size, sft.lr) == (7000, 300, 128, 2e-5)
    for config in (pre, sft):
        assert (config.adam_beta1, config.adam_beta2, config.adam_eps) == (0.9, 0.99, 1e-8)
        assert (config.weight_decay, config.max_grad_norm, config.precision, config.seed) == (0.01, 1.0, "bf16", 42)
        assert config.activation_checkpointing and config.model == "libra_11b"
    assert pre.frozen_language and not sft.frozen_language
    assert (pre.max_length, sft.max_length, pre.dataset, sft.dataset) == (700, 2048, "webdataset", "llava")
    # configs/tiny.yaml is the embedded default written out.
    for key, value in vars(tiny).items():
        assert getattr(TrainConfig(), key) == value, key


def test_schedule_and_weight_decay_groups():
    lrs = [warmup_cosine_lr(s, peak_lr=1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    assert warmup_cosine_lr(20, peak_lr=1.0, warmup_steps=4, total_steps=20, min_lr=0.1) == pytest.approx(0.1)
    assert no_weight_decay("model.layers.0.input_layernorm.weight", None)
    assert no_weight_decay("model.vision_signal_norm.weight", None) and no_weight_decay("x.bias", None)
    assert not no_weight_decay("model.layers.0.self_attn.vision_q_proj.weight_A", None)
    assert not no_weight_decay("model.vision_contiguous_signal_processor.weight", None)


def test_master_adamw_keeps_fp32_masters_and_skips_frozen():
    from libra_model.config import LibraConfig
    from libra_model.model import LibraForCausalLM

    model = LibraForCausalLM(LibraConfig.tiny())
    trainer.freeze_language_(model)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.to(torch.bfloat16)
    optimizer = MasterAdamW(model, initial_masters=full)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(optimizer.names) == trained and all("vision" in n for n in trained)
    for name in trained:
        assert optimizer.masters[name].dtype == torch.float32 and torch.equal(optimizer.masters[name], full[name])
    decay = {id(p) for p in optimizer.optimizer.param_groups[0]["params"]}
    assert id(optimizer.masters["model.vision_norm.weight"]) not in decay
    for param in model.parameters():
        if param.requires_grad:
            param.grad = None
            (param.float().sum() * 0 + param.float().pow(2).sum()).backward()
    name = "model.layers.0.mlp.vision_up_proj.weight_A"
    torch.testing.assert_close(optimizer.main_grads[name], 2 * dict(model.named_parameters())[name].float())
    assert dict(model.named_parameters())[name].grad is None  # moved into the float32 buffer by the hook
    optimizer.step(1e-2)
    assert dict(model.named_parameters())[name].dtype == torch.bfloat16
    torch.testing.assert_close(dict(model.named_parameters())[name].float(), optimizer.masters[name],
                               atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    root = tmp_path / "ck"
    for step, complete in ((3, True), (6, True), (9, False)):
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"x")
        if complete:
            (d / ".metadata").write_bytes(b"x")
            (d / ckpt.META_NAME).write_text("{}")
    (root / (".tmp-" + ckpt.step_dir_name(12))).mkdir()  # a crash mid-save
    assert ckpt.list_checkpoints(str(root)) == [str(root / "step_00000003"), str(root / "step_00000006")]
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_00000006")
    assert ckpt.latest_checkpoint(str(tmp_path / "none")) is None


def test_kill_and_resume_continues_exactly(processor_dir, tmp_path, monkeypatch):
    reference = train(small_config(processor_dir, tmp_path / "a"))
    expected = read_metrics(tmp_path / "a")
    assert [row["step"] for row in expected] == [1, 2, 3, 4, 5, 6]
    assert os.path.basename(reference["checkpoint"]) == "step_00000006"

    calls = {"n": 0}
    real_step = trainer.train_step

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(processor_dir, tmp_path / "b"))
    monkeypatch.setattr(trainer, "train_step", real_step)
    root = tmp_path / "b" / "checkpoints"
    assert ckpt.list_checkpoints(str(root)) == [str(root / "step_00000003")]
    (root / ".tmp-step_00000004").mkdir()  # as if the process had died while saving step 4
    assert len(read_metrics(tmp_path / "b")) == 4  # step 4 ran and was logged, but not saved

    resumed = train(small_config(processor_dir, tmp_path / "b", resume=True))
    got = read_metrics(tmp_path / "b")
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)  # bit-exact
    assert resumed["loss"] == reference["loss"]
    assert expected[-1]["loss"] < expected[0]["loss"]


# ------------------------------------------------------------------------------------------------ data in a run
def _shapes_shard(path, start, count, corrupt_every=0):
    shapes = ShapesCaptions(1000, image_size=42, seed=3)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            sample = shapes[i]
            buffer = io.BytesIO()
            sample["image"].save(buffer, format="JPEG")
            image = buffer.getvalue() if not corrupt_every or i % corrupt_every else b"broken jpeg"
            for ext, data in (("jpg", image), ("json", json.dumps({"caption": sample["caption"]}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_training_on_webdataset_shards_skips_and_counts_bad_data(processor_dir, tmp_path, capsys):
    _shapes_shard(tmp_path / "shard-0.tar", 0, 24, corrupt_every=5)
    (tmp_path / "shard-1.tar").write_bytes(b"this is no tar file" * 50)
    _shapes_shard(tmp_path / "shard-2.tar", 24, 24)
    summary = train(small_config(processor_dir, tmp_path / "run", dataset="webdataset", max_steps=3, save_every=3,
                                 data_shards=str(tmp_path / "shard-{0..2}.tar"), caption_samples=1,
                                 export_hf=True, caption_max_new_tokens=4))
    assert summary["skips"]["corrupt_shard"] == 1
    assert summary["skips"]["corrupt_image"] >= 1
    out = capsys.readouterr().out
    assert "corrupt_shard 1" in out and "training image (no held-out split) 47: generated:" in out
    assert os.path.isfile(tmp_path / "run" / "hf" / "model.safetensors")
    # The export loads with the model's own loader and holds the trained weights.
    from libra_model.model import LibraForCausalLM

    exported = LibraForCausalLM.from_pretrained(str(tmp_path / "run" / "hf"))
    assert exported.config.vocab_size == 128


def test_entry_point_flags(processor_dir, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = {}
    monkeypatch.setattr(module, "train", lambda config: seen.setdefault("config", config))
    module.main(["--output-dir", str(tmp_path), "--max-steps", "5", "--tp", "1", "--resume",
                 "--set", "lr=1e-4", "--set", f"processor={processor_dir}"])
    config = seen["config"]
    assert (config.output_dir, config.max_steps, config.tp, config.resume, config.lr) == \
        (str(tmp_path), 5, 1, True, 1e-4)
    module.main([])
    assert seen["config"].max_steps == 5  # setdefault kept the first; the second call parsed without error


# ------------------------------------------------------------------------------------------------ loss normalisation
def test_loss_normalisations_against_the_models_own_loss():
    import copy
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests", "dist"))
    from libra_dist_helpers import make_batch, slice_batch, tiny_model

    from libra_model.parallel.mesh import ParallelState
    from libra_model.train_step import forward_loss, train_step

    model = tiny_model()
    batch = make_batch(model.config, 3, 20, [(0, 2), (2, 5)], seed=4)
    # With no normalizer the loss is Libra's mean, exactly the model's own loss.
    own = model(batch["input_ids"], batch["vision_indices"], contiguous_signal=batch["contiguous_signal"],
                labels=batch["labels"]).loss.detach()
    torch.testing.assert_close(forward_loss(model, batch, None), own, rtol=1e-12, atol=0)
    # The global-token share of a batch that is the whole step is the same number.
    torch.testing.assert_close(forward_loss(model, batch, model.target_counts(batch["labels"])), own,
                               rtol=1e-12, atol=0)
    # Split into micro-batches, the global-token shares add up to the whole batch's loss; the mean of the
    # micro-batch means is a different number (the reference's definition).
    parts = [slice_batch(batch, 0, 1), slice_batch(batch, 1, 3)]
    counts = model.target_counts(batch["labels"])
    shares = sum(forward_loss(model, part, counts).detach() for part in parts)
    torch.testing.assert_close(shares, own, rtol=1e-12, atol=0)
    means = sum(forward_loss(model, part, None).detach() for part in parts) / 2
    assert abs(float(means) - float(own)) > 1e-4
    results = {}
    for normalization in ("global_tokens", "mean_of_microbatches"):
        copy_ = copy.deepcopy(model)
        results[normalization] = train_step(copy_, MasterAdamW(copy_, master_dtype=torch.float64), parts,
                                            ParallelState(), lr=1e-3, normalization=normalization).loss
    assert results["global_tokens"] == pytest.approx(float(own), rel=1e-12)
    assert results["mean_of_microbatches"] == pytest.approx(float(means), rel=1e-12)
    with pytest.raises(ValueError, match="normalization"):
        train_step(model, None, parts, ParallelState(), lr=1e-3, normalization="tokens")


def test_packed_training_resumes_exactly_and_reports_padding(processor_dir, tmp_path, monkeypatch):
    packed = dict(pack_sequences=True, max_length=96, pack_buffer=16, micro_batch_size=2, global_batch_size=4)
    reference = train(small_config(processor_dir, tmp_path / "a", **packed))
    expected = read_metrics(tmp_path / "a")
    assert all(row["packed_documents"] > 2 * row["step"] * 2 for row in expected)  # several documents per row
    assert all(0 <= row["padding_fraction"] < 0.5 for row in expected)
    assert expected[-1]["loss"] < expected[0]["loss"]

    calls = {"n": 0}
    real_step = trainer.train_step

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(processor_dir, tmp_path / "b", **packed))
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = train(small_config(processor_dir, tmp_path / "b", resume=True, **packed))
    got = read_metrics(tmp_path / "b")
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert a["packed_documents"] == b["packed_documents"]
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)  # bit-exact
    assert resumed["loss"] == reference["loss"]
