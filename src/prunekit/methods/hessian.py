"""Diagonal curvature estimators for saliency criteria (Optimal Brain Damage and friends).

Every estimator has the same shape::

    estimator(model, loader, loss_fn, params=None, *, max_batches=None, progress=False, ...)
        -> {parameter name: float64 tensor of that parameter's shape}

* ``loader`` is any iterable of ``(x, y)`` batches (a ``DataLoader``, a list of tuples);
* ``loss_fn(model(x), y)`` must return the **mean** loss over the batch (PyTorch's
  default ``reduction="mean"``), so that a one-sample batch gives that sample's loss;
* ``params`` maps names to the parameters to estimate for (default: every
  parameter with ``requires_grad``); the other parameters are held fixed;
* the result is the diagonal for the average per-sample loss over the first
  ``max_batches`` batches (batches weighted by their size), accumulated in float64.

The estimators:

* :func:`exact_diagonal` - the true Hessian diagonal, one Hessian-vector product
  per parameter (autograd double-backward); small models only.
* :func:`hutchinson_diagonal` - ``E[z * Hz]`` over Rademacher probes ``z``
  (unbiased; its error falls like ``1/sqrt(probes)``).
* :func:`gauss_newton_diagonal` - the diagonal of the generalized Gauss-Newton
  matrix ``J^T H_out J``: the Hessian without the network's own second
  derivatives. This is LeCun's Levenberg-Marquardt approximation in OBD; it is
  >= 0 for convex losses and exact for linear least squares.
* :func:`empirical_fisher_diagonal` - the mean of squared per-sample gradients
  (>= 0; a cheaper, cruder stand-in for the Gauss-Newton diagonal).
* :func:`mean_gradient` - the average gradient (for first-order Taylor saliency).

The model is put in eval mode while estimating (dropout off, batch norm frozen:
the per-sample tricks below need samples to be independent) and its mode is
restored. Nothing touches ``param.grad``: everything goes through
``torch.autograd.grad``, so a user's accumulated gradients and a Pruner's
gradient hooks are left alone.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .._modes import in_mode
from .._progress import progress_bar
from .._validate import check_int

__all__ = [
    "exact_diagonal",
    "exact_diagonal_entries",
    "hutchinson_diagonal",
    "gauss_newton_diagonal",
    "empirical_fisher_diagonal",
    "mean_gradient",
    "EXACT_MAX_PARAMS",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = Mapping[str, nn.Parameter]

#: Above this many parameters :func:`exact_diagonal` refuses (one HVP per parameter per batch).
EXACT_MAX_PARAMS = 20_000
#: Largest per-sample output size for which :func:`gauss_newton_diagonal` factors the output Hessian.
_GN_MAX_OUTPUTS = 1024


# -- shared plumbing --------------------------------------------------------------------------


def _resolve_params(model: nn.Module, params: Params | None, owner: str) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{owner}: params must be a non-empty dict name -> parameter of the model")
    owned = {id(p) for p in model.parameters()}
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or id(p) not in owned:
            raise ValueError(f"{owner}: params[{name!r}] is not a parameter of the model")
    return dict(params)


def _batches(loader: Iterable[Any], max_batches: int | None, device: torch.device, progress: bool,
             desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` on ``device`` from at most ``max_batches`` batches, with a tqdm bar."""
    if max_batches is not None:
        max_batches = check_int(desc, "max_batches", max_batches, minimum=1)
    total = max_batches
    if hasattr(loader, "__len__"):
        total = len(loader) if total is None else min(total, len(loader))
    seen = 0
    with progress_bar(progress, total=total, desc=desc, unit="batch") as bar:
        for batch in loader:
            if max_batches is not None and seen >= max_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"{desc}: the loader must yield (x, y) pairs, got {type(batch).__name__}")
            x, y = batch
            yield x.to(device), y.to(device)
            seen += 1
            bar.update(1)
    if seen == 0:
        raise ValueError(f"{desc}: the loader yielded no batch")


def _zeros64(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}


