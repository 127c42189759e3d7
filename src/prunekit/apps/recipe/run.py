"""Run a recipe: validate everything, then run the stages that are not done yet.

The run directory is ``<out>/<recipe name>-<first 12 hex digits of the recipe's
SHA-256>``: the same recipe always lands in the same directory, a changed one in
a new directory. A finished stage leaves ``stages/<stage>.json`` (its result,
written atomically after its files), so running a recipe again skips it; an
interrupted stage resumes from its last checkpoint. ``stages/log.json`` records
every stage run and skip, in order.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..._io import atomic_write_json
from ..._progress import resolve_progress
from ..._repro import seeded
from ...core.criteria import Magnitude
from ...core.pruner import Pruner
from .build import Data, build_granularity, build_model, check_compatible, load_data
from .config import Recipe, RecipeError, check_mobile_runtimes, load_recipe
from .stages import STAGES, Context, run_stage

__all__ = ["RunResult", "prepare", "run_recipe", "run_dir_for", "resolve_run"]


@dataclass
class RunResult:
    """What :func:`run_recipe` did.

    Attributes:
        run_dir: the run directory.
        executed: stages run by this call, in order.
        skipped: stages already done before this call.
        results: every stage's result, by stage name.
    """

    run_dir: Path
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_dir_for(recipe: Recipe, out: str | os.PathLike[str] = "runs") -> Path:
    """The run directory of ``recipe`` under ``out`` (not created).

    Example:
        >>> run_dir_for(recipe, "runs")  # doctest: +SKIP
        PosixPath('runs/demo-3f2a9c0b1d4e')
    """
    return Path(out) / recipe.run_name


def prepare(recipe: Recipe) -> Data:
    """Check everything that can fail before any file is written: model, data, shapes, scope, granularity.

    Raises:
        RecipeError: the first problem, naming the recipe field.

    Example:
        >>> data = prepare(load_recipe("examples/demo.yaml"))  # doctest: +SKIP
    """
    data = load_data(recipe.data)
    if len(data.X_train) == 0 or len(data.X_test) == 0:
        raise RecipeError("recipe.data: an empty train or test split")
    with seeded(recipe.training.seed):
        model = build_model(recipe.model)
        check_compatible(model, data)
        scope = recipe.scope
        try:  # a magnitude dry run validates scope and granularity without the criterion's cost
            Pruner(copy.deepcopy(model), recipe.schedule, criterion=Magnitude(),
                   granularity=build_granularity(recipe.granularity),
                   layers=None if scope.layers is None else list(scope.layers), exclude=list(scope.exclude) or None,
                   overrides=dict(scope.overrides) or None, ranking=scope.ranking).remove()
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"recipe.scope/granularity: {exc}") from None
    _check_pattern_sparsity(recipe)
    check_mobile_runtimes(recipe.export)
    return data


def _check_pattern_sparsity(recipe: Recipe) -> None:
    # An N:M pattern fixes the sparsity at 1 - n/m: a ramp would fail at its second update, mid-run.
    g, s = recipe.granularity, recipe.schedule
    if g.type != "nm":
        return
    allowed = 1 - g.n / g.m
    end = s.begin_step if s.end_step == -1 else s.end_step
    for step in range(s.begin_step, end + 1, s.frequency):
        value = s.sparsity(step)
        if value != 0 and abs(value - allowed) > 1e-9:
            raise RecipeError(f"recipe.schedule: {g.n}:{g.m} sparsity is fixed at {allowed:g}, but the schedule asks "
                              f"for {value:.4g} at step {step}; use ConstantSparsity with target_sparsity {allowed:g}")


def run_recipe(recipe: Recipe | str | os.PathLike[str], out: str | os.PathLike[str] = "runs", *,
               progress: bool | None = None, log: Callable[[str], None] | None = print) -> RunResult:
    """Run (or finish) a recipe in its run directory under ``out``.

    Args:
        recipe: a :class:`~prunekit.apps.recipe.config.Recipe` or the path of a YAML recipe.
        out: parent of the run directory.
        progress: tqdm bars while training (``None``: only when stderr is a terminal).
        log: called with one line per stage (``None``: silent).

    Returns:
        A :class:`RunResult`.

    Raises:
        RecipeError: an invalid recipe (nothing is written then).
        FileNotFoundError: the recipe file does not exist.

    Example:
        >>> result = run_recipe("examples/demo.yaml", "runs")  # doctest: +SKIP
        >>> result.executed  # doctest: +SKIP
        ['dense-train', 'prune-train', 'export', 'evaluate']
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a directory")
    show = resolve_progress(progress)
    say = log or (lambda line: None)
    run_dir = run_dir_for(recipe, out)
    if all((run_dir / "stages" / f"{name}.json").is_file() for name in STAGES):
        data = None  # everything is done: not even the data is needed
    else:
        data = prepare(recipe)
    with _exclusive(run_dir):
        return _run_stages(recipe, run_dir, data, show, say)


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    # Two processes running stages in one directory would interleave their files. The lock
    # is the kernel's: it goes away with its process, even after kill -9.
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"run directory {str(run_dir)!r} is in use by another prunekit process") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_stages(recipe: Recipe, run_dir: Path, data: Data | None, show: bool,
                say: Callable[[str], None]) -> RunResult:
    result = RunResult(run_dir)
    atomic_write_json(run_dir / "recipe.json", recipe.to_dict())
    for name in STAGES:
        marker = run_dir / "stages" / f"{name}.json"
        if marker.is_file():
            result.skipped.append(name)
            result.results[name] = json.loads(marker.read_text())
            _log(run_dir, name, "skipped")
            say(f"{name}: done before, skipped")
            continue
        stage_result = run_stage(name, Context(recipe, run_dir, data, show))
        atomic_write_json(marker, stage_result)
        result.executed.append(name)
        result.results[name] = stage_result
        _log(run_dir, name, "ran")
        say(f"{name}: {_summary(name, stage_result)}")
    return result


