"""``stop_when`` in a recipe: a :class:`prunekit.StopWhen` on the prune-train phase, saved in its checkpoints.

:class:`StoppingPruner` stands for the Pruner in :class:`~prunekit.training.checkpoint.Checkpoints`:
its state is the Pruner's plus ``"stop_when"`` (the search so far: baseline, history,
stop step; plain JSON values), so a phase killed mid-run resumes with the same
baseline and history and, once stopped, held at the same sparsity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ...core.pruner import Pruner
from ...methods.budget import StopWhen
from ...training.loop import evaluate
from .build import Data
from .config import StopWhenConfig

__all__ = ["StoppingPruner", "build_stop", "stop_report"]


def build_stop(config: StopWhenConfig, data: Data) -> StopWhen:
    """The :class:`~prunekit.StopWhen` of a recipe's ``stop_when`` section, on its split's first ``samples``.

    Example:
        >>> from prunekit.apps.recipe.build import load_data
        >>> from prunekit.apps.recipe.config import DataConfig
        >>> stop = build_stop(StopWhenConfig("loss", 0.1, relative=True), load_data(DataConfig("digits")))
        >>> stop.tolerance.higher_is_better
        False
    """
    X, y = (data.X_test, data.y_test) if config.split == "test" else (data.X_train, data.y_train)
    X, y = X[:config.samples], y[:config.samples]
    metric = config.metric

    def measure(model: nn.Module) -> float:
        return evaluate(model, X, y)[metric]

    return StopWhen(measure, config.max_drop, relative=config.relative, higher_is_better=metric == "accuracy")


class StoppingPruner:
    """A Pruner and its StopWhen, saved and restored together (what ``Checkpoints`` calls ``pruner``).

    Build the Pruner with ``hooks=[stop]`` for a fresh phase (the hook then measures the dense
    baseline before the first update), without it when resuming: :meth:`load_state_dict`
    loads the saved search into ``stop`` and attaches it (holding the Pruner if it had stopped).

    Example:
        >>> stopping = StoppingPruner(pruner, stop)  # doctest: +SKIP
        >>> Checkpoints(path, optimizer, stopping, every=50)  # doctest: +SKIP
    """

    def __init__(self, pruner: Pruner, stop: StopWhen) -> None:
        self.pruner, self.stop = pruner, stop

    def state_dict(self) -> dict[str, Any]:
        """The Pruner's state with ``"stop_when"``: the StopWhen's."""
        return {**self.pruner.state_dict(), "stop_when": self.stop.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore both; then hook the StopWhen into the Pruner (held if it had stopped).

        Raises:
            ValueError: the state holds no ``stop_when`` part, or it does not fit.
        """
        state = dict(state)
        saved = state.pop("stop_when", None)
        if saved is None:
            raise ValueError("checkpoint holds no stop_when state (written by a run without stop_when)")
        self.pruner.load_state_dict(state)
        self.stop.load_state_dict(saved)
        self.stop.attach(self.pruner)


def stop_report(stop: StopWhen, config: StopWhenConfig, sparsity: float) -> dict[str, Any]:
    """Plain JSON: the tolerance, whether and where it stopped, the sparsity reached, every check.

    ``sparsity`` is the final sparsity of the phase (the held one when it stopped).

    Example:
        >>> r = stop_report(StopWhen(lambda m: 1.0, 0.01, baseline=1.0), StopWhenConfig("accuracy", 0.01), 0.0)
        >>> r["stopped"], r["stop_step"], r["checks"]
        (False, None, [])
    """
    good = stop.good
    return {"metric": config.metric, "split": config.split, "samples": config.samples, "max_drop": config.max_drop,
            "relative": config.relative, "baseline": stop.baseline, "stopped": stop.stopped,
            "stop_step": stop.step, "sparsity_reached": sparsity,
            "last_good": None if good is None else {"step": good.step, "sparsity": good.sparsity,
                                                    "metric": good.metric},
            "evaluations": stop.evaluations, "summary": stop.summary(),
            "checks": [{"step": c.step, "sparsity": c.sparsity, "metric": c.metric, "ok": c.ok}
                       for c in stop.history]}
