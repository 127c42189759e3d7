"""Fixtures for the file-format tests (helpers live in ``formats_helpers``)."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import make_sparse

import prunekit.formats as pf


@pytest.fixture
def small_state() -> dict[str, torch.Tensor]:
    """A small mixed state_dict: sparse weights of several shapes, a bias, an int counter."""
    return {
        "conv.weight": make_sparse((4, 2, 3, 3), torch.float32, 0.5, seed=1),
        "fc.weight": make_sparse((8, 16), torch.float32, 0.9, seed=2),
        "fc.bias": make_sparse((8,), torch.float32, 0.0, seed=3),
        "steps": torch.tensor(7),
    }


@pytest.fixture
def small_file(small_state) -> bytes:
    """``small_state`` as a lossless prunekit file."""
    return pf.dumps(small_state)


@pytest.fixture
def int8_file(small_state) -> bytes:
    """``small_state`` as an int8 prunekit file."""
    return pf.dumps(small_state, quantize="int8")
