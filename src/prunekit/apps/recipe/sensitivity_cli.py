"""``prunekit sensitivity --recipe R.yaml``: how much each layer of a recipe's dense model can be pruned alone.

The dense model is the recipe's dense phase: reused from the recipe's run
directory (``<runs>/<name>-<hash12>/dense.safetensors``) when its dense-train
stage has finished there (``prunekit prune`` writes it), otherwise trained here
by that very stage, in a temporary directory that is removed afterwards (run
``prunekit prune`` first to train once for both). Each layer in the recipe's
scope (``layers``/``exclude``) is then pruned alone with the recipe's criterion
and granularity over the grid, and the metric is the test-set accuracy. The
output directory gets ``sensitivity.json``, ``sensitivity.md`` and
``sensitivity.png``, each written atomically.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors.torch import load as st_load
from torch import nn

from ..._io import atomic_write_bytes, atomic_write_json
from ..._progress import resolve_progress
from ..._repro import seeded
from ...methods.sensitivity import DEFAULT_SPARSITIES, SensitivityResult, check_grid, sensitivity
from ...training.loop import evaluate
from .build import Data, build_criterion, build_granularity, build_model
from .config import Recipe, load_recipe
from .run import prepare, run_dir_for
from .stages import Context, run_stage

__all__ = ["parse_sparsities", "sensitivity_command", "run_sensitivity", "dense_model"]

FILES = ("sensitivity.json", "sensitivity.md", "sensitivity.png")


def parse_sparsities(text: str) -> tuple[float, ...]:
    """The grid of ``--sparsities``: comma-separated numbers in ``[0, 1)``.

    Raises:
        ValueError: an empty list, a part that is not a number, or one outside ``[0, 1)``.

    Example:
        >>> parse_sparsities("0.1, 0.5,0.9")
        (0.1, 0.5, 0.9)
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("--sparsities: empty; give comma-separated sparsities in [0, 1), e.g. 0.1,0.5,0.9")
    out = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--sparsities: {part!r} is not a number; give comma-separated sparsities in [0, 1), "
                             "e.g. 0.1,0.5,0.9") from None
        if not 0.0 <= value < 1.0:  # also refuses nan
            raise ValueError(f"--sparsities: {part!r} is outside [0, 1)")
        out.append(value)
    return tuple(out)


def dense_model(recipe: Recipe, data: Data, runs: str | Path, *, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's dense model and where it came from (``{"source": "run directory" | "trained", ...}``).

    Raises:
        ValueError: the run directory's ``dense.safetensors`` does not fit the recipe's model.

    Example:
        >>> model, origin = dense_model(recipe, data, "runs", progress=False)  # doctest: +SKIP
        >>> origin["source"]  # doctest: +SKIP
        'run directory'
    """
    run_dir = run_dir_for(recipe, runs)
    path = run_dir / "dense.safetensors"
    if (run_dir / "stages" / "dense-train.json").is_file() and path.is_file():
        return _load(recipe, path), {"source": "run directory", "path": str(path)}
    with tempfile.TemporaryDirectory(prefix="prunekit-sensitivity-") as tmp:
        stage = run_stage("dense-train", Context(recipe, Path(tmp), data, progress))
        model = _load(recipe, Path(tmp) / "dense.safetensors")
    return model, {"source": "trained", "path": None, "seconds": stage["seconds"]}


def _load(recipe: Recipe, path: Path) -> nn.Module:
    tensors = st_load(path.read_bytes())
    tensors.pop("rng/torch", None)  # the dense stage stores its RNG state beside the weights
    model = build_model(recipe.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{str(path)!r} does not fit the recipe's model ({first})") from None
    return model.eval()


def _grid(recipe: Recipe, sparsities: str | Sequence[float] | None) -> list[float]:
    # Checked in full (duplicates, what the granularity can reach) before the dense model is trained.
    g = recipe.granularity
    if isinstance(sparsities, str):
        sparsities = parse_sparsities(sparsities)
    elif sparsities is None:
        sparsities = (1 - g.n / g.m,) if g.type == "nm" else DEFAULT_SPARSITIES  # N:M fixes the sparsity
    return check_grid(sparsities, build_granularity(g))


def run_sensitivity(recipe: Recipe | str | Path, out: str | Path | None = None, *, runs: str | Path = "runs",
                    sparsities: str | Sequence[float] | None = None, progress: bool | None = None,
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Analyse ``recipe``'s dense model and write the three files into ``out``; returns the JSON written.

    Args:
        recipe: a :class:`~prunekit.apps.recipe.config.Recipe` or the path of a YAML recipe.
        out: output directory (``None``: ``<runs>/<run name>/sensitivity``).
        runs: parent of the recipe's run directory, whose dense model is reused if there.
        sparsities: the grid (``"0.1,0.5"`` or numbers; ``None``: 0.1..0.9, or ``1 - n/m`` for N:M).
        progress: bars for training and the analysis (``None``: when stderr is a terminal).
        log: called with a line per step (``None``: silent).

    Raises:
        RecipeError: an invalid recipe; ValueError: a bad grid or output path (nothing is written then).
        ImportError: matplotlib is missing (checked before any work).

    Example:
        >>> doc = run_sensitivity("examples/demo.yaml", "runs/demo-sensitivity")  # doctest: +SKIP
        >>> doc["metric"]  # doctest: +SKIP
        'test accuracy'
    """
    _need_matplotlib()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out) if out is not None else run_dir_for(recipe, runs) / "sensitivity"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a directory")
    grid = _grid(recipe, sparsities)
    say = log or (lambda line: None)
    data = prepare(recipe)
    model, origin = dense_model(recipe, data, runs, progress=resolve_progress(progress))
    say(f"dense model: {'reused ' + origin['path'] if origin['path'] else 'trained by the dense-train stage'}")
    scope = recipe.scope
    with seeded(recipe.training.seed):
        result = sensitivity(model, lambda m: evaluate(m, data.X_test, data.y_test)["accuracy"], sparsities=grid,
                             layers=None if scope.layers is None else list(scope.layers),
                             exclude=list(scope.exclude) or None, criterion=build_criterion(recipe.criterion, data),
                             granularity=build_granularity(recipe.granularity), progress=progress)
    doc = {**result.to_dict(), "metric": "test accuracy", "recipe": recipe.to_dict(), "run": recipe.run_name,
           "test_samples": len(data.X_test), "dense_model": origin}
    _write(out, doc, result, recipe)
    say(_summary(result, out))
    return doc


