"""Fixtures for the evaluation tests: one TorchBackend on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backend import Backend
from engine.registry import TINY_TEST_MODEL, ModelRegistry
from engine.torch_backend import load_backend


@pytest.fixture(scope="module")
def tiny_backend(models_dir: Path) -> Backend:
    return load_backend(ModelRegistry(models_dir), TINY_TEST_MODEL, "cpu")
