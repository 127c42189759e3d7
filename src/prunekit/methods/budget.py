"""Accuracy-budgeted pruning: prune as far as the metric allows, one-shot or during training.

* :func:`prune_to_budget` (one-shot): bisection over the overall sparsity (each
  trial: an :func:`~prunekit.allocate` allocation by ``rule``, pruned in place,
  optionally recovered, evaluated, and the model put back bit for bit) for the
  highest sparsity whose metric stays within ``max_drop`` of the dense one. The
  model is left pruned at that sparsity, evaluated once more: the result is never
  outside the tolerance on the evaluation set, whatever the metric's shape.
* :func:`prune_channels_to_budget` (structural): remove channels until the
  model's MACs (or measured latency, or any cost) are at most a budget, unless
  the metric leaves its tolerance first (it says which bound); during training,
  :class:`StopAtBudget` does the same as a hook of a scheduled
  :class:`~prunekit.StructuredPruner`.
* :class:`StopWhen` (gradual): a hook of a scheduled :class:`~prunekit.Pruner`
  that evaluates after every mask update; at the first update that leaves the
  tolerance it undoes that update (the last good masks, and the pruned
  parameters' values and optimizer state as they were just before it, bit for
  bit) and holds the sparsity there for the rest of the run.

"Within tolerance" means ``drop <= max_drop`` where ``drop`` is how much worse
than the reference the metric is (``reference - metric`` for accuracy-like
metrics, ``metric - reference`` when ``higher_is_better=False``), divided by
``|reference|`` when ``relative=True``; a slack of ``1e-12`` absorbs float
rounding (``0.9 - 0.85`` is ``0.05000000000000004``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import nn

from .._progress import progress_bar
from .._validate import check_real
from ..core.criteria import Criterion, Magnitude
from ..core.granularity import Granularity, Unstructured
from ..core.pruner import Pruner
from ..core.scope import Selector, resolve_scope
from .allocation import Allocation, AllocationRule, allocate
from .sensitivity import _dense_scores, _Snapshot

__all__ = ["BudgetCheck", "BudgetResult", "ChannelBudgetResult", "ChannelTrial", "Check", "Latency", "StopAtBudget",
           "StopWhen", "Tolerance", "Trial", "prune_channels_to_budget", "prune_to_budget"]

_SLACK = 1e-12
_FORMAT, _VERSION = "prunekit.StopWhen", 1
Evaluate = Callable[[nn.Module], float]
Method = Callable[[nn.Module, Allocation], Any]


# -- the tolerance ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may fall from a reference: ``max_drop`` absolute, or relative to ``|reference|``.

    Example:
        >>> t = Tolerance(0.05)
        >>> t.ok(0.9, 0.85), t.ok(0.9, 0.84)
        (True, False)
        >>> Tolerance(0.1, relative=True, higher_is_better=False).drop(2.0, 2.1)  # a loss 5% higher
        0.05
    """

    max_drop: float
    relative: bool = False
    higher_is_better: bool = True
    owner: str = field(default="Tolerance", compare=False, repr=False)

    def __post_init__(self) -> None:
        value = check_real(self.owner, "max_drop", self.max_drop)
        if value < 0:
            raise ValueError(f"{self.owner}: max_drop must be >= 0 (how much worse the metric may get), got {value}")
        object.__setattr__(self, "max_drop", value)
        for name in ("relative", "higher_is_better"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{self.owner}: {name} must be True or False, got {getattr(self, name)!r}")

    def check_reference(self, reference: float) -> None:
        """Refuse a reference a relative drop cannot be measured against (zero)."""
        if self.relative and reference == 0:
            raise ValueError(f"{self.owner}: relative=True needs a nonzero reference metric, got {reference}; "
                             "use an absolute max_drop")

    def drop(self, reference: float, metric: float) -> float:
        """How much worse ``metric`` is than ``reference`` (negative: better), rounded to 12 digits."""
        worse = (reference - metric) if self.higher_is_better else (metric - reference)
        return round(worse / abs(reference) if self.relative else worse, 12)

    def ok(self, reference: float, metric: float) -> bool:
        """Whether ``metric`` is within the tolerance of ``reference``."""
        worse = (reference - metric) if self.higher_is_better else (metric - reference)
        return (worse / abs(reference) if self.relative else worse) <= self.max_drop + _SLACK


def _metric(owner: str, value: Any, where: str) -> float:
    """``evaluate``'s value as a finite float (a one-element tensor is fine)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: evaluate must return a real number (the metric), got {type(value).__name__} "
                        f"{value!r} {where}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{owner}: evaluate returned {value} {where}; the metric must be finite")
    return float(value)


def _evaluate_aside(owner: str, evaluate: Evaluate, model: nn.Module, where: str) -> float:
    """``evaluate(model)`` during training: module modes and the global RNG state are put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):  # evaluating must not change the run's random stream
            value = evaluate(model)
    finally:
        for module, flag in modes:
            module.training = flag
    return _metric(owner, value, where)


# -- one-shot: the result ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One evaluated point of the search: the overall sparsity asked for, the metric, within tolerance or not."""

    sparsity: float
    metric: float
    ok: bool


