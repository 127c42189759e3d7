"""Per-layer sparsity allocation: how much of each layer to prune for one overall sparsity.

:func:`allocate` turns an overall target ``S`` into a target per parameter by a
rule, and rounds those targets so that the allocation prunes exactly
``round(N·S)`` weights (``N``: the weights in scope):

* ``"uniform"``: every layer at ``S``.
* ``"erk"`` (Evci et al. 2020, RigL): Erdős–Rényi-Kernel densities
  ``d_l = ε·Σ(dims)/Π(dims)``; layers that would exceed density 1 are made dense
  and ``ε`` re-solved for the rest, as in the RigL code.
* ``"lamp"`` (Lee et al. 2021): one global threshold on the LAMP scores
  ``w_u² / Σ_{v ≥ u} w_v²`` (weights of a layer sorted by magnitude).
* ``"owl"`` (Yin et al. 2024): layers with more activation outliers
  (``|W_ij|·‖X_j‖₂ > M·mean``) get lower sparsity, within ``S ± λ``; needs
  calibration data.
* ``"equal-loss"``: every layer pruned to the same metric loss, read off a
  sensitivity table (:func:`prunekit.methods.sensitivity.sensitivity` or a plain
  ``{layer: [(sparsity, metric), ...]}``).

The result, an :class:`Allocation`, is a mapping ``{parameter name: sparsity}``
(names glob-escaped, so identical to the names unless one holds ``*?[``) that
:class:`~prunekit.Pruner` takes as ``overrides=`` and
:func:`~prunekit.methods.oneshot.prune_oneshot` as ``sparsity=``; both prune
``round(n_l·s_l)`` weights of a layer of ``n_l``, which :func:`exact_counts`
makes sum to the overall count exactly. Pass them the same ``layers`` /
``exclude``. A Pruner prunes parameters outside the allocation at its main
schedule's target. ``prune_oneshot`` leaves them dense, prunes only the layers
inside its blocks and **raises** for an allocation key that selects a layer
outside them (a BERT pooler, an untied LM head: it would stay dense and the
overall sparsity would be wrong); a weight tied to the input embedding (a tied LM
head) is not pruned either (``report.skipped`` lists it). So allocate over the
layers it prunes, e.g. ``layers=["model.layers"]``. Counts are exact for unstructured
pruning (the Pruner's default granularity, ``prune_oneshot`` with fractions);
a float override makes a gradual Pruner jump to it when its schedule begins:
:meth:`Allocation.schedules` gives per-layer ramps instead.

"Overall sparsity" is weighted by size (``mean="weighted"``, the default: the
fraction of all weights in scope that are pruned). ``mean="layer"`` makes the
plain average of the per-layer targets equal ``S`` instead (OWL's paper, equal
loss and uniform offer it); the overall count is then whatever that gives, and
:attr:`Allocation.sparsity` says what.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    >>> alloc = allocate(net, 0.8, "erk")
    >>> {name: round(s, 4) for name, s in alloc.items()}  # the small layer is kept denser
    {'0.weight': 0.8428, '2.weight': 0.372}
    >>> alloc.pruned == round(alloc.total * 0.8)
    True
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .._hf import cache_disabled
from .._modes import in_mode
from .._progress import progress_bar
from .._validate import check_choice, check_real, check_sparsity
from ..core.granularity import lowest_k, prune_count
from ..core.schedules import PolynomialDecay
from ..core.scope import Selector, Target, check_materialised, resolve_scope
from .oneshot.blocks import resolve_blocks
from .oneshot.calibration import call_model, to_device
from .oneshot.layers import Layer, UnsupportedLayer

__all__ = [
    "ERK",
    "LAMP",
    "OWL",
    "RULES",
    "Allocation",
    "AllocationRule",
    "EqualLoss",
    "Problem",
    "Uniform",
    "allocate",
    "exact_counts",
    "lamp_scores",
]

_OWNER = "allocate"
MEANS = ("weighted", "layer")


# -- exact rounding ------------------------------------------------------------------------------------------------


def exact_counts(numels: Sequence[int], sparsities: Sequence[float], total: int | None = None) -> list[int]:
    """Weights to prune per layer, ``k_l ≈ n_l·s_l``, summing to ``total`` exactly (largest remainder).

    Each ``n_l·s_l`` is floored, and the units still missing go to the layers with
    the largest fractional parts (Hamilton's method; ties to the earlier layer),
    so every ``k_l`` is within 1 of ``n_l·s_l`` when they sum to ``total``. Every
    layer keeps at least one weight (``0 <= k_l <= n_l - 1``: Pruner and
    prune_oneshot take sparsities below 1). ``k_l / n_l`` then prunes exactly
    ``k_l`` weights (``round(n_l·(k_l/n_l)) == k_l``).

    Args:
        numels: weights per layer.
        sparsities: real-valued targets per layer.
        total: the overall count; ``None``: ``round(Σ n_l·s_l)``.

    Raises:
        ValueError: lengths differ, or ``total`` is outside ``[0, Σ (n_l - 1)]``.

    Example:
        >>> exact_counts([10, 10, 10], [0.25, 0.25, 0.25], total=8)
        [3, 3, 2]
    """
    if len(numels) != len(sparsities):
        raise ValueError(f"exact_counts: {len(numels)} numels but {len(sparsities)} sparsities")
    highs = [max(int(n) - 1, 0) for n in numels]
    x = [min(max(float(n) * float(s), 0.0), h) for n, s, h in zip(numels, sparsities, highs)]
    total = round(sum(x)) if total is None else int(total)
    if not 0 <= total <= sum(highs):
        raise ValueError(f"exact_counts: cannot prune {total} weights of layers of {list(numels)} weights while each "
                         f"keeps one (at most {sum(highs)})")
    counts = [min(math.floor(v), h) for v, h in zip(x, highs)]
    short = total - sum(counts)
    frac = [v - c for v, c in zip(x, counts)]
    step = 1 if short > 0 else -1
    # Add to the largest remainders first; take (if ever over) from the smallest.
    order = sorted(range(len(x)), key=lambda i: (-frac[i], i) if step > 0 else (frac[i], i))
    while short:
        for i in order:
            if short and (counts[i] < highs[i] if step > 0 else counts[i] > 0):
                counts[i] += step
                short -= step
    return counts


# -- the result ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation(Mapping[str, float]):
    """Per-parameter target sparsities that prune an exact overall count; a mapping for ``overrides=``.

    Keys are the parameter names of the scope (``glob.escape``d, i.e. the names
    themselves unless one holds ``*``, ``?`` or ``[``); values are ``counts[i] /
    numels[i]``. Looking up a raw name works too.

    Attributes:
        rule: the rule's name.
        requested: the overall sparsity asked for.
        mean: ``"weighted"`` (fraction of all weights) or ``"layer"`` (average of the targets).
        names: parameter names, in model order.
        numels: weights per parameter.
        counts: weights each parameter loses.
        sparsities: the targets to pass (``counts[i] / numels[i]``; a ``fixed`` one as given).
        raw: the rule's real-valued targets before rounding.
        info: what the rule found (ERK's ``epsilon`` and ``dense`` layers, LAMP's
            ``threshold``, OWL's ``outlier_ratios``, equal loss's ``level``, ...).

    Example:
        >>> a = Allocation("uniform", 0.5, "weighted", ("fc.weight",), (8,), (4,), (0.5,), (0.5,))
        >>> dict(a), a.sparsity
        ({'fc.weight': 0.5}, 0.5)
    """

    rule: str
    requested: float
    mean: str
    names: tuple[str, ...]
    numels: tuple[int, ...]
    counts: tuple[int, ...]
    sparsities: tuple[float, ...]
    raw: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __getitem__(self, key: str) -> float:
        index = self._index.get(key)
        if index is None:
            raise KeyError(f"Allocation: no parameter {key!r}; parameters: {list(self.names)}")
        return self.sparsities[index]

    def __iter__(self) -> Iterator[str]:
        return (glob.escape(name) for name in self.names)

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {**{name: i for i, name in enumerate(self.names)},
                **{glob.escape(name): i for i, name in enumerate(self.names)}}

    @property
    def total(self) -> int:
        """Weights in scope."""
        return sum(self.numels)

    @property
    def pruned(self) -> int:
        """Weights the allocation prunes."""
        return sum(self.counts)

    @property
    def sparsity(self) -> float:
        """The overall (size-weighted) sparsity it reaches."""
        return self.pruned / self.total if self.total else 0.0

    def by_name(self) -> dict[str, float]:
        """``{raw parameter name: sparsity}`` (no escaping)."""
        return {name: self[name] for name in self.names}

    def schedules(self, schedule: PolynomialDecay) -> dict[str, PolynomialDecay]:
        """Per-parameter ramps for gradual pruning: ``schedule`` scaled to end at each target (``overrides=``).

        Parameter ``l`` follows ``s_l / final · schedule(t)`` (same steps, power and
        frequency), so every layer ramps together, the overall sparsity follows
        ``schedule`` (up to one weight per layer) and ends at exactly ``pruned``.

        Raises:
            TypeError: ``schedule`` is not a :class:`~prunekit.PolynomialDecay`.

        Example:
            >>> from prunekit import PolynomialDecay
            >>> a = Allocation("erk", 0.5, "weighted", ("a", "b"), (8, 8), (6, 2), (0.75, 0.25), (0.75, 0.25))
            >>> ramps = a.schedules(PolynomialDecay(0.2, 0.5, 0, 10, frequency=5))
            >>> [round(s.initial_sparsity, 4) for s in ramps.values()]
            [0.3, 0.1]
        """
        if not isinstance(schedule, PolynomialDecay):
            raise TypeError(f"Allocation.schedules: schedule must be a PolynomialDecay, got {type(schedule).__name__}")
        final = schedule.final_sparsity
        out = {}
        for key, target in zip(self, self.sparsities):
            scale = target / final if final > 0 else 0.0
            out[key] = replace(schedule, initial_sparsity=min(schedule.initial_sparsity * scale, target),
                               final_sparsity=target)
        return out

    def verify(self, model: nn.Module) -> None:
        """Check that ``model`` has exactly ``counts[i]`` zeros in each allocated parameter (after pruning).

        Raises:
            ValueError: the first parameter whose number of zeros differs, or one the model lacks.

        Example:
            >>> alloc.verify(model)  # doctest: +SKIP
        """
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, count in zip(self.names, self.counts):
            if name not in params:
                raise ValueError(f"Allocation.verify: the model has no parameter {name!r}")
            zeros = int((params[name].detach() == 0).sum())
            if zeros != count:
                raise ValueError(f"Allocation.verify: {name!r} has {zeros} zeros, the allocation prunes {count} "
                                 "(was it pruned with these targets and the same layers/exclude?)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (layers in model order)."""
        return {"rule": self.rule, "requested": self.requested, "mean": self.mean, "sparsity": self.sparsity,
                "pruned": self.pruned, "total": self.total,
                "layers": [{"name": n, "numel": k, "pruned": c, "sparsity": v, "raw": r}
                           for n, k, c, v, r in zip(self.names, self.numels, self.counts, self.sparsities, self.raw)],
                "info": _plain(self.info)}

    def table(self) -> str:
        """A Markdown table: each parameter's size and sparsity, then the overall line."""
        lines = ["| parameter | weights | sparsity |", "|---|---:|---:|"]
        lines += [f"| {n} | {k:,} | {v:.4f} |" for n, k, v in zip(self.names, self.numels, self.sparsities)]
        lines.append(f"| (overall, {self.rule}) | {self.total:,} | {self.sparsity:.4f} |")
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, torch.Tensor) else value


# -- the problem every rule solves ---------------------------------------------------------------------------------


@dataclass
class Problem:
    """What a rule allocates: the free parameters (not fixed) and the goal on them.

    Attributes:
        model: the model.
        targets: the free parameters, in model order.
        numels: their sizes.
        mean: ``"weighted"`` or ``"layer"``.
        goal: weighted: the weights to prune among them, ``N·S`` less the fixed ones' counts (real, so
            that a rule's real targets follow its published formula); layer: the mean target they must average.
        count: weighted: the exact integer count the rounding will meet (``round(N·S)`` less the fixed ones').
        fixed: names of the fixed parameters (not in ``targets``).
    """

    model: nn.Module
    targets: list[Target]
    numels: list[int]
    mean: str
    goal: float
    count: int = 0
    fixed: set[str] = field(default_factory=set)

    @property
    def highs(self) -> list[float]:
        """The highest sparsity of each parameter: it keeps one weight."""
        return [(n - 1) / n if n else 0.0 for n in self.numels]

    def uniform(self) -> float:
        """The one sparsity that meets the goal on every free parameter."""
        return self.goal / sum(self.numels) if self.mean == "weighted" else self.goal

    def achieved(self, sparsities: Sequence[float], units: Sequence[Sequence[int]] | None = None) -> float:
        """The goal's quantity for per-unit ``sparsities`` (units: lists of parameter indices; default one each)."""
        units = [[i] for i in range(len(self.targets))] if units is None else units
        if self.mean == "weighted":
            return sum(s * sum(self.numels[i] for i in u) for s, u in zip(sparsities, units))
        return sum(sparsities) / len(units)


class AllocationRule:
    """A rule: ``solve(problem) -> (real-valued sparsity per free parameter, info)``.

    Subclass it for a rule of your own and pass an instance to :func:`allocate`.
    ``means`` lists the means it supports.
    """

    name = "rule"
    means: tuple[str, ...] = ("weighted",)

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        """Per free parameter, a target in ``[0, 1)`` meeting ``problem``'s goal (rounding comes after)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _bisect(fn: Callable[[float], float], goal: float, lo: float, hi: float,
            iterations: int = 200) -> tuple[float, float]:
    """``(a, b)`` with ``fn(a) <= goal <= fn(b)`` and ``b - a`` tiny, for a non-decreasing ``fn``."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if fn(mid) <= goal:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _blend(fn: Callable[[float], list[float]], achieved: Callable[[list[float]], float], goal: float,
           lo: float, hi: float) -> list[float]:
    """Between the allocations at ``lo`` and ``hi`` (which bracket ``goal``), the mix that meets it exactly."""
    a, b = fn(lo), fn(hi)
    ga, gb = achieved(a), achieved(b)
    t = 0.0 if gb == ga else min(max((goal - ga) / (gb - ga), 0.0), 1.0)
    return [x + t * (y - x) for x, y in zip(a, b)]


