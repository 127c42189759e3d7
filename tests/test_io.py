"""Atomic writes: the final name only ever holds a complete file."""

import json
import os
import stat

import pytest

from prunekit._io import atomic_open, atomic_write_bytes, atomic_write_json


def test_written_file_has_open_like_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        import importlib

        import prunekit._io as io_mod

        importlib.reload(io_mod)  # the umask is read once, at import
        io_mod.atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
        importlib.reload(io_mod)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_bytes(target, b"old contents")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_json_round_trip_and_parent_creation(tmp_path):
    target = tmp_path / "a" / "b" / "r.json"
    atomic_write_json(target, {"x": 1.5, "y": [1, 2]})
    assert json.loads(target.read_text()) == {"x": 1.5, "y": [1, 2]}


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "f", "ab"):
            pass
