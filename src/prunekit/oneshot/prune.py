"""``prune_oneshot``: prune a pretrained model's ``Linear`` layers from calibration data, block by block."""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from .._validate import check_choice
from .calibration import (
    call_model, capture_block_inputs, find_blocks, first_output, gather_grams, replace_hidden, to_device,
)
from .solvers import Target, check_sparsegpt_args, magnitude_prune, relative_error, sparsegpt_prune, wanda_prune

__all__ = ["METHODS", "LayerResult", "OneShotReport", "prune_oneshot"]

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class LayerResult:
    """One pruned layer.

    Attributes:
        name: the ``Linear`` module's name (its weight is ``name + ".weight"``).
        shape: the weight's shape ``(out, in)``.
        target: the target, ``"0.5"`` or ``"2:4"``.
        sparsity: the fraction of the weight that is now exactly zero.
        error: ``‖(W − Ŵ)X‖²_F / ‖WX‖²_F`` on the calibration inputs the layer saw
            (``None`` without calibration data).
        seconds: time of the solver (mask and weight update) for this layer.
    """

    name: str
    shape: tuple[int, int]
    target: str
    sparsity: float
    error: float | None
    seconds: float


@dataclass
class OneShotReport:
    """What :func:`prune_oneshot` did.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        blocks: name of the block list processed in order, or ``None`` (one pass).
        samples: calibration samples used.
        layers: one :class:`LayerResult` per pruned layer, in processing order.
        skipped: ``Linear`` layers left dense because they lie outside the blocks.
        seconds: wall time of the whole call (calibration passes included).
    """

    method: str
    blocks: str | None
    samples: int
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "sparsity": self.sparsity}

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'target':>6s} {'sparsity':>8s} {'rel.err':>9s} {'s':>6s}"]
        for r in self.layers:
            err = "-" if r.error is None else f"{r.error:.2e}"
            lines.append(f"{r.name:40s} {r.target:>6s} {r.sparsity:8.3f} {err:>9s} {r.seconds:6.2f}")
        lines.append(f"{self.method}: {len(self.layers)} layers, sparsity {self.sparsity:.3f}, {self.seconds:.1f} s")
        return "\n".join(lines)


