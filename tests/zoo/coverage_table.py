"""Render the zoo's recorded outcomes as the README's coverage table (family x capability).

Usage (after ``make test`` or ``pytest tests/zoo``)::

    python -m tests.zoo.coverage_table            # rewrite README.md between the zoo-coverage markers
    python -m tests.zoo.coverage_table --print    # print the table only

A cell is ``pass`` when every seed passed, ``refused`` (with its exact message
as a footnote) when prunekit raised the documented error, ``FAIL`` otherwise,
and ``-`` when the record has no result for it.

Example:
    >>> cells = {"lenet5/gradual": {"0": {"outcome": "pass"}, "1": {"outcome": "pass"}}}
    >>> render(cells, ["lenet5"], ["gradual"]).splitlines()[2]
    '| lenet5 (prunekit.apps.models) | pass (2 seeds) |'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

START, END = "<!-- zoo-coverage:start -->", "<!-- zoo-coverage:end -->"
CAPABILITIES = ("gradual", "save_load", "onnx", "accelerate", "oneshot", "structural")
TITLES = {"gradual": "gradual pruning", "save_load": "save / load", "onnx": "ONNX export",
          "accelerate": "accelerate", "oneshot": "one-shot", "structural": "structural"}
ROOT = Path(__file__).resolve().parents[2]


def _sources() -> dict[str, str]:
    try:
        from .models import FAMILIES
    except ImportError:  # run as a plain script
        from models import FAMILIES  # type: ignore[no-redef]
    return {name: fam.source for name, fam in FAMILIES.items()}


def _cell(seeds: Mapping[str, Mapping[str, str]] | None, notes: list[str]) -> str:
    if not seeds:
        return "-"
    outcomes = {e["outcome"] for e in seeds.values()}
    if "fail" in outcomes:
        first = next(e["message"] for e in seeds.values() if e["outcome"] == "fail")
        return f"FAIL: {first[:80].replace('|', '/')}"
    if outcomes == {"refused"}:
        message = next(iter(seeds.values()))["message"]
        if message not in notes:
            notes.append(message)
        return f"refused [{notes.index(message) + 1}]"
    if outcomes == {"pass"}:
        seeds_text = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        note = next((e["note"] for e in seeds.values() if e.get("note")), None)
        if note is None:
            return f"pass ({seeds_text})"
        note = f"save_pretrained, then apply_shapes on the saved config (from_pretrained alone cannot): {note}"
        if note not in notes:
            notes.append(note)
        return f"pass ({seeds_text}) [{notes.index(note) + 1}]"
    return " / ".join(sorted(outcomes))


def render(cells: Mapping[str, Mapping[str, Mapping[str, str]]], families: Sequence[str],
           capabilities: Sequence[str] = CAPABILITIES, sources: Mapping[str, str] | None = None) -> str:
    """The Markdown table (and its refusal footnotes) for ``cells`` (``{"family/capability": {seed: entry}}``)."""
    sources = _sources() if sources is None else sources
    notes: list[str] = []
    lines = ["| family | " + " | ".join(TITLES.get(c, c) for c in capabilities) + " |",
             "|---|" + "---|" * len(capabilities)]
    for fam in families:
        row = [_cell(cells.get(f"{fam}/{cap}"), notes) for cap in capabilities]
        label = f"{fam} ({sources[fam]})" if fam in sources else fam
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] `{note}`  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def effnet_part(results: Mapping | None) -> list[str]:
    """Lines summarising ``prunekit experiment efficientnet-lite0`` (empty without its results)."""
    if not results:
        return []
    lines = ["", "### A pretrained model through the whole path: EfficientNet-Lite0", "",
             f"`prunekit experiment efficientnet-lite0` ({', '.join(results['image_names'])}; "
             f"{results['preprocessing']}; no retraining): each variant saved, reloaded into a freshly built model "
             "(identical outputs) and exported to ONNX; top-5 compared with the dense model's.", "",
             "| variant | params | non-zero | file KiB | top-5 overlap | top-1 agree | p(dense top-1) | ONNX rel. err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["variants"]:
        size = f"{row['file_bytes'] / 1024:,.0f}" if "file_bytes" in row else "-"
        onnx = f"{row['onnx_max_rel_error']:.1e}" if "onnx_max_rel_error" in row else "-"
        lines.append(f"| {row['variant']} | {row['params']:,} | {row['nonzero']:,} | {size} | "
                     f"{row['mean_overlap']:.2f} | {row['mean_top1']:.2f} | {row['mean_dense_top1_prob']:.3f} | {onnx} |")
    lines += ["", "The path itself is exact (reloaded outputs identical, onnxruntime within the relative error shown). "
              "The predictions are not kept: without retraining, and with no calibration data beyond the few images "
              "that ship with matplotlib, this compact network is very sensitive to pruning (plain magnitude pruning "
              "written out by hand, without prunekit, gives the same top-5 overlaps at 30%). Recovering accuracy needs "
              "fine-tuning on ImageNet-like data, which is not on this machine."]
    return lines


def section(cells: Mapping[str, Mapping[str, Mapping[str, str]]], effnet: Mapping | None = None) -> str:
    """The README section between the markers, markers included."""
    sources = _sources()
    table = render(cells, list(sources), CAPABILITIES, sources)
    intro = ("Every family of the test zoo (`tests/zoo/`: tiny random-init configs, hidden 32-64, 2 layers) "
             "through every capability, with exact-equivalence checks: gradual pruning (measured sparsity = "
             "target, same state_dict keys), save/load (identical outputs), ONNX export (onnxruntime vs torch "
             "<= 1e-4 on a second input), accelerate (vs the dense-with-zeros model <= 1e-5), one-shot (SparseGPT; "
             "the last block's first layer calibrated on what the pruned model's own full forward feeds it), "
             "structural (physically pruned vs masked model <= 1e-5, 30% of every coupled group; transformers "
             "models round-trip `save_pretrained` / `from_pretrained`, or, where the config cannot describe the "
             "pruned sizes, `save_pretrained` + `apply_shapes` on the saved config). A refusal is a clear error the test asserts word for word. Generated by "
             "`python -m tests.zoo.coverage_table` from the last `make test`.")
    return "\n".join([START, "", "## Coverage: the model zoo", "", intro, "", table, *effnet_part(effnet), "", END])


def update_readme(readme: Path, cells: Mapping[str, Mapping[str, Mapping[str, str]]],
                  effnet: Mapping | None = None) -> None:
    """Replace the marked section of ``readme`` (or append it at the end if the markers are missing)."""
    text = readme.read_text()
    new = section(cells, effnet)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    readme.write_text(text)


def failures(cells: Mapping[str, Mapping[str, Mapping[str, str]]]) -> str:
    """A Markdown list of every failing (family, capability) with the first line of its error."""
    lines = []
    for key, seeds in sorted(cells.items()):
        bad = {s: e for s, e in seeds.items() if e["outcome"] == "fail"}
        if bad:
            seed, entry = next(iter(bad.items()))
            lines.append(f"- **{key}** (seeds {', '.join(sorted(bad))}): `{entry['message'][:400]}`")
    return "\n".join(lines) if lines else "- none"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: read the record, print the table or rewrite the README section."""
    parser = argparse.ArgumentParser(prog="python -m tests.zoo.coverage_table", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "zoo" / "coverage.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--effnet", type=Path, default=ROOT / "runs" / "efficientnet-lite0" / "results.json",
                        help="results.json of `prunekit experiment efficientnet-lite0` (used if it exists)")
    parser.add_argument("--failures", type=Path, default=None, help="also write the list of failing cells here")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the table, change nothing")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"no zoo results at {args.results}: run `make test` (or pytest tests/zoo) first", file=sys.stderr)
        return 1
    cells = json.loads(args.results.read_text())["cells"]
    effnet = json.loads(args.effnet.read_text()) if args.effnet.is_file() else None
    if args.failures is not None:
        header = ("# Zoo failures (issue 14)\n\nGenerated by `python -m tests.zoo.coverage_table --failures ...` "
                  "from `runs/zoo/coverage.json`; each failing (family/capability), the first line of its error. "
                  "Reproduce one cell: `.venv/bin/python -m pytest -q tests/zoo -p no:cacheprovider "
                  "-k 'test_onnx and gpt2'`.\n\n")
        args.failures.write_text(header + failures(cells) + "\n")
    if args.print_only:
        print(section(cells, effnet))
    else:
        update_readme(args.readme, cells, effnet)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
