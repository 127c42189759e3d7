"""The recipe loader: aliases, nesting and size are bounded and duplicate keys refused, with one line and exit 2.

References are independent of the loader: plain ``yaml.safe_load`` / ``yaml.compose`` (which accept all of these
documents: the negative controls) and small recursive counters over their results.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from recipe_helpers import TINY, write_recipe

from prunekit.apps.cli import main
from prunekit.apps.recipe import RecipeError, load_recipe, safe_yaml
from prunekit.apps.recipe.safe_yaml import MAX_DEPTH, MAX_NODES, RecipeYAMLError, load_yaml

TINY_YAML = yaml.safe_dump(TINY, sort_keys=False)


def _laughs(levels: int = 9, width: int = 9) -> str:
    """The classic bomb: each level is ``width`` aliases of the previous one (width**levels scalars)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines)


def _expanded_size(node: yaml.Node) -> int:
    """Nodes of a composed document with aliases expanded (no memo: only for small documents)."""
    if isinstance(node, yaml.ScalarNode):
        return 1
    if isinstance(node, yaml.SequenceNode):
        return 1 + sum(_expanded_size(n) for n in node.value)
    return 1 + sum(_expanded_size(k) + _expanded_size(v) for k, v in node.value)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 1


def _bomb_recipe(tmp_path):
    # A valid recipe whose model kwargs hold the bomb. Plain safe_load returns it at once (shared references), but
    # whatever walks it never finishes: here the error message for LeNet5's unknown kwargs, which reprs them
    # (before the bounded loader, this recipe ran for minutes, its memory growing).
    bomb = "\n".join("    " + line for line in _laughs().splitlines())
    text = TINY_YAML.replace("model:\n  factory: prunekit.apps.models:LeNet5\n",
                             f"model:\n  factory: prunekit.apps.models:LeNet5\n  kwargs:\n{bomb}\n")
    assert text != TINY_YAML
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    return path


def test_billion_laughs_is_a_bomb_for_plain_yaml(tmp_path):
    # Negative control: plain safe_load accepts it, and it stands for 9**9 scalars.
    data = yaml.safe_load(_bomb_recipe(tmp_path).read_text())
    count, level = 1, data["model"]["kwargs"]["l8"]
    while isinstance(level, list):
        count, level = count * len(level), level[0]
    assert count == 9 ** 9 > MAX_NODES


def test_billion_laughs_exits_2_quickly(tmp_path):
    path = _bomb_recipe(tmp_path)
    assert path.stat().st_size < 2048
    proc = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--recipe", str(path), "--out",
                           str(tmp_path / "runs"), "--no-progress"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "not valid YAML" in lines[0] and f"recipes are limited to {MAX_NODES:,}" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("limit", [5, 12, 40])
def test_node_bound_is_exact(limit, monkeypatch):
    monkeypatch.setattr(safe_yaml, "MAX_NODES", limit)
    docs = ["a: &x [1, 2]\nb: [*x, *x]", "a: &x {k: [1, 2, 3]}\nb: *x\nc: [*x, 4]", "a: 1", "[1, [2, 3], [4]]",
            _laughs(2, 3), _laughs(3, 2)]
    for doc in docs:
        size = _expanded_size(yaml.compose(doc))
        if size <= limit:
            assert load_yaml(doc) == yaml.safe_load(doc), doc
        else:
            with pytest.raises(RecipeYAMLError, match=f"expands to [0-9,]+ nodes .*limited to {limit}"):
                load_yaml(doc)


def test_aliases_within_the_bound_load_like_safe_load():
    doc = "base: &b {lr: 0.01, seed: 3}\nx: *b\ny: {<<: *b, seed: 4}\nlayers: &l [fc1, fc2]\nalso: *l"
    assert load_yaml(doc) == yaml.safe_load(doc) == {
        "base": {"lr": 0.01, "seed": 3}, "x": {"lr": 0.01, "seed": 3}, "y": {"lr": 0.01, "seed": 4},
        "layers": ["fc1", "fc2"], "also": ["fc1", "fc2"]}


@pytest.mark.parametrize("levels", [MAX_DEPTH - 3, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH + 5])
def test_depth_bound_is_exact(levels):
    doc = "a: " + "[" * levels + "1" + "]" * levels  # the mapping, `levels` lists, the scalar
    depth = _depth(yaml.safe_load(doc))
    assert depth == levels + 2
    if depth <= MAX_DEPTH:
        assert load_yaml(doc) == yaml.safe_load(doc)
    else:
        with pytest.raises(RecipeYAMLError, match=f"nesting deeper than {MAX_DEPTH} levels at line 1"):
            load_yaml(doc)


