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
