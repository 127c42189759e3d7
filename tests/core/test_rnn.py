"""LSTM and GRU: every gate weight pruned, training goes on, strip, save/load and ONNX export stay exact.

Covers {LSTM, GRU} x {unidirectional, bidirectional} x {1, 2 layers}. The oracle for the
pruned modules is an independent float64 re-implementation of PyTorch's LSTM/GRU
equations that reads the named parameters (so a stale cuDNN-style flat weight list
would show), and a fresh dense module loaded with the zeros.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apps.models import RowLSTM
from prunekit.formats import export_onnx, load, save

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}
CASES = list(itertools.product(KINDS, (False, True), (1, 2)))
IDS = [f"{k}-{'bi' if b else 'uni'}-{n}layer" for k, b, n in CASES]
IN, HIDDEN, STEPS = 5, 8, 6


class SeqModel(nn.Module):
    def __init__(self, kind: str, bidirectional: bool, layers: int) -> None:
        super().__init__()
        self.rnn = KINDS[kind](IN, HIDDEN, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _expected_names(bidirectional: bool, layers: int) -> list[str]:
    # Written out, not read from the module: all input and hidden weights of every layer and direction.
    names = []
    for layer in range(layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            names += [f"rnn.weight_ih_l{layer}{suffix}", f"rnn.weight_hh_l{layer}{suffix}"]
    return names


# -- an independent reference: PyTorch's documented equations, float64, from the named parameters ----


def _lstm_cell(p: dict, x, h, c):
    gates = x @ p["ih"].T + p["b_ih"] + h @ p["hh"].T + p["b_hh"]
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(p: dict, x, h, _c):
    xr, xz, xn = (x @ p["ih"].T + p["b_ih"]).chunk(3, dim=1)
    hr, hz, hn = (h @ p["hh"].T + p["b_hh"]).chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


def _direction(cell, p: dict, seq: torch.Tensor, reverse: bool) -> torch.Tensor:
    batch, steps, _ = seq.shape
    h = torch.zeros(batch, HIDDEN, dtype=torch.float64)
    c = torch.zeros_like(h)
    out = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        h, c = cell(p, seq[:, t], h, c)
        out[t] = h
    return torch.stack(out, dim=1)


def reference_forward(model: SeqModel, x: torch.Tensor) -> torch.Tensor:
    rnn = model.rnn
    cell = _lstm_cell if isinstance(rnn, nn.LSTM) else _gru_cell
    seq = x.double()
    for layer in range(rnn.num_layers):
        outs = []
        for suffix in ("", "_reverse") if rnn.bidirectional else ("",):
            p = {key: getattr(rnn, f"{name}_l{layer}{suffix}").detach().double()
                 for key, name in (("ih", "weight_ih"), ("hh", "weight_hh"), ("b_ih", "bias_ih"), ("b_hh", "bias_hh"))}
            outs.append(_direction(cell, p, seq, reverse=bool(suffix)))
        seq = torch.cat(outs, dim=2)
    head = model.head
    return seq[:, -1] @ head.weight.detach().double().T + head.bias.detach().double()


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Tiny recurrent steps gain nothing from threads: every test here runs with ``single_thread``."""


# -- helpers -----------------------------------------------------------------------------------


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, STEPS, IN, generator=g)
    y = torch.stack([x[:, :, 0].mean(1), x[:, -1, 1], x[:, 0, 2]], dim=1) * 2
    return x, y


