"""Every TrainConfig setting is checked for type, range and its relations to others, with the setting named."""

import pytest

from libra_model.trainer import TrainConfig, parse_set

BAD = [
    ("keep_last", -1), ("keep_last", 0), ("keep_last", 1.5), ("min_lr", 1), ("min_lr", -1e-5),
    ("weight_decay", -1), ("adam_beta1", 1.0), ("adam_beta1", -0.1), ("adam_beta2", 1.5), ("adam_eps", 0),
    ("lr", 0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "fast"), ("warmup_ratio", 1.5),
    ("warmup_steps", -1), ("warmup_steps", 10_000), ("max_grad_norm", 0), ("max_grad_norm", float("nan")),
    ("label_smoothing", 2), ("z_loss_weight", -1), ("max_steps", 0), ("max_steps", True), ("global_batch_size", -8),
    ("micro_batch_size", 64), ("log_every", 0), ("save_every", 0), ("tp", 0), ("max_length", 0), ("prefetch", -1),
    ("seed", -1), ("caption_samples", -1), ("caption_max_new_tokens", -2), ("max_skipped_updates", 0),
    ("dist_timeout_s", 0), ("dist_timeout_s", -5), ("dataset", "imagenet"), ("precision", "fp8"),
    ("loss_normalization", "mean"), ("resume", "yes"), ("export_hf", 1), ("model_overrides", [1]),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_setting_is_named(name, value):
    with pytest.raises(ValueError, match=rf"TrainConfig: {name}\b"):
        TrainConfig.from_sources(None, {name: value})


def test_set_flags_reach_the_same_checks():
    with pytest.raises(ValueError, match=r"keep_last must be a positive int or null, got -1"):
        TrainConfig.from_sources(None, parse_set(["keep_last=-1"]))
    with pytest.raises(ValueError, match=r"min_lr \(1\) must be <= lr \(0.003\)"):
        TrainConfig.from_sources(None, parse_set(["min_lr=1"]))
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0.0, inf\], got -1"):
        TrainConfig.from_sources(None, parse_set(["weight_decay=-1"]))


def test_good_edges_are_accepted():
    config = TrainConfig.from_sources(None, {"keep_last": None, "min_lr": 3e-3, "weight_decay": 0, "adam_beta1": 0,
                                             "max_grad_norm": None, "warmup_steps": 0, "warmup_ratio": 1,
                                             "max_length": None, "micro_batch_size": 32, "dist_timeout_s": "30"})
    assert (config.keep_last, config.min_lr, config.dist_timeout_s) == (None, 3e-3, 30.0)


def test_the_shipped_configs_validate():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths
    for path in paths:
        TrainConfig.from_sources(path)


def test_save_checkpoint_refuses_a_bad_keep_last(tmp_path):
    from libra_model.parallel import dcp_checkpoint as ckpt
    from libra_model.parallel.mesh import ParallelState

    for keep_last in (-1, 0):
        with pytest.raises(ValueError, match="keep_last must be an int >= 1 or None"):
            ckpt.save_checkpoint(str(tmp_path), 1, None, None, ParallelState(), {}, keep_last=keep_last)


def test_train_py_reports_a_bad_setting_without_a_traceback(capsys):
    import importlib.util
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    spec = importlib.util.spec_from_file_location("train_cli_validation", os.path.join(root, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.train = lambda config: pytest.fail("train must not start with a bad setting")
    for argv, message in ((["--set", "keep_last=-1"], "keep_last must be a positive int or null"),
                          (["--dist-timeout", "0"], "dist_timeout_s must be in (0.0, inf]"),
                          (["--set", "lr"], "--set expects key=value")):
        with pytest.raises(SystemExit) as caught:
            module.main(argv)
        assert caught.value.code == 2
        assert message in capsys.readouterr().err