# -- uniform and ERK -----------------------------------------------------------------------------------------------


class Uniform(AllocationRule):
    """Every free parameter at the same sparsity (``S`` when nothing is fixed).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> dict(allocate(net, 0.5, Uniform()))
        {'0.weight': 0.5, '1.weight': 0.5}
    """

    name = "uniform"
    means = MEANS

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        return [problem.uniform()] * len(problem.targets), {}


def _erk_ratio(shape: Sequence[int], power: float) -> float:
    return (sum(shape) / math.prod(shape)) ** power


class ERK(AllocationRule):
    """Erdős–Rényi-Kernel (Evci et al. 2020): density ``∝ ε·(Σ dims)/(Π dims)``, dense where that exceeds 1.

    For a convolution ``(n_out, n_in, k_h, k_w)``: ``(n_in + n_out + k_h + k_w) /
    (n_in·n_out·k_h·k_w)``; for a linear layer ``(n_in + n_out)/(n_in·n_out)``.
    ``ε`` makes the overall density ``1 - S``; while the layer(s) of the largest
    ratio would exceed density 1 they are set dense and ``ε`` re-solved (the RigL
    code's loop; ``info["dense"]`` lists them, ``info["epsilon"]`` is the final ``ε``).

    Args:
        power: exponent on the ratio (RigL's ``erk_power_scale``; 1 is ERK, 0 uniform).

    Example:
        >>> net = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
        >>> allocate(net, 0.8, ERK()).info["dense"]
        []
    """

    name = "erk"

    def __init__(self, power: float = 1.0) -> None:
        self.power = check_real("ERK", "power", power)

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        numels = problem.numels
        ratios = [_erk_ratio(tuple(t.param.shape), self.power) for t in problem.targets]
        kept = sum(numels) - problem.goal
        dense: set[int] = set()
        while True:
            free = [i for i in range(len(numels)) if i not in dense]
            divisor = sum(ratios[i] * numels[i] for i in free)
            if not free or divisor <= 0:
                raise ValueError(f"{_OWNER}: ERK cannot reach the target: every layer would be dense")
            eps = (kept - sum(numels[i] for i in dense)) / divisor
            top = max(ratios[i] for i in free)
            if eps * top <= 1.0:
                break
            dense.update(i for i in free if ratios[i] == top)
        sparsities = [0.0 if i in dense else 1.0 - eps * ratios[i] for i in range(len(numels))]
        return sparsities, {"epsilon": eps, "dense": [problem.targets[i].name for i in sorted(dense)],
                            "power": self.power}

    def __repr__(self) -> str:
        return f"ERK(power={self.power:g})"


