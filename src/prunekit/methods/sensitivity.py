"""Sensitivity analysis: prune each layer alone over a sparsity grid and measure the user's metric.

For every layer in scope (or every user-given group of layers, pruned
together) and every sparsity of the grid, :func:`sensitivity` prunes that
layer one-shot with the criterion and granularity (a :meth:`Pruner.manual
<prunekit.Pruner.manual>` over just that layer, ``update_masks(s)``, then
``remove()``), calls ``evaluate(model)``, and puts the model back exactly as
it was: every parameter, gradient, buffer, ``requires_grad`` flag and each
module's train/eval flag, bit for bit, also when ``evaluate`` raises. The
result (:class:`SensitivityResult`) says which layers can take how much
sparsity: the input of per-layer sparsity allocation and of "know when to
stop".
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._io import atomic_write_bytes
from .._progress import progress_bar
from .._validate import check_choice, check_sparsity
from ..core.criteria import Criterion, Magnitude, ScoreContext
from ..core.granularity import NM, Granularity, Unstructured
from ..core.pruner import Pruner, _check_bound_model
from ..core.scope import Selector, Target, check_materialised, resolve_scope

__all__ = ["DEFAULT_SPARSITIES", "SensitivityResult", "check_grid", "sensitivity"]

DEFAULT_SPARSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_FORMAT, _VERSION = "prunekit.sensitivity", 1
_OWNER = "sensitivity"


# -- the result -----------------------------------------------------------------------------------------------------


@dataclass
class SensitivityResult:
    """Metric vs sparsity for each layer (or group) pruned alone, from :func:`sensitivity`.

    Attributes:
        dense: the metric of the unpruned model.
        curves: ``{layer: [(sparsity, metric), ...]}`` in model order, sparsities ascending.
        sizes: ``{layer: number of weights}`` (summed over a group's parameters).
        parameters: ``{layer: parameter names}`` pruned in that row (one, or a group's).
        higher_is_better: whether a larger metric is better (accuracy) or worse (loss, perplexity).
        evaluations: calls of ``evaluate``, the dense one included.
        seconds: wall time of the whole analysis.
        criterion: the criterion's ``repr``.
        granularity: the granularity's ``repr``.

    Example:
        >>> r = SensitivityResult(0.9, {"fc.weight": [(0.5, 0.85), (0.9, 0.4)]}, {"fc.weight": 64})
        >>> r.drop("fc.weight")
        [(0.5, 0.05), (0.9, 0.5)]
    """

    dense: float
    curves: dict[str, list[tuple[float, float]]]
    sizes: dict[str, int]
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    higher_is_better: bool = True
    evaluations: int = 0
    seconds: float = 0.0
    criterion: str = "Magnitude()"
    granularity: str = "Unstructured()"

    def __post_init__(self) -> None:
        self.parameters = {name: tuple(self.parameters.get(name, (name,))) for name in self.curves}

    @property
    def layers(self) -> list[str]:
        """The rows (layer or group names), in model order."""
        return list(self.curves)

    @property
    def sparsities(self) -> list[float]:
        """The sparsity grid, ascending."""
        first = next(iter(self.curves.values()), [])
        return [s for s, _ in first]

    def drop(self, layer: str) -> list[tuple[float, float]]:
        """``[(sparsity, how much worse than dense)]`` for ``layer``: positive is worse, for either metric direction.

        Rounded to 12 digits so that ``0.9 - 0.85`` reads ``0.05``.

        Raises:
            KeyError: ``layer`` is not a row of this result.
        """
        if layer not in self.curves:
            raise KeyError(f"SensitivityResult: no layer {layer!r}; layers: {self.layers}")
        sign = 1.0 if self.higher_is_better else -1.0
        return [(s, round(sign * (self.dense - m), 12)) for s, m in self.curves[layer]]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values; layers are a list, so model order survives ``sort_keys``.

        Example:
            >>> r = SensitivityResult(0.9, {"fc.weight": [(0.5, 0.85)]}, {"fc.weight": 64})
            >>> r.to_dict()["layers"][0]["curve"]
            [[0.5, 0.85]]
        """
        return {
            "format": _FORMAT, "version": _VERSION, "dense": self.dense, "higher_is_better": self.higher_is_better,
            "sparsities": self.sparsities, "criterion": self.criterion, "granularity": self.granularity,
            "cost": {"evaluations": self.evaluations, "seconds": self.seconds},
            "layers": [{"name": name, "numel": self.sizes[name],
                        "parameters": list(self.parameters[name]),
                        "curve": [[s, m] for s, m in curve]} for name, curve in self.curves.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityResult":
        """Rebuild a result from :meth:`to_dict` (e.g. a ``sensitivity.json`` read back).

        Raises:
            ValueError: not a sensitivity result, or of another version.

        Example:
            >>> r = SensitivityResult(0.9, {"fc.weight": [(0.5, 0.85)]}, {"fc.weight": 64})
            >>> SensitivityResult.from_dict(r.to_dict()) == r
            True
        """
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError("SensitivityResult.from_dict: not a prunekit sensitivity result (missing format marker)")
        if data.get("version") != _VERSION:
            raise ValueError(f"SensitivityResult.from_dict: unsupported version {data.get('version')!r}; "
                             f"expected {_VERSION}")
        rows = data["layers"]
        return cls(float(data["dense"]), {r["name"]: [(float(s), float(m)) for s, m in r["curve"]] for r in rows},
                   {r["name"]: int(r["numel"]) for r in rows}, {r["name"]: tuple(r["parameters"]) for r in rows},
                   bool(data["higher_is_better"]), int(data["cost"]["evaluations"]), float(data["cost"]["seconds"]),
                   str(data["criterion"]), str(data["granularity"]))

    def table(self, fmt: str = "markdown") -> str:
        """Metric per layer (rows) and sparsity (columns) with each layer's size; ``fmt``: ``"markdown"`` or ``"text"``.

        Example:
            >>> r = SensitivityResult(0.9, {"fc.weight": [(0.5, 0.85)]}, {"fc.weight": 64})
            >>> print(r.table())
            | layer | weights | 50% |
            |---|---:|---:|
            | (dense) | | 0.9000 |
            | fc.weight | 64 | 0.8500 |
        """
        fmt = check_choice("SensitivityResult.table", "fmt", fmt, ("markdown", "text"))
        head = ["layer", "weights"] + [f"{s * 100:g}%" for s in self.sparsities]
        rows = [["(dense)", ""] + [_number(self.dense)] * len(self.sparsities)]
        rows += [[name, f"{self.sizes[name]:,}"] + [_number(m) for _, m in curve]
                 for name, curve in self.curves.items()]
        if fmt == "markdown":
            lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            return "\n".join(lines + ["| " + " | ".join(r).replace("|  |", "| |") + " |" for r in rows])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         .rstrip() for r in [head] + rows)

    def plot(self, path: str | Any, *, title: str | None = None) -> None:
        """Write a PNG to ``path`` (atomically): metric vs sparsity per layer, and a heat map layer x sparsity.

        The heat map shows how much worse than dense each cell is (red worse,
        blue better, whatever the metric's direction).

        Raises:
            ImportError: matplotlib is not installed (``pip install 'prunekit[plot]'``).

        Example:
            >>> result.plot("runs/sensitivity.png")  # doctest: +SKIP
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("SensitivityResult.plot needs matplotlib: pip install 'prunekit[plot]' "
                              "(or pip install matplotlib)") from exc
        fig = Figure(figsize=(13, max(4.0, 1.5 + 0.32 * len(self.curves))))
        _draw(fig, self, title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        atomic_write_bytes(path, buffer.getvalue())


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _draw(fig: Any, r: SensitivityResult, title: str | None) -> None:
    curves, heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    for name, curve in r.curves.items():
        curves.plot([s * 100 for s, _ in curve], [m for _, m in curve], marker="o", markersize=3, label=name)
    curves.axhline(r.dense, color="black", linestyle="--", linewidth=1, label="dense")
    curves.set_xlabel("sparsity of the pruned layer (%)")
    curves.set_ylabel(f"metric ({'higher' if r.higher_is_better else 'lower'} is better)")
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize=7, ncol=1 + len(r.curves) // 16)
    drops = torch.tensor([[d for _, d in r.drop(name)] for name in r.curves], dtype=torch.float64)
    bound = float(drops.abs().max()) if drops.numel() and float(drops.abs().max()) > 0 else 1.0
    image = heat.imshow(drops.numpy(), aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
    heat.set_xticks(range(len(r.sparsities)), [f"{s * 100:g}" for s in r.sparsities])
    heat.set_yticks(range(len(r.curves)), list(r.curves), fontsize=7)
    heat.set_xlabel("sparsity (%)")
    if drops.numel() <= 300:  # small enough to label every cell legibly
        for (i, j), value in ((ij, float(drops[ij])) for ij in _cells(drops.shape)):
            heat.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6,
                      color="white" if abs(value) > 0.6 * bound else "black")  # legible on dark cells
    fig.colorbar(image, ax=heat, label="worse than dense by (metric units)")
    fig.suptitle(title or f"Sensitivity: each layer pruned alone ({r.criterion}, {r.granularity}); "
                          f"dense {_number(r.dense)}")
    fig.tight_layout()


def _cells(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    return ((i, j) for i in range(shape[0]) for j in range(shape[1]))


# -- putting the model back -----------------------------------------------------------------------------------------


class _Snapshot:
    """A model's structure and state, to put back bit for bit after each trial.

    Kept: which parameter, buffer and submodule objects each module holds
    (``model.double()`` replaces buffer objects, an ``evaluate`` may swap a
    layer), every parameter's value, gradient and ``requires_grad``, every
    buffer's value, and each module's train/eval flag.
    """

    def __init__(self, model: nn.Module) -> None:
        self.slots = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]
        # p.data aliases the storage: holding it lets a cast (model.double()) be undone onto the same memory.
        self.params = [(p, p.data, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                       for p in model.parameters()]
        self.buffers = [(b, b.data, b.detach().clone()) for b in model.buffers()]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        """Put everything back: the original objects in place, holding their original values."""
        for module, params, buffers, children in self.slots:
            for current, saved in ((module._parameters, params), (module._buffers, buffers),
                                   (module._modules, children)):
                if current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items()):
                    current.clear()
                    current.update(saved)
        with torch.no_grad():
            for p, storage, value, requires_grad, grad in self.params:
                _put(p, storage, value)
                p.requires_grad_(requires_grad)
                if grad is None:
                    p.grad = None
                elif p.grad is not None and _same_layout(p.grad, grad):
                    p.grad.copy_(grad)
                else:
                    p.grad = grad.clone()
            for b, storage, value in self.buffers:
                _put(b, storage, value)
        for module, flag in self.modes:
            module.training = flag  # by assignment: an overridden train() cannot move the flags


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _put(tensor: torch.Tensor, storage: torch.Tensor, value: torch.Tensor) -> None:
    if tensor.data_ptr() != storage.data_ptr() or not _same_layout(tensor, storage):
        tensor.data = storage  # evaluate cast or moved it (model.half(), .to(...)): the original memory again
    tensor.copy_(value)


# -- units: what is pruned alone ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One row of the analysis: the selection that makes a Pruner prune exactly ``params``."""

    name: str
    layers: list[Selector] | None
    exclude: list[Selector] | None
    params: tuple[str, ...]
    numel: int


def _literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (brackets, ``*`` and ``?`` are escaped)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _units(model: nn.Module, layers: Any, exclude: Any, groups: Any) -> tuple[list[_Unit], list[Target]]:
    if groups is not None:
        if layers is not None:
            raise ValueError(f"{_OWNER}: pass layers= or groups=, not both (each group names its own layers)")
        return _group_units(model, exclude, groups)
    try:
        targets = resolve_scope(model, layers, exclude).targets
    except ValueError as exc:
        raise ValueError(f"{_OWNER}: {exc}") from None
    if not targets:
        raise ValueError(f"{_OWNER}: no prunable parameter in scope (check layers/exclude)")
    base = list(exclude) if isinstance(exclude, (list, tuple)) else ([] if exclude is None else [exclude])
    units = []
    for t in targets:
        # The user's own selection, minus every other target: explicit naming (position tables) keeps working.
        others = [_literal(o.name) for o in targets if o is not t]
        units.append(_Unit(t.name, None if layers is None else list(_as_list(layers)), (base + others) or None,
                           (t.name,), t.param.numel()))
    return units, targets


def _as_list(selectors: Any) -> list[Any]:
    return list(selectors) if isinstance(selectors, (list, tuple)) else [selectors]


def _group_units(model: nn.Module, exclude: Any, groups: Any) -> tuple[list[_Unit], list[Target]]:
    if isinstance(groups, Mapping):
        named = [(str(k), v) for k, v in groups.items()]
    elif isinstance(groups, (list, tuple)):
        named = [(None, v) for v in groups]
    else:
        raise TypeError(f"{_OWNER}: groups must be a dict {{name: selectors}} or a list of selector lists, "
                        f"got {type(groups).__name__}")
    if not named:
        raise ValueError(f"{_OWNER}: groups is empty; pass at least one group of layers (or groups=None)")
    excluded = _excluded_names(model, exclude)
    units, seen = [], {}
    for key, selectors in named:
        try:  # exclude applies to the analysis as a whole: a group need not contain what it names
            found = resolve_scope(model, _as_list(selectors)).targets
        except ValueError as exc:
            raise ValueError(f"{_OWNER}: group {key or selectors!r}: {exc}") from None
        targets = [t for t in found if t.name not in excluded]
        if not targets:
            raise ValueError(f"{_OWNER}: group {key or selectors!r} has no prunable parameter (check it and exclude)")
        name = key if key is not None else "+".join(t.name for t in targets)
        if name in {u.name for u in units}:
            raise ValueError(f"{_OWNER}: two groups are named {name!r}; give groups distinct names")
        left_out = [_literal(t.name) for t in found if t.name in excluded]
        units.append(_Unit(name, _as_list(selectors), left_out or None, tuple(t.name for t in targets),
                           sum(t.param.numel() for t in targets)))
        seen.update({t.name: t for t in targets})
    return units, list(seen.values())


def _excluded_names(model: nn.Module, exclude: Any) -> set[str]:
    if exclude is None:
        return set()
    try:
        kept = {t.name for t in resolve_scope(model, None, exclude).targets}
    except ValueError as exc:
        raise ValueError(f"{_OWNER}: {exc}") from None
    return {t.name for t in resolve_scope(model).targets} - kept


# -- scores of the dense model, computed once -----------------------------------------------------------------------


class _DenseScores(Criterion):
    """The criterion's scores of the dense model, computed once per parameter and served to every trial.

    Every trial starts from the same (restored) weights at step 0, so the
    criterion would return the same scores each time; for data-driven criteria
    (OBD, Taylor) this turns one estimate per trial into one per analysis.
    """

    def __init__(self, inner: Criterion, targets: Sequence[Target]) -> None:
        self.inner = inner
        self.table = {t.name: inner.score(t.param.detach(), ScoreContext(t.name, t.module, 0)) for t in targets}

    def score(self, param: torch.Tensor, context: ScoreContext) -> torch.Tensor:  # noqa: D102
        return self.table[context.name]

    def __repr__(self) -> str:
        return repr(self.inner)


def _dense_scores(model: nn.Module, criterion: Criterion, targets: Sequence[Target]) -> _DenseScores:
    bind = getattr(criterion, "bind", None)
    if callable(bind) and getattr(criterion, "model", None) is None:
        bind(model)  # as the Pruner does: OBD / Taylor estimate on the model being analysed
    try:
        _check_bound_model(criterion, model, targets)  # the Pruner's rule, before an estimate is paid for
    except ValueError as exc:
        raise ValueError(f"{_OWNER}: {str(exc).removeprefix('Pruner: ')}") from None
    return _DenseScores(criterion, targets)


# -- the analysis ---------------------------------------------------------------------------------------------------


def check_grid(sparsities: Any, granularity: Granularity | None = None) -> list[float]:
    """The sparsity grid, validated and sorted: numbers in ``[0, 1)``, at least one, no duplicates.

    With an :class:`~prunekit.NM` granularity only ``0`` and its pattern's sparsity are possible.

    Raises:
        TypeError: not a sequence of real numbers.
        ValueError: empty, duplicates, a value outside ``[0, 1)``, or one the granularity cannot reach.

    Example:
        >>> check_grid((0.5, 0.1))
        [0.1, 0.5]
        >>> check_grid((0.3,), NM(2, 4))
        Traceback (most recent call last):
        ...
        ValueError: sensitivity: NM(2, 4) fixes the sparsity at 0.5, got 0.3 in sparsities; pass sparsities=(0.5,)
    """
    if isinstance(sparsities, (str, bytes)) or not hasattr(sparsities, "__iter__"):
        raise TypeError(f"{_OWNER}: sparsities must be a sequence of numbers in [0, 1), got {sparsities!r}")
    grid = [check_sparsity(_OWNER, f"sparsities[{i}]", s) for i, s in enumerate(sparsities)]
    if not grid:
        raise ValueError(f"{_OWNER}: sparsities is empty; pass at least one sparsity in [0, 1)")
    if len(set(grid)) != len(grid):
        raise ValueError(f"{_OWNER}: sparsities has duplicates: {grid}")
    if isinstance(granularity, NM):
        bad = [s for s in grid if s != 0 and abs(s - granularity.sparsity) > 1e-9]
        if bad:
            raise ValueError(f"{_OWNER}: {granularity!r} fixes the sparsity at {granularity.sparsity:g}, got "
                             f"{bad[0]:g} in sparsities; pass sparsities=({granularity.sparsity:g},)")
    return sorted(grid)


def _metric(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{_OWNER}: evaluate must return a real number (the metric), got {type(value).__name__} "
                        f"{value!r} {where}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_OWNER}: evaluate returned {value} {where}; the metric must be finite")
    return value


def _prune(model: nn.Module, unit: _Unit, sparsity: float, criterion: Criterion, granularity: Granularity,
           ranking: str) -> None:
    """Prune ``unit`` alone to ``sparsity`` in place, through a manual Pruner that is removed again."""
    where = f"{_OWNER}: layer {unit.name!r} at sparsity {sparsity:g}"
    try:
        pruner = Pruner.manual(model, criterion=criterion, granularity=granularity, layers=unit.layers,
                               exclude=unit.exclude, ranking=ranking)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        if tuple(pruner.names) != unit.params:  # the selection must reach exactly this unit's parameters
            raise RuntimeError(f"{where}: the pruner selected {pruner.names}, expected {list(unit.params)}")
        pruner.update_masks(sparsity)
    except ValueError as exc:  # e.g. a shape the granularity cannot tile
        raise ValueError(f"{where}: {exc}") from None
    finally:
        pruner.remove()


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    layers: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
    groups: Mapping[str, Sequence[Selector]] | Sequence[Sequence[Selector]] | None = None,
    criterion: Criterion | None = None,
    granularity: Granularity | None = None,
    ranking: str = "layerwise",
    higher_is_better: bool = True,
    progress: bool | None = None,
) -> SensitivityResult:
    """Prune each layer (or group) alone, one-shot, at each sparsity; evaluate; restore the model exactly.

    Args:
        model: the (trained, dense) model; changed during the analysis and
            restored after every evaluation, bit for bit: parameters, gradients,
            buffers, ``requires_grad`` and each module's train/eval flag. It
            holds one extra copy of the model's tensors meanwhile.
        evaluate: ``evaluate(model) -> float``, the metric (accuracy, loss,
            perplexity...). Whatever it changes in the model (values, modes,
            dtypes, even a swapped layer) is put back afterwards.
        sparsities: the grid, each in ``[0, 1)`` (sorted; duplicates refused).
        layers: selectors of the layers to analyse one by one (as for
            :class:`~prunekit.Pruner`; ``None``: every prunable weight). A row is
            named by its parameter (``"fc1.weight"``).
        exclude: selectors left out.
        groups: instead of ``layers``: ``{name: selectors}`` (or a list of
            selector lists, named by their parameters joined with ``+``); each
            group is pruned as one, every tensor of it to the sparsity
            (``ranking="global"``: one ranking across the group).
        criterion: saliency (default :class:`~prunekit.Magnitude`). Data-driven
            ones (OBD, Taylor) are bound to ``model`` if unbound. It is asked
            once per parameter, on the dense model (every trial starts there).
        granularity: unit of pruning (default :class:`~prunekit.Unstructured`).
        ranking: ``"layerwise"`` or ``"global"`` within a group.
        higher_is_better: ``True`` for accuracy-like metrics, ``False`` for
            losses; it fixes the sign of :meth:`SensitivityResult.drop`.
        progress: a bar over layers x sparsities (``None``: when stderr is a terminal).

    Returns:
        A :class:`SensitivityResult`.

    Raises:
        ValueError: an empty or invalid grid, a selector or group matching
            nothing, a layer the granularity cannot prune, or ``evaluate``
            returning a non-finite number (the message names the layer and sparsity).
        TypeError: ``evaluate`` returning something that is not a real number.
        Any exception ``evaluate`` raises propagates, with the model restored.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> X = torch.randn(32, 4)
        >>> y = net(X).argmax(1)  # the dense model is right on every sample
        >>> accuracy = lambda m: float((m(X).argmax(1) == y).float().mean())
        >>> result = sensitivity(net, accuracy, sparsities=(0.5, 0.9), progress=False)
        >>> result.dense, result.layers, result.evaluations
        (1.0, ['0.weight', '2.weight'], 5)
        >>> bool(torch.equal(net(X).argmax(1), y))  # the model is back
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(f"{_OWNER}: evaluate must be a callable evaluate(model) -> float, "
                        f"got {type(evaluate).__name__}")
    criterion = Magnitude() if criterion is None else criterion
    granularity = Unstructured() if granularity is None else granularity
    for arg, value, kind in (("criterion", criterion, Criterion), ("granularity", granularity, Granularity)):
        if not isinstance(value, kind):
            raise TypeError(f"{_OWNER}: {arg} must be a prunekit {kind.__name__} instance, got {type(value).__name__}")
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"{_OWNER}: higher_is_better must be True or False, got {higher_is_better!r}")
    ranking = check_choice(_OWNER, "ranking", ranking, ("layerwise", "global"))
    grid = check_grid(sparsities, granularity)
    units, targets = _units(model, layers, exclude, groups)
    check_materialised(_OWNER, targets)
    started = time.perf_counter()
    snapshot = _Snapshot(model)
    with progress_bar(progress, total=1 + len(units) * len(grid), desc="sensitivity", unit="eval") as bar:
        dense = _evaluate(evaluate, model, snapshot, "for the dense model")
        bar.update(1)
        try:
            scores = _dense_scores(model, criterion, targets)
        finally:
            snapshot.restore()  # an estimate may leave gradients behind
        curves = {}
        for unit in units:
            bar.set_postfix_str(unit.name, refresh=False)
            curves[unit.name] = []
            for s in grid:
                _prune_and_restore_on_error(model, unit, s, scores, granularity, ranking, snapshot)
                curves[unit.name].append((s, _evaluate(evaluate, model, snapshot,
                                                       f"for layer {unit.name!r} at sparsity {s:g}")))
                bar.update(1)
    return SensitivityResult(dense, curves, {u.name: u.numel for u in units}, {u.name: u.params for u in units},
                             higher_is_better, 1 + len(units) * len(grid), round(time.perf_counter() - started, 3),
                             repr(criterion), repr(granularity))


def _prune_and_restore_on_error(model: nn.Module, unit: _Unit, sparsity: float, criterion: Criterion,
                                granularity: Granularity, ranking: str, snapshot: _Snapshot) -> None:
    try:
        _prune(model, unit, sparsity, criterion, granularity, ranking)
    except BaseException:
        snapshot.restore()
        raise


def _evaluate(evaluate: Callable[[nn.Module], Any], model: nn.Module, snapshot: _Snapshot, where: str) -> float:
    """``evaluate(model)`` checked, with the model put back afterwards whatever happens."""
    try:
        value = evaluate(model)
    finally:
        snapshot.restore()
    return _metric(value, where)
