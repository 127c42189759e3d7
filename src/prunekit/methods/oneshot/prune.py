"""``prune_oneshot``: prune a pretrained model's Linear/Conv layers from calibration data, block by block."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from ..._hf import cache_disabled
from ..._modes import denormals_flushed, in_mode
from ..._progress import progress_bar, resolve_progress
from ..._validate import check_choice
from .blocks import BlockFeeder, Inputs, resolve_blocks
from .calibration import call_model, gather_grams, to_device
from .layers import Layer, UnsupportedLayer
from .select import Selection, globs, select_layers
from .solvers import Target, check_sparsegpt_args, magnitude_prune, relative_error, sparsegpt_prune, wanda_prune

__all__ = ["METHODS", "LayerResult", "OneShotReport", "prune_oneshot"]

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class LayerResult:
    """One pruned layer.

    Attributes:
        name: the module's name (its weight is ``name + ".weight"``).
        shape: the weight's stored shape (``(out, in)`` for Linear, ``(in, out)`` for
            transformers ``Conv1D``, ``(out, in/groups, *kernel)`` for convolutions).
        target: the target, ``"0.5"`` or ``"2:4"``.
        sparsity: the fraction of the weight that is now exactly zero.
        error: ``‖(W − Ŵ)X‖²_F / ‖WX‖²_F`` on the calibration inputs the layer saw
            (``None`` without calibration data).
        seconds: time of the solver (mask and weight update) for this layer.
        aliases: every name of the weight when it is tied/shared (else empty).
    """

    name: str
    shape: tuple[int, ...]
    target: str
    sparsity: float
    error: float | None
    seconds: float
    aliases: tuple[str, ...] = ()


@dataclass
class OneShotReport:
    """What :func:`prune_oneshot` did.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        blocks: the block lists processed in order (``"encoder.block, decoder.block"``),
            or ``None`` (one pass).
        samples: calibration samples used.
        layers: one :class:`LayerResult` per pruned layer, in processing order.
        skipped: selected layers left dense (outside the blocks, tied embeddings).
        reasons: ``{skipped layer: why}``.
        full_captures: blocks whose inputs came from a forward of the whole partly
            pruned model (the first block, a decoder's first block, ...); every other
            block was re-run on its predecessor's pruned outputs.
        seconds: wall time of the whole call (calibration passes included).
    """

    method: str
    blocks: str | None
    samples: int
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    full_captures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights."""
        total = sum(math.prod(r.shape) for r in self.layers)
        return sum(r.sparsity * math.prod(r.shape) for r in self.layers) / total if total else 0.0

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



BlockObserver = Callable[[str, list[Inputs]], None]


def prune_oneshot(model: nn.Module, calibration: Iterable[Any] | None, *, method: str = "wanda",
                  sparsity: float | str | Mapping[str, float | str] = 0.5,
                  layers: str | list[str] | None = None, exclude: str | list[str] | None = None,
                  blocks: str | bool | list[str | nn.Module] | None = None, percdamp: float = 0.01,
                  blocksize: int = 128, progress: bool | None = None,
                  on_block_inputs: BlockObserver | None = None) -> OneShotReport:
    """Prune ``model``'s Linear / ``Conv1D`` / Conv weights in place, one shot, from calibration data.

    With blocks (found by structure: GPT-2's ``transformer.h``, Llama's
    ``model.layers``, BERT's ``encoder.layer``, T5's ``encoder.block`` then
    ``decoder.block``, a CNN's stages), each block in turn gathers its layers'
    input statistics over all samples, is pruned, and is then run **with the
    pruned weights** to give the next block its inputs: every block is
    calibrated on exactly what the final pruned model feeds it, whatever the
    model does with attention masks, position ids, rotary embeddings or
    position biases (see :mod:`prunekit.methods.oneshot.blocks`). The KV cache is off
    during calibration (``use_cache=False``, config restored afterwards), and denormal
    floats are flushed to zero (:func:`prunekit._modes.denormals_flushed`). All
    layers of a block see the same (block-input) pass; layers outside the blocks
    (a BERT's pooler, the LM head) stay dense and are listed in ``skipped``.
    Without blocks (``blocks=False``) every layer is hooked in one pass of the
    dense model and then pruned (no propagation of pruned outputs).

    Each layer is solved on its ``(out, in·k)`` matrix: a ``Conv1D`` weight
    (stored ``(in, out)``) transposed, a convolution's weight flattened with its
    im2col inputs (grouped convolutions per group). N:M groups run along the
    inputs of that matrix; Wanda compares within output rows. A weight tied to an
    input embedding is never pruned unless ``layers`` names it exactly.

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
            matching none stay dense (a key other than ``"*"`` that selects a layer outside
            the blocks raises, as ``layers`` does: it would stay dense).
        layers: glob(s) over module names to prune (default: every Linear/Conv).
        exclude: glob(s) over module names never pruned.
        blocks: ``None`` (find them), ``False`` (one pass), the name of a
            ``ModuleList``/``Sequential`` (its children are the blocks), or a list of
            module names / modules (the blocks; a ``ModuleList`` stands for its children).
        percdamp: SparseGPT damping, ``λ = percdamp·mean(diag H)``.
        blocksize: SparseGPT columns per lazy-update block.
        progress: a tqdm bar over blocks (``None``: only on a terminal).
        on_block_inputs: called as ``on_block_inputs(block name, [(args, kwargs) per
            sample])`` with the inputs each block is calibrated on (checks, debugging).

    Returns:
        The :class:`OneShotReport`.

    Raises:
        ValueError / TypeError: a bad argument, no blocks found, a layer one-shot
            cannot solve (the message names the module and what to pass to skip it), or
            a layer outside the blocks selected by ``layers`` or a sparsity mapping.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> report = prune_oneshot(net, [torch.randn(16, 8)], method="sparsegpt", sparsity="2:4", blocks=False)
        >>> [r.sparsity for r in report.layers]
        [0.5, 0.5]
    """
    started = time.perf_counter()
    method = check_choice("prune_oneshot", "method", method, METHODS)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_oneshot: model must be an nn.Module, got {type(model).__name__}")
    explicit = layers is not None
    selection = select_layers(model, sparsity, globs("layers", layers), globs("exclude", exclude))
    samples = _samples(model, calibration, method)
    block_list = None if samples is None else resolve_blocks(model, blocks)
    inside = None if block_list is None else {id(m) for _, b in block_list for m in b.modules()}
    _check_targets(selection, method, blocksize, percdamp, inside)
    report = OneShotReport(method, _describe(model, block_list), len(samples or []))
    report.skipped, report.reasons = list(selection.left), dict(selection.left)
    solve = _solver(method, percdamp, blocksize, report, selection.aliases)
    show = resolve_progress(progress)
    # activations of a degraded (pruned) model can drift into the denormal range, where CPU arithmetic
    # is many times slower: flush them to zero during the calibration passes
    with in_mode(model, training=False), cache_disabled(model), torch.no_grad(), denormals_flushed():
        if block_list is not None:
            _by_block(model, block_list, selection, samples, solve, report, explicit, show, on_block_inputs)
        else:
            _raise_unsupported(selection.unsupported)
            with progress_bar(show, total=len(selection.targets), desc=f"prune_oneshot[{method}]",
                              unit="layer") as bar:
                _one_pass(model, selection.targets, samples, solve, bar)
    report.seconds = time.perf_counter() - started
    return report


def _check_targets(selection: Selection, method: str, blocksize: int, percdamp: float,
                   inside: set[int] | None) -> None:
    """Checks that need no calibration: SparseGPT arguments, N:M divisibility of each pruned layer's inputs."""
    for name, (layer, target) in selection.targets.items():
        if inside is not None and id(layer.module) not in inside:
            continue  # outside the blocks: left dense
        if method == "sparsegpt":
            check_sparsegpt_args(blocksize, percdamp, target)
        if target.nm is not None and layer.columns % target.nm.m:
            raise ValueError(
                f"prune_oneshot: {target} at '{name}' ({type(layer.module).__name__}) needs its inputs per output "
                f"(in·k = {layer.columns}) to be a multiple of {target.nm.m}; pass exclude=[{name!r}] or give it "
                f"another target with sparsity={{{name!r}: ...}}")


def _raise_unsupported(unsupported: dict[str, str]) -> None:
    if unsupported:
        raise UnsupportedLayer(next(iter(unsupported.values())) +
                               (f" (and {len(unsupported) - 1} more: {', '.join(list(unsupported)[1:])})"
                                if len(unsupported) > 1 else ""))


def _describe(model: nn.Module, blocks: list[tuple[str, nn.Module]] | None) -> str | None:
    """Block names, with whole lists written as the list's name (``encoder.layer``)."""
    if blocks is None:
        return None
    parts: list[str] = []
    modules = dict(model.named_modules())
    chosen = {name for name, _ in blocks}
    for name, _ in blocks:
        parent = name.rpartition(".")[0]
        container = modules.get(parent)
        whole = (isinstance(container, (nn.ModuleList, nn.Sequential)) and
                 all((f"{parent}.{c}" if parent else c) in chosen for c, _ in container.named_children()))
        label = parent if whole and parent else name
        if not parts or parts[-1] != label:
            parts.append(label)
    return ", ".join(parts)


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


Solve = Callable[[str, Layer, Target, "torch.Tensor | None"], None]


def _solver(method: str, percdamp: float, blocksize: int, report: OneShotReport,
            aliases: dict[str, tuple[str, ...]]) -> Solve:
    """The per-layer step: solve the ``(out, in·k)`` problem, write the weight back, record a :class:`LayerResult`."""

    def solve(name: str, layer: Layer, target: Target, H: torch.Tensor | None) -> None:
        start = time.perf_counter()
        W = layer.matrix()
        if method == "magnitude":
            new, keep = magnitude_prune(W, target)
        elif method == "wanda":
            new, keep = wanda_prune(W, H, target)
        else:
            new, keep = sparsegpt_prune(W, H, target, blocksize=blocksize, percdamp=percdamp)
        seconds = time.perf_counter() - start
        new = new.to(W.dtype).masked_fill(~keep.to(new.device), 0)
        error = None if H is None else relative_error(W, new, H)
        layer.write(new)
        weight = layer.weight
        sparsity = (weight == 0).sum().item() / weight.numel()
        report.layers.append(LayerResult(name, tuple(weight.shape), str(target), sparsity, error, seconds,
                                         aliases.get(name, ())))

    return solve


def _by_block(model: nn.Module, blocks: list[tuple[str, nn.Module]], selection: Selection, samples: list[Any],
              solve: Solve, report: OneShotReport, explicit: bool, show: bool,
              observer: BlockObserver | None) -> None:
    owner = {id(m): name for name, block in blocks for m in block.modules()}
    targets = selection.targets
    _raise_unsupported({n: e for n, e in selection.unsupported.items()
                        if id(model.get_submodule(n)) in owner})
    outside = [name for name, (layer, _) in targets.items() if id(layer.module) not in owner]
    _refuse_asked_outside(outside, selection, explicit)
    for name in outside + [n for n in selection.unsupported if id(model.get_submodule(n)) not in owner]:
        report.skipped.append(name)
        report.reasons[name] = "outside the blocks (one-shot prunes the layers inside the blocks)"
    feeder = BlockFeeder(model, blocks, samples)
    report.blocks = _describe(model, feeder.order)  # in the order the forward runs them
    report.full_captures = [feeder.order[p][0] for p in feeder.full_captures]
    with progress_bar(show, total=len(blocks), desc=f"prune_oneshot[{report.method}]", unit="block") as bar:

        def process(position: int, name: str, block: nn.Module, inputs: list[Inputs]) -> None:
            bar.set_postfix(block=name)
            if observer is not None:
                observer(name, inputs)
            mine = {n: layer for n, (layer, _) in targets.items() if owner.get(id(layer.module)) == name}
            if mine:
                grams = gather_grams(lambda: [block(*a, **k) for a, k in inputs], mine)
                for layer_name, layer in mine.items():
                    solve(layer_name, layer, targets[layer_name][1], grams.pop(layer_name))
            bar.update()

        feeder.run(process)


def _refuse_asked_outside(outside: list[str], selection: Selection, explicit: bool) -> None:
    """Raise if ``layers=`` or a sparsity-mapping key (other than ``"*"``) selects a layer outside the blocks.

    Such a layer would silently stay dense (an allocation's overall sparsity would then be wrong);
    only the catch-all (a plain sparsity, or the key ``"*"``) leaves layers outside the blocks dense.
    """
    asked = [n for n in outside if explicit or selection.by_glob.get(n, "*") != "*"]
    if not asked:
        return
    keys = sorted({selection.by_glob[n] for n in asked if n in selection.by_glob})
    one, them = len(asked) == 1, ("it" if len(asked) == 1 else "them")
    if explicit:
        how = "layers= selects"
    else:
        how = f"the sparsity mapping's {'key' if len(keys) == 1 else 'keys'} {', '.join(map(repr, keys))} select"
        how += "s" if len(keys) == 1 else ""
    raise ValueError(
        f"prune_oneshot: {', '.join(asked)} {'lies' if one else 'lie'} outside the blocks but {how} {them}; one-shot "
        f"prunes only the layers inside the blocks, so {them} would stay dense. Pass blocks=False to calibrate every "
        f"layer in one pass, blocks=[...] that include {them}, or keep {them} out of the selection "
        f"(exclude={asked!r} under a broader glob, or drop {'its key' if one else 'their keys'}; an allocation: "
        "allocate(..., layers=[the blocks]))")


def _one_pass(model: nn.Module, targets: dict[str, tuple[Layer, Target]], samples: list[Any] | None,
              solve: Solve, bar: tqdm) -> None:
    if samples is None:
        grams: dict[str, torch.Tensor | None] = {name: None for name in targets}
    else:
        grams = gather_grams(lambda: [call_model(model, s) for s in samples],
                             {n: layer for n, (layer, _) in targets.items()})
    for name, (layer, target) in targets.items():
        solve(name, layer, target, grams.pop(name))
        bar.update()
