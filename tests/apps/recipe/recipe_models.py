"""Small models for recipe tests, importable as ``recipe_models:<Name>`` (tests put this folder on PYTHONPATH)."""

from __future__ import annotations

from torch import nn


class DropNet(nn.Module):
    """A flat-input MLP with dropout: its training draws on the global RNG, so resuming must restore it."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(self.flatten(x)).relu()))


# -- callables a recipe must not be able to call (tests/apps/recipe/test_factories.py) -----------------------------
# Each writes a marker file when called, so a test can prove it never was.


def _touch(path: str) -> None:
    with open(path, "w") as handle:
        handle.write("called")


def write_marker(path: str, **_: object) -> nn.Module:
    """A plain function: refused until registered; when called it leaves ``path`` behind."""
    _touch(path)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


lambda_factory = lambda path, **_: (_touch(path), nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))[1]  # noqa: E731


class NotAModule:
    """A class that is not an ``nn.Module``: instantiating it writes the marker."""

    def __init__(self, path: str, **_: object) -> None:
        _touch(path)


class MarkerNet(nn.Module):
    """An ``nn.Module`` class whose constructor writes the marker: calling it is allowed (the positive control)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        _touch(path)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(self.flatten(x))

    @classmethod
    def tiny(cls, path: str) -> "MarkerNet":
        """An alternative constructor: refused until registered."""
        return cls(path)


MODULE_INSTANCE = nn.Linear(784, 10)  # callable (its forward), but an instance, not a class: refused