def _need_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401 - only whether it imports
    except ImportError:
        raise ImportError("sensitivity.png needs matplotlib: pip install 'prunekit[plot]'") from None


def _write(out: Path, doc: dict[str, Any], result: SensitivityResult, recipe: Recipe) -> None:
    atomic_write_json(out / "sensitivity.json", doc)
    origin = doc["dense_model"]
    lines = [f"# Sensitivity of `{recipe.name}`: test accuracy with one layer pruned alone", "",
             f"Criterion {result.criterion}, granularity {result.granularity}; every other layer dense. "
             f"Dense test accuracy {result.dense:.4f} on {doc['test_samples']:,} test samples. Dense model: "
             f"{origin['path'] or 'trained by the recipe dense-train stage'}. "
             f"{result.evaluations} evaluations in {result.seconds:.1f} s.", "", result.table(), ""]
    atomic_write_bytes(out / "sensitivity.md", "\n".join(lines).encode("utf-8"))
    result.plot(out / "sensitivity.png", title=f"{recipe.name}: test accuracy with one layer pruned alone")


def _summary(result: SensitivityResult, out: Path) -> str:
    top = result.sparsities[-1]
    at_top = sorted(result.layers, key=lambda name: result.drop(name)[-1][1])
    most, least = at_top[-1], at_top[0]
    return (f"{len(result.layers)} layers x {len(result.sparsities)} sparsities: {result.evaluations} evaluations "
            f"in {result.seconds:.1f} s; dense accuracy {result.dense:.2%}; at {top:.0%} most sensitive {most} "
            f"({result.curves[most][-1][1]:.2%}), least {least} ({result.curves[least][-1][1]:.2%}); "
            f"results in {out}")


def sensitivity_command(recipe: Path, out: Path | None = None, *, runs: Path = Path("runs"),
                        sparsities: str | Sequence[float] | None = None, progress: bool | None = None) -> int:
    """Run :func:`run_sensitivity` and print where the results are; the exit code.

    A missing optional dependency prints one line and returns 1; bad input and
    OS errors raise (the command line reports them with exit code 2).

    Example:
        >>> sensitivity_command(Path("examples/demo.yaml"), sparsities="0.5,0.9", progress=False)  # doctest: +SKIP
        0
    """
    try:
        run_sensitivity(recipe, out, runs=runs, sparsities=sparsities, progress=progress)
    except ImportError as exc:
        print(f"prunekit sensitivity: error: {exc}", file=sys.stderr)
        return 1
    return 0
