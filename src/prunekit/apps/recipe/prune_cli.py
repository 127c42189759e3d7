"""``prunekit prune --recipe R.yaml [--out DIR]``: run a recipe, stage by stage, resumably."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["prune_command"]


def prune_command(recipe: Path, out: Path, *, progress: bool | None = None) -> int:
    """Run ``recipe`` under ``out``, print where its results are; the exit code.

    A missing optional dependency prints one line and returns 1; bad input and
    OS errors raise (the command line reports them with exit code 2).

    Example:
        >>> prune_command(Path("examples/demo.yaml"), Path("runs"), progress=False)  # doctest: +SKIP
        0
    """
    from .run import run_recipe

    try:
        result = run_recipe(recipe, out, progress=progress)
    except ImportError as exc:
        # A missing optional dependency (e.g. onnx for export.onnx): the environment, not the input.
        # OSError (unreadable recipe, unwritable --out) is reported by prunekit.apps.cli.main with exit 2.
        print(f"prunekit prune: error: {exc}", file=sys.stderr)
        return 1
    evaluation = result.results["evaluate"]
    print(f"run directory {result.run_dir}: ran {', '.join(result.executed) or 'nothing'}"
          f"{'; skipped ' + ', '.join(result.skipped) if result.skipped else ''}")
    print(f"pruned test accuracy {evaluation['pruned']['accuracy']:.2%} at sparsity {evaluation['sparsity']:.2%}; "
          f"results in {result.run_dir / 'results.json'}")
    return 0