# -- LAMP ----------------------------------------------------------------------------------------------------------


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al. 2021) of one layer: ``w_u² / Σ_{v ≥ u} w_v²`` over its weights sorted by ``|w|``.

    Computed in float64, same shape as ``weight``. The largest weight scores 1;
    scores grow with magnitude, so pruning a layer's lowest LAMP scores is
    pruning its smallest weights. Equal magnitudes are ordered by position (a
    stable sort); zero weights score 0 (also in an all-zero layer).

    Example:
        >>> lamp_scores(torch.tensor([3.0, -1.0, 2.0])).tolist()
        [1.0, 0.07142857142857142, 0.3076923076923077]
    """
    flat = weight.detach().reshape(-1).double()
    squares = flat * flat
    order = torch.sort(squares, stable=True).indices
    ordered = squares[order]
    # Σ_{v ≥ u}: suffix sums of the ascending squares.
    tail = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])
    scores_sorted = torch.where(tail > 0, ordered / tail.clamp_min(torch.finfo(torch.float64).tiny),
                                torch.zeros_like(ordered))
    scores = torch.empty_like(flat)
    scores[order] = scores_sorted
    return scores.reshape(weight.shape)


class LAMP(AllocationRule):
    """Layer-Adaptive Magnitude Pruning (Lee et al. 2021): one global threshold on :func:`lamp_scores`.

    The ``K`` lowest LAMP scores over all free layers are pruned (``K`` = the
    weights to prune; ties broken by layer order then position); each layer's
    count is what falls below the threshold. Each layer's largest weight is never
    selected, so every layer keeps one. ``info["threshold"]`` is the highest
    pruned score. Weighted mean only (the threshold fixes the count).

    Args:
        progress: a bar over layers (``None``: only on a terminal).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
        >>> allocate(net, 0.75, LAMP()).pruned  # round(320 * 0.75)
        240
    """

    name = "lamp"

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = progress

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        k = problem.count
        scores = []
        # A sort per layer: about 0.3 s per million weights on one core, so a bar on larger models.
        for t in progress_bar(self.progress, problem.targets, desc="allocate[lamp]", unit="layer"):
            s = lamp_scores(t.param).reshape(-1)
            if s.numel():
                s[torch.argmax(s)] = math.inf  # the layer's top weight (score 1) stays
            scores.append(s)
        flat = torch.cat(scores)
        # A selection, not a sort (linear time); equal scores go in layer order, then by position.
        pruned = ~lowest_k(flat, k)
        counts = [int(part.sum()) for part in pruned.split([s.numel() for s in scores])]
        threshold = float(flat[pruned].max()) if k else 0.0
        return [c / n if n else 0.0 for c, n in zip(counts, problem.numels)], {"threshold": threshold}


# -- OWL -----------------------------------------------------------------------------------------------------------

Calibration = Iterable[Any] | Callable[[nn.Module], Any] | Mapping[str, torch.Tensor]


def _layer_of(model: nn.Module, target: Target) -> Layer:
    if target.param_name != "weight":
        raise ValueError(f"{_OWNER}: OWL needs input activations of '{target.name}', which is not a layer's weight "
                         f"input map; pass exclude=[{target.module_name!r}] or fixed={{{target.name!r}: ...}}")
    try:
        return Layer.of(target.module_name, target.module)
    except UnsupportedLayer:
        raise ValueError(f"{_OWNER}: OWL needs input activations of '{target.name}' ({type(target.module).__name__}); "
                         f"it measures Linear / Conv1D / Conv layers only: pass exclude=[{target.module_name!r}] or "
                         f"fixed={{{target.name!r}: ...}}") from None


class _SquaredNorms:
    """Forward hook summing each input column's ``x_j²`` over the rows of a layer's matrix problem."""

    def __init__(self, layer: Layer) -> None:
        self.layer, self.sum, self.rows = layer, None, 0
        self.handle = layer.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.rows == 0:
            self.layer.verify(args, output)
        x = self.layer.input_rows(args).double()
        part = (x * x).sum(0)
        self.sum = part if self.sum is None else self.sum + part
        self.rows += x.shape[0]


def _input_norms(model: nn.Module, targets: Sequence[Target], calibration: Any,
                 progress: bool | None) -> dict[str, torch.Tensor]:
    """``{parameter name: ‖X_j‖₂ per input column}`` from one pass of the dense model over the calibration."""
    layers = {t.name: _layer_of(model, t) for t in targets}
    hooks = {name: _SquaredNorms(layer) for name, layer in layers.items()}
    try:
        with in_mode(model, training=False), cache_disabled(model), torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                samples = list(calibration)
                if not samples:
                    raise ValueError(f"{_OWNER}: OWL calibration is empty")
                for sample in progress_bar(progress, samples, desc="allocate[owl]", unit="sample"):
                    call_model(model, to_device(sample, device))
    finally:
        for hook in hooks.values():
            hook.handle.remove()
    missing = [name for name, hook in hooks.items() if hook.rows == 0]
    if missing:
        raise ValueError(f"{_OWNER}: the calibration data never reached {missing} (their forward was never called); "
                         "check the inputs, or exclude them")
    return {name: hook.sum.sqrt() for name, hook in hooks.items()}


def _metric_matrix(layer: Layer, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij|·‖X_j‖₂`` on the ``(out, in·k)`` matrix; a grouped convolution's rows use their group's inputs."""
    W = layer.matrix().double().abs()
    if norms.numel() != layer.groups * W.shape[1]:
        raise ValueError(f"{_OWNER}: OWL input norms of '{layer.name}.weight' have {norms.numel()} entries; its "
                         f"weight needs {layer.groups * W.shape[1]} (one per input column, im2col for convolutions)")
    norms = norms.to(W.device).double().reshape(layer.groups, -1)
    rows = torch.arange(W.shape[0], device=W.device) // (W.shape[0] // layer.groups)
    return W * norms[rows]


