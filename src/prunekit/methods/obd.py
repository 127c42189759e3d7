"""Data-driven saliency: Optimal Brain Damage (Hessian diagonal) and first-order Taylor criteria.

Both are :class:`prunekit.Criterion` objects like :class:`prunekit.Magnitude`,
but they need the whole model and data: they estimate a statistic for every
prunable parameter in one pass (:mod:`prunekit.methods.hessian`) and serve the
Pruner's ``score`` calls from a cache.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._validate import check_choice, check_int
from ..core.criteria import Criterion, ScoreContext
from ..core.scope import resolve_scope

__all__ = ["OBD", "Taylor"]


class _ModelCriterion(Criterion):
    """Base for criteria that need the whole model and data (OBD, Taylor).

    Such a criterion estimates a statistic for every prunable parameter of the
    model in one pass and serves :meth:`score` calls from a cache. The Pruner
    only hands a criterion the parameter and its owning module, so the root
    model is given explicitly: ``model=`` at construction or :meth:`bind`
    (``prunekit.iterative_prune`` binds for you). The cache is valid while no
    parameter of the model changes: PyTorch bumps a tensor's version counter on
    every in-place update (optimizer steps, mask application, ``copy_``), so one
    Pruner mask update costs one estimate however many layers it ranks.
    """

    def __init__(self, loader: Iterable[Any], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 model: nn.Module | None = None, max_batches: int | None = None, progress: bool = False) -> None:
        if not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable (output, target) -> mean loss")
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"{type(self).__name__}: loader must be an iterable of (x, y) batches")
        self.loader, self.loss_fn, self.progress = loader, loss_fn, bool(progress)
        self.max_batches = None if max_batches is None else check_int(type(self).__name__, "max_batches", max_batches,
                                                                      minimum=1)
        self.model: nn.Module | None = None
        self._cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self.estimates = 0  # how many times the statistic was computed (cache misses)
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module) -> "_ModelCriterion":
        """Use ``model`` (the model the Pruner prunes) for estimates; returns ``self``.

        Example:
            >>> crit = Taylor([(torch.randn(4, 3), torch.randn(4, 2))], nn.functional.mse_loss)
            >>> crit.bind(nn.Linear(3, 2)) is crit
            True
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}.bind: model must be an nn.Module, got {type(model).__name__}")
        if model is not self.model:
            self.model, self._cache = model, None
        return self

    def saliency(self, step: int = 0) -> dict[str, torch.Tensor]:
        """Float64 saliency of every prunable parameter of the bound model, at its current weights.

        Example:
            >>> net = nn.Linear(3, 2)
            >>> crit = Taylor([(torch.randn(4, 3), torch.randn(4, 2))], nn.functional.mse_loss, model=net)
            >>> sorted(crit.saliency())
            ['weight']
        """
        model = self._bound()
        key = tuple((id(p), p._version) for p in model.parameters())
        if self._cache is None or self._cache[0] != key:
            params = {t.name: t.param for t in resolve_scope(model).targets}
            self._cache = (key, self._compute(model, params, step))
            self.estimates += 1
        return self._cache[1]

    def score(self, param: torch.Tensor, context: ScoreContext) -> torch.Tensor:  # noqa: D102
        table = self.saliency(context.step)
        own = dict(self._bound().named_parameters()).get(context.name)
        if own is None or own.data_ptr() != param.data_ptr():
            raise ValueError(f"{self!r} is bound to a different model than the one being pruned "
                             f"(no parameter {context.name!r} sharing storage); bind it to the pruned model")
        if context.name not in table:
            raise KeyError(f"{self!r}: {context.name!r} is not a prunable parameter of the bound model")
        return table[context.name].to(param.device)

    def _bound(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} needs the model: pass model=... or call .bind(model) "
                               "(prunekit.iterative_prune binds it for you)")
        return self.model

    def _compute(self, model: nn.Module, params: dict[str, nn.Parameter], step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_ESTIMATORS = ("exact", "hutchinson", "gauss-newton", "fisher")


class OBD(_ModelCriterion):
    """Optimal Brain Damage saliency ``s_k = 1/2 * h_kk * w_k**2`` (LeCun, Denker & Solla 1990).

    ``h_kk`` is the diagonal of the Hessian of the average loss over the
    loader's first ``max_batches`` batches, from one of the estimators of
    :mod:`prunekit.methods.hessian`:

    * ``"exact"``: autograd double-backward, one row per parameter (small models only);
    * ``"hutchinson"``: ``E[z * Hz]`` over ``probes`` Rademacher probes per batch;
    * ``"gauss-newton"``: LeCun's Levenberg-Marquardt approximation, ``>= 0``;
    * ``"fisher"``: the empirical Fisher (mean squared per-sample gradient), ``>= 0``.

    Saliencies are in units of loss, so they compare across layers: global
    ranking is the natural choice. Exact and Hutchinson estimates can be
    negative; such weights rank first for removal (the quadratic model says
    removing them lowers the loss).

    Args:
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        estimator: one of ``"exact"``, ``"hutchinson"``, ``"gauss-newton"``, ``"fisher"``.
        model: the pruned model (or call :meth:`bind`).
        probes: Hutchinson probes per batch.
        max_batches: batches per estimate (default: the whole loader).
        seed: Hutchinson's seed; the probes of step ``t`` are seeded by ``(seed, t)``.
        progress: show a tqdm bar while estimating.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> obd = OBD(data, nn.functional.cross_entropy, estimator="gauss-newton", model=net)
        >>> pruner = Pruner(net, 0.5, criterion=obd, ranking="global")  # doctest: +SKIP
    """

    def __init__(self, loader: Iterable[Any], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 estimator: str = "gauss-newton", model: nn.Module | None = None, probes: int = 100,
                 max_batches: int | None = None, seed: int = 0, progress: bool = False) -> None:
        self.estimator = check_choice("OBD", "estimator", estimator, _ESTIMATORS)
        self.probes = check_int("OBD", "probes", probes, minimum=1)
        self.seed = check_int("OBD", "seed", seed, minimum=0)
        super().__init__(loader, loss_fn, model=model, max_batches=max_batches, progress=progress)

    def hessian_diagonal(self, model: nn.Module, params: dict[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        """The chosen estimator's ``h_kk`` for ``params`` of ``model`` (float64)."""
        from . import hessian

        common = dict(max_batches=self.max_batches, progress=self.progress)
        if self.estimator == "exact":
            return hessian.exact_diagonal(model, self.loader, self.loss_fn, params, **common)
        if self.estimator == "hutchinson":
            seed = zlib.crc32(f"{self.seed}:{step}".encode())
            return hessian.hutchinson_diagonal(model, self.loader, self.loss_fn, params, probes=self.probes,
                                               seed=seed, **common)
        if self.estimator == "gauss-newton":
            return hessian.gauss_newton_diagonal(model, self.loader, self.loss_fn, params, **common)
        return hessian.empirical_fisher_diagonal(model, self.loader, self.loss_fn, params, **common)

    def _compute(self, model: nn.Module, params: dict[str, nn.Parameter], step: int) -> dict[str, torch.Tensor]:
        h = self.hessian_diagonal(model, params, step)
        return {name: 0.5 * h[name] * p.detach().double().square() for name, p in params.items()}

    def __repr__(self) -> str:
        extra = f", probes={self.probes}, seed={self.seed}" if self.estimator == "hutchinson" else ""
        return f"OBD(estimator={self.estimator!r}{extra}, max_batches={self.max_batches})"


class Taylor(_ModelCriterion):
    """First-order Taylor saliency ``|w * dL/dw|`` (the loss change of removing ``w``, to first order).

    The gradient is that of the average loss over the loader's first
    ``max_batches`` batches. Near a minimum that gradient is small and noisy,
    which is why OBD goes to second order.

    Args:
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        model: the pruned model (or call :meth:`bind`).
        max_batches: batches per estimate (default: the whole loader).
        progress: show a tqdm bar while estimating.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> data = [(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]]))]
        >>> Taylor(data, nn.functional.mse_loss, model=net).saliency()["weight"]  # |w * 2(wx - y)x|
        tensor([[2., 4.]], dtype=torch.float64)
    """

    def _compute(self, model: nn.Module, params: dict[str, nn.Parameter], step: int) -> dict[str, torch.Tensor]:
        from .hessian import mean_gradient

        grad = mean_gradient(model, self.loader, self.loss_fn, params, max_batches=self.max_batches,
                             progress=self.progress)
        return {name: (p.detach().double() * grad[name]).abs() for name, p in params.items()}

    def __repr__(self) -> str:
        return f"Taylor(max_batches={self.max_batches})"
