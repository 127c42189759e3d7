"""Pruning schedules: ``step -> (update now?, target sparsity)``.

Semantics follow TensorFlow Model Optimization's pruning schedules so that
recipes carry over: masks are recomputed at a step when
``begin_step <= step <= end_step`` (or ``end_step == -1``) and
``(step - begin_step) % frequency == 0``.

Schedules are small immutable objects; ``to_dict`` / :func:`schedule_from_dict`
turn them into plain dicts (JSON/YAML friendly) and back, with validation.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .._validate import check_int, check_real, check_sparsity

__all__ = ["Schedule", "ConstantSparsity", "PolynomialDecay", "schedule_from_dict"]


def _in_update_step(step: int, begin_step: int, end_step: int, frequency: int) -> bool:
    in_range = step >= begin_step and (end_step == -1 or step <= end_step)
    return in_range and (step - begin_step) % frequency == 0


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses implement :meth:`sparsity` and :meth:`should_update`."""

    _registry: ClassVar[dict[str, type["Schedule"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Schedule._registry[cls.__name__] = cls

    def should_update(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``."""
        raise NotImplementedError

    def sparsity(self, step: int) -> float:
        """Target sparsity at ``step`` (a float in [0, 1))."""
        raise NotImplementedError

    def __call__(self, step: int) -> tuple[bool, float]:
        """Return ``(should_update(step), sparsity(step))``."""
        step = check_int(type(self).__name__, "step", step, minimum=0)
        return self.should_update(step), self.sparsity(step)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with a ``"type"`` key; :func:`schedule_from_dict` inverts it."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ConstantSparsity(Schedule):
    """Prune to a fixed ``target_sparsity`` every ``frequency`` steps from ``begin_step``.

    Args:
        target_sparsity: fraction of weights pruned, in [0, 1).
        begin_step: first step at which masks are computed (>= 0).
        end_step: last step at which masks are computed, or -1 for no end.
        frequency: steps between mask updates (>= 1).

    Example:
        >>> s = ConstantSparsity(0.5, begin_step=0, frequency=10)
        >>> s(0), s(5), s(10)
        ((True, 0.5), (False, 0.5), (True, 0.5))
    """

    target_sparsity: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self) -> None:
        owner = "ConstantSparsity"
        object.__setattr__(self, "target_sparsity", check_sparsity(owner, "target_sparsity", self.target_sparsity))
        _validate_steps(owner, self, allow_open_end=True)

    def should_update(self, step: int) -> bool:  # noqa: D102 - documented on the base class
        return _in_update_step(step, self.begin_step, self.end_step, self.frequency)

    def sparsity(self, step: int) -> float:  # noqa: D102
        return self.target_sparsity


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    """Ramp sparsity from ``initial_sparsity`` to ``final_sparsity`` between two steps.

    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`` and
    ``s = final + (initial - final) * (1 - p) ** power`` (Zhu & Gupta 2017). When
    ``end_step == begin_step`` the target jumps to ``final_sparsity`` at that step.
    Masks change only at update steps, so ``final_sparsity`` is reached only if
    ``end_step - begin_step`` is a multiple of ``frequency`` (a warning says so otherwise).

    Args:
        initial_sparsity: sparsity at ``begin_step``, in [0, 1).
        final_sparsity: sparsity from ``end_step`` on, in [0, 1).
        begin_step: first step at which masks are computed (>= 0).
        end_step: last step at which masks are computed (>= begin_step).
        power: exponent of the decay (> 0); 3 is the published choice.
        frequency: steps between mask updates (>= 1).

    Example:
        >>> s = PolynomialDecay(0.5, 0.8, begin_step=0, end_step=100, frequency=50)
        >>> [round(s.sparsity(t), 4) for t in (0, 50, 100, 200)]
        [0.5, 0.7625, 0.8, 0.8]
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 100

    def __post_init__(self) -> None:
        owner = "PolynomialDecay"
        object.__setattr__(self, "initial_sparsity", check_sparsity(owner, "initial_sparsity", self.initial_sparsity))
        object.__setattr__(self, "final_sparsity", check_sparsity(owner, "final_sparsity", self.final_sparsity))
        power = check_real(owner, "power", self.power)
        if power <= 0:
            raise ValueError(f"{owner}: power must be > 0, got {power}")
        object.__setattr__(self, "power", power)
        _validate_steps(owner, self, allow_open_end=False)
        if (self.end_step - self.begin_step) % self.frequency:
            last = self.end_step - (self.end_step - self.begin_step) % self.frequency
            warnings.warn(
                f"PolynomialDecay: end_step - begin_step ({self.end_step - self.begin_step}) is not a multiple of "
                f"frequency ({self.frequency}); the last mask update is at step {last} with sparsity "
                f"{self.sparsity(last):.4f}, so final_sparsity {self.final_sparsity} is never reached",
                stacklevel=3,
            )

    def should_update(self, step: int) -> bool:  # noqa: D102
        return _in_update_step(step, self.begin_step, self.end_step, self.frequency)

    def sparsity(self, step: int) -> float:  # noqa: D102
        span = self.end_step - self.begin_step
        if span == 0:
            p = 1.0 if step >= self.begin_step else 0.0
        else:
            p = min(1.0, max(0.0, (step - self.begin_step) / span))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power


def _validate_steps(owner: str, sched: Any, *, allow_open_end: bool) -> None:
    begin = check_int(owner, "begin_step", sched.begin_step, minimum=0)
    end = check_int(owner, "end_step", sched.end_step)
    freq = check_int(owner, "frequency", sched.frequency, minimum=1)
    if allow_open_end and end == -1:
        pass
    elif end < begin:
        extra = " or -1 (no end)" if allow_open_end else ""
        raise ValueError(f"{owner}: end_step must be >= begin_step ({begin}){extra}, got {end}")
    object.__setattr__(sched, "begin_step", begin)
    object.__setattr__(sched, "end_step", end)
    object.__setattr__(sched, "frequency", freq)


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Build a schedule from the dict written by :meth:`Schedule.to_dict`.

    Raises:
        TypeError: ``data`` is not a dict.
        ValueError: unknown ``type``, unknown or missing fields, or invalid values.

    Example:
        >>> schedule_from_dict({"type": "ConstantSparsity", "target_sparsity": 0.9})
        ConstantSparsity(target_sparsity=0.9, begin_step=0, end_step=-1, frequency=100)
    """
    if not isinstance(data, dict):
        raise TypeError(f"schedule_from_dict: expected a dict, got {type(data).__name__}")
    kind = data.get("type")
    cls = Schedule._registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        allowed = ", ".join(sorted(Schedule._registry))
        raise ValueError(f"schedule_from_dict: 'type' must be one of {allowed}, got {kind!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"schedule_from_dict: unknown field(s) {unknown} for {kind}; allowed: {sorted(fields)}")
    try:
        return cls(**args)
    except TypeError as exc:
        if "required positional argument" in str(exc):
            raise ValueError(f"schedule_from_dict: {kind} is missing a field: {exc}") from None
        raise
