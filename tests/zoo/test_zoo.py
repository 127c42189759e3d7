"""Every family of the zoo through every capability, with exact-equivalence checks.

A cell either passes its check or is a *documented refusal*: :data:`REFUSALS`
holds the exact error prunekit must raise for it (the op, the module path and
what to pass to skip it). Nothing is skipped silently. Each cell's outcome is
recorded (``tests/zoo/conftest.py``) and ``python -m tests.zoo.coverage_table``
turns the record into the README's coverage table.
"""

from __future__ import annotations

from typing import Callable

import pytest

pytest.importorskip("transformers")

from .checks import (check_accelerate, check_gradual, check_oneshot, check_onnx,  # noqa: E402
                     check_save_load, check_structural)
from .models import FAMILIES  # noqa: E402

pytestmark = pytest.mark.slow

CAPABILITIES = ("gradual", "save_load", "onnx", "accelerate", "oneshot", "structural")

# (family, capability) -> (exception class name, the first line of its message, exactly).
REFUSALS: dict[tuple[str, str], tuple[str, str]] = {
    ("row_lstm", "oneshot"): (
        "UnsupportedLayer",
        "prune_oneshot: cannot solve LSTM at 'lstm' (one-shot solves Linear, transformers Conv1D and Conv1d/2d/3d "
        "layers only); pass exclude=['lstm'] to leave it dense"),
    ("transformer_encoder", "oneshot"): (
        "UnsupportedLayer",
        "prune_oneshot: cannot solve MultiheadAttention at 'encoder.layers.0.self_attn' (its projections are used "
        "through F.multi_head_attention_forward, not called as layers); pass exclude=['encoder.layers.0.self_attn'] "
        "to leave it dense (and 1 more: encoder.layers.1.self_attn)"),
}

TWO_SEEDS = [0, 1]
ONE_SEED = [0]


def run_cell(family: str, capability: str, check: Callable[[], None], record_property) -> None:
    """Run ``check``; for a documented refusal, assert prunekit raises exactly that error."""
    refusal = REFUSALS.get((family, capability))
    if refusal is None:
        note = check()
        if note:  # passed by a documented route (e.g. reload via apply_shapes): the table says which
            record_property("zoo_note", note)
        return
    kind, message = refusal
    with pytest.raises(Exception) as info:
        check()
    assert type(info.value).__name__ == kind, f"expected {kind}, got {type(info.value).__name__}: {info.value}"
    first = str(info.value).splitlines()[0] if str(info.value) else ""
    assert first == message, f"refusal message changed:\n  got:  {first}\n  want: {message}"
    record_property("zoo_refused", f"{kind}: {message}")


@pytest.mark.parametrize("seed", TWO_SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradual(family, seed, record_property):
    run_cell(family, "gradual", lambda: check_gradual(FAMILIES[family], seed), record_property)


@pytest.mark.parametrize("seed", TWO_SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load(family, seed, tmp_path, record_property):
    run_cell(family, "save_load", lambda: check_save_load(FAMILIES[family], seed, tmp_path), record_property)


@pytest.mark.parametrize("seed", ONE_SEED)
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx(family, seed, tmp_path, record_property):
    pytest.importorskip("onnxruntime")
    run_cell(family, "onnx", lambda: check_onnx(FAMILIES[family], seed, tmp_path), record_property)


@pytest.mark.parametrize("seed", ONE_SEED)
@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate(family, seed, record_property):
    run_cell(family, "accelerate", lambda: check_accelerate(FAMILIES[family], seed), record_property)


@pytest.mark.parametrize("seed", TWO_SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_oneshot(family, seed, record_property):
    run_cell(family, "oneshot", lambda: check_oneshot(FAMILIES[family], seed), record_property)


@pytest.mark.parametrize("seed", TWO_SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_structural(family, seed, tmp_path, record_property):
    run_cell(family, "structural", lambda: check_structural(FAMILIES[family], seed, tmp_path), record_property)


def test_refusals_name_a_known_cell():
    """A refusal entry for a family or capability that does not exist would never be exercised."""
    assert all(f in FAMILIES and c in CAPABILITIES for f, c in REFUSALS)