@dataclass
class BudgetResult:
    """What :func:`prune_to_budget` found; the model is left pruned at :attr:`sparsity`.

    Attributes:
        dense: the metric of the dense model.
        metric: the metric of the returned (pruned) model, evaluated last.
        sparsity: the overall sparsity of the returned model (``allocation.sparsity``; 0 if left dense).
        requested: the overall sparsity the search settled on (the allocation's target).
        allocation: the :class:`~prunekit.Allocation` applied (``None``: the model was left dense).
        trials: every search trial in order (``Trial(sparsity, metric, ok)``).
        tolerance: the :class:`Tolerance`.
        rule: the allocation rule's name.
        evaluations: calls of ``evaluate`` (dense, trials, final checks).
        seconds: wall time.
        rejected: sparsities whose re-evaluation at the end fell outside the tolerance (a non-reproducible
            ``evaluate`` or ``recover``); the search then fell back to the next lower good trial.

    Example:
        >>> r = BudgetResult(0.9, 0.89, 0.5, 0.5, None, [Trial(0.5, 0.89, True)], Tolerance(0.02))
        >>> r.drop
        0.01
    """

    dense: float
    metric: float
    sparsity: float
    requested: float
    allocation: Allocation | None
    trials: list[Trial]
    tolerance: Tolerance
    rule: str = "uniform"
    evaluations: int = 0
    seconds: float = 0.0
    rejected: list[float] = field(default_factory=list)

    @property
    def drop(self) -> float:
        """How much worse than dense the returned model is (see :class:`Tolerance`)."""
        return self.tolerance.drop(self.dense, self.metric)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the allocation as :meth:`Allocation.to_dict`)."""
        t = self.tolerance
        return {"dense": self.dense, "metric": self.metric, "sparsity": self.sparsity, "requested": self.requested,
                "drop": self.drop, "max_drop": t.max_drop, "relative": t.relative,
                "higher_is_better": t.higher_is_better, "rule": self.rule, "evaluations": self.evaluations,
                "seconds": self.seconds, "rejected": list(self.rejected),
                "trials": [[x.sparsity, x.metric, x.ok] for x in self.trials],
                "allocation": None if self.allocation is None else self.allocation.to_dict()}

    def table(self) -> str:
        """A Markdown table of the trials, sorted by sparsity, and the outcome.

        Example:
            >>> r = BudgetResult(0.9, 0.89, 0.5, 0.5, None, [Trial(0.5, 0.89, True)], Tolerance(0.02))
            >>> print(r.table())
            | sparsity | metric | drop | within |
            |---:|---:|---:|:---:|
            | (dense) | 0.9000 | 0 | |
            | 0.5000 | 0.8900 | 0.01 | yes |
            | **0.5000** (returned) | 0.8900 | 0.01 | yes |
        """
        lines = ["| sparsity | metric | drop | within |", "|---:|---:|---:|:---:|",
                 f"| (dense) | {self.dense:.4f} | 0 | |"]
        for x in sorted(self.trials, key=lambda x: x.sparsity):
            lines.append(f"| {x.sparsity:.4f} | {x.metric:.4f} | {self.tolerance.drop(self.dense, x.metric):.4g} "
                         f"| {'yes' if x.ok else 'no'} |")
        lines.append(f"| **{self.sparsity:.4f}** (returned) | {self.metric:.4f} | {self.drop:.4g} | yes |")
        return "\n".join(lines)


# -- one-shot: the search ---------------------------------------------------------------------------------------------


@dataclass
class _Search:
    """What every trial of one :func:`prune_to_budget` call needs."""

    model: nn.Module
    evaluate: Evaluate
    tolerance: Tolerance
    allocation: Callable[[float], Allocation]
    prune: Method
    recover: Callable[[nn.Module], Any] | None
    scope: list[torch.Tensor]
    snapshot: _Snapshot
    bar: Any
    dense: float = 0.0
    evaluations: int = 0

    def measure(self, where: str) -> float:
        """``evaluate(model)``, checked; the caller puts the model back."""
        self.evaluations += 1
        self.bar.update(1)
        return _metric("prune_to_budget", self.evaluate(self.model), where)

    def apply(self, sparsity: float) -> Allocation:
        """Prune the (dense) model in place at ``sparsity`` and run the recovery, which cannot revive a pruned weight."""
        alloc = self.allocation(sparsity)
        self.prune(self.model, alloc)
        if self.recover is not None:
            with torch.no_grad():
                zeros = [(p, p == 0) for p in self.scope]
            self.recover(self.model)
            with torch.no_grad():
                for p, zero in zeros:
                    p.masked_fill_(zero, 0)
        return alloc

    def trial(self, sparsity: float) -> Trial:
        """Prune at ``sparsity``, evaluate, put the dense model back bit for bit."""
        try:
            self.apply(sparsity)
            metric = self.measure(f"at overall sparsity {sparsity:g}")
        finally:
            self.snapshot.restore()
        return Trial(sparsity, metric, self.tolerance.ok(self.dense, metric))

    def final(self, sparsity: float) -> tuple[Allocation, float] | None:
        """Prune at ``sparsity`` and keep it if a fresh evaluation is within tolerance (else the dense model back)."""
        try:
            alloc = self.apply(sparsity)
            pruned = _Snapshot(self.model)
            try:
                metric = self.measure(f"of the returned model at overall sparsity {sparsity:g}")
            finally:
                pruned.restore()  # whatever evaluate changed, the pruned model stays as pruned
        except BaseException:
            self.snapshot.restore()
            raise
        if self.tolerance.ok(self.dense, metric):
            return alloc, metric
        self.snapshot.restore()
        return None


def _bisect(search: _Search, lo: float, hi: float, tol: float) -> list[Trial]:
    """The trials of the bisection: ``hi`` first, then halve ``(good, bad)`` until it is narrower than ``tol``."""
    trials = [] if lo == 0 else [search.trial(lo)]
    if trials and not trials[0].ok:
        drop = search.tolerance.drop(search.dense, trials[0].metric)
        raise ValueError(f"prune_to_budget: already at lo={lo:g} the metric is {trials[0].metric:.6g} (worse than "
                         f"dense {search.dense:.6g} by {drop:.4g} > max_drop {search.tolerance.max_drop:g}); "
                         "lower lo or raise max_drop")
    top = search.trial(hi)
    trials.append(top)
    good, bad = lo, hi
    while not top.ok and bad - good > tol:
        mid = (good + bad) / 2
        trial = search.trial(mid)
        trials.append(trial)
        good, bad = (mid, bad) if trial.ok else (good, mid)
    return trials


def _method(method: Any, criterion: Criterion | None, granularity: Granularity | None, layers: Any, exclude: Any,
            model: nn.Module) -> Method:
    if callable(method) and not isinstance(method, str):
        if criterion is not None or granularity is not None:
            raise ValueError("prune_to_budget: criterion= and granularity= apply to method='magnitude' only; a "
                             "callable method prunes by itself")
        return method
    if method != "magnitude":
        raise ValueError(f"prune_to_budget: method must be 'magnitude' or a callable method(model, allocation), "
                         f"got {method!r}")
    criterion = Magnitude() if criterion is None else criterion
    granularity = Unstructured() if granularity is None else granularity
    for arg, value, kind in (("criterion", criterion, Criterion), ("granularity", granularity, Granularity)):
        if not isinstance(value, kind):
            raise TypeError(f"prune_to_budget: {arg} must be a prunekit {kind.__name__} instance, "
                            f"got {type(value).__name__}")
    try:
        scores = _dense_scores(model, criterion, resolve_scope(model, layers, exclude).targets)
    except ValueError as exc:
        raise ValueError(f"prune_to_budget: {str(exc).removeprefix('sensitivity: ')}") from None

    def prune(net: nn.Module, alloc: Allocation) -> None:
        pruner = Pruner.manual(net, criterion=scores, granularity=granularity, layers=layers, exclude=exclude)
        try:
            pruner.update_masks(alloc.by_name())
        finally:
            pruner.remove()
    return prune


def _check_range(lo: Any, hi: Any, tol: Any) -> tuple[float, float, float]:
    lo, hi, tol = (check_real("prune_to_budget", n, v) for n, v in (("lo", lo), ("hi", hi), ("tol", tol)))
    if not 0 <= lo < hi < 1:
        raise ValueError(f"prune_to_budget: need 0 <= lo < hi < 1, got lo={lo:g}, hi={hi:g}")
    if tol <= 0:
        raise ValueError(f"prune_to_budget: tol must be > 0 (the width at which bisection stops), got {tol:g}")
    return lo, hi, tol


def _allocator(model: nn.Module, rule: Any, options: Mapping[str, Any] | None, layers: Any,
               exclude: Any) -> tuple[Callable[[float], Allocation], str]:
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"prune_to_budget: rule_options must be a dict, got {type(options).__name__}")
    opts = dict(options or {})
    if isinstance(rule, AllocationRule) and opts:
        raise TypeError("prune_to_budget: rule_options go to a named rule's constructor; with a rule object pass none")
    name = allocate(model, 0.0, rule, layers=layers, exclude=exclude, **opts).rule  # bad rules, scopes fail now
    return (lambda s: allocate(model, s, rule, layers=layers, exclude=exclude, **opts)), name


def prune_to_budget(
    model: nn.Module,
    evaluate: Evaluate,
    *,
    max_drop: float,
    relative: bool = False,
    higher_is_better: bool = True,
    rule: str | AllocationRule = "uniform",
    rule_options: Mapping[str, Any] | None = None,
    method: str | Method = "magnitude",
    criterion: Criterion | None = None,
    granularity: Granularity | None = None,
    layers: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
    recover: Callable[[nn.Module], Any] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
    tol: float = 0.005,
    progress: bool | None = None,
) -> BudgetResult:
    """Prune ``model`` in place, one-shot, to the highest overall sparsity whose metric is within ``max_drop`` of dense.

    The dense metric is measured first. Then ``hi`` is tried, and if it is
    outside the tolerance, bisection between the highest good and lowest bad
    sparsity until they are less than ``tol`` apart (``lo`` counts as good: it is
    tried first when above 0). Each trial allocates the sparsity over the layers
    by ``rule`` (on the dense weights), prunes by ``method``, runs ``recover``,
    evaluates, and restores the model bit for bit (parameters, gradients,
    buffers, modes). The best good trial is then applied for good and evaluated
    once more; should that fresh value leave the tolerance (``evaluate`` or
    ``recover`` not reproducible), the next lower good trial is taken, down to the
    dense model. The returned model is therefore never outside the tolerance on
    the evaluation set. For a metric that falls monotonically with sparsity the
    result is within ``tol`` below the threshold; for any other it is a good
    sparsity with a bad one less than ``tol`` above it (or ``hi``).

    Args:
        model: the dense (trained) model; left pruned (plain zeros, no hooks).
        evaluate: ``evaluate(model) -> float`` on the evaluation set.
        max_drop: how much worse than dense the metric may get (``>= 0``).
        relative: ``max_drop`` is a fraction of ``|dense metric|``.
        higher_is_better: ``False`` for losses and perplexities.
        rule: allocation rule, as for :func:`~prunekit.allocate` (``"uniform"``, ``"erk"``, ``"lamp"``,
            ``"owl"``, ``"equal-loss"`` or an :class:`~prunekit.methods.allocation.AllocationRule`).
        rule_options: a named rule's arguments (``{"calibration": samples}`` for OWL, ``{"table": result}``
            for equal loss).
        method: ``"magnitude"`` (a manual :class:`~prunekit.Pruner` with ``criterion`` (default
            :class:`~prunekit.Magnitude`, scored once on the dense model) and ``granularity``, each
            parameter at its allocated target) or ``method(model, allocation)`` that prunes in place,
            e.g. ``lambda m, a: prune_oneshot(m, calib, method="wanda", sparsity=a)``.
        criterion: see ``method``.
        granularity: see ``method``.
        layers: the parameters to prune (selectors as for :class:`~prunekit.Pruner`).
        exclude: selectors left out.
        recover: optional ``recover(model)`` after each pruning (a few fine-tuning steps); every
            weight in scope that is zero after pruning is zeroed again after it.
        lo: lowest overall sparsity considered (must itself be within the tolerance).
        hi: highest overall sparsity considered (``< 1``).
        tol: bisection stops when the bracket is narrower than this.
        progress: a bar over evaluations (``None``: when stderr is a terminal).

    Returns:
        A :class:`BudgetResult` (the allocation in it can seed a ``Pruner(..., overrides=alloc)``).

    Raises:
        ValueError: a bad tolerance or range, ``lo`` already outside the tolerance, a zero dense metric
            with ``relative=True``, a bad rule or scope, or ``evaluate`` returning a non-finite number.
        TypeError: arguments of the wrong kind, or ``evaluate`` returning something not a real number.
        Any exception of ``evaluate``, ``method`` or ``recover`` propagates, with the dense model restored.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> X = torch.randn(64, 16)
        >>> y = net(X).argmax(1)  # the dense model is right on every sample
        >>> accuracy = lambda m: float((m(X).argmax(1) == y).float().mean())
        >>> r = prune_to_budget(net, accuracy, max_drop=0.05, progress=False)
        >>> zeros = sum(int((p == 0).sum()) for p in (net[0].weight, net[2].weight))
        >>> r.metric >= 0.95, r.sparsity == zeros / (16 * 16 + 16 * 4), len(r.trials) > 2
        (True, True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_to_budget: model must be an nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(f"prune_to_budget: evaluate must be a callable evaluate(model) -> float, "
                        f"got {type(evaluate).__name__}")
    tolerance = Tolerance(max_drop, relative, higher_is_better, owner="prune_to_budget")
    lo, hi, tol = _check_range(lo, hi, tol)
    if recover is not None and not callable(recover):
        raise TypeError(f"prune_to_budget: recover must be a callable recover(model) or None, got {recover!r}")
    allocation, rule_name = _allocator(model, rule, rule_options, layers, exclude)
    started = time.perf_counter()
    snapshot = _Snapshot(model)
    prune = _method(method, criterion, granularity, layers, exclude, model)
    snapshot.restore()  # a data-driven criterion's estimate may leave gradients behind
    scope = [t.param for t in resolve_scope(model, layers, exclude).targets]
    expected = 3 + (lo > 0) + math.ceil(math.log2(max((hi - lo) / tol, 1.0)))
    with progress_bar(progress, total=expected, desc="prune_to_budget", unit="eval") as bar:
        search = _Search(model, evaluate, tolerance, allocation, prune, recover, scope, snapshot, bar)
        try:
            search.dense = search.measure("for the dense model")
        finally:
            snapshot.restore()
        tolerance.check_reference(search.dense)
        trials = _bisect(search, lo, hi, tol)
        result = _settle(search, trials, lo)
        bar.set_postfix_str(f"sparsity {result.sparsity:.4f}", refresh=False)
    result.rule = rule_name
    result.evaluations, result.seconds = search.evaluations, round(time.perf_counter() - started, 3)
    if not tolerance.ok(result.dense, result.metric):  # the guarantee, checked where it is made
        raise AssertionError(f"prune_to_budget: returned model outside the tolerance ({result.drop} > {max_drop})")
    return result


def _settle(search: _Search, trials: list[Trial], lo: float) -> BudgetResult:
    """Apply the best good trial, re-evaluated; fall back to lower good ones (then dense) if it fails."""
    good = sorted({t.sparsity for t in trials if t.ok}, reverse=True)
    rejected = []
    for sparsity in good:
        kept = search.final(sparsity)
        if kept is not None:
            alloc, metric = kept
            return BudgetResult(search.dense, metric, alloc.sparsity, sparsity, alloc, trials, search.tolerance,
                                rejected=rejected)
        rejected.append(sparsity)
    if lo > 0:
        raise RuntimeError(f"prune_to_budget: no good trial stayed within the tolerance when evaluated again "
                           f"({rejected}); evaluate (or recover) is not reproducible")
    return BudgetResult(search.dense, search.dense, 0.0, 0.0, None, trials, search.tolerance, rejected=rejected)


# -- gradual: stop when the metric leaves the tolerance ---------------------------------------------------------------


class _BeforeUpdate:
    """The pruned parameters just before a mask update: masks, values and optimizer state, to undo it bit for bit.

    For a :class:`~prunekit.StructuredPruner` the kept units stand for the masks.
    """

    def __init__(self, pruner: Any) -> None:
        slots = pruner.keeper.slots
        units = getattr(pruner, "keeps", None)
        self.masks = pruner.masks if units is None else None
        self.keeps = None if units is None else {k: v.clone() for k, v in units.items()}
        self.values = [(s.param, s.param.detach().clone()) for s in slots]
        self.states = [(opt, s.param, _copy_state(opt.state.get(s.param))) for opt in pruner.keeper.optimizers
                       for s in slots]

    @torch.no_grad()
    def restore(self, pruner: Any) -> None:
        # the keeper's masks; this also cleans optimizer state, overwritten below
        pruner.set_masks(self.masks) if self.keeps is None else pruner.set_keeps(self.keeps)
        for param, value in self.values:
            param.copy_(value)
        for opt, param, saved in self.states:
            if saved is None:
                opt.state.pop(param, None)
                continue
            state = opt.state[param]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) \
                        and current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)
                else:
                    state[key] = value.clone() if isinstance(value, torch.Tensor) else value