def _outlier_ratio(metrics: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of the entries above ``m`` times their mean (over all of ``metrics`` together)."""
    flat = torch.cat([x.reshape(-1) for x in metrics])
    return float((flat > m * flat.mean()).double().mean()) if flat.numel() else 0.0


class OWL(AllocationRule):
    """Outlier Weighted Layerwise sparsity (Yin et al. 2024), for one-shot pruning of transformers.

    A layer's outlier ratio ``D_l`` is the fraction of its ``A_ij = |W_ij|·‖X_j‖₂``
    (``X_j``: the ``j``-th input feature over all calibration tokens, the dense
    model's, as in the authors' code) above ``m`` times the layer's mean of
    ``A``. The ratios are mapped linearly onto ``[0, 2λ]`` and subtracted from a
    common offset: more outliers, lower sparsity, the spread ``max − min = 2λ``
    (as the authors' code). The offset makes the mean equal ``S`` (``mean=
    "layer"``: the average over groups, as the paper; ``"weighted"``: the fraction
    of weights). When that would put a target outside ``[S − λ, S + λ]`` (the
    paper's range; the code's mapping can leave it when the ratios are skewed),
    the spread is narrowed until every target is inside. Targets are clipped to
    ``[0, 1)``, the offset re-solved if so.

    Args:
        calibration: model inputs as ``prune_oneshot`` takes them (an iterable of
            mappings, tuples or tensors), a callable ``feed(model)`` that runs data
            through the model, or precomputed ``{parameter name: ‖X_j‖₂ per input
            column}`` (im2col columns for convolutions).
        m: the outlier threshold ``M`` (times the layer mean).
        lam: the spread ``λ``.
        groups: ``"parameter"`` (each weight its own ratio) or ``"block"`` (one ratio
            per transformer block over all its layers, as the paper; found as
            ``prune_oneshot`` finds blocks; a weight outside every block is its own group).
        progress: a bar over calibration samples (``None``: only on a terminal).

    ``info``: ``outlier_ratios`` ``{group: D}``, ``groups`` ``{group: [parameter names]}``, ``lam_used``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> alloc = allocate(net, 0.5, OWL([torch.randn(64, 16)], m=2.0, lam=0.1), mean="layer")
        >>> [round(s, 4) for s in alloc.raw]  # the layer with more outliers is pruned less
        [0.6, 0.4]
    """

    name = "owl"
    means = MEANS

    def __init__(self, calibration: Calibration, *, m: float = 5.0, lam: float = 0.08, groups: str = "parameter",
                 progress: bool | None = None) -> None:
        if calibration is None or isinstance(calibration, (torch.Tensor, str)):
            raise TypeError("OWL: calibration must be an iterable of model inputs (as prune_oneshot takes), a "
                            "callable feed(model), or {parameter name: input norms}; got "
                            f"{type(calibration).__name__}")
        self.calibration = calibration
        self.m = check_real("OWL", "m", m)
        self.lam = check_real("OWL", "lam", lam)
        if self.m <= 0 or not 0 <= self.lam < 0.5:
            raise ValueError(f"OWL: m must be > 0 and lam in [0, 0.5), got m={m}, lam={lam}")
        self.groups = check_choice("OWL", "groups", groups, ("parameter", "block"))
        self.progress = progress

    def ratios(self, model: nn.Module, targets: Sequence[Target]) -> tuple[dict[str, float], dict[str, list[int]]]:
        """``({group: outlier ratio}, {group: indices into targets})``."""
        norms = self._norms(model, targets)
        groups = self._group(model, targets)
        ratios = {}
        for key, members in groups.items():
            metrics = [_metric_matrix(_layer_of(model, targets[i]), norms[targets[i].name]) for i in members]
            ratios[key] = _outlier_ratio(metrics, self.m)
        return ratios, groups

    def _norms(self, model: nn.Module, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        if not isinstance(self.calibration, Mapping):
            return _input_norms(model, targets, self.calibration, self.progress)
        names = {t.name for t in targets}
        unknown = [k for k in self.calibration if k not in names]
        if unknown:
            raise ValueError(f"{_OWNER}: OWL norms for {unknown[:3]}, which are not free parameters in scope; "
                             f"in scope: {sorted(names)[:8]}")
        missing = [t.name for t in targets if t.name not in self.calibration]
        if missing:
            raise ValueError(f"{_OWNER}: OWL norms missing for {missing[:3]}; give one tensor per parameter")
        return {k: torch.as_tensor(v) for k, v in self.calibration.items()}

    def _group(self, model: nn.Module, targets: Sequence[Target]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        owner: dict[int, str] = {}
        if self.groups == "block":
            try:
                blocks = resolve_blocks(model, None) or []
            except ValueError as exc:
                raise ValueError(f"{_OWNER}: OWL groups='block': {exc}; or pass groups='parameter'") from None
            for name, block in blocks:
                owner.update({id(m): name for m in block.modules()})
        for i, t in enumerate(targets):
            out.setdefault(owner.get(id(t.module), t.name), []).append(i)
        return out

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        ratios, groups = self.ratios(problem.model, problem.targets)
        keys = list(groups)
        units = [groups[k] for k in keys]
        d = [ratios[k] for k in keys]
        spread = max(d) - min(d)
        scaled = [(x - min(d)) / spread * 2 * self.lam if spread > 0 else 0.0 for x in d]
        base = problem.uniform()
        mu = problem.achieved(scaled, units) / (sum(problem.numels) if problem.mean == "weighted" else 1.0)
        # Narrow the spread if the code's mapping leaves [S - λ, S + λ]: max target is offset, min offset - 2λα.
        alpha = 1.0 if spread == 0 else min([1.0] + [self.lam / v for v in (mu, 2 * self.lam - mu) if v > self.lam])
        highs = [min(problem.highs[i] for i in u) for u in units]

        def at(offset: float) -> list[float]:
            return [min(max(offset - alpha * s, 0.0), h) for s, h in zip(scaled, highs)]

        offset = base + alpha * mu
        per_unit = at(offset)
        if per_unit != [offset - alpha * s for s in scaled]:  # clipped: solve the offset again
            lo, hi = _bisect(lambda c: problem.achieved(at(c), units), problem.goal, -1.0, 2.0 + 2 * self.lam)
            per_unit = _blend(at, lambda s: problem.achieved(s, units), problem.goal, lo, hi)
        out = [0.0] * len(problem.targets)
        for s, u in zip(per_unit, units):
            for i in u:
                out[i] = s
        names = {k: [problem.targets[i].name for i in groups[k]] for k in keys}
        return out, {"outlier_ratios": ratios, "groups": names, "lam_used": alpha * self.lam if spread > 0 else 0.0}

    def __repr__(self) -> str:
        return f"OWL(m={self.m:g}, lam={self.lam:g}, groups={self.groups!r})"


# -- equal loss from a sensitivity table ---------------------------------------------------------------------------


class _Curve:
    """A row's loss vs sparsity (piecewise linear, its running maximum), and its inverse."""

    def __init__(self, name: str, points: Sequence[tuple[float, float]], dense: float, sign: float) -> None:
        pts = sorted((check_sparsity(_OWNER, f"table[{name!r}] sparsity", s), check_real(_OWNER, f"table[{name!r}]", v))
                     for s, v in points)
        if not pts:
            raise ValueError(f"{_OWNER}: table[{name!r}] is empty; give [(sparsity, metric), ...]")
        if pts[0][0] > 0:
            pts.insert(0, (0.0, dense))  # unpruned: the dense metric
        self.s = [s for s, _ in pts]
        loss, top = [], -math.inf
        for _, v in pts:
            # Running max: a layer is never credited with a lower loss at a higher sparsity than at a lower one.
            top = max(top, sign * (dense - v))
            loss.append(top)
        self.loss = loss

    def sparsity_at(self, level: float) -> float:
        """The highest sparsity whose (running-max) loss is at most ``level``, interpolated."""
        if level < self.loss[0]:
            return 0.0
        for i in range(len(self.s) - 1):
            a, b = self.loss[i], self.loss[i + 1]
            if b > level:
                return self.s[i] + (level - a) / (b - a) * (self.s[i + 1] - self.s[i])
        return self.s[-1]

    def loss_at(self, sparsity: float) -> float:
        """The interpolated (running-max) loss at ``sparsity``."""
        for i in range(len(self.s) - 1):
            if sparsity <= self.s[i + 1]:
                t = (sparsity - self.s[i]) / (self.s[i + 1] - self.s[i])
                return self.loss[i] + t * (self.loss[i + 1] - self.loss[i])
        return self.loss[-1]


class EqualLoss(AllocationRule):
    """Every layer pruned to the same metric loss, read off a sensitivity table; a bisection on the loss level.

    Each row's loss (``dense − metric``, or ``metric − dense`` when lower is
    better) is interpolated linearly between the table's sparsities (with ``(0,
    dense)`` added when the grid has no 0) and made non-decreasing (its running
    maximum, so noise never buys sparsity). For a loss level ``δ`` each row takes
    the highest sparsity whose loss is at most ``δ`` (at most its grid's last
    sparsity: no extrapolation); ``δ`` is bisected until the mean meets the
    target, and the two bracketing allocations blended to meet it exactly.
    ``info``: ``level`` (the common loss ``δ``), ``loss`` ``{row: predicted loss}``.

    Args:
        table: a :class:`~prunekit.methods.sensitivity.SensitivityResult` (rows
            are parameters or named groups of them), or ``{parameter name:
            [(sparsity, metric), ...]}``.
        dense: the dense metric (taken from a ``SensitivityResult``; required otherwise).
        higher_is_better: the metric's direction (from a ``SensitivityResult``; default ``True``).

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
        >>> table = {"0.weight": [(0.5, 0.9), (0.9, 0.5)], "1.weight": [(0.5, 0.99), (0.9, 0.95)]}
        >>> alloc = allocate(net, 0.6, EqualLoss(table, dense=1.0))
        >>> [round(s, 6) for s in alloc.raw], round(alloc.info["level"], 6)
        ([0.3, 0.9], 0.06)
    """

    name = "equal-loss"
    means = MEANS

    def __init__(self, table: Any, *, dense: float | None = None, higher_is_better: bool | None = None) -> None:
        if hasattr(table, "curves") and hasattr(table, "dense"):  # a SensitivityResult (duck-typed)
            curves, parameters = dict(table.curves), dict(getattr(table, "parameters", {}) or {})
            dense = table.dense if dense is None else dense
            if higher_is_better is None:
                higher_is_better = getattr(table, "higher_is_better", True)
        elif isinstance(table, Mapping):
            curves, parameters = dict(table), {}
        else:
            raise TypeError("EqualLoss: table must be a SensitivityResult or {parameter name: [(sparsity, metric), "
                            f"...]}}, got {type(table).__name__}")
        if dense is None:
            raise ValueError("EqualLoss: dense= (the unpruned model's metric) is required with a plain table")
        self.dense = check_real("EqualLoss", "dense", dense)
        self.higher_is_better = True if higher_is_better is None else higher_is_better
        if not isinstance(self.higher_is_better, bool):
            raise TypeError(f"EqualLoss: higher_is_better must be True or False, got {higher_is_better!r}")
        sign = 1.0 if self.higher_is_better else -1.0
        self.curves = {str(k): _Curve(str(k), v, self.dense, sign) for k, v in curves.items()}
        self.parameters = {k: tuple(parameters.get(k, (k,))) for k in self.curves}

    def _units(self, problem: Problem, fixed: set[str]) -> tuple[list[str], list[list[int]]]:
        index = {t.name: i for i, t in enumerate(problem.targets)}
        rows, units, seen = [], [], {}
        for row, params in self.parameters.items():
            unknown = [p for p in params if p not in index and p not in fixed]
            if unknown:
                raise ValueError(f"{_OWNER}: the table's row {row!r} names {unknown[0]!r}, which is not a parameter in "
                                 f"scope; in scope: {list(index)[:8]}")
            members = [index[p] for p in params if p in index]
            for i in members:
                if i in seen:
                    raise ValueError(f"{_OWNER}: '{problem.targets[i].name}' is in two rows of the table "
                                     f"({seen[i]!r}, {row!r})")
                seen[i] = row
            if members:
                rows.append(row)
                units.append(members)
        missing = [t.name for i, t in enumerate(problem.targets) if i not in seen]
        if missing:
            raise ValueError(f"{_OWNER}: the table has no row for {missing[:3]}; add them to the analysis, or pass "
                             "fixed={name: sparsity} or exclude=[...]")
        return rows, units

    def solve(self, problem: Problem) -> tuple[list[float], dict[str, Any]]:
        rows, units = self._units(problem, problem.fixed)
        curves = [self.curves[r] for r in rows]
        highs = [min(problem.highs[i] for i in u) for u in units]

        def at(level: float) -> list[float]:
            return [min(c.sparsity_at(level), h) for c, h in zip(curves, highs)]

        achieved = lambda s: problem.achieved(s, units)
        top = max(c.loss[-1] for c in curves)
        most = achieved(at(top))
        if most < problem.goal * (1 - 1e-12):
            raise ValueError(f"{_OWNER}: equal-loss cannot reach the target: the table's grid ends at "
                             f"{max(c.s[-1] for c in curves):g}, which gives at most {self._what(problem, most)}; "
                             "extend the sensitivity grid")
        lo, hi = _bisect(lambda v: achieved(at(v)), problem.goal, min(c.loss[0] for c in curves) - 1.0, top)
        per_unit = _blend(at, achieved, problem.goal, lo, hi)
        out = [0.0] * len(problem.targets)
        for s, u in zip(per_unit, units):
            for i in u:
                out[i] = s
        return out, {"level": 0.5 * (lo + hi), "loss": {r: c.loss_at(s) for r, c, s in zip(rows, curves, per_unit)}}

    @staticmethod
    def _what(problem: Problem, value: float) -> str:
        if problem.mean == "weighted":
            return f"{value / sum(problem.numels):.4f} of the free weights"
        return f"a mean target of {value:.4f}"

    def __repr__(self) -> str:
        return f"EqualLoss({len(self.curves)} rows, dense={self.dense:g})"


# -- the entry point -----------------------------------------------------------------------------------------------

RULES: dict[str, type[AllocationRule]] = {"uniform": Uniform, "erk": ERK, "lamp": LAMP, "owl": OWL,
                                          "equal-loss": EqualLoss}


def _make_rule(rule: Any, options: dict[str, Any]) -> AllocationRule:
    if isinstance(rule, AllocationRule):
        if options:
            raise TypeError(f"{_OWNER}: options {sorted(options)} go to the rule's constructor; with a rule object "
                            f"({rule!r}) pass none")
        return rule
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"{_OWNER}: unknown rule {rule!r}; rules: {', '.join(map(repr, RULES))} "
                         "(or an AllocationRule instance)")
    try:
        return RULES[rule](**options)
    except TypeError as exc:
        raise TypeError(f"{_OWNER}: rule {rule!r}: {exc}") from None