def _pruned_and_trained(case, seed: int, final: float = 0.75, steps: int = 80):
    """Train with gradual pruning of the RNN; returns model, pruner, losses and the data."""
    torch.manual_seed(seed)
    model = SeqModel(*case)
    x, y = _data(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    schedule = prunekit.PolynomialDecay(0.0, final, begin_step=5, end_step=25, frequency=5)
    pruner = prunekit.Pruner(model, schedule, optimizer=opt, layers=["rnn"])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, pruner, losses, x


def _zeros_where_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[name].detach()[~keep] == 0).all()) for name, keep in masks.items())


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_gate_weight_is_pruned_and_training_goes_on(case, seed):
    _, bidirectional, layers = case
    model, pruner, losses, x = _pruned_and_trained(case, seed)
    assert pruner.names == _expected_names(bidirectional, layers)
    masks = pruner.masks
    for name, keep in masks.items():
        assert int((~keep).sum()) == round(keep.numel() * 0.75), name
    assert not any(math.isnan(v) for v in losses)
    # Pruning ends at step 25: the sparse network keeps learning afterwards.
    assert sum(losses[-5:]) < 0.5 * sum(losses[25:30]), "the pruned RNN stopped learning"
    assert _zeros_where_pruned(model, masks)
    rnn = model.rnn
    for name, flat in zip(rnn._flat_weights_names, rnn._flat_weights):
        assert flat is getattr(rnn, name)  # the flat weight list still aliases the parameters
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got.double(), reference_forward(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_strip_gives_the_dense_with_zeros_model(case):
    model, pruner, _, x = _pruned_and_trained(case, seed=2, steps=30)
    masks = pruner.masks
    keys = list(model.state_dict())
    prunekit.strip(model)
    assert list(model.state_dict()) == keys  # no renamed keys
    # A fresh dense module holding the original weights times the masks computes the same outputs.
    dense = SeqModel(*case)
    state = {k: v * masks[k] if k in masks else v for k, v in model.state_dict().items()}
    dense.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    # After strip nothing re-applies masks: a plain training step moves pruned weights again.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(x), torch.zeros(len(x), 3)).backward()
    opt.step()
    assert not _zeros_where_pruned(model, masks)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_load_round_trip(case, tmp_path):
    model, pruner, _, x = _pruned_and_trained(case, seed=3, steps=30)
    prunekit.strip(model)
    dense_bytes = save(SeqModel(*case), tmp_path / "dense.pkt")
    written = save(model, tmp_path / "sparse.pkt")
    assert written == (tmp_path / "sparse.pkt").stat().st_size < dense_bytes
    fresh = SeqModel(*case)
    load(tmp_path / "sparse.pkt", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # int8: pruned zeros stay exact zeros, the rest within the quantization step.
    save(model, tmp_path / "int8.pkt", quantize="int8")
    q = SeqModel(*case)
    load(tmp_path / "int8.pkt", q)
    assert _zeros_where_pruned(q, pruner.masks)
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnx_export_matches_onnxruntime(case, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort

    model, _, _, x = _pruned_and_trained(case, seed=4, steps=30)
    prunekit.strip(model).eval()
    result = export_onnx(model, x[:4], tmp_path / "rnn.onnx")
    assert result.max_rel_error <= 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (x[:4], x[4:11]):  # another batch size too: dim 0 is dynamic
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
        ref = reference_forward(model, batch)
        assert float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # The pruned zeros reach the graph: at least as many zero weights as the masks made.
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(result.path)).graph.initializer)
    pruned = sum(int((p == 0).sum()) for n, p in model.rnn.named_parameters() if n.startswith("weight_"))
    assert zeros >= pruned


# -- RowLSTM --------------------------------------------------------------------------------------


def test_row_lstm_counts_and_reads_rows_as_time_steps():
    model = RowLSTM()
    assert sum(p.numel() for p in model.parameters()) == 4 * 128 * (28 + 128 + 2) + 128 * 10 + 10
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 28, 28, generator=g)
    with torch.no_grad():
        out = model(images)
        seq, _ = model.lstm(images[:, 0])  # (N, 28 rows, 28 pixels)
        assert torch.allclose(out, model.fc(seq[:, -1]), atol=1e-6)
        assert torch.equal(model(images.reshape(3, 784)), out)
    with pytest.raises(ValueError, match="hidden_size"):
        RowLSTM(hidden_size=0)


@pytest.mark.slow
def test_row_lstm_prunes_strips_and_exports(tmp_path):
    torch.manual_seed(0)
    model = RowLSTM(hidden_size=16)
    pruner = prunekit.Pruner(model, 0.9)
    assert pruner.names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc.weight"]
    prunekit.strip(model).eval()
    result = export_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "row_lstm.onnx")
    assert result.max_rel_error <= 1e-4
