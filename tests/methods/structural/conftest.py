"""Fixtures for structural pruning tests."""

from __future__ import annotations

import pytest

import prunekit.methods.structural.registry as _registry


@pytest.fixture(autouse=True)
def _restore_surgery_registry():
    """Tests may call ``register_surgery``; never let a registration leak into another test."""
    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: every test here runs with the shared ``single_thread`` fixture."""
