"""The tiny processor directory shared by the trainer tests."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from train_helpers import build_processor_dir  # noqa: E402


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    return build_processor_dir(tmp_path_factory.mktemp("processor"))
