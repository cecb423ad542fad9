"""--resume never loads a partial or mismatched model: a different model config is an error naming the differing
settings, and a checkpoint holding tensors the live model lacks is refused even without a recorded config."""

import json
import os

import pytest
from train_helpers import TINY, small_config

from libra_model.hf_checkpoint import CheckpointError
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.trainer import train


def test_fewer_layers_is_an_error_naming_the_setting(processor_dir, run_copy):
    config = small_config(processor_dir, run_copy, resume=True, model_overrides={**TINY, "num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match=r"num_hidden_layers: checkpoint 2, this run 1"):
        train(config)


def test_several_differing_settings_are_all_named(processor_dir, run_copy):
    config = small_config(processor_dir, run_copy, resume=True,
                          model_overrides={**TINY, "bridge_rank": 2, "rms_norm_eps": 1e-5})
    with pytest.raises(CheckpointError) as caught:
        train(config)
    assert "bridge_rank" in str(caught.value) and "rms_norm_eps" in str(caught.value)


def test_extra_tensors_are_refused_without_a_recorded_config(processor_dir, run_copy):
    latest = ckpt.latest_checkpoint(os.path.join(run_copy, "checkpoints"))
    meta_path = os.path.join(latest, ckpt.META_NAME)
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    del meta["model_config"]
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    config = small_config(processor_dir, run_copy, resume=True, model_overrides={**TINY, "num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match=r"model tensors this model lacks \(model\.layers\.1\."):
        train(config)


def test_same_config_resumes(processor_dir, finished_run, run_copy):
    _, reference, _ = finished_run
    resumed = train(small_config(processor_dir, run_copy, resume=True, max_steps=6))
    assert resumed["step"] == 6 and resumed["loss"] is None  # nothing left to train: the checkpoint is step 6
    assert resumed["checkpoint"].endswith("step_00000006")
    assert reference["step"] == 6