def _scope(model: nn.Module, layers: Any, exclude: Any) -> list[Target]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    try:
        targets = resolve_scope(model, layers, exclude).targets
    except ValueError as exc:
        raise ValueError(f"{_OWNER}: {exc}") from None
    if not targets:
        raise ValueError(f"{_OWNER}: no prunable parameter in scope (check layers/exclude)")
    check_materialised(_OWNER, targets)
    return targets


def _fixed(fixed: Mapping[str, float] | None, targets: Sequence[Target]) -> dict[str, float]:
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise TypeError(f"{_OWNER}: fixed must be a dict {{parameter name: sparsity}}, got {type(fixed).__name__}")
    names = {alias: t.name for t in targets for alias in (t.aliases or (t.name,))}
    out = {}
    for key, value in fixed.items():
        if key not in names:
            raise ValueError(f"{_OWNER}: fixed[{key!r}] is not a parameter in scope; in scope: "
                             f"{[t.name for t in targets][:8]}{' ...' if len(targets) > 8 else ''}")
        out[names[key]] = check_sparsity(_OWNER, f"fixed[{key!r}]", value)
    return out


def _goal(sparsity: float, mean: str, free: list[Target], numels: list[int], fixed: dict[str, float],
          targets: Sequence[Target]) -> tuple[float, int]:
    """The free parameters' goal (weights to prune, real, or their mean target) and exact count (weighted)."""
    fixed_counts = {t.name: prune_count(t.param.numel(), fixed[t.name]) for t in targets if t.name in fixed}
    total = sum(t.param.numel() for t in targets)
    if mean == "weighted":
        goal = prune_count(total, sparsity) - sum(fixed_counts.values())
        most = sum(max(n - 1, 0) for n in numels)
        if not free and goal != 0:
            raise ValueError(f"{_OWNER}: every parameter in scope is fixed, which prunes "
                             f"{sum(fixed_counts.values()) / total:.4f} of the weights, not {sparsity:g}; "
                             "leave some free or change the target")
        if not 0 <= goal <= most:
            reach = (sum(fixed_counts.values()) + (0 if goal < 0 else most)) / total
            raise ValueError(f"{_OWNER}: overall sparsity {sparsity:g} cannot be reached: with fixed={fixed} and every "
                             f"free layer keeping at least one weight the {'least' if goal < 0 else 'most'} is "
                             f"{reach:.4f}")
        return total * sparsity - sum(fixed_counts.values()), goal
    goal = (len(targets) * sparsity - sum(fixed.values())) / len(free) if free else sparsity
    if not free and abs(sum(fixed.values()) / len(targets) - sparsity) > 1e-12:
        raise ValueError(f"{_OWNER}: every parameter in scope is fixed, with mean target "
                         f"{sum(fixed.values()) / len(targets):.4f}, not {sparsity:g}")
    if free and not 0 <= goal < 1:
        raise ValueError(f"{_OWNER}: a mean target of {sparsity:g} cannot be reached with fixed={fixed}: the free "
                         f"layers would need a mean of {goal:.4f}")
    return goal, 0


