"""Turn a validated :class:`~prunekit.apps.recipe.config.Recipe` into objects: model, data, Pruner parts, optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._modes import in_mode
from ...core.criteria import Criterion, Magnitude, Random
from ...core.granularity import NM, Blocks, Channels, Granularity, Unstructured
from ...methods.obd import OBD, Taylor
from ...training.data import load_digits, load_mnist5k
from .config import CriterionConfig, DataConfig, GranularityConfig, ModelConfig, Recipe, RecipeError, TrainingConfig
from .factories import resolve_factory

__all__ = ["Data", "resolve_factory", "build_model", "load_data", "build_criterion", "build_granularity",
           "build_optimizer", "build_pruner_kwargs", "check_compatible"]


@dataclass(frozen=True)
class Data:
    """The training and test split of a recipe's dataset."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def build_model(config: ModelConfig) -> nn.Module:
    """Call the recipe's factory (vetted by :func:`resolve_factory`) with its kwargs; it must return an ``nn.Module``.

    Example:
        >>> type(build_model(ModelConfig("prunekit.apps.models:LeNet300100", {"num_classes": 4}))).__name__
        'LeNet300100'
    """
    factory = resolve_factory(config.factory)
    try:
        model = factory(**config.kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe.model: {config.factory}(**{dict(config.kwargs)!r}) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"recipe.model.factory: {config.factory!r} must return an nn.Module, "
                          f"got {type(model).__name__}")
    return model


def load_data(config: DataConfig) -> Data:
    """Load the dataset's train and test splits (prefixes of ``train_samples`` / ``test_samples``).

    Example:
        >>> d = load_data(DataConfig("digits", train_samples=10))
        >>> d.X_train.shape
        torch.Size([10, 1, 8, 8])
    """
    loader = {"mnist5k": load_mnist5k, "digits": load_digits}[config.name]
    kwargs = dict(test_fraction=config.test_fraction, seed=config.seed, flat=config.flat)
    X, y = loader("train", **kwargs)
    X_test, y_test = loader("test", **kwargs)
    n, m = config.train_samples, config.test_samples
    return Data(X[:n], y[:n], X_test[:m], y_test[:m])


def check_compatible(model: nn.Module, data: Data) -> None:
    """Run one small batch through the model: the data's shape must fit and give one logit row per sample.

    Raises:
        RecipeError: the forward pass fails or returns the wrong shape.

    Example:
        >>> d = load_data(DataConfig("digits", train_samples=4, test_samples=4))
        >>> check_compatible(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), d)
    """
    x = data.X_train[:2]
    try:
        with in_mode(model, training=False), torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"recipe.data: the model cannot take inputs of shape {tuple(x.shape)} from "
                          f"{type(model).__name__} ({first})") from None
    classes = int(data.y_train.max()) + 1
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == len(x) and out.shape[1] >= classes):
        raise RecipeError(f"recipe.model: outputs of shape {tuple(getattr(out, 'shape', ()))} for inputs "
                          f"{tuple(x.shape)}; expected (batch, >= {classes} logits) for this dataset")


def build_criterion(config: CriterionConfig, data: Data) -> Criterion:
    """The recipe's criterion; data-driven ones see the first ``samples`` training samples as one batch.

    Example:
        >>> build_criterion(CriterionConfig("random", {"seed": 3}), None)
        Random(seed=3)
    """
    p = config.params
    if config.name == "magnitude":
        return Magnitude()
    if config.name == "random":
        return Random(p["seed"])
    batches = [(data.X_train[:p["samples"]], data.y_train[:p["samples"]])]
    loss = nn.functional.cross_entropy
    if config.name == "taylor":
        return Taylor(batches, loss)
    return OBD(batches, loss, estimator=p["estimator"], probes=p["probes"], seed=p["seed"])


def build_granularity(config: GranularityConfig) -> Granularity:
    """The recipe's granularity.

    Example:
        >>> build_granularity(GranularityConfig("nm", 2, 4)).sparsity
        0.5
    """
    if config.type == "nm":
        return NM(config.n, config.m)
    if config.type == "blocks":
        return Blocks(config.block)
    if config.type == "channels":
        return Channels()
    return Unstructured()


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over every parameter of ``model``.

    Example:
        >>> type(build_optimizer(nn.Linear(2, 2), TrainingConfig(epochs=1, optimizer="sgd"))).__name__
        'SGD'
    """
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_pruner_kwargs(recipe: Recipe, data: Data) -> dict[str, Any]:
    """Keyword arguments of :class:`prunekit.Pruner` for this recipe (besides model and optimizer).

    Example:
        >>> Pruner(model, recipe.schedule, optimizer=opt, **build_pruner_kwargs(recipe, data))  # doctest: +SKIP
    """
    scope = recipe.scope
    return dict(criterion=build_criterion(recipe.criterion, data), granularity=build_granularity(recipe.granularity),
                layers=None if scope.layers is None else list(scope.layers), exclude=list(scope.exclude) or None,
                overrides=dict(scope.overrides) or None, ranking=scope.ranking)