def _device(params: dict[str, nn.Parameter]) -> torch.device:
    return next(iter(params.values())).device


def _grads(loss: torch.Tensor, params: list[torch.Tensor], *, create_graph: bool) -> list[torch.Tensor]:
    # materialize_grads: a parameter the loss does not use gets a zero gradient, not None.
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=True))


def _hvp_rows(flat_grad: torch.Tensor, params: list[torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """``vectors @ H`` for a batch of vectors ``(k, n)``: one double-backward per row, vmapped when possible."""
    if not flat_grad.requires_grad:  # the gradient does not depend on the parameters: H = 0
        return torch.zeros_like(vectors)
    try:
        rows = torch.autograd.grad(flat_grad, params, grad_outputs=vectors, retain_graph=True, allow_unused=True,
                                   materialize_grads=True, is_grads_batched=True)
        return torch.cat([r.reshape(len(vectors), -1) for r in rows], dim=1)
    except (RuntimeError, NotImplementedError):
        # Some operators have no batching rule for their double backward: one row at a time.
        out = [torch.cat([r.reshape(-1) for r in _rows_one(flat_grad, params, v)]) for v in vectors]
        return torch.stack(out)


def _rows_one(flat_grad: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True, allow_unused=True,
                               materialize_grads=True)


def _split(flat: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    pieces = torch.split(flat, [p.numel() for p in params.values()])
    return {n: piece.reshape(p.shape) for (n, p), piece in zip(params.items(), pieces)}


def _finish(acc: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {n: a / count for n, a in acc.items()}


# -- exact and Hutchinson ---------------------------------------------------------------------


def exact_diagonal(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Params | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    max_params: int = EXACT_MAX_PARAMS,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """The exact diagonal of the loss Hessian, by autograd double-backward, row by row.

    Costs one Hessian-vector product per parameter per batch (``chunk`` of them
    vmapped together), so it is meant for small models and for checking the
    estimators; larger models are refused (see :func:`exact_diagonal_entries`
    for a sample of entries of a large model).

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        params: ``{name: parameter}`` to compute for (default: all trainable).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.
        max_params: refuse above this many parameters in ``params``.
        chunk: Hessian rows computed per vmapped double-backward.

    Returns:
        ``{name: float64 tensor}`` with ``H_kk`` for each entry.

    Raises:
        ValueError: more than ``max_params`` parameters.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> h = exact_diagonal(net, data, nn.functional.mse_loss)
        >>> sorted(h), h["weight"].dtype
        (['bias', 'weight'], torch.float64)
    """
    params = _resolve_params(model, params, "exact_diagonal")
    entries = {n: torch.arange(p.numel()) for n, p in params.items()}
    values = exact_diagonal_entries(model, loader, loss_fn, entries, params, max_batches=max_batches,
                                    progress=progress, max_entries=max_params, chunk=chunk)
    return {n: values[n].reshape(p.shape) for n, p in params.items()}


def exact_diagonal_entries(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    entries: Mapping[str, torch.Tensor],
    params: Params | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    max_entries: int = EXACT_MAX_PARAMS,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Exact Hessian diagonal entries ``H_kk`` for chosen entries of chosen parameters.

    The ground truth for checking estimators on a model too large for
    :func:`exact_diagonal`: one Hessian-vector product per requested entry per batch.

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        entries: ``{name: 1-D int64 tensor of flat indices into that parameter}``.
        params: ``{name: parameter}`` containing every key of ``entries``
            (default: the model's trainable parameters).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.
        max_entries: refuse above this many entries in total.
        chunk: Hessian rows computed per vmapped double-backward.

    Returns:
        ``{name: float64 tensor}`` aligned with ``entries[name]``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = [(torch.ones(2, 3), torch.zeros(2, 1))]
        >>> exact_diagonal_entries(net, data, nn.functional.mse_loss, {"weight": torch.tensor([0, 2])})["weight"]
        tensor([2., 2.], dtype=torch.float64)
    """
    allp = _resolve_params(model, params, "exact_diagonal_entries")
    missing = sorted(set(entries) - set(allp))
    if missing:
        raise ValueError(f"exact_diagonal_entries: no parameter named {missing} among {sorted(allp)}")
    params = {n: allp[n] for n in entries}
    flat_idx = _global_indices(params, entries)
    n_req, n = len(flat_idx), sum(p.numel() for p in params.values())
    if n_req > check_int("exact_diagonal", "max_params", max_entries, minimum=1):
        raise ValueError(f"exact Hessian diagonal: {n_req:,} entries requested, above the limit of {max_entries:,}; "
                         "it needs one Hessian-vector product per entry per batch. Use hutchinson_diagonal or "
                         "gauss_newton_diagonal for a model this size, or raise the limit (max_params).")
    # Each chunk holds two (chunk, n) matrices: cap them at ~2**24 entries (64 MiB in float32).
    chunk = max(1, min(check_int("exact_diagonal", "chunk", chunk, minimum=1), 2**24 // n))
    acc, count = torch.zeros(n_req, dtype=torch.float64, device=_device(params)), 0
    with in_mode(model, training=False):
        for x, y in _batches(loader, max_batches, _device(params), progress, "exact Hessian diagonal"):
            flat = torch.cat([g.reshape(-1) for g in _grads(loss_fn(model(x), y), list(params.values()),
                                                             create_graph=True)])
            for start in range(0, n_req, chunk):
                pos = torch.arange(start, min(start + chunk, n_req))
                idx = flat_idx[pos].to(flat.device)
                eye = torch.zeros(len(idx), n, dtype=flat.dtype, device=flat.device)
                eye[torch.arange(len(idx)), idx] = 1
                rows = _hvp_rows(flat, list(params.values()), eye)
                acc[pos.to(acc.device)] += rows[torch.arange(len(idx)), idx].double() * len(x)
            count += len(x)
    pieces = torch.split(acc / count, [len(entries[name]) for name in params])
    return dict(zip(params, pieces))


def _global_indices(params: dict[str, nn.Parameter], entries: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Flat indices into the concatenation of ``params`` for each requested entry, in ``entries`` order."""
    out, offset = [], 0
    for name, p in params.items():
        idx = torch.as_tensor(entries[name], dtype=torch.int64).reshape(-1).cpu()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise ValueError(f"exact_diagonal_entries: indices for {name!r} must be in [0, {p.numel()})")
        out.append(idx + offset)
        offset += p.numel()
    return torch.cat(out)


def hutchinson_diagonal(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Params | None = None,
    *,
    probes: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal, ``E[z * Hz]`` over Rademacher ``z``.

    Unbiased for every entry; the variance of entry ``k`` is
    ``sum_{j != k} H_kj**2 / probes``, so networks with strong off-diagonal
    curvature need many probes. Entries can come out negative (noise, or true
    negative curvature away from a minimum).

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        params: ``{name: parameter}`` to estimate for (default: all trainable).
        probes: Rademacher probes per batch (>= 1).
        seed: seed of the probes' own generator (the global RNG is untouched).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.
        chunk: probes computed per vmapped double-backward.

    Returns:
        ``{name: float64 tensor}`` estimating ``H_kk``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> h = hutchinson_diagonal(net, data, nn.functional.mse_loss, probes=10, seed=1)
        >>> h["weight"].shape
        torch.Size([1, 3])
    """
    params = _resolve_params(model, params, "hutchinson_diagonal")
    probes = check_int("hutchinson_diagonal", "probes", probes, minimum=1)
    chunk = check_int("hutchinson_diagonal", "chunk", chunk, minimum=1)
    n = sum(p.numel() for p in params.values())
    chunk = max(1, min(chunk, 2**24 // n))  # bound the (chunk, n) probe matrices, as in exact_diagonal_entries
    gen = torch.Generator().manual_seed(check_int("hutchinson_diagonal", "seed", seed, minimum=0))
    acc, count = torch.zeros(n, dtype=torch.float64, device=_device(params)), 0
    with in_mode(model, training=False):
        for x, y in _batches(loader, max_batches, _device(params), progress, "Hutchinson Hessian diagonal"):
            flat = torch.cat([g.reshape(-1) for g in _grads(loss_fn(model(x), y), list(params.values()),
                                                             create_graph=True)])
            batch_sum = torch.zeros(n, dtype=torch.float64, device=flat.device)
            for start in range(0, probes, chunk):
                k = min(chunk, probes - start)
                # Drawn on the CPU generator so the probes do not depend on the device.
                z = (torch.randint(0, 2, (k, n), generator=gen) * 2 - 1).to(flat.dtype).to(flat.device)
                batch_sum += (z * _hvp_rows(flat, list(params.values()), z)).double().sum(0)
            acc += batch_sum / probes * len(x)
            count += len(x)
    return _split(acc / count, params)


# -- per-sample squared gradients (Gauss-Newton, empirical Fisher) -----------------------------

# ScalarFn(outputs, rows) -> scalar whose gradient is the SUM over the given rows of the
# per-sample gradients whose squares we want; ``rows`` indexes the batch.
ScalarFn = Callable[[torch.Tensor, slice], torch.Tensor]


class _LinearTaps:
    """Forward hooks that keep each ``nn.Linear``'s input and output for the per-sample trick.

    For a linear layer the per-sample weight gradient is ``delta_i a_i^T``, so the
    sum of its squares over samples is ``(delta**2)^T (a**2)``: one matmul, no
    per-sample tensors. Layers called more than once per forward, or with inputs
    that are not ``(batch, features)``, fall back to the per-sample loop.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        by_id = {id(p): n for n, p in params.items()}
        owners: dict[int, int] = {}
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self.layers: dict[str, tuple[nn.Linear, str, str | None]] = {}
        for mname, mod in model.named_modules():
            # Tied weights (one tensor owned by several modules) get the generic path.
            if isinstance(mod, nn.Linear) and id(mod.weight) in by_id and owners[id(mod.weight)] == 1:
                b = mod.bias
                bname = by_id.get(id(b)) if b is not None and owners[id(b)] == 1 else None
                self.layers[mname] = (mod, by_id[id(mod.weight)], bname)
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_LinearTaps":
        for mname, (mod, _, _) in self.layers.items():
            self._handles.append(mod.register_forward_hook(self._hook(mname)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, mname: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.seen.setdefault(mname, []).append((args[0].detach(), output, output._version))
        return hook

    def usable(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layers seen exactly once, with 2-D input and an output not modified in place afterwards
        (``ReLU(inplace=True)`` would make it the wrong tensor to differentiate against)."""
        return {m: calls[0][:2] for m, calls in self.seen.items()
                if len(calls) == 1 and calls[0][0].dim() == 2 and calls[0][1]._version == calls[0][2]}


def _verified(taps: _LinearTaps, usable: dict[str, tuple[torch.Tensor, torch.Tensor]],
              scalar: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Keep the tapped layers whose ``delta^T a`` reproduces autograd's weight gradient.

    A forward that also uses a layer's weight outside the layer call (``F.linear(h, fc.weight)``)
    would make the outer-product trick silently wrong; one extra backward rules that out.
    """
    if not usable:
        return usable
    names = list(usable)
    weights = [taps.layers[m][0].weight for m in names]
    grads = torch.autograd.grad(scalar, [usable[m][1] for m in names] + weights, retain_graph=True,
                                allow_unused=True, materialize_grads=True)
    kept = {}
    for mname, delta, gw in zip(names, grads[:len(names)], grads[len(names):]):
        rebuilt = delta.T @ usable[mname][0]
        # Relative to the gradient's own size: a near-converged model has tiny gradients.
        tol = 1e3 * torch.finfo(gw.dtype).eps * float(torch.maximum(gw.norm(), rebuilt.norm()))
        if float((rebuilt - gw).norm()) <= tol:
            kept[mname] = usable[mname]
    return kept


def _sq_sum_fast(taps: _LinearTaps, usable: dict[str, tuple[torch.Tensor, torch.Tensor]], scalar: torch.Tensor,
                 acc: dict[str, torch.Tensor]) -> None:
    """Add the per-sample squared gradients of the tapped layers (one backward for all samples)."""
    names = list(usable)
    deltas = torch.autograd.grad(scalar, [usable[m][1] for m in names], retain_graph=True, allow_unused=True,
                                 materialize_grads=True)
    for mname, delta in zip(names, deltas):
        _, wname, bname = taps.layers[mname]
        a, d2 = usable[mname][0].double(), delta.double().square()
        if wname is not None:
            acc[wname] += d2.T @ a.square()
        if bname is not None:
            acc[bname] += d2.sum(0)


def _sq_sum_loop(model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor,
                 scalars: list[ScalarFn], acc: dict[str, torch.Tensor]) -> None:
    """Add the per-sample squared gradients of ``params`` one sample at a time (any architecture)."""
    names, tensors = list(params), list(params.values())
    for i in range(len(x)):
        out = model(x[i:i + 1])
        for k, fn in enumerate(scalars):
            grads = torch.autograd.grad(fn(out, slice(i, i + 1)), tensors, retain_graph=k + 1 < len(scalars),
                                        allow_unused=True, materialize_grads=True)
            for name, g in zip(names, grads):
                acc[name] += g.double().square()


def _per_sample_sq_sum(model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor,
                       scalars: list[ScalarFn], acc: dict[str, torch.Tensor]) -> None:
    """``acc[name] += sum_i sum_k (d scalars[k]_i / d param)**2`` over the samples ``i`` of ``x``.

    Linear layers use the outer-product trick; every other parameter is done by
    an explicit loop over samples.
    """
    taps = _LinearTaps(model, params)
    with taps:
        out = model(x)
    # Verify with the last scalar: for Gauss-Newton it carries the largest output-Hessian eigenvalue
    # (the first is often a null direction, e.g. softmax's, whose zero gradient would prove nothing).
    usable = _verified(taps, taps.usable(), scalars[-1](out, slice(None)))
    for fn in scalars:
        if usable:
            _sq_sum_fast(taps, usable, fn(out, slice(None)), acc)
    covered = {n for m in usable for n in taps.layers[m][1:] if n is not None}
    rest = {n: p for n, p in params.items() if n not in covered}
    if rest:
        _sq_sum_loop(model, rest, x, scalars, acc)


def _output_hessian_factors(out: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """Per-sample ``Q_i`` with ``Q_i Q_i^T`` = Hessian of the loss w.r.t. sample ``i``'s output.

    Returns ``(batch, K, K)`` with ``K`` the flattened output size; column ``c`` of
    ``Q_i`` is ``sqrt(max(lambda_c, 0)) v_c`` from the eigendecomposition, so the
    Gauss-Newton diagonal is a sum of squares and never negative.
    """
    flat = out.detach().reshape(len(out), -1)
    if flat.shape[1] > _GN_MAX_OUTPUTS:
        raise ValueError(f"gauss_newton_diagonal: {flat.shape[1]} outputs per sample exceed {_GN_MAX_OUTPUTS}; "
                         "the per-sample output Hessian would be too large (use empirical_fisher_diagonal)")
    shape = out.shape[1:]

    def sample_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(o.reshape(1, *shape), t.unsqueeze(0))

    try:
        hess = torch.func.vmap(torch.func.hessian(sample_loss))(flat, y)
    except (RuntimeError, NotImplementedError):  # a loss without batching rules: one sample at a time
        hess = torch.stack([torch.autograd.functional.hessian(lambda o: sample_loss(o, t), o) for o, t in zip(flat, y)])
    evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)).double())
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).to(out.dtype)


def gauss_newton_diagonal(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Params | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal of the generalized Gauss-Newton matrix ``mean_i J_i^T H_i J_i`` (LeCun's LM approximation).

    ``J_i`` is the Jacobian of sample ``i``'s output w.r.t. the parameters and
    ``H_i`` the Hessian of its loss w.r.t. that output. This drops the term of
    the Hessian that involves the network's second derivatives, exactly as the
    Levenberg-Marquardt approximation of Optimal Brain Damage does; it equals
    the Hessian for a model linear in its parameters under squared error, and
    is >= 0 (negative eigenvalues of ``H_i`` are clipped). For cross-entropy it
    is also the (true) Fisher information. Cost: one backward pass per output
    unit per batch, with a closed form for ``nn.Linear`` layers and a
    per-sample loop for other parameters.

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        params: ``{name: parameter}`` to estimate for (default: all trainable).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.

    Returns:
        ``{name: float64 tensor}``, every entry >= 0.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> bool((gauss_newton_diagonal(net, data, nn.functional.cross_entropy)["weight"] >= 0).all())
        True
    """
    params = _resolve_params(model, params, "gauss_newton_diagonal")
    acc, count = _zeros64(params), 0
    with in_mode(model, training=False):
        for x, y in _batches(loader, max_batches, _device(params), progress, "Gauss-Newton diagonal"):
            with torch.no_grad():
                factors = _output_hessian_factors(model(x), y, loss_fn)
            scalars = [_gn_scalar(factors, c) for c in range(factors.shape[2])]
            _per_sample_sq_sum(model, params, x, scalars, acc)
            count += len(x)
    return _finish(acc, count)


def _gn_scalar(factors: torch.Tensor, c: int) -> ScalarFn:
    # sum_i q_ic . f(x_i): its gradient w.r.t. sample i's activations is J_i^T q_ic's backprop signal.
    return lambda out, rows: (out.reshape(len(out), -1) * factors[rows, :, c]).sum()


def empirical_fisher_diagonal(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Params | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal: the mean over samples of each squared per-sample gradient.

    Always >= 0 and cheap (one backward pass per batch for ``nn.Linear``
    layers). It is not the Hessian: near a minimum it tracks the Gauss-Newton
    matrix only insofar as the residuals look like samples of the model's own
    predictive distribution.

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        params: ``{name: parameter}`` to estimate for (default: all trainable).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.

    Returns:
        ``{name: float64 tensor}``, every entry >= 0.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> f = empirical_fisher_diagonal(net, data, nn.functional.cross_entropy)
        >>> f["bias"].shape
        torch.Size([2])
    """
    params = _resolve_params(model, params, "empirical_fisher_diagonal")
    acc, count = _zeros64(params), 0
    with in_mode(model, training=False):
        for x, y in _batches(loader, max_batches, _device(params), progress, "empirical Fisher diagonal"):
            # A mean loss times the rows it averages is the sum of their per-sample losses.
            scalar: ScalarFn = lambda out, rows, y=y: loss_fn(out, y[rows]) * len(out)  # noqa: E731
            _per_sample_sq_sum(model, params, x, [scalar], acc)
            count += len(x)
    return _finish(acc, count)


def mean_gradient(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    params: Params | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The gradient of the average per-sample loss over the batches, in float64.

    Args:
        model: the model.
        loader: iterable of ``(x, y)`` batches.
        loss_fn: ``loss_fn(model(x), y) -> mean loss over the batch``.
        params: ``{name: parameter}`` (default: all trainable).
        max_batches: use at most this many batches (default: all).
        progress: show a tqdm bar.

    Returns:
        ``{name: float64 tensor}``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> g = mean_gradient(net, [(torch.randn(4, 3), torch.randn(4, 1))], nn.functional.mse_loss)
        >>> g["weight"].dtype
        torch.float64
    """
    params = _resolve_params(model, params, "mean_gradient")
    acc, count = _zeros64(params), 0
    with in_mode(model, training=False):
        for x, y in _batches(loader, max_batches, _device(params), progress, "gradient"):
            grads = _grads(loss_fn(model(x), y), list(params.values()), create_graph=False)
            for name, g in zip(params, grads):
                acc[name] += g.double() * len(x)
            count += len(x)
    return _finish(acc, count)
