"""Reference implementations and layer cases shared by the core test files.

Deliberately independent of the code under test: numpy, float64, and an explicit
(dead first, score, flat index) lexicographic order instead of torch's stable sort.
(A plain module rather than conftest.py, so that ``from core_helpers import ...``
cannot pick up another directory's conftest.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


def reference_keep(scores: list, sparsity: float, priors: list | None = None) -> list[np.ndarray]:
    """Brute-force keep-masks for unstructured ranking of ``scores`` (one entry per tensor).

    ``k = round(n * sparsity)`` entries are pruned over the concatenation of all
    tensors (one tensor = layer-wise, several = global ranking). Entries dead in
    ``priors`` (keep-masks) come first (by flat index), then live entries by
    ascending score, then ascending flat index (so ties prune the lowest index first).
    """
    arrays = [np.asarray(torch.as_tensor(s).detach().double().cpu().numpy()) for s in scores]
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    if priors is None:
        priors = [None] * len(arrays)
    dead = np.concatenate([
        np.zeros(a.size, dtype=bool) if p is None
        else ~np.asarray(torch.as_tensor(p).cpu().numpy(), dtype=bool).reshape(-1)
        for a, p in zip(arrays, priors)
    ])
    n = flat.size
    k = round(n * sparsity)
    index = np.arange(n)
    # Dead units rank below every live one as if their score were -inf (so among
    # themselves by index); primary key last: dead first, then score, then index.
    order = np.lexsort((index, np.where(dead, -np.inf, flat), ~dead))
    keep = np.ones(n, dtype=bool)
    keep[order[:k]] = False
    out, start = [], 0
    for a in arrays:
        out.append(keep[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


# --------------------------------------------------------------------------------------
# Layer cases: a module, how to feed it, and the names of the parameters that the
# default scope must prune (written out by hand, not derived from the code under test).
# --------------------------------------------------------------------------------------


@dataclass
class LayerCase:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    expected: list[str]

    def forward(self, module: nn.Module, inputs: tuple) -> torch.Tensor:
        out = module(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        return out


def _rnn_names(layers: int, bidirectional: bool, proj: bool) -> list[str]:
    names = []
    for layer in range(layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            names += [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
            if proj:
                names.append(f"weight_hr_l{layer}{suffix}")
    return names


def _randn(*shape):
    return lambda g: (torch.randn(*shape, generator=g),)


LAYER_CASES = [
    LayerCase("linear", lambda: nn.Linear(6, 5), _randn(4, 6), ["weight"]),
    LayerCase("conv1d", lambda: nn.Conv1d(3, 4, 3), _randn(2, 3, 8), ["weight"]),
    LayerCase("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), _randn(2, 3, 6, 6), ["weight"]),
    LayerCase("conv3d", lambda: nn.Conv3d(2, 3, 2), _randn(1, 2, 4, 4, 4), ["weight"]),
    LayerCase("convtranspose1d", lambda: nn.ConvTranspose1d(3, 4, 3), _randn(2, 3, 5), ["weight"]),
    LayerCase("convtranspose2d", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), _randn(2, 3, 4, 4), ["weight"]),
    LayerCase("embedding", lambda: nn.Embedding(10, 6),
              lambda g: (torch.randint(0, 10, (4, 3), generator=g),), ["weight"]),
    LayerCase("lstm", lambda: nn.LSTM(5, 6), _randn(3, 2, 5), _rnn_names(1, False, False)),
    LayerCase("lstm_bi_2layer", lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True), _randn(3, 2, 5),
              _rnn_names(2, True, False)),
    LayerCase("lstm_proj", lambda: nn.LSTM(5, 6, num_layers=2, proj_size=3), _randn(3, 2, 5),
              _rnn_names(2, False, True)),
    LayerCase("lstm_proj_bi", lambda: nn.LSTM(5, 6, proj_size=3, bidirectional=True, batch_first=True),
              _randn(2, 3, 5), _rnn_names(1, True, True)),
    LayerCase("gru_2layer", lambda: nn.GRU(5, 6, num_layers=2), _randn(3, 2, 5), _rnn_names(2, False, False)),
    LayerCase("rnn_bi", lambda: nn.RNN(5, 6, bidirectional=True), _randn(3, 2, 5), _rnn_names(1, True, False)),
    LayerCase("mha_packed", lambda: nn.MultiheadAttention(8, 2),
              lambda g: (torch.randn(3, 2, 8, generator=g),) * 3, ["in_proj_weight", "out_proj.weight"]),
    LayerCase("mha_separate", lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=3),
              lambda g: (torch.randn(3, 2, 8, generator=g), torch.randn(4, 2, 5, generator=g),
                         torch.randn(4, 2, 3, generator=g)),
              ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` whose equality is bit equality (distinguishes -0.0 and NaN payloads)."""
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bit_identical(a, b, where: str = "") -> None:
    """Assert that tensors (in nested dicts, lists, tuples) are bit-identical and other values equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_bit_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
