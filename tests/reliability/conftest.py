"""Fixtures of the reliability tests: the tiny processor directory and one short training run with checkpoints at
steps 2, 4 and 6 (copied by each test that damages it)."""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import build_processor_dir, read_metrics, small_config  # noqa: E402


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    return build_processor_dir(tmp_path_factory.mktemp("processor"))


@pytest.fixture(scope="session")
def finished_run(processor_dir, tmp_path_factory):
    """(output_dir, summary, metrics) of a 6-step run that kept every checkpoint (steps 2, 4, 6)."""
    from libra_model.trainer import train

    output = tmp_path_factory.mktemp("run")
    summary = train(small_config(processor_dir, output, save_every=2, keep_last=None))
    return str(output), summary, read_metrics(output)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run's output directory (its checkpoints may be damaged freely)."""
    source, _, _ = finished_run
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return str(target)
