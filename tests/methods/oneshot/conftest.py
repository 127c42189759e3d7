"""One intra-op thread for the one-shot tests: small operations, and a machine shared with other processes."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs with the shared ``single_thread`` fixture."""
