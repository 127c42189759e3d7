"""The `prunekit` command line: the demo subcommand, argument errors, and OS errors of every subcommand."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.apps.cli import main


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


COMMANDS = ("demo", "prune", "inspect", "export", "bench", "experiment", "sensitivity")


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


# -- OS errors: every subcommand exits 2 with one line naming the path, never a traceback ------------------------

LONG = "x" * 300  # longer than NAME_MAX (255) on every common file system


def _one_error_line(argv: list[str], capsys) -> str:
    code = _exit_code(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, captured.err)
    assert lines[0].startswith("prunekit: error: ") and "Traceback" not in captured.err
    return lines[0]


def _recipe(tmp_path) -> Path:
    import yaml

    from prunekit.apps.recipe import parse_recipe

    data = {"name": "t", "model": {"factory": "prunekit.apps.models:LeNet300100", "kwargs": {"in_features": 64}},
            "data": {"name": "digits", "train_samples": 8},
            "schedule": {"type": "ConstantSparsity", "target_sparsity": 0.5}, "training": {"epochs": 1}}
    parse_recipe(data)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


OS_CASES = [
    # (id, argv with {tmp}/{long}/{file}/{dir}/{recipe}, what the message says)
    ("prune recipe name too long", ["prune", "--recipe", "{tmp}/{long}.yaml"], "File name too long"),
    ("prune recipe under a file", ["prune", "--recipe", "{file}/r.yaml"], "Not a directory: '{file}/r.yaml'"),
    ("prune recipe is a directory", ["prune", "--recipe", "{dir}"], "is a directory, not a recipe file: '{dir}'"),
    ("prune out under a file", ["prune", "--recipe", "{recipe}", "--out", "{file}/runs", "--no-progress"],
     "Not a directory: '{file}/runs"),
    ("inspect name too long", ["inspect", "{tmp}/{long}"], "File name too long"),
    ("inspect under a file", ["inspect", "{file}/m.pkt"], "Not a directory: '{file}/m.pkt'"),
    ("export run dir name too long", ["export", "{tmp}/{long}", "--to", "int8", "--out", "{tmp}/m.pkt"],
     "File name too long"),
    ("export recipe name too long", ["export", "--recipe", "{tmp}/{long}.yaml", "--to", "int8", "--out", "{tmp}/m"],
     "File name too long"),
    ("bench run dir name too long", ["bench", "{tmp}/{long}"], "File name too long"),
    ("bench recipe is a directory", ["bench", "--recipe", "{dir}"], "is a directory, not a recipe file: '{dir}'"),
    ("demo out name too long", ["demo", "--quick", "--no-progress", "--out", "{tmp}/{long}"], "File name too long"),
    ("demo out under a file", ["demo", "--quick", "--no-progress", "--out", "{file}/run"],
     "Not a directory: '{file}/run'"),
    ("experiment out name too long", ["experiment", "lottery", "--quick", "--no-progress", "--out", "{tmp}/{long}"],
     "File name too long"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in OS_CASES], ids=[c[0] for c in OS_CASES])
def test_os_errors_exit_2_with_one_line_naming_the_path(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    names = {"{tmp}": str(tmp_path), "{long}": LONG, "{file}": str(tmp_path / "file"), "{dir}": str(tmp_path / "dir")}
    if "{recipe}" in argv:
        names["{recipe}"] = str(_recipe(tmp_path))

    def fill(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    line = _one_error_line([fill(a) for a in argv], capsys)
    assert fill(message) in line, line
    if "{long}" in "".join(argv):
        # The path is named, shortened: its start, and how long it was.
        assert f"'{tmp_path}/xxxx" in line and "characters) (use a shorter name)" in line and LONG not in line


def test_permission_denied_is_one_line(tmp_path, capsys, monkeypatch):
    # Root reads anything, so the denial is simulated where the recipe is opened (a real one follows when not root).
    import errno

    from prunekit.apps.recipe import config

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(config, "_read_text", denied)
    line = _one_error_line(["prune", "--recipe", str(tmp_path / "r.yaml")], capsys)
    assert line == f"prunekit: error: Permission denied: '{tmp_path}/r.yaml' (check its permissions)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied permission")
def test_real_permission_denied(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe.chmod(0)
    line = _one_error_line(["prune", "--recipe", str(recipe)], capsys)
    assert "Permission denied" in line and str(recipe) in line


def test_inspect_of_a_directory_or_garbage_is_a_format_error_exit_2(tmp_path, capsys):
    line = _one_error_line(["inspect", str(tmp_path)], capsys)
    assert str(tmp_path) in line and "is a directory" in line
    (tmp_path / "junk.pkt").write_bytes(b"not a prunekit file at all")
    line = _one_error_line(["inspect", str(tmp_path / "junk.pkt")], capsys)
    assert "not a prunekit file" in line


def test_control_characters_in_a_path_stay_on_one_line(tmp_path, capsys):
    name = "a\nb\x1b[31mred\u202e"
    line = _one_error_line(["inspect", str(tmp_path / name)], capsys)
    assert "a\\nb\\x1b[31mred\\u202e" in line and "\x1b" not in line and "\u202e" not in line


def test_run_dir_recipe_json_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "is not valid JSON (nested too deeply)" in _one_error_line(["bench", str(run)], capsys)
    (run / "recipe.json").write_text('{"name": "a", "name": "b"}')
    assert "is not valid JSON (duplicate key 'name')" in _one_error_line(["bench", str(run)], capsys)
    (run / "recipe.json").write_bytes(b'{"name": "\xff"}')
    assert "is not valid JSON ('utf-8' codec can't decode" in _one_error_line(["bench", str(run)], capsys)
    (run / "recipe.json").unlink()
    (run / "recipe.json").mkdir()
    assert "not a recipe run directory" in _one_error_line(["export", str(run), "--to", "int8", "--out", "m"], capsys)


def test_os_error_in_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prunekit", "inspect", str(tmp_path / LONG)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "File name too long" in proc.stderr


# -- the functions behind the commands take plain arguments (the parser lives in prunekit.apps.cli only) ----------


def test_command_functions_need_no_parser(tmp_path):
    from prunekit.apps.experiments.cli import experiment_command
    from prunekit.apps.recipe.bench import bench_command
    from prunekit.apps.recipe.export_cli import export_command

    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is an existing file, not a directory"):
        experiment_command("lottery", a_file, quick=True, progress=False)
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiment_command("nope", tmp_path / "out")
    for call in (lambda: bench_command(tmp_path, None, tmp_path, [1]),
                 lambda: export_command(tmp_path, None, "int8", tmp_path / "m.pkt")):
        with pytest.raises(FileNotFoundError, match="not a recipe run directory"):
            call()


def test_every_command_is_declared_with_the_function_it_calls():
    from prunekit.apps.cli import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    commands = subcommands(build_parser())
    assert tuple(commands) == COMMANDS
    leaves = {**{n: p for n, p in commands.items() if n != "experiment"}, **subcommands(commands["experiment"])}
    assert len(leaves) > len(COMMANDS) and all(callable(p.get_default("func")) for p in leaves.values())
