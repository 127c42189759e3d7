"""What one lottery-ticket run does: training hyper-parameters, pruning rates, rewinding.

Both configs are frozen dataclasses that validate themselves, turn into plain
JSON-ready dicts and back, and feed the run's config hash, so a run directory
can never be resumed with different settings.

Per-round targets are defined by their closed form: a tensor pruned at rate
``p`` per round has sparsity ``s_r = 1 - (1 - p) ** r`` after round ``r``, and
``round(n * s_r)`` of its ``n`` weights are pruned. Pruning "``p`` of the
remaining weights" and rounding each round would drift from that by a weight
or two per round; the closed form keeps every round exactly on the curve.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..._validate import check_choice, check_int, check_real
from ...core.granularity import prune_count

__all__ = ["TrainSpec", "LotteryConfig", "round_sparsity", "pruned_count"]

_OPTIMIZERS = ("adam", "sgd")


def round_sparsity(rate: float, round_index: int) -> float:
    """Sparsity after ``round_index`` rounds at ``rate`` per round: ``1 - (1 - rate) ** round_index``.

    Example:
        >>> [round(round_sparsity(0.2, r), 3) for r in range(4)]
        [0.0, 0.2, 0.36, 0.488]
    """
    rate = _check_rate("round_sparsity", "rate", rate)
    round_index = check_int("round_sparsity", "round_index", round_index, minimum=0)
    return 1.0 - (1.0 - rate) ** round_index


def pruned_count(numel: int, rate: float, round_index: int) -> int:
    """Weights of an ``numel``-entry tensor pruned after ``round_index`` rounds: ``round(numel * s_r)``.

    Example:
        >>> pruned_count(1000, 0.2, 1), pruned_count(1000, 0.2, 2), pruned_count(1000, 0.1, 2)
        (200, 360, 190)
    """
    return prune_count(numel, round_sparsity(rate, round_index))


def _check_rate(owner: str, name: str, value: Any) -> float:
    value = check_real(owner, name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{owner}: {name} must be in (0, 1), got {value}")
    return value


@dataclass(frozen=True)
class TrainSpec:
    """How every (re)training of a run is done.

    Attributes:
        iterations: optimizer steps per training (>= 1).
        batch_size: samples per step.
        lr: learning rate.
        optimizer: ``"adam"`` (Frankle & Carbin's choice for LeNet) or ``"sgd"``.
        momentum: SGD momentum (ignored by Adam).
        eval_every: validation loss is measured every this many steps (and at
            the last); the early-stopping iteration is the one of minimum
            validation loss among those.

    Example:
        >>> TrainSpec(iterations=1000, eval_every=50).lr
        0.0012
    """

    iterations: int
    batch_size: int = 60
    lr: float = 1.2e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    eval_every: int = 50

    def __post_init__(self) -> None:
        owner = "TrainSpec"
        object.__setattr__(self, "iterations", check_int(owner, "iterations", self.iterations, minimum=1))
        object.__setattr__(self, "batch_size", check_int(owner, "batch_size", self.batch_size, minimum=1))
        object.__setattr__(self, "eval_every", check_int(owner, "eval_every", self.eval_every, minimum=1))
        object.__setattr__(self, "optimizer", check_choice(owner, "optimizer", self.optimizer, _OPTIMIZERS))
        lr, momentum = check_real(owner, "lr", self.lr), check_real(owner, "momentum", self.momentum)
        if lr <= 0:
            raise ValueError(f"{owner}: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum}")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "momentum", momentum)


@dataclass(frozen=True)
class LotteryConfig:
    """One iterative-magnitude-pruning run with rewinding (Frankle & Carbin 2019; Frankle et al. 2019).

    Round 0 trains the dense network from its initialization. Round ``r >= 1``
    prunes the trained weights of round ``r - 1`` to the round-``r`` targets
    (already pruned weights stay pruned), rewinds the survivors to the weights
    of iteration ``rewind_iteration`` of round 0 (0: the initial weights, the
    winning ticket; ``k > 0``: late rewinding), and retrains.

    Attributes:
        train: how each round trains.
        rounds: pruning rounds after the dense round 0. Not part of the config
            hash: a finished run can be extended with more rounds.
        rate: fraction of the remaining weights pruned per round (``p``).
        output_rate: the output layer's rate; ``None``: ``rate / 2`` as in the paper.
        output_layer: the output layer's parameter name; ``None``: the last pruned parameter.
        ranking: ``"layerwise"`` (each tensor reaches its own target) or
            ``"global"`` (one ranking across all tensors but the output layer,
            which is ranked alone at ``output_rate``).
        rewind_iteration: ``k``, the round-0 iteration rewound to (``0 <= k <= iterations``).
        seed: seeds the initialization and the order of the training samples.
        layers: name patterns of the parameters to prune (``None``: every prunable weight).
        exclude: name patterns never pruned.

    Example:
        >>> cfg = LotteryConfig(TrainSpec(iterations=500), rounds=5, rate=0.2)
        >>> cfg.output_rate_or_default
        0.1
    """

    train: TrainSpec
    rounds: int
    rate: float = 0.2
    output_rate: float | None = None
    output_layer: str | None = None
    ranking: str = "layerwise"
    rewind_iteration: int = 0
    seed: int = 0
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        owner = "LotteryConfig"
        if not isinstance(self.train, TrainSpec):
            raise TypeError(f"{owner}: train must be a TrainSpec, got {type(self.train).__name__}")
        object.__setattr__(self, "rounds", check_int(owner, "rounds", self.rounds, minimum=0))
        object.__setattr__(self, "rate", _check_rate(owner, "rate", self.rate))
        if self.output_rate is not None:
            object.__setattr__(self, "output_rate", _check_rate(owner, "output_rate", self.output_rate))
        if self.output_layer is not None and not isinstance(self.output_layer, str):
            raise TypeError(f"{owner}: output_layer must be a parameter name or None, got {self.output_layer!r}")
        object.__setattr__(self, "ranking", check_choice(owner, "ranking", self.ranking, ("layerwise", "global")))
        k = check_int(owner, "rewind_iteration", self.rewind_iteration, minimum=0)
        if k > self.train.iterations:
            raise ValueError(f"{owner}: rewind_iteration must be <= train.iterations "
                             f"({self.train.iterations}), got {k}")
        object.__setattr__(self, "rewind_iteration", k)
        object.__setattr__(self, "seed", check_int(owner, "seed", self.seed, minimum=0))
        if self.layers is not None:
            object.__setattr__(self, "layers", _patterns(owner, "layers", self.layers))
        object.__setattr__(self, "exclude", _patterns(owner, "exclude", self.exclude))

    @property
    def output_rate_or_default(self) -> float:
        """The output layer's per-round rate: ``output_rate``, or ``rate / 2``."""
        return self.output_rate if self.output_rate is not None else self.rate / 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        data = dataclasses.asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LotteryConfig":
        """Rebuild a config from :meth:`to_dict` output, with validation.

        Raises:
            ValueError: unknown or missing fields, or invalid values.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("train"), Mapping):
            raise ValueError("LotteryConfig.from_dict: expected a dict with a 'train' dict")
        _check_fields(cls, data)
        _check_fields(TrainSpec, data["train"])
        args = dict(data)
        args["train"] = TrainSpec(**data["train"])
        if args.get("layers") is not None:
            args["layers"] = tuple(args["layers"])
        args["exclude"] = tuple(args.get("exclude", ()))
        return cls(**args)


def _patterns(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{owner}: {name} must be a tuple of parameter-name patterns, got {value!r}")
    return tuple(value)


def _check_fields(cls: type, data: Mapping[str, Any]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if unknown or missing:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}, missing fields {missing}")