def _check_raw(rule: AllocationRule, raw: Any, free: Sequence[Target]) -> None:
    """A rule's targets: one finite number in ``[0, 1]`` per free parameter (a custom rule may get it wrong)."""
    if not isinstance(raw, (list, tuple)) or len(raw) != len(free):
        raise ValueError(f"{_OWNER}: rule {rule!r} returned {type(raw).__name__} of "
                         f"{len(raw) if hasattr(raw, '__len__') else '?'} targets for {len(free)} free parameters")
    for t, value in zip(free, raw):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{_OWNER}: rule {rule!r} gave '{t.name}' the target {value!r}; targets must be "
                             "numbers in [0, 1]")


def allocate(model: nn.Module, sparsity: float, rule: str | AllocationRule = "uniform", *,
             layers: Sequence[Selector] | None = None, exclude: Sequence[Selector] | None = None,
             fixed: Mapping[str, float] | None = None, mean: str = "weighted", **options: Any) -> Allocation:
    """Per-parameter target sparsities by ``rule`` that prune exactly ``round(N·S)`` weights overall.

    Args:
        model: the model (read, never changed; OWL runs its calibration forward in eval mode).
        sparsity: the overall target ``S`` in ``[0, 1)``.
        rule: ``"uniform"``, ``"erk"``, ``"lamp"``, ``"owl"``, ``"equal-loss"``, or
            an :class:`AllocationRule` (:class:`Uniform`, :class:`ERK`, :class:`LAMP`,
            :class:`OWL`, :class:`EqualLoss`, or your own).
        layers: selectors of the parameters to allocate over, as for :class:`~prunekit.Pruner`.
        exclude: selectors left out (not counted in ``N``).
        fixed: ``{parameter name: sparsity}`` set by hand (``0.0``: kept dense); the
            rule allocates the rest so the overall target still holds.
        mean: ``"weighted"`` (the fraction of all weights in scope is ``S``, exactly
            ``round(N·S)`` pruned) or ``"layer"`` (the average of the per-parameter
            targets is ``S``; OWL, equal-loss and uniform only).
        **options: the rule's arguments when ``rule`` is a name
            (``allocate(model, 0.7, "owl", calibration=samples, lam=0.1)``).

    Returns:
        An :class:`Allocation`: pass it as ``Pruner(model, S, overrides=alloc,
        layers=..., exclude=...)`` or ``prune_oneshot(model, data, sparsity=alloc)``.

    Raises:
        ValueError: an unknown rule or mean, a sparsity outside ``[0, 1)``, a
            target no allocation can reach, or a name (in ``fixed``, a table, OWL
            norms) that is not a parameter in scope.
        TypeError: arguments of the wrong kind.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 3))
        >>> alloc = allocate(net, 0.5, "uniform", fixed={"2.weight": 0.0})
        >>> dict(alloc), alloc.pruned  # 115 = round(230 * 0.5), all of it in the two free layers
        ({'0.weight': 0.58, '1.weight': 0.57, '2.weight': 0.0}, 115)
    """
    rule_obj = _make_rule(rule, options)
    sparsity = check_sparsity(_OWNER, "sparsity", sparsity)
    mean = check_choice(_OWNER, "mean", mean, MEANS)
    if mean not in rule_obj.means:
        raise ValueError(f"{_OWNER}: rule {rule_obj.name!r} supports mean={rule_obj.means[0]!r} only, got {mean!r}")
    targets = _scope(model, layers, exclude)
    fixed_map = _fixed(fixed, targets)
    free = [t for t in targets if t.name not in fixed_map]
    numels = [t.param.numel() for t in free]
    goal, count = _goal(sparsity, mean, free, numels, fixed_map, targets)
    raw_free: list[float] = []
    info: dict[str, Any] = {}
    if free and (count > 0 if mean == "weighted" else goal > 0):
        problem = Problem(model, free, numels, mean, max(goal, 0.0), count, set(fixed_map))
        raw_free, info = rule_obj.solve(problem)
        _check_raw(rule_obj, raw_free, free)
    elif free:
        raw_free = [0.0] * len(free)
    free_total = count if mean == "weighted" else None
    free_counts = exact_counts(numels, raw_free, free_total) if free else []
    by_free = dict(zip((t.name for t in free), zip(free_counts, raw_free)))
    counts, values, raw = [], [], []
    for t in targets:
        n = t.param.numel()
        if t.name in fixed_map:
            counts.append(prune_count(n, fixed_map[t.name]))
            values.append(fixed_map[t.name])
            raw.append(fixed_map[t.name])
        else:
            counts.append(by_free[t.name][0])
            values.append(counts[-1] / n if n else 0.0)
            raw.append(float(by_free[t.name][1]))
    return Allocation(rule_obj.name, sparsity, mean, tuple(t.name for t in targets),
                      tuple(t.param.numel() for t in targets), tuple(counts), tuple(values), tuple(raw), info)