def test_depth_through_aliases_is_counted():
    # Each anchor nests the previous one 8 levels deeper: 10 short lines, 80 levels once expanded.
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} " + "[" * 8 + f"*a{i - 1}" + "]" * 8 for i in range(1, 10)]
    doc = "\n".join(lines)
    assert _depth(yaml.safe_load(doc)) > MAX_DEPTH
    with pytest.raises(RecipeYAMLError, match="nesting deeper than"):
        load_yaml(doc)


@pytest.mark.parametrize("doc,inner", [("a: &x [1, *x]", lambda v: v[1]), ("a: &x {b: *x}", lambda v: v["b"]),
                                       ("a: &x [[[*x]]]", lambda v: v[0][0][0])])
def test_recursive_alias_is_refused(doc, inner):
    value = yaml.safe_load(doc)["a"]
    assert inner(value) is value  # negative control: plain yaml builds a cyclic structure
    with pytest.raises(RecipeYAMLError, match=r"alias \*x at line 1, column \d+ is inside the node it names"):
        load_yaml(doc)


def test_deep_nesting_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text(TINY_YAML + "scope: {layers: " + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RecursionError):  # negative control: plain yaml overflows the stack
        yaml.safe_load(path.read_text())
    code = main(["prune", "--recipe", str(path), "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"nesting deeper than {MAX_DEPTH} levels" in err[0], err


@pytest.mark.parametrize("where,text,key,line", [
    ("top level", TINY_YAML + "training: {epochs: 5}\n", "training", len(TINY_YAML.splitlines()) + 1),
    ("nested", TINY_YAML.replace("  epochs: 3\n", "  epochs: 3\n  epochs: 30\n"), "epochs", None),
    ("quoted twin", TINY_YAML.replace("name: tiny\n", "name: tiny\n'name': other\n"), "name", 2),
    ("flow mapping", TINY_YAML + "criterion: {name: random, name: magnitude}\n", "name", None),
])
def test_duplicate_keys_exit_2_naming_the_key(where, text, key, line, tmp_path, capsys):
    assert isinstance(yaml.safe_load(text), dict)  # negative control: plain yaml keeps the last value silently
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    code = main(["prune", "--recipe", str(path), "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"duplicate key {key!r} at line " in err[0] and "give each key once" in err[0], err[0]
    if line is not None:
        assert f"duplicate key {key!r} at line {line}," in err[0]
    assert not (tmp_path / "runs").exists()


def test_keys_that_only_look_alike_are_not_duplicates():
    assert load_yaml("a: 1\n'a ': 2\nA: 3\n1: 4\n'1': 5") == {"a": 1, "a ": 2, "A": 3, 1: 4, "1": 5}


def test_merge_keys_may_be_overridden():
    assert load_yaml("b: &b {x: 1, y: 2}\nd: {<<: *b, x: 3}")["d"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("scalar,ok", [
    ("1" * safe_yaml.MAX_INT_CHARS, True), ("1" * (safe_yaml.MAX_INT_CHARS + 1), False),
    ("1" + ":1" * 100_000, False), ("0x" + "f" * 10_000, False), ("1_000", True)])
def test_long_integers_are_refused(scalar, ok):
    # base-60 integers cost quadratic time, decimal ones past 4300 digits raise ValueError in Python itself
    if ok:
        assert load_yaml(f"a: {scalar}") == yaml.safe_load(f"a: {scalar}")
    else:
        with pytest.raises(RecipeYAMLError, match="an integer of [0-9,]+ characters at line 1, column 4"):
            load_yaml(f"a: {scalar}")


def test_too_large_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(TINY_YAML + "#" * safe_yaml.MAX_RECIPE_BYTES)
    with pytest.raises(RecipeError, match=f"larger than {safe_yaml.MAX_RECIPE_BYTES:,} bytes"):
        load_recipe(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(TINY_YAML.replace("tiny", "t\xefny").encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8: invalid continuation byte at byte"):
        load_recipe(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--recipe", str(fifo), "--out",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("not a regular file"), proc.stderr


def test_yaml_syntax_errors_are_one_line_with_position(tmp_path, capsys):
    path = write_recipe(tmp_path / "ok.yaml", TINY)
    path.write_text(path.read_text() + "extra: [unclosed\n")
    code = main(["prune", "--recipe", str(path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0] and "at line" in err[0], err


def test_python_tags_stay_refused():
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        load_yaml("a: !!python/object/apply:os.system ['true']")
