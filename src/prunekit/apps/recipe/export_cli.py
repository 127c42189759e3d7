"""``prunekit export RUN_DIR|--recipe R.yaml --to onnx|prunekit|int8 --out FILE``: export a run's final model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "export_run"]

FORMATS = ("prunekit", "int8", "onnx")


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand.

    Example:
        >>> parser = argparse.ArgumentParser(prog="prunekit")
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["export", "runs/x", "--to", "onnx", "--out", "m.onnx"]).to
        'onnx'
    """
    parser = subparsers.add_parser(
        "export", help="export a recipe run's pruned model: prunekit file, int8, or ONNX",
        description="Rebuild a recipe run's final (pruned, stripped) model via the recipe's model factory and "
                    "write it as a prunekit file (lossless), an int8 prunekit file, or ONNX (checked against "
                    "onnxruntime).")
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="a run directory of 'prunekit prune'")
    parser.add_argument("--recipe", type=Path, metavar="R.yaml", help="instead of RUN_DIR: the recipe's run under --runs")
    parser.add_argument("--runs", type=Path, default=Path("runs"), metavar="DIR",
                        help="where --recipe's run directory is (default: runs)")
    parser.add_argument("--to", choices=FORMATS, required=True, help="output format")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file")
    parser.set_defaults(func=_main)


def export_run(run_dir: Path | None, recipe: Path | None, to: str, out: Path, runs: Path = Path("runs")) -> int:
    """Write the final model of a run to ``out`` in format ``to``; return the bytes written.

    Example:
        >>> export_run(Path("runs/demo-3f2a9c0b1d4e"), None, "int8", Path("model_int8.pkt"))  # doctest: +SKIP
        11873
    """
    from ...formats import export_onnx, save
    from .build import load_data
    from .run import resolve_run
    from .stages import load_final_model

    config, run = resolve_run(run_dir, recipe, runs)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name")
    model = load_final_model(config, run)
    if to == "onnx":
        example = load_data(config.data).X_test[:8]
        return export_onnx(model, example, out).bytes
    return save(model, out, quantize="int8" if to == "int8" else None)


def _main(args: argparse.Namespace) -> int:
    written = export_run(args.run_dir, args.recipe, args.to, args.out, args.runs)
    print(f"wrote {args.out} ({written:,} bytes, {args.to})")
    return 0
