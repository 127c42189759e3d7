"""One progress rule for every bar prunekit draws: ``progress=None`` means "only when a person is watching".

tqdm draws on stderr, so a bar is worth drawing only when stderr is a
terminal; logs, pipes and CI get none unless asked for with ``progress=True``.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["resolve_progress", "progress_bar"]


def resolve_progress(progress: bool | None) -> bool:
    """Whether to show a bar: ``progress`` itself, or (``None``) whether stderr is a terminal.

    Raises:
        TypeError: ``progress`` is neither a bool nor ``None`` (``1`` or ``"yes"`` are likely mistakes).

    Example:
        >>> resolve_progress(False), resolve_progress(True)
        (False, True)
    """
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {type(progress).__name__} {progress!r}")
    return progress


def progress_bar(progress: bool | None, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
                 unit: str, **options: Any) -> tqdm:
    """A tqdm bar on stderr that fits the terminal's width, drawn only if :func:`resolve_progress` says so.

    Args:
        progress: ``True``/``False``, or ``None`` for "only when stderr is a terminal".
        iterable: iterate through the bar (``None``: call ``bar.update`` instead).
        total: expected number of updates (``None``: ``len(iterable)`` if it has one).
        desc: label in front of the bar.
        unit: what one update counts ("step", "batch", "layer", ...).
        **options: further tqdm options (``initial``, ``leave``, ``delay``, ...).

    Example:
        >>> with progress_bar(False, total=3, desc="demo", unit="step") as bar:
        ...     bar.update(3)
        >>> bar.disable
        True
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not resolve_progress(progress), file=sys.stderr,
                dynamic_ncols=True, **options)
