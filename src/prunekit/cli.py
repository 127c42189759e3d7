"""The ``prunekit`` command line: a thin layer over the library.

Each subcommand lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``func`` (a callable
taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from . import __version__

# Modules providing subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "prunekit.demo",
    "prunekit.recipe.prune_cli",
    "prunekit.formats.inspect",
    "prunekit.recipe.export_cli",
    "prunekit.recipe.bench",
    "prunekit.experiments.cli",
)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts integers ``>= minimum`` (with a one-line error otherwise).

    Example:
        >>> int_at_least(0)("3")
        3
    """
    words = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value

    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line on stderr and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = OneLineErrorParser(
        prog="prunekit",
        description="Prune PyTorch models during training, one-shot or structurally; ship them small and fast.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>", parser_class=OneLineErrorParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` console script; returns the exit code.

    Invalid input exits with code 2 and a one-line message on stderr.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `prunekit inspect f --json | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
