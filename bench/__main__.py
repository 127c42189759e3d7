"""Run the benchmarks and write JSON + Markdown under --out.

Each benchmark module exposes ``run(out: pathlib.Path, quick: bool) -> str``:
it writes ``out/<name>.json`` itself (atomically) and returns a Markdown section.
All sections are joined into ``out/README.md``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

import torch

from prunekit._io import atomic_open

# (name, module) in the order they run.
BENCHES: tuple[tuple[str, str], ...] = (
    ("train_step", "bench.train_step"),
    ("size", "bench.size"),
    ("runtime", "bench.runtime"),
    ("models", "bench.models"),
    ("structural", "bench.structural"),
    ("mobile", "bench.mobile"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    parser.add_argument("--only", nargs="*", default=None, help="names of benchmarks to run")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    args = parser.parse_args(argv)
    names = [n for n, _ in BENCHES]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [f"# prunekit benchmarks\n\n{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n"]
    for name, module in BENCHES:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        section = importlib.import_module(module).run(args.out, args.quick)
        print(section, flush=True)
        sections.append(section)
    with atomic_open(args.out / "README.md", "w") as f:
        f.write("\n\n".join(sections) + "\n")
    print(f"wrote {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
