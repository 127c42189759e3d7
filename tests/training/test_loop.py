"""prunekit.training.loop: the reproducible training loop and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apps.models import LeNet300100
from prunekit.training.data import load_digits
from prunekit.training.loop import evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_digits("train", flat=True), load_digits("test", flat=True)


def _digits_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet300100(in_features=64)


# -- evaluate -------------------------------------------------------------------------------


def test_evaluate_matches_a_hand_computation():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    X = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])  # logits = X
    y = torch.tensor([0, 0, 1])
    # Cross-entropy by hand: log(sum exp(logits)) - logit of the true class.
    expected_loss = (math.log(1 + math.exp(-2)) + math.log(1 + math.e) + math.log(1 + math.exp(-2))) / 3
    for batch_size in (1, 2, 3, 1000):  # a short last batch must keep its true weight
        result = evaluate(model, X, y, batch_size=batch_size)
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert result["accuracy"] == pytest.approx(2 / 3)  # argmax = [0, 1, 1]


def test_evaluate_runs_in_eval_mode_without_grad_and_restores_mode():
    seen = []
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    X, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    for training in (True, False):
        model.train(training)
        evaluate(model, X, y, batch_size=2)
        assert model.training is training
    assert set(seen) == {(False, False)}


# -- train ----------------------------------------------------------------------------------


def test_train_reduces_loss_and_learns(digits):
    (X_tr, y_tr), (X_te, y_te) = digits
    model = _digits_model()
    before = evaluate(model, X_te, y_te)
    losses = train(model, X_tr, y_tr, epochs=3, batch_size=32,
                   optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), progress=False)
    after = evaluate(model, X_te, y_te)
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert losses[-1] < 0.5 * losses[0]
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.9
    assert after["loss"] < before["loss"] / 4


def test_train_is_reproducible_and_seeded(digits):
    (X_tr, y_tr), _ = digits
    X_tr, y_tr = X_tr[:256], y_tr[:256]

    def run(seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = _digits_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = train(model, X_tr, y_tr, epochs=2, batch_size=16, optimizer=opt, seed=seed, progress=False)
        return losses, model.state_dict()

    (l1, s1), (l2, s2), (l3, s3) = run(0), run(0), run(1)
    assert l1 == l2 and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert l1 != l3  # another seed, another batch order


def test_train_mean_loss_is_per_sample(digits):
    # With lr=0 the model never changes, so the epoch loss must equal evaluate()'s loss.
    (X_tr, y_tr), _ = digits
    X, y = X_tr[:100], y_tr[:100]
    model = _digits_model()
    [loss] = train(model, X, y, epochs=1, batch_size=32, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                   progress=False)
    assert loss == pytest.approx(evaluate(model, X, y)["loss"], rel=1e-5)


def test_train_restores_mode_and_handles_zero_epochs(digits):
    (X_tr, y_tr), _ = digits
    model = _digits_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(model, X_tr, y_tr, epochs=0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    train(model, X_tr[:64], y_tr[:64], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert model.training is False


def test_train_with_an_attached_pruner(digits):
    (X_tr, y_tr), (X_te, y_te) = digits
    model = _digits_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = prunekit.PolynomialDecay(0.3, 0.75, begin_step=0, end_step=40, frequency=10)
    prunekit.Pruner(model, schedule, optimizer=opt)
    losses = train(model, X_tr, y_tr, epochs=2, batch_size=32, optimizer=opt, progress=False)  # 90 steps
    prunekit.strip(model)
    assert all(math.isfinite(v) for v in losses)
    for layer in (model.fc1, model.fc2, model.fc3):
        assert int((layer.weight == 0).sum()) == round(layer.weight.numel() * 0.75)
    assert evaluate(model, X_te, y_te)["accuracy"] > 0.6  # chance: 0.1


def test_train_uses_a_custom_loss(digits):
    (X_tr, y_tr), _ = digits
    calls = []

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(target))
        return logits.pow(2).mean()

    model = _digits_model()
    train(model, X_tr[:50], y_tr[:50], epochs=1, batch_size=20, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
          loss_fn=loss_fn, progress=False)
    assert calls == [20, 20, 10]


def test_progress_bar_on_stderr_only_when_asked(digits, capsys):
    (X_tr, y_tr), _ = digits
    model = _digits_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, X_tr[:64], y_tr[:64], epochs=1, optimizer=opt, progress=False)
    assert capsys.readouterr().err == ""
    train(model, X_tr[:64], y_tr[:64], epochs=1, optimizer=opt, progress=True, desc="warmup")
    assert "warmup" in capsys.readouterr().err
    train(model, X_tr[:64], y_tr[:64], epochs=1, optimizer=opt)  # auto: pytest's stderr is no terminal
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"epochs": -1}, ValueError, "epochs"),
    ({"epochs": 1.0}, TypeError, "epochs"),
    ({"epochs": 1, "batch_size": 0}, ValueError, "batch_size"),
    ({"epochs": 1, "optimizer": None}, TypeError, "optimizer"),
    ({"epochs": 1, "seed": -2}, ValueError, "seed"),
    ({"epochs": 1, "progress": "yes"}, TypeError, "progress"),
])
def test_train_rejects_bad_arguments(kwargs, exc, word):
    model = nn.Linear(2, 2)
    kwargs = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), **kwargs}
    with pytest.raises(exc, match=word):
        train(model, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), **kwargs)


def test_train_and_evaluate_reject_mismatched_data():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same number of samples"):
        train(model, torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), epochs=1,
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="model"):
        evaluate("model", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
