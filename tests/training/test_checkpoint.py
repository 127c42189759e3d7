"""training/checkpoint.py: hostile or foreign files give ValueError naming the file, never another error."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from prunekit.training.checkpoint import load_checkpoint

HOSTILE = {
    "garbage": b"garbage",
    "bad json header": struct.pack("<Q", 20) + b'{"a": {"dtype":"F32"}}',
    "header longer than the file": struct.pack("<Q", 10**12) + b"{}",
    "truncated tensor": struct.pack("<Q", 64) + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.ljust(64)
    + b"\0" * 4,
    "empty": b"",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_are_a_value_error(tmp_path, name):
    path = tmp_path / "c.safetensors"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(ValueError, match="c.safetensors"):
        load_checkpoint(path)


def test_a_foreign_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a prunekit checkpoint"):
        load_checkpoint(path)
