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


# -- temporary files of interrupted writes ------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

from prunekit._io import TEMP_MARK, remove_stale_temps, temp_prefix  # noqa: E402

_WRITER = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("io_under_test", sys.argv[3])  # _io alone: no torch to import
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    with io.atomic_open(sys.argv[1]) as f:
        f.write(b"half of a file")
        f.flush()
        print("writing", flush=True)
        if sys.argv[2] == "kill":
            os._exit(9)  # as kill -9 would: no cleanup runs, the lock dies with the process
        sys.stdin.readline()  # "live": hold the temporary file until told to finish
        f.write(b", then the rest")
""")


def _temps(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARK in p.name)


def _writer(target, mode: str) -> subprocess.Popen:
    import prunekit._io

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), mode, prunekit._io.__file__],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_a_killed_writer_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "model.pkt"
    atomic_write_bytes(target, b"old")
    proc = _writer(target, "kill")
    assert proc.wait(timeout=60) == 9
    [left] = _temps(tmp_path)
    assert left.startswith(temp_prefix(target)) and left.split("-")[-2] == str(proc.pid)
    assert target.read_bytes() == b"old"  # the kill never touched the final name
    atomic_write_bytes(target, b"new")
    assert _temps(tmp_path) == [] and target.read_bytes() == b"new"


def test_a_concurrent_writers_temp_file_is_left_alone(tmp_path):
    target = tmp_path / "model.pkt"
    proc = _writer(target, "live")
    try:
        [live] = _temps(tmp_path)
        atomic_write_bytes(target, b"mine")  # another write to the same path meanwhile
        assert _temps(tmp_path) == [live] and target.read_bytes() == b"mine"
        assert remove_stale_temps(target) == []
    finally:
        proc.stdin.write("go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert _temps(tmp_path) == [] and target.read_bytes() == b"half of a file, then the rest"


def test_only_temp_files_of_the_same_target_are_considered(tmp_path):
    target, other = tmp_path / "a.pkt", tmp_path / "b.pkt"
    proc = _writer(other, "kill")
    proc.wait(timeout=60)
    unrelated = [tmp_path / ".a.pkt.backup", tmp_path / f".a.pkt{TEMP_MARK}notapid", tmp_path / "a.pkt.tmp"]
    for path in unrelated:
        path.write_bytes(b"keep me")
    atomic_write_bytes(target, b"x")
    assert all(p.exists() for p in unrelated)  # not names we make
    assert len(_temps(tmp_path)) == 2  # b's leftover and the look-alike remain
    atomic_write_bytes(other, b"y")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(temp_prefix(other))] == []


def test_an_unlocked_temp_file_of_a_live_pid_is_kept_while_young(tmp_path):
    # A writer that has created its file but not yet locked it looks like this; it gets a minute.
    target = tmp_path / "m.pkt"
    young = tmp_path / f"{temp_prefix(target)}{os.getpid()}-{'ab' * 6}"
    young.write_bytes(b"")
    assert remove_stale_temps(target) == [] and young.exists()
    old = time.time() - 3600
    os.utime(young, (old, old))  # an hour old and unlocked: whoever made it is gone (or its pid was reused)
    assert remove_stale_temps(target) == [young] and not young.exists()


def test_temp_names_fit_long_file_names(tmp_path):
    target = tmp_path / ("n" * 250)  # near the 255-byte limit of most file systems
    atomic_write_bytes(target, b"ok")
    assert target.read_bytes() == b"ok" and _temps(tmp_path) == []
