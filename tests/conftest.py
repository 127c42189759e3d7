"""Shared fixtures for the prunekit test-suite (helpers live in core_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import LAYER_CASES, LayerCase

import prunekit.core.scope as _scope


@pytest.fixture(autouse=True)
def _restore_prunable_registry():
    """Tests may call ``register_prunable``; never let a registration leak into another test."""
    saved = dict(_scope._REGISTRY)
    yield
    _scope._REGISTRY.clear()
    _scope._REGISTRY.update(saved)


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread is faster and avoids oversubscribing a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request) -> LayerCase:
    return request.param