def prune_oneshot(model: nn.Module, calibration: Iterable[Any] | None, *, method: str = "wanda",
                  sparsity: float | str | Mapping[str, float | str] = 0.5,
                  layers: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                  blocks: str | bool | None = None, percdamp: float = 0.01, blocksize: int = 128,
                  progress: bool | None = None) -> OneShotReport:
    """Prune ``model``'s ``Linear`` weights in place, one shot, from calibration data.

    With blocks (found automatically, e.g. ``encoder.layer`` of a BERT), the
    inputs of the first block are captured once; then for each block its
    ``Linear`` layers collect input statistics over all samples, are pruned, and
    the block is run again **with the pruned weights** to give the next block its
    inputs. Memory holds one block's activations for all samples. All ``Linear``
    layers of a block see the same (block-input) pass; ``Linear`` layers outside
    the blocks (a BERT's pooler) stay dense and are listed in ``skipped``.
    Without blocks (none found, or ``blocks=False``) every ``Linear`` is hooked in
    one pass of the dense model and then pruned (no propagation of pruned outputs).

    Pruned weights become exact zeros in the model's own parameters: no wrappers,
    the same ``state_dict`` keys. The model runs in eval mode during calibration
    and gets its modes back afterwards.

    Args:
        model: the model (modified in place).
        calibration: iterable of model inputs: a mapping (``model(**x)``, e.g. a
            tokenizer's output), a tuple (``model(*x)``) or a tensor. Tensors are moved
            to the model's device. ``None`` only with ``method="magnitude"``
            (then no errors are reported).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: a fraction in ``[0, 1)``, an ``"n:m"`` string (``n`` kept of every
            ``m`` consecutive inputs, :class:`prunekit.NM`), or a mapping
            ``{name_glob: sparsity}``: each layer takes its first matching glob, layers
            matching none stay dense.
        layers: glob(s) over module names to prune (default: every ``Linear``).
        exclude: glob(s) over module names never pruned.
        blocks: ``None`` (find them), the dotted name of a ``ModuleList``, or ``False`` (one pass).
        percdamp: SparseGPT damping, ``λ = percdamp·mean(diag H)``.
        blocksize: SparseGPT columns per lazy-update block.
        progress: a tqdm bar over layers (``None``: only on a terminal).

    Returns:
        The :class:`OneShotReport`.

    Raises:
        ValueError / TypeError: a bad argument (the message names it).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> report = prune_oneshot(net, [torch.randn(16, 8)], method="sparsegpt", sparsity="2:4")
        >>> [r.sparsity for r in report.layers]
        [0.5, 0.5]
    """
    started = time.perf_counter()
    method = check_choice("prune_oneshot", "method", method, METHODS)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_oneshot: model must be an nn.Module, got {type(model).__name__}")
    targets = _select_targets(model, sparsity, _globs("layers", layers), _globs("exclude", exclude))
    if method == "sparsegpt":  # checked before any calibration pass runs
        for target in {t for _, t in targets.values()}:
            check_sparsegpt_args(blocksize, percdamp, target)
    samples = _samples(model, calibration, method)
    block_info = _resolve_blocks(model, blocks)
    report = OneShotReport(method, block_info[0] if block_info else None, len(samples or []))
    solve = _solver(method, percdamp, blocksize, report)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    with _eval_mode(model), torch.no_grad(), tqdm(total=len(targets), desc=f"prune_oneshot[{method}]",
                                                  unit="layer", disable=not show, file=sys.stderr) as bar:
        if samples is None:
            for name, (layer, target) in targets.items():
                solve(name, layer, target, None)
                bar.update()
        elif block_info:
            _by_block(model, block_info[1], targets, samples, solve, bar, report, explicit=layers is not None)
        else:
            _one_pass(model, targets, samples, solve, bar)
    report.seconds = time.perf_counter() - started
    return report


def _globs(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(g, str) for g in items):
        raise TypeError(f"prune_oneshot: {name} must be a glob string or a list of them, got {value!r}")
    return list(items)


def _match(name: str, globs: list[str]) -> str | None:
    return next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)


def _select_targets(model: nn.Module, sparsity: Any, layers: list[str] | None,
                    exclude: list[str] | None) -> dict[str, tuple[nn.Linear, Target]]:
    """``{module name: (Linear, Target)}`` for every layer to prune."""
    if isinstance(sparsity, Mapping):
        if not sparsity or not all(isinstance(k, str) for k in sparsity):
            raise TypeError("prune_oneshot: a sparsity mapping must be non-empty with glob-string keys, "
                            f"got {sparsity!r}")
        per_glob = {g: Target.parse(v, f"sparsity[{g!r}]") for g, v in sparsity.items()}
    else:
        per_glob = {"*": Target.parse(sparsity)}
    used: set[str] = set()
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        groups = (layers or ["*"], exclude or [], list(per_glob))
        used.update(g for globs in groups for g in globs if fnmatch.fnmatchcase(name, g))
        hits = [_match(name, globs) for globs in groups]
        if hits[0] and not hits[1] and hits[2] and per_glob[hits[2]].fraction > 0:
            targets[name] = (module, per_glob[hits[2]])
    unused = [g for g in (layers or []) + (exclude or []) + (list(per_glob) if isinstance(sparsity, Mapping) else [])
              if g not in used]
    if unused:
        raise ValueError(f"prune_oneshot: no Linear layer matches {', '.join(map(repr, unused))}")
    if not targets:
        raise ValueError("prune_oneshot: nothing to prune (no Linear layer selected with a sparsity > 0)")
    return targets


