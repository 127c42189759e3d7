"""``prunekit experiment <name> [--quick] [--out DIR] [--seeds N]``: run a registered experiment.

Each entry of :data:`prunekit.apps.experiments.EXPERIMENTS` becomes a sub-command
with the same options; the experiment's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from . import EXPERIMENTS, Experiment
from ..cli import int_at_least

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``experiment`` and one sub-command per registered experiment.

    Example:
        >>> parser = argparse.ArgumentParser(prog="prunekit")
        >>> register(parser.add_subparsers())
        >>> args = parser.parse_args(["experiment", "obd-vs-magnitude", "--quick", "--seeds", "2"])
        >>> args.experiment, args.quick, args.seeds
        ('obd-vs-magnitude', True, 2)
    """
    parser = subparsers.add_parser(
        "experiment", help="run a named, reproducible experiment (table.md, results.json, plot.png)",
        description="Run a named experiment; it writes DIR/table.md, DIR/results.json and DIR/plot.png.")
    names = parser.add_subparsers(title="experiments", metavar="<name>", dest="experiment", required=True,
                                  parser_class=type(parser))
    for entry in EXPERIMENTS.values():
        _add_experiment(names, entry)


def _add_experiment(names: Any, entry: Experiment) -> None:
    # argparse %-formats help strings (not descriptions): "30% channels" would read as a "% c" conversion.
    sub = names.add_parser(entry.name, help=entry.help.replace("%", "%%"), description=entry.help)
    sub.add_argument("--out", type=Path, default=Path("runs") / entry.name, metavar="DIR",
                     help=f"output directory (default: runs/{entry.name})")
    sub.add_argument("--quick", action="store_true", help="a small version that takes seconds (for tests)")
    sub.add_argument("--seeds", type=int_at_least(1), default=None, metavar="N",
                     help=f"run seeds 0..N-1 (default: {entry.default_seeds}; --quick: fewer)")
    sub.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                     help="no progress bars (default: shown when stderr is a terminal)")
    sub.set_defaults(func=lambda args: _run(entry, args))


def _run(entry: Experiment, args: argparse.Namespace) -> int:
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a directory")
    seeds = None if args.seeds is None else list(range(args.seeds))
    started = time.perf_counter()
    try:
        entry.load().run(out, quick=args.quick, seeds=seeds, progress=args.progress)
    except ImportError as exc:
        # A missing optional dependency: the environment, not the input. ValueError, TypeError and
        # OSError (e.g. an unwritable --out) are reported by prunekit.apps.cli.main with exit 2.
        print(f"prunekit experiment {entry.name}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'plot.png'} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
