"""Writes are atomic: a failure mid-write leaves the previous file intact and no temporary files."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import prunekit._io
import prunekit.formats as pf


def _listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("failure", ["fsync", "replace", "interrupt"])
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, monkeypatch, failure):
    path = tmp_path / "model.pkt"
    old = {"w": torch.ones(3, 3)}
    pf.save(old, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt if failure == "interrupt" else OSError("disk full")

    # fsync runs after the bytes are written to the temporary file: a crash "mid-write".
    target = "replace" if failure == "replace" else "fsync"
    monkeypatch.setattr(prunekit._io.os, target, boom)
    with pytest.raises((OSError, KeyboardInterrupt)):
        pf.save({"w": torch.zeros(100, 100)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["model.pkt"]
    assert torch.equal(pf.load(path)["w"], old["w"])


def test_a_save_that_fails_to_encode_writes_nothing(tmp_path):
    path = tmp_path / "model.pkt"
    with pytest.raises(ValueError):
        pf.save({"w": torch.tensor([[float("inf")]])}, path, quantize="int8")
    assert _listing(tmp_path) == []


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "model.pkt"
    pf.save({"w": torch.ones(2)}, path)
    pf.save(nn.Linear(2, 3), path)
    assert sorted(pf.load(path)) == ["bias", "weight"]
    assert _listing(tmp_path) == ["model.pkt"]


def test_save_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "model.pkt"
    pf.save({"w": torch.ones(2)}, path)
    assert os.path.isfile(path)