def _samples(model: nn.Module, calibration: Any, method: str) -> list[Any] | None:
    if calibration is None:
        if method != "magnitude":
            raise ValueError(f"prune_oneshot: method {method!r} needs calibration data, got None")
        return None
    if isinstance(calibration, (torch.Tensor, Mapping, str)) or not isinstance(calibration, Iterable):
        raise TypeError("prune_oneshot: calibration must be an iterable of model inputs (e.g. a list of "
                        f"tokenizer outputs or of tensors), got {type(calibration).__name__}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    samples = [to_device(s, device) for s in calibration]
    if not samples:
        raise ValueError("prune_oneshot: calibration is empty")
    return samples


def _resolve_blocks(model: nn.Module, blocks: Any) -> tuple[str, nn.ModuleList] | None:
    if blocks is None:
        return find_blocks(model)
    if blocks is False:
        return None
    if not isinstance(blocks, str):
        raise TypeError(f"prune_oneshot: blocks must be None, False or a module name, got {blocks!r}")
    try:
        found = model.get_submodule(blocks)
    except AttributeError:
        raise ValueError(f"prune_oneshot: blocks={blocks!r} is not a submodule of the model") from None
    if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
        raise ValueError(f"prune_oneshot: blocks={blocks!r} must name a non-empty ModuleList or Sequential, "
                         f"got {type(found).__name__}")
    return blocks, found


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


Solve = Callable[[str, nn.Linear, Target, "torch.Tensor | None"], None]


def _solver(method: str, percdamp: float, blocksize: int, report: OneShotReport) -> Solve:
    """The per-layer step: solve, write the pruned weight in place, record a :class:`LayerResult`."""

    def solve(name: str, layer: nn.Linear, target: Target, H: torch.Tensor | None) -> None:
        start = time.perf_counter()
        if method == "magnitude":
            new, keep = magnitude_prune(layer.weight, target)
        elif method == "wanda":
            new, keep = wanda_prune(layer.weight, H, target)
        else:
            new, keep = sparsegpt_prune(layer.weight, H, target, blocksize=blocksize, percdamp=percdamp)
        seconds = time.perf_counter() - start
        new = new.to(layer.weight.dtype).masked_fill(~keep.to(new.device), 0)
        error = None if H is None else relative_error(layer.weight, new, H)
        layer.weight.data.copy_(new)
        sparsity = (layer.weight == 0).sum().item() / layer.weight.numel()
        report.layers.append(LayerResult(name, tuple(layer.weight.shape), str(target), sparsity, error, seconds))

    return solve


def _by_block(model: nn.Module, blocks: nn.ModuleList, targets: dict[str, tuple[nn.Linear, Target]],
              samples: list[Any], solve: Solve, bar: tqdm, report: OneShotReport, explicit: bool) -> None:
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    outside = [name for name, (layer, _) in targets.items() if id(layer) not in owner]
    if outside and explicit:
        raise ValueError(f"prune_oneshot: {', '.join(outside)} lie outside the blocks; pass blocks=False to "
                         "calibrate every Linear in one pass")
    report.skipped = outside
    inputs = capture_block_inputs(model, blocks[0], samples)
    for index, block in enumerate(blocks):
        mine = {n: layer for n, (layer, _) in targets.items() if owner.get(id(layer)) == index}
        if mine:
            bar.set_postfix(block=index)
            grams = gather_grams(lambda: [block(*a, **k) for a, k in inputs], mine)
            for name, layer in mine.items():
                solve(name, layer, targets[name][1], grams.pop(name))
                bar.update()
        if index + 1 < len(blocks):  # the next block sees this block's pruned outputs
            inputs = [replace_hidden((a, k), first_output(block(*a, **k))) for a, k in inputs]


def _one_pass(model: nn.Module, targets: dict[str, tuple[nn.Linear, Target]], samples: list[Any],
              solve: Solve, bar: tqdm) -> None:
    grams = gather_grams(lambda: [call_model(model, s) for s in samples], {n: l for n, (l, _) in targets.items()})
    for name, (layer, target) in targets.items():
        solve(name, layer, target, grams.pop(name))
        bar.update()
