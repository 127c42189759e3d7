"""Fixtures of the recipe tests; puts this folder on sys.path (recipe_models, recipe_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from recipe_helpers import TINY, write_recipe  # noqa: E402


@pytest.fixture
def tiny_yaml(tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", TINY)


@pytest.fixture(autouse=True)
def _restore_model_factories():
    """Tests register model factories; never let a registration leak into another test."""
    from prunekit.apps.recipe import factories

    saved = dict(factories._REGISTRY)
    yield
    factories._REGISTRY.clear()
    factories._REGISTRY.update(saved)
