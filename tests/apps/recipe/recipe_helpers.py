"""Tiny recipes for the recipe tests, and YAML helpers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

# Seconds on two cores: LeNet-5 on 256 digits, 1 dense epoch, 3 pruning epochs (24 steps).
TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"factory": "prunekit.apps.models:LeNet5"},
    "data": {"name": "mnist5k", "batch_size": 32, "train_samples": 256, "test_samples": 100},
    "schedule": {"type": "PolynomialDecay", "initial_sparsity": 0.5, "final_sparsity": 0.8,
                 "begin_step": 0, "end_step": 16, "frequency": 4},
    "training": {"dense_epochs": 1, "epochs": 3, "lr": 0.003, "checkpoint_every": 5},
    "export": {"prunekit": True, "int8": True, "onnx": False},
}

FINAL_ARTIFACTS = ("dense.safetensors", "pruned.safetensors", "model.pkt", "model_int8.pkt", "model.onnx",
                   "results.json")


def merged(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with sections replaced or (dict values) updated key by key; ``None`` deletes a section.

    A ``schedule`` is always replaced whole: its fields depend on its type.
    """
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "schedule":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

