"""``prunekit prune --recipe R.yaml [--out DIR]``: run a recipe, stage by stage, resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``prune`` subcommand.

    Example:
        >>> parser = argparse.ArgumentParser(prog="prunekit")
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["prune", "--recipe", "r.yaml"]).out
        PosixPath('runs')
    """
    parser = subparsers.add_parser(
        "prune", help="run a YAML recipe: dense training, pruning, export, evaluation (resumable)",
        description="Run the pruning run a YAML recipe describes in OUT/<name>-<hash12>. Finished stages "
                    "(dense-train, prune-train, export, evaluate) are skipped when run again; an interrupted "
                    "stage resumes from its last checkpoint. See examples/*.yaml.")
    parser.add_argument("--recipe", type=Path, required=True, metavar="R.yaml", help="the recipe (YAML)")
    parser.add_argument("--out", type=Path, default=Path("runs"), metavar="DIR",
                        help="parent of the run directory (default: runs)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars (default: shown when stderr is a terminal)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .run import run_recipe

    try:
        result = run_recipe(args.recipe, args.out, progress=args.progress)
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
