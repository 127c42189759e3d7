"""The ``prunekit`` command line: a thin layer over the library.

Each subcommand lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``func`` (a callable
taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Callable, Sequence

from .. import __version__

# Modules providing subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "prunekit.apps.demo",
    "prunekit.apps.recipe.prune_cli",
    "prunekit.formats.inspect",
    "prunekit.apps.recipe.export_cli",
    "prunekit.apps.recipe.bench",
    "prunekit.apps.experiments.cli",
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

    Invalid input (``ValueError``, ``TypeError``, :class:`prunekit.FormatError`,
    a recipe error) and every ``OSError`` (a missing, unreadable or unwritable
    path, a name too long, a directory where a file is expected) exit with code 2
    and one line on stderr naming the problem and the path.

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
    except BrokenPipeError:
        # `prunekit inspect f --json | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"prunekit: error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"prunekit: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


# What to do about the common OS errors, by errno.
_OS_HINTS: dict[int, str] = {
    errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
    errno.ENAMETOOLONG: "use a shorter name", errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory", errno.ENOSPC: "free some disk space",
    errno.EROFS: "choose a writable location", errno.ELOOP: "the path has a symbolic link loop",
    errno.EEXIST: "remove it or choose another path", errno.ENOENT: "check the path",
}
_MAX_SHOWN = 160  # characters of a path shown in a message: a too-long name must not flood the terminal


def describe_os_error(exc: OSError) -> str:
    """``"<what went wrong>: '<path>' (<what to do>)"`` for an OS error; long paths are shortened.

    Example:
        >>> describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/root/r.yaml"))
        "Permission denied: '/root/r.yaml' (check its permissions)"
        >>> describe_os_error(OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300))[-39:]
        "' (300 characters) (use a shorter name)"
    """
    if exc.filename is None:
        return str(exc) or type(exc).__name__
    names = [_shown(exc.filename)] + ([_shown(exc.filename2)] if exc.filename2 is not None else [])
    hint = _OS_HINTS.get(exc.errno or -1)
    return f"{exc.strerror or type(exc).__name__}: {' -> '.join(names)}" + (f" ({hint})" if hint else "")


def _shown(name: object) -> str:
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    if len(text) > _MAX_SHOWN:
        return f"{text[:100] + '...' + text[-40:]!r} ({len(text):,} characters)"
    return repr(text)


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def one_line(text: str) -> str:
    """``text`` with line breaks, other control characters, bidi overrides and lone surrogates escaped.

    A message stays one line, and a name in it cannot move the cursor or recolour the terminal.

    Example:
        >>> one_line("bad name 'a\\nb\\x1b[31m'")
        "bad name 'a\\\\nb\\\\x1b[31m'"
    """
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or ch in _BIDI or 0xD800 <= code < 0xE000:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or
                       (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
