"""Fixtures for structural pruning tests."""

from __future__ import annotations

import pytest
import torch

import prunekit.structural.registry as _registry


@pytest.fixture(autouse=True)
def _restore_surgery_registry():
    """Tests may call ``register_surgery``; never let a registration leak into another test."""
    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and avoids oversubscribing a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