def _log(run_dir: Path, stage: str, event: str) -> None:
    path = run_dir / "stages" / "log.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"stage": stage, "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_json(path, entries)


def _summary(name: str, r: dict[str, Any]) -> str:
    took = f"{r['seconds']:.1f} s"
    if name == "dense-train":
        return f"{r['epochs']} epochs, test accuracy {r['accuracy']:.2%}, loss {r['loss']:.4f} ({took})"
    if name == "prune-train":
        resumed = f", resumed at step {r['resumed_at']}" if r.get("resumed_at") is not None else ""
        stop = r.get("stop_when")
        stopped = "" if stop is None else (
            f", stop_when: stopped at step {stop['stop_step']}, holding sparsity {stop['sparsity_reached']:.2%}"
            if stop["stopped"] else ", stop_when: never out of tolerance")
        return f"{r['steps']} steps, sparsity {r['sparsity']:.2%}{stopped}{resumed} ({took})"
    if name == "export":
        files = ", ".join(f"{k} {v['bytes']:,} B" for k, v in r.items() if isinstance(v, dict)) or "nothing"
        return f"{files} ({took})"
    acc = f"test accuracy {r['pruned']['accuracy']:.2%}"
    if "model_int8.pkt" in r:
        acc += f", int8 file {r['model_int8.pkt']['accuracy']:.2%}"
    return f"{acc}, sparsity {r['sparsity']:.2%} ({took})"


def resolve_run(run_dir: str | os.PathLike[str] | None, recipe_path: str | os.PathLike[str] | None,
                runs: str | os.PathLike[str] = "runs") -> tuple[Recipe, Path]:
    """The recipe and run directory named by either a run directory or a recipe file (for export and bench).

    Raises:
        ValueError: both or neither given, or the run directory holds no valid ``recipe.json``.
        FileNotFoundError: a missing recipe file or run directory.

    Example:
        >>> recipe, run_dir = resolve_run(None, "examples/demo.yaml", "runs")  # doctest: +SKIP
    """
    from .config import parse_recipe

    if (run_dir is None) == (recipe_path is None):
        raise ValueError("give either a run directory (RUN_DIR) or --recipe R.yaml, not both or neither")
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        return recipe, run_dir_for(recipe, runs)
    path = Path(run_dir)
    if not (path / "recipe.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a recipe run directory (no recipe.json)")
    return parse_recipe(_read_recipe_json(path / "recipe.json")), path


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_recipe_json(path: Path) -> Any:
    # A run directory may come from elsewhere: the same bounds as a YAML recipe (size, nesting, duplicate keys).
    from .safe_yaml import MAX_RECIPE_BYTES

    with open(path, "rb") as handle:
        raw = handle.read(MAX_RECIPE_BYTES + 1)
    try:
        if len(raw) > MAX_RECIPE_BYTES:
            raise ValueError(f"larger than {MAX_RECIPE_BYTES:,} bytes")
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{str(path)!r} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise ValueError(f"{str(path)!r} is not valid JSON ({str(exc).splitlines()[0]})") from None