def _copy_state(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not state:
        return None
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _overall(pruner: Pruner) -> float:
    slots = pruner.keeper.slots
    total = sum(s.param.numel() for s in slots)  # a sharded parameter (DTensor) counts its global size
    return sum(s.n_pruned for s in slots) / total if total else 0.0  # n_pruned: over all shards


@dataclass(frozen=True)
class Check:
    """One mask update seen by :class:`StopWhen`: its step, the overall sparsity after it, the metric, within or not."""

    step: int
    sparsity: float
    metric: float
    ok: bool


class StopWhen:
    """Keep raising sparsity on the schedule while the metric stays within tolerance; stop at the first update that leaves it.

    A hook of a scheduled :class:`~prunekit.Pruner` (``Pruner(..., hooks=[stop])``
    or :meth:`attach`). Before every scheduled mask update it keeps the pruned
    parameters' masks, values and optimizer state (one copy); after it, it calls
    ``evaluate(model)`` (module modes and the global RNG state are put back
    afterwards, so evaluating does not change the training run) and records a
    :class:`Check`. At the first update whose metric is outside the tolerance it
    **rolls that update back**: the last good masks and, bit for bit, the values
    and optimizer state the pruned parameters had just before it (identical to
    a run whose pruning was stopped by hand after the last good update), then
    holds the Pruner (:meth:`Pruner.hold <prunekit.Pruner.hold>`): later scheduled
    updates are skipped and training goes on at that sparsity. It does not end
    the training loop: to stop training there, test :attr:`stopped`
    (``if stop.stopped: break``).

    Args:
        evaluate: ``evaluate(model) -> float`` (accuracy, loss, ...); it must not change the weights.
        max_drop: how much worse than ``baseline`` the metric may get (``>= 0``).
        relative: ``max_drop`` is a fraction of ``|baseline|``.
        higher_is_better: ``False`` for losses and perplexities.
        baseline: the reference metric; ``None``: measured just before the first update this hook
            sees (the dense model when passed to the Pruner's constructor).

    Attributes:
        history: a :class:`Check` per update seen, in order.
        stopped: whether it has stopped.
        step: the step of the first violating update (``None`` before the stop).
        sparsity: the overall sparsity held from then on (that of the last good update; ``None`` before).
        evaluations: calls of ``evaluate``.

    Example:
        >>> from prunekit import PolynomialDecay
        >>> net = nn.Sequential(nn.Linear(10, 10))
        >>> kept = lambda m: float((m[0].weight != 0).float().mean())  # a "metric": the fraction kept
        >>> stop = StopWhen(kept, max_drop=0.45)
        >>> pruner = Pruner(net, PolynomialDecay(0.0, 0.9, 0, 6, power=1, frequency=1), hooks=[stop])
        >>> for _ in range(6):
        ...     pruner.step()
        >>> stop.step, stop.sparsity, [c.sparsity for c in stop.history]
        (4, 0.45, [0.0, 0.15, 0.3, 0.45, 0.6])
    """

    def __init__(self, evaluate: Evaluate, max_drop: float, *, relative: bool = False, higher_is_better: bool = True,
                 baseline: float | None = None) -> None:
        if not callable(evaluate):
            raise TypeError(f"StopWhen: evaluate must be a callable evaluate(model) -> float, "
                            f"got {type(evaluate).__name__}")
        self.evaluate = evaluate
        self.tolerance = Tolerance(max_drop, relative, higher_is_better, owner="StopWhen")
        self.baseline = None if baseline is None else check_real("StopWhen", "baseline", baseline)
        if self.baseline is not None:
            self.tolerance.check_reference(self.baseline)
        self.history: list[Check] = []
        self.stopped = False
        self.step: int | None = None
        self.sparsity: float | None = None
        self.evaluations = 0
        self._before: _BeforeUpdate | None = None

    def attach(self, pruner: Pruner) -> StopWhen:
        """Hook into ``pruner`` (after construction, or to resume); holds it at once if this hook has stopped.

        Raises:
            TypeError: ``pruner`` is not a :class:`~prunekit.Pruner`.
            ValueError: it is hooked there already.
        """
        if not isinstance(pruner, Pruner):
            raise TypeError(f"StopWhen.attach: expected a prunekit Pruner, got {type(pruner).__name__}")
        if any(hook is self for hook in pruner.hooks):
            raise ValueError("StopWhen.attach: this StopWhen is hooked into that Pruner already")
        pruner.hooks.append(self)
        if self.stopped:
            pruner.hold()
        return self

    @property
    def good(self) -> Check | None:
        """The last update within the tolerance (``None`` if none was)."""
        return next((c for c in reversed(self.history) if c.ok), None)

    def before_update(self, pruner: Pruner) -> None:
        """Called by the Pruner before a scheduled mask update: measure the baseline if needed, keep the state."""
        if self.stopped:  # hooked into a Pruner that was not held: this update is undone, then it is held
            self._before = _BeforeUpdate(pruner)
            return
        if self.baseline is None:
            self.baseline = self._measure(pruner, "for the baseline (before the first update)")
            self.tolerance.check_reference(self.baseline)
        self._before = _BeforeUpdate(pruner)

    def after_update(self, pruner: Pruner) -> None:
        """Called by the Pruner after a scheduled mask update: evaluate; roll it back and hold if outside tolerance."""
        before, self._before = self._before, None
        if before is None:  # before_update was not called: nothing to judge against
            return
        if self.stopped:
            before.restore(pruner)
            pruner.hold()
            return
        assert self.baseline is not None
        step = pruner.current_step
        metric = self._measure(pruner, f"after the mask update at step {step}")
        ok = self.tolerance.ok(self.baseline, metric)
        self.history.append(Check(step, _overall(pruner), metric, ok))
        if not ok:
            before.restore(pruner)
            pruner.hold()
            self.stopped, self.step, self.sparsity = True, step, _overall(pruner)

    def _measure(self, pruner: Pruner, where: str) -> float:
        self.evaluations += 1
        return _evaluate_aside("StopWhen", self.evaluate, pruner.model, where)

    def summary(self) -> str:
        """One line: where it stopped (or that it has not) and the last good update.

        Example:
            >>> StopWhen(lambda m: 1.0, 0.01).summary()
            'StopWhen: no update seen yet'
        """
        good = self.good
        last = "none within tolerance" if good is None else \
            f"last good: step {good.step}, sparsity {good.sparsity:.4f}, metric {good.metric:.6g}"
        if self.stopped:
            return (f"StopWhen: stopped at step {self.step} (metric {self.history[-1].metric:.6g} vs baseline "
                    f"{self.baseline:.6g}), holding sparsity {self.sparsity:.4f}; {last}")
        return f"StopWhen: {len(self.history)} updates within tolerance; {last}" if self.history else \
            "StopWhen: no update seen yet"

    def state_dict(self) -> dict[str, Any]:
        """The search so far, as plain values (``torch.load(weights_only=True)`` safe); save it with the Pruner's.

        Example:
            >>> StopWhen(lambda m: 1.0, 0.01, baseline=1.0).state_dict()["baseline"]
            1.0
        """
        t = self.tolerance
        return {"format": _FORMAT, "version": _VERSION, "max_drop": t.max_drop, "relative": t.relative,
                "higher_is_better": t.higher_is_better, "baseline": self.baseline, "stopped": self.stopped,
                "step": self.step, "sparsity": self.sparsity, "evaluations": self.evaluations,
                "history": [[c.step, c.sparsity, c.metric, c.ok] for c in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a search from :meth:`state_dict`, into a fresh StopWhen; then :meth:`attach` it.

        To resume: build the Pruner (without this hook), load the model, optimizer and
        Pruner states, then ``stop.load_state_dict(saved)`` and ``stop.attach(pruner)``.

        Raises:
            ValueError: not a StopWhen state, another version or tolerance, or this StopWhen has seen updates.
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError("StopWhen.load_state_dict: not a prunekit StopWhen state (missing format marker)")
        if state.get("version") != _VERSION:
            raise ValueError(f"StopWhen.load_state_dict: unsupported version {state.get('version')!r}; "
                             f"expected {_VERSION}")
        if self.history or self.evaluations:
            raise ValueError("StopWhen.load_state_dict: this StopWhen has evaluated already; load into a fresh one "
                             "(before attaching it)")
        t = self.tolerance
        for key, mine in (("max_drop", t.max_drop), ("relative", t.relative), ("higher_is_better", t.higher_is_better)):
            if state.get(key) != mine:
                raise ValueError(f"StopWhen.load_state_dict: saved {key} {state.get(key)!r} differs from this "
                                 f"StopWhen's {mine!r}")
        try:
            history = [Check(int(s), float(p), float(m), bool(ok)) for s, p, m, ok in state["history"]]
            baseline = None if state["baseline"] is None else float(state["baseline"])
            stopped = bool(state["stopped"])
            step = None if state["step"] is None else int(state["step"])
            sparsity = None if state["sparsity"] is None else float(state["sparsity"])
            evaluations = int(state["evaluations"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"StopWhen.load_state_dict: malformed state ({exc!r})") from None
        if stopped != (step is not None):
            raise ValueError("StopWhen.load_state_dict: malformed state (stopped without a step, or the reverse)")
        self.history, self.baseline, self.stopped, self.step, self.sparsity = history, baseline, stopped, step, sparsity
        self.evaluations = evaluations

    def __repr__(self) -> str:
        t = self.tolerance
        return (f"StopWhen(max_drop={t.max_drop:g}, relative={t.relative}, higher_is_better={t.higher_is_better}, "
                f"stopped={self.stopped}, updates={len(self.history)})")


# -- structural: a budget on MACs or latency as well as on the metric -------------------------------------------------


class Latency:
    """A latency cost for :func:`prune_channels_to_budget`: the median seconds of ``runs`` forward passes.

    Each call runs ``warmup`` untimed forwards of ``model`` on ``example_input``
    (eval mode, ``torch.inference_mode``), then ``runs`` timed ones, each timed
    alone as ``timer()`` after minus ``timer()`` before; the median is returned
    (robust to the odd preempted run on a shared machine). ``timer`` is
    ``time.perf_counter`` unless given (tests inject a fake one).

    Args:
        example_input: a tensor, a tuple of tensors or a mapping of keyword tensors.
        runs: timed forwards (``>= 1``).
        warmup: untimed forwards first (allocator, lazy kernel choices).
        timer: a monotonic clock in seconds.

    Example:
        >>> ticks = iter(range(100))
        >>> cost = Latency(torch.randn(1, 4), runs=3, warmup=0, timer=lambda: next(ticks))
        >>> cost(nn.Linear(4, 2))  # each run took one tick of this fake clock
        1.0
    """

    name = "latency"

    def __init__(self, example_input: Any, *, runs: int = 20, warmup: int = 3,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        from .._validate import check_int

        self.example_input = example_input
        self.runs = check_int("Latency", "runs", runs, minimum=1)
        self.warmup = check_int("Latency", "warmup", warmup, minimum=0)
        if not callable(timer):
            raise TypeError(f"Latency: timer must be a callable returning seconds, got {type(timer).__name__}")
        self.timer = timer

    def __call__(self, model: nn.Module) -> float:
        from .._modes import in_mode
        from .structural.graph import call_model

        times = []
        with in_mode(model, training=False), torch.inference_mode():
            for _ in range(self.warmup):
                call_model(model, self.example_input)
            for _ in range(self.runs):
                start = self.timer()
                call_model(model, self.example_input)
                times.append(self.timer() - start)
        return float(statistics.median(times))

    def __repr__(self) -> str:
        return f"Latency(runs={self.runs}, warmup={self.warmup})"


@dataclass(frozen=True)
class ChannelTrial:
    """One structural ratio tried: its cost, and the metric when it was evaluated (``None``: not needed)."""

    ratio: float
    cost: float
    within_budget: bool
    metric: float | None = None
    ok: bool | None = None


@dataclass
class ChannelBudgetResult:
    """What :func:`prune_channels_to_budget` found; the model is left physically pruned at :attr:`ratio`.

    Attributes:
        ratio: the fraction of every group's units removed (``prune_channels``'s ``sparsity``; 0: left dense).
        binding: ``"budget"`` (the cost reached the budget within the tolerance), ``"accuracy"`` (the
            metric left the tolerance first: the model is at the highest ratio within it, above the
            budget), or ``"dense"`` (the dense model is within the budget already).
        cost_name: ``"macs"``, ``"latency"`` or the cost callable's name.
        budget / dense_cost / cost: the budget, and the cost of the dense and of the returned model
            (measured again on it).
        within_budget: ``cost <= budget``.
        dense / metric: the metric of the dense and of the returned model (``None`` without ``evaluate``).
        trials: every ratio tried, in order (budget search first, then the metric's).
        report: the :class:`~prunekit.methods.structural.StructuralReport` of the final pruning (``None``: dense).
        tolerance: the :class:`Tolerance` (``None`` without ``evaluate``).
        evaluations: calls of ``evaluate``; seconds: wall time.

    Example:
        >>> r = ChannelBudgetResult(0.5, "budget", "macs", 100, 240, 90, True)
        >>> r.cost_reduction
        2.6666666666666665
    """

    ratio: float
    binding: str
    cost_name: str
    budget: float
    dense_cost: float
    cost: float
    within_budget: bool
    dense: float | None = None
    metric: float | None = None
    trials: list[ChannelTrial] = field(default_factory=list)
    report: Any = None
    tolerance: Tolerance | None = None
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def cost_reduction(self) -> float:
        """``dense_cost / cost``."""
        return self.dense_cost / self.cost if self.cost else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (trials as ``[ratio, cost, within_budget, metric, ok]``)."""
        t = self.tolerance
        return {"ratio": self.ratio, "binding": self.binding, "cost_name": self.cost_name, "budget": self.budget,
                "dense_cost": self.dense_cost, "cost": self.cost, "within_budget": self.within_budget,
                "dense": self.dense, "metric": self.metric, "max_drop": None if t is None else t.max_drop,
                "relative": None if t is None else t.relative, "evaluations": self.evaluations,
                "seconds": self.seconds, "trials": [[x.ratio, x.cost, x.within_budget, x.metric, x.ok]
                                                    for x in self.trials],
                "report": None if self.report is None else self.report.to_dict()}

    def summary(self) -> str:
        """One line: the ratio, what bound it, the cost against the budget and the metric.

        Example:
            >>> print(ChannelBudgetResult(0.5, "budget", "macs", 100, 240, 90, True).summary())
            ratio 0.5000 (bound by the budget): macs 240 -> 90 (budget 100, met)
        """
        met = "met" if self.within_budget else "not met"
        line = (f"ratio {self.ratio:.4f} (bound by the {self.binding if self.binding != 'dense' else 'dense model'})"
                f": {self.cost_name} {self.dense_cost:.6g} -> {self.cost:.6g} (budget {self.budget:.6g}, {met})")
        if self.metric is not None:
            line += f"; metric {self.dense:.6g} -> {self.metric:.6g}"
        return line


@dataclass
class _ChannelSearch:
    """What every trial of one :func:`prune_channels_to_budget` call needs; trials run on copies."""

    model: nn.Module
    prune: Callable[[nn.Module, float, bool], Any]
    cost: Callable[[nn.Module], float]
    budget: float
    evaluate: Evaluate | None
    tolerance: Tolerance | None
    bar: Any
    dense: float | None = None
    evaluations: int = 0
    trials: list[ChannelTrial] = field(default_factory=list)

    def measure(self, model: nn.Module, where: str) -> float:
        assert self.evaluate is not None
        self.evaluations += 1
        self.bar.update(1)
        return _metric("prune_channels_to_budget", self.evaluate(model), where)

    def price(self, model: nn.Module, where: str) -> float:
        return _metric("prune_channels_to_budget", self.cost(model), f"as the cost {where}")

    def trial(self, ratio: float, metric: bool) -> ChannelTrial:
        """Prune a copy at ``ratio``: its cost, and its metric if asked (the model itself is never touched)."""
        net = copy.deepcopy(self.model)
        self.prune(net, ratio, False)
        cost = self.price(net, f"at ratio {ratio:g}")
        value = self.measure(net, f"at ratio {ratio:g}") if metric else None
        ok = None if value is None else self.tolerance.ok(self.dense, value)
        found = ChannelTrial(ratio, cost, cost <= self.budget, value, ok)
        self.trials.append(found)
        return found


def _reach_budget(search: _ChannelSearch, hi: float, tol: float) -> float:
    """The lowest ratio found whose cost is within the budget: bisection between 0 (over) and ``hi`` (within)."""
    top = search.trial(hi, False)
    if not top.within_budget:
        raise ValueError(f"prune_channels_to_budget: even at ratio hi={hi:g} the cost is {top.cost:.6g} > budget "
                         f"{search.budget:.6g}; raise hi, raise the budget, or prune fewer layers by hand (ignore= "
                         "keeps channels that might otherwise go)")
    return _halve(hi, 0.0, tol, lambda r: search.trial(r, False).within_budget)


def _within_metric(search: _ChannelSearch, target: float, tol: float) -> tuple[float, str]:
    """``(ratio, binding)``: ``target`` if its metric is within the tolerance, else the highest good ratio below it."""
    if search.trial(target, True).ok:
        return target, "budget"
    return _halve(0.0, target, tol, lambda r: bool(search.trial(r, True).ok)), "accuracy"


def _halve(passing: float, failing: float, tol: float, passes: Callable[[float], bool]) -> float:
    """Bisect between a ratio that passes and one that fails until they are ``tol`` apart; the passing end."""
    while abs(failing - passing) > tol:
        mid = (passing + failing) / 2
        passing, failing = (mid, failing) if passes(mid) else (passing, mid)
    return passing


def _cost_function(cost: Any, example_input: Any) -> tuple[Callable[[nn.Module], float], str]:
    from .structural.macs import count_macs

    if cost == "macs":
        return (lambda m: float(count_macs(m, example_input))), "macs"
    if cost == "latency":
        return Latency(example_input), "latency"
    if callable(cost) and not isinstance(cost, str):
        return cost, getattr(cost, "name", None) or getattr(cost, "__name__", type(cost).__name__)
    raise ValueError(f"prune_channels_to_budget: cost must be 'macs', 'latency', a Latency(...) or a callable "
                     f"cost(model) -> float, got {cost!r}")


def _check_channel_args(model: Any, budget: Any, evaluate: Any, max_drop: Any, hi: Any,
                        tol: Any) -> tuple[float, float, float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_channels_to_budget: model must be an nn.Module, got {type(model).__name__}")
    budget = check_real("prune_channels_to_budget", "budget", budget)
    hi, tol = check_real("prune_channels_to_budget", "hi", hi), check_real("prune_channels_to_budget", "tol", tol)
    if budget <= 0 or not 0 < hi < 1 or tol <= 0:
        raise ValueError(f"prune_channels_to_budget: need budget > 0, 0 < hi < 1 and tol > 0, got budget={budget:g}, "
                         f"hi={hi:g}, tol={tol:g}")
    _check_metric_args("prune_channels_to_budget", evaluate, max_drop)
    return budget, hi, tol


def _check_metric_args(owner: str, evaluate: Any, max_drop: Any) -> None:
    if (evaluate is None) != (max_drop is None):
        raise ValueError(f"{owner}: evaluate= and max_drop= go together (the metric and how much of it may be "
                         "lost); pass both, or neither for a cost budget alone")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"{owner}: evaluate must be a callable evaluate(model) -> float, got {type(evaluate).__name__}")


def prune_channels_to_budget(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    budget: float,
    *,
    cost: str | Callable[[nn.Module], float] = "macs",
    evaluate: Evaluate | None = None,
    max_drop: float | None = None,
    relative: bool = False,
    higher_is_better: bool = True,
    importance: Any = "l2",
    reduction: str = "sum",
    round_to: int = 1,
    ignore: Any = None,
    hi: float = 0.95,
    tol: float = 0.01,
    progress: bool | None = None,
) -> ChannelBudgetResult:
    """Remove channels until the model's cost is at most ``budget``, unless the metric leaves its tolerance first.

    Structural pruning (:func:`~prunekit.prune_channels`: the same ratio of every
    coupled group's units, by ``importance``) is searched by bisection over that
    ratio. Every trial prunes a **copy** of ``model`` and measures the copy, so
    the model itself is untouched (bit for bit) until the end. First the lowest
    ratio (to within ``tol``) whose cost is within ``budget``; then, with
    ``evaluate``, that ratio's metric: within the tolerance, it is the answer
    (``binding="budget"``); outside, bisection below it for the highest ratio within
    the tolerance (``binding="accuracy"``: the metric binds first, the budget is
    not met). The model is then pruned in place at the ratio found, and its cost
    and metric measured once more (the returned values).

    Costs: ``"macs"`` counts the multiply-accumulates of one forward on
    ``example_input`` in the really pruned network (forward hooks on every
    convolution, linear layer, attention and LSTM,
    :func:`~prunekit.methods.structural.count_macs`); ``"latency"`` is
    :class:`Latency` (median seconds of 20 forwards after 3 warm-ups; pass your own
    ``Latency(x, runs=..., timer=...)`` to change them); any callable
    ``cost(model) -> float`` works (lower is cheaper). Latency is noisy: a budget
    met in the search may read slightly over when measured again
    (``within_budget`` says); MACs are exact.

    Args:
        model: the (trained) model; left physically smaller (or dense if it is within the budget already).
        example_input: a tensor, a tuple of tensors or a mapping of keyword tensors (tracing, MACs, latency).
        budget: the largest cost allowed (``> 0``; MACs, seconds, or your cost's unit).
        cost: ``"macs"``, ``"latency"``, a :class:`Latency` or a callable ``cost(model) -> float``.
        evaluate: optional ``evaluate(model) -> float``; with ``max_drop`` it caps how far pruning goes.
        max_drop: how much worse than dense the metric may get (see :class:`Tolerance`).
        relative: ``max_drop`` is a fraction of ``|dense metric|``.
        higher_is_better: ``False`` for losses and perplexities.
        importance / reduction / round_to / ignore: as for :func:`~prunekit.prune_channels`.
        hi: the highest ratio tried (``< 1``).
        tol: bisection stops when the bracket is narrower than this.
        progress: a bar over trials (``None``: when stderr is a terminal).

    Returns:
        A :class:`ChannelBudgetResult` (``binding`` says which constraint stopped it).

    Raises:
        ValueError: bad arguments, a budget not reached even at ``hi``, ``evaluate`` without
            ``max_drop`` (or the reverse), a metric or cost that is not finite.
        RuntimeError: the final model's fresh metric is outside the tolerance although its search trial
            was within (``evaluate`` is not reproducible); the model is left pruned.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> x = torch.randn(1, 16)
        >>> r = prune_channels_to_budget(net, x, budget=800, progress=False)  # dense: 16*64 + 64*4 = 1280 MACs
        >>> r.binding, r.cost <= 800, net[0].out_features
        ('budget', True, 40)
    """
    from .structural.prune import prune_channels

    budget, hi, tol = _check_channel_args(model, budget, evaluate, max_drop, hi, tol)
    cost_fn, cost_name = _cost_function(cost, example_input)
    tolerance = None if max_drop is None else Tolerance(max_drop, relative, higher_is_better,
                                                        owner="prune_channels_to_budget")

    def prune(net: nn.Module, ratio: float, verify: bool) -> Any:
        return prune_channels(net, example_input, ratio, importance=importance, reduction=reduction,
                              round_to=round_to, ignore=ignore, verify=verify)[1]

    started = time.perf_counter()
    expected = 2 * (math.ceil(math.log2(max(hi / tol, 1.0))) + 2)
    with progress_bar(progress, total=expected, desc="prune_channels_to_budget", unit="trial") as bar:
        search = _ChannelSearch(model, prune, cost_fn, budget, evaluate, tolerance, bar)
        dense_cost = search.price(copy.deepcopy(model), "of the dense model")
        ratio, binding = (0.0, "dense") if dense_cost <= budget else (_reach_budget(search, hi, tol), "budget")
        if tolerance is not None:
            search.dense = search.measure(copy.deepcopy(model), "for the dense model")
            tolerance.check_reference(search.dense)
            if binding == "budget":
                ratio, binding = _within_metric(search, ratio, tol)
        report = prune(model, ratio, True) if ratio > 0 else None
        final_cost = search.price(model, "of the returned model") if report is not None else dense_cost
        metric = None if tolerance is None else \
            search.measure(model, "of the returned model") if report is not None else search.dense
    if tolerance is not None and not tolerance.ok(search.dense, metric):
        raise RuntimeError(f"prune_channels_to_budget: at ratio {ratio:g} the metric was within the tolerance in the "
                           f"search but is {metric:.6g} now (dense {search.dense:.6g}); evaluate is not reproducible. "
                           "The model is left pruned at that ratio")
    return ChannelBudgetResult(ratio, binding, cost_name, budget, dense_cost, final_cost, final_cost <= budget,
                               search.dense, metric, search.trials, report, tolerance, search.evaluations,
                               round(time.perf_counter() - started, 3))


@dataclass(frozen=True)
class BudgetCheck:
    """One mask update seen by :class:`StopAtBudget`: step, units removed, cost, metric (``None``: none), within."""

    step: int
    ratio: float
    cost: float
    metric: float | None
    ok: bool | None


class StopAtBudget:
    """Gradual structural pruning that stops once the cost is within budget, or when the metric leaves its tolerance.

    A hook of a scheduled :class:`~prunekit.StructuredPruner` (``StructuredPruner(...,
    hooks=[stop])``). After every scheduled mask update it measures ``cost`` on a
    **physically pruned copy** (:meth:`~prunekit.StructuredPruner.pruned_copy`: the
    model :meth:`~prunekit.StructuredPruner.finalize` would give; MACs counted in
    it) and, with ``evaluate``, the metric of the masked model (modes and the
    global RNG state put back). Whichever binds first stops it:

    * the metric outside the tolerance: the update is **rolled back** (the kept
      units, and the pruned parameters' values and optimizer state as they were
      just before it, bit for bit) and the pruner held; ``binding = "accuracy"``;
    * else the cost within ``budget``: this update is kept and the pruner held;
      ``binding = "budget"``.

    Training goes on at that ratio; test :attr:`stopped` to end the loop. The
    checks are in :attr:`history`.

    Args:
        budget: the largest cost allowed (``> 0``).
        cost: ``"macs"`` (on the pruner's example input), ``"latency"`` (:class:`Latency` on it), a
            :class:`Latency` or a callable ``cost(model) -> float``.
        evaluate: optional ``evaluate(model) -> float``, with ``max_drop``.
        max_drop / relative / higher_is_better: the tolerance (see :class:`Tolerance`).
        baseline: the reference metric; ``None``: measured before the first update this hook sees.

    Example:
        >>> from prunekit import PolynomialDecay, StructuredPruner
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))  # 10 MACs per hidden unit
        >>> stop = StopAtBudget(100)
        >>> pruner = StructuredPruner(net, torch.randn(1, 8), PolynomialDecay(0.0, 0.9, 0, 8, power=1,
        ...                           frequency=1), hooks=[stop])
        >>> for _ in range(8):
        ...     pruner.step()
        >>> stop.binding, stop.step, [c.cost for c in stop.history]
        ('budget', 4, [160.0, 140.0, 120.0, 110.0, 90.0])
    """

    def __init__(self, budget: float, cost: str | Callable[[nn.Module], float] = "macs", *,
                 evaluate: Evaluate | None = None, max_drop: float | None = None, relative: bool = False,
                 higher_is_better: bool = True, baseline: float | None = None) -> None:
        self.budget = check_real("StopAtBudget", "budget", budget)
        if self.budget <= 0:
            raise ValueError(f"StopAtBudget: budget must be > 0, got {self.budget:g}")
        _check_metric_args("StopAtBudget", evaluate, max_drop)
        self.cost, self.evaluate = cost, evaluate
        self.tolerance = None if max_drop is None else Tolerance(max_drop, relative, higher_is_better,
                                                                 owner="StopAtBudget")
        self.baseline = None if baseline is None else check_real("StopAtBudget", "baseline", baseline)
        self.history: list[BudgetCheck] = []
        self.binding: str | None = None
        self.step: int | None = None
        self._before: _BeforeUpdate | None = None
        self._price: Callable[[nn.Module], float] | None = None

    @property
    def stopped(self) -> bool:
        """Whether the budget was reached or the metric left its tolerance."""
        return self.binding is not None

    def before_update(self, pruner: Any) -> None:
        """Called before a scheduled mask update: the baseline if needed, and the state to roll back to."""
        if self._price is None:
            self._price, _ = _cost_function(self.cost, pruner.example_input)
        if self.evaluate is not None and self.baseline is None:
            self.baseline = self._measure(pruner.model, "for the baseline (before the first update)")
            self.tolerance.check_reference(self.baseline)
        self._before = _BeforeUpdate(pruner) if self.evaluate is not None else None

    def after_update(self, pruner: Any) -> None:
        """Called after a scheduled mask update: cost of the pruned copy, the metric; roll back or hold."""
        before, self._before = self._before, None
        if self.stopped:
            return
        step = pruner.current_step
        pruned, _ = pruner.pruned_copy()
        cost = _metric("StopAtBudget", self._price(pruned), f"as the cost after the update at step {step}")
        metric = None if self.evaluate is None else self._measure(pruner.model, f"after the update at step {step}")
        ok = None if metric is None else self.tolerance.ok(self.baseline, metric)
        removed = sum(int((~k).sum()) for k in pruner.keeps.values())
        self.history.append(BudgetCheck(step, removed / max(sum(k.numel() for k in pruner.keeps.values()), 1),
                                        cost, metric, ok))
        if ok is False:
            before.restore(pruner)
            self.binding = "accuracy"
        elif cost <= self.budget:
            self.binding = "budget"
        if self.stopped:
            self.step = step
            pruner.hold()

    def _measure(self, model: nn.Module, where: str) -> float:
        return _evaluate_aside("StopAtBudget", self.evaluate, model, where)

    def __repr__(self) -> str:
        return f"StopAtBudget(budget={self.budget:g}, binding={self.binding!r}, updates={len(self.history)})"
