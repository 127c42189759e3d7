"""The `prunekit` command line: the demo subcommand and its argument errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.cli import main


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and bad arguments
        return exc.code


def test_top_level_help_lists_demo(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "prune LeNet-5" in out


def test_demo_help(capsys):
    assert _exit_code(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--quick", "--no-progress"):
        assert option in out


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_bad_seed_exits_2_with_one_line(value, capsys, tmp_path):
    assert _exit_code(["demo", "--quick", "--out", str(tmp_path), "--seed", value]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "--seed" in lines[0] and "non-negative integer" in lines[0] and repr(value) in lines[0]
    assert captured.out == "" and not (tmp_path / "results.json").exists()


def test_out_that_is_a_file_exits_2_with_one_line(capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert _exit_code(["demo", "--quick", "--out", str(a_file)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "directory" in lines[0]


def test_python_m_prunekit_demo_quick(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "prunekit", "demo", "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert "pruned" in proc.stdout and "fc1.weight" in proc.stdout
    assert proc.stderr == ""  # no progress bars without a terminal, no warnings


def test_console_script_help():
    script = Path(sys.executable).with_name("prunekit")
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout


COMMANDS = ("demo", "prune", "inspect", "export", "bench", "experiment")


def test_top_level_help_lists_every_command_in_order(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"    {name}") for name in COMMANDS]
    assert positions == sorted(positions)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: prunekit {command}") and "-h, --help" in out


@pytest.mark.parametrize("argv,message", [
    (["prune"], "the following arguments are required: --recipe"),
    (["export", "x", "--out", "m"], "the following arguments are required: --to"),
    (["bench", "x", "--rounds", "-1"], "--rounds: must be a positive integer, got '-1'"),
])
def test_recipe_commands_usage_errors_are_one_line(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
