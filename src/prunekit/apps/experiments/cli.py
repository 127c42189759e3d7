"""``prunekit experiment <name> [--quick] [--out DIR] [--seeds N]``: run a registered experiment.

The command line (:mod:`prunekit.apps.cli`) offers each entry of
:data:`prunekit.apps.experiments.EXPERIMENTS` as a sub-command and calls
:func:`experiment_command`; the experiment's module is imported only when it runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import get_experiment

__all__ = ["experiment_command"]


def experiment_command(name: str, out: Path, *, quick: bool = False, seeds: int | None = None,
                       progress: bool | None = None) -> int:
    """Run experiment ``name`` with seeds ``0 .. seeds - 1`` into ``out``, say what it wrote; the exit code.

    ``seeds=None`` runs the experiment's default seeds. A missing optional
    dependency prints one line and returns 1; bad input raises (``ValueError``).

    Example:
        >>> experiment_command("lottery", Path("runs/lottery"), quick=True)  # doctest: +SKIP
        0
    """
    entry = get_experiment(name)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a directory")
    started = time.perf_counter()
    try:
        entry.load().run(out, quick=quick, seeds=None if seeds is None else list(range(seeds)), progress=progress)
    except ImportError as exc:
        # A missing optional dependency: the environment, not the input. ValueError, TypeError and
        # OSError (e.g. an unwritable --out) are reported by prunekit.apps.cli.main with exit 2.
        print(f"prunekit experiment {entry.name}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'plot.png'} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
