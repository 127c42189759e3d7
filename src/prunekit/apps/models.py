"""Reference models of the pruning literature, built from standard ``nn`` modules only.

Layers are named attributes (``conv1``, ``fc1``, ...) so that parameter names in
reports and ``state_dict`` read like the papers' tables (``fc1.weight``), and
every model is traceable by ``torch.fx`` and exportable to ONNX.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_int

__all__ = ["LeNet5", "LeNet300100", "RowLSTM"]


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 28x28 inputs, with ReLU and max pooling.

    ``conv1`` 5x5, 6 channels, padding 2 -> ReLU -> 2x2 max pool -> ``conv2`` 5x5,
    16 channels -> ReLU -> 2x2 max pool -> flatten (400) -> ``fc1`` 120 -> ReLU ->
    ``fc2`` 84 -> ReLU -> ``fc3`` ``num_classes`` (logits). 61,706 parameters
    with the defaults.

    Shapes: input ``(N, in_channels, 28, 28)``; after ``conv1``/``pool1``
    ``(N, 6, 28, 28)``/``(N, 6, 14, 14)``; after ``conv2``/``pool2``
    ``(N, 16, 10, 10)``/``(N, 16, 5, 5)``; output ``(N, num_classes)``.

    Args:
        num_classes: number of output logits (>= 1).
        in_channels: channels of the input images (>= 1).

    Example:
        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        num_classes = check_int("LeNet5", "num_classes", num_classes, minimum=1)
        in_channels = check_int("LeNet5", "in_channels", in_channels, minimum=1)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 28, 28)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class LeNet300100(nn.Module):
    """LeNet-300-100: the fully connected MNIST network of LeCun et al. 1998 and Han et al. 2015.

    flatten -> ``fc1`` 300 -> ReLU -> ``fc2`` 100 -> ReLU -> ``fc3`` ``num_classes``
    (logits). 266,610 parameters with the defaults.

    Shapes: input ``(N, *)`` with ``in_features`` entries per sample (e.g.
    ``(N, 1, 28, 28)`` or ``(N, 784)``), flattened to ``(N, in_features)``;
    hidden ``(N, 300)``, ``(N, 100)``; output ``(N, num_classes)``.

    Args:
        num_classes: number of output logits (>= 1).
        in_features: entries per input sample (>= 1).

    Example:
        >>> LeNet300100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        num_classes = check_int("LeNet300100", "num_classes", num_classes, minimum=1)
        in_features = check_int("LeNet300100", "in_features", in_features, minimum=1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, *)`` with ``in_features`` entries each."""
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class RowLSTM(nn.Module):
    """An LSTM classifier for row-sequential MNIST: an image is read one pixel row per time step.

    reshape to ``(N, steps, features)`` (28 rows of 28 pixels) -> ``lstm``
    (``nn.LSTM(features, hidden_size, batch_first=True)``) -> last hidden
    state ``h_T`` ``(N, hidden_size)`` -> ``fc`` ``num_classes`` (logits).
    82,186 parameters with the defaults (80,896 in the LSTM).

    Shapes: input ``(N, *)`` with ``steps * features`` entries per sample (e.g.
    ``(N, 1, 28, 28)``, ``(N, 28, 28)`` or ``(N, 784)``); output ``(N, num_classes)``.

    Args:
        num_classes: number of output logits (>= 1).
        hidden_size: LSTM hidden units (>= 1).
        steps: time steps (image rows) per sample (>= 1).
        features: inputs per time step (pixels per row, >= 1).

    Example:
        >>> RowLSTM()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, hidden_size: int = 128, steps: int = 28, features: int = 28) -> None:
        super().__init__()
        num_classes = check_int("RowLSTM", "num_classes", num_classes, minimum=1)
        hidden_size = check_int("RowLSTM", "hidden_size", hidden_size, minimum=1)
        self.steps = check_int("RowLSTM", "steps", steps, minimum=1)
        self.features = check_int("RowLSTM", "features", features, minimum=1)
        self.lstm = nn.LSTM(self.features, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, *)`` with ``steps * features`` entries each."""
        _, (h, _) = self.lstm(x.reshape(-1, self.steps, self.features))
        return self.fc(h[-1])
