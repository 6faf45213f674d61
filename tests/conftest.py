"""Session fixtures: tiny random models saved to disk, loaded through the real loader, and random SAEs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from feature_circuits.model import load_model
from tests.helpers import save_model, save_random_saes, tiny_gpt_neox, tiny_llama


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    return save_model(tiny_gpt_neox(), tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def neox(neox_dir):
    return load_model(neox_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def neox_saes(tmp_path_factory) -> Path:
    return save_random_saes(tiny_gpt_neox(), tmp_path_factory.mktemp("saes"))
