"""prunekit.training.loop.run_loop: the one loop under train, recipe phases and lottery trainings, and its hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.apps.recipe.loop import Phase, run_phase
from prunekit.methods.lottery.config import TrainSpec
from prunekit.methods.lottery.data import LotteryData
from prunekit.methods.lottery.train import train_early_stopping
from prunekit.training.checkpoint import Checkpoints
from prunekit.training.loop import LoopOptions, Position, run_loop, train

SAMPLES, BATCH = 50, 8  # 7 batches per epoch, the last one short


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))  # dropout: uses the RNG


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, 6, generator=gen), torch.randint(0, 3, (SAMPLES,), generator=gen)


def _run(X, y, options, **hooks) -> tuple[Position, dict[str, torch.Tensor]]:
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    pos = run_loop(model, opt, X, y, options, **hooks)
    return pos, model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_callbacks_see_every_step_after_the_epoch_is_closed(data):
    seen = []
    pos, _ = _run(*data, LoopOptions(batch_size=BATCH, epochs=2),
                  callbacks=[lambda m, p: seen.append((p.step, p.epoch, p.batch, m.training))])
    assert [s[0] for s in seen] == list(range(1, 15))
    assert seen[6] == (7, 1, 0, True) and seen[7] == (8, 1, 1, True)  # the 7th step closes epoch 0
    assert (pos.epoch, pos.batch, pos.step, len(pos.epoch_losses)) == (2, 0, 14, 2)


def test_max_steps_stops_mid_epoch_and_crosses_epochs(data):
    pos, weights = _run(*data, LoopOptions(batch_size=BATCH, max_steps=10))
    assert (pos.epoch, pos.batch, pos.step) == (1, 3, 10)
    both, weights_both = _run(*data, LoopOptions(batch_size=BATCH, epochs=5, max_steps=10))
    assert both == pos and _same(weights, weights_both)  # whichever bound comes first
    short, _ = _run(*data, LoopOptions(batch_size=BATCH, epochs=1, max_steps=10))
    assert short.step == 7
    with pytest.raises(ValueError, match="epochs, max_steps"):
        LoopOptions(batch_size=BATCH)


@pytest.mark.parametrize("cut", [1, 6, 7, 9, 14])
def test_resume_from_any_step_is_bit_identical(data, tmp_path, cut):
    X, y = data
    whole, reference = _run(X, y, LoopOptions(batch_size=BATCH, epochs=3))
    path = tmp_path / "ckpt.safetensors"
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    run_loop(model, opt, X, y, LoopOptions(batch_size=BATCH, max_steps=cut),
             callbacks=[Checkpoints(path, opt, every=1)])
    torch.manual_seed(123)  # whatever the RNG holds now, the checkpoint's state is restored
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    checkpoints = Checkpoints(path, opt, every=1)
    start = checkpoints.resume(model)
    assert start is not None and start.step == cut
    pos = run_loop(model, opt, X, y, LoopOptions(batch_size=BATCH, epochs=3), start=start, callbacks=[checkpoints])
    assert start.step == cut  # the start position is not modified
    assert pos == whole and _same(model.state_dict(), reference)


def test_resume_finds_nothing_to_resume(tmp_path):
    model = _net()
    assert Checkpoints(tmp_path / "none.safetensors", torch.optim.SGD(model.parameters(), lr=0.1)).resume(model) is None


def test_the_adapters_all_run_the_same_loop(data):
    X, y = data
    pos, reference = _run(X, y, LoopOptions(batch_size=BATCH, seed=3, epochs=2))

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _net()
        torch.manual_seed(5)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = fresh()
    assert train(model, X, y, epochs=2, batch_size=BATCH, optimizer=opt, seed=3, progress=False) == pos.epoch_losses
    assert _same(model.state_dict(), reference)
    model, opt = fresh()
    assert run_phase(model, opt, X, y, Phase(2, BATCH, 3))["epoch_losses"] == pos.epoch_losses
    assert _same(model.state_dict(), reference)
    model, opt = fresh()
    lottery = LotteryData(X, y, X[:10], y[:10], X[:10], y[:10])
    out = train_early_stopping(model, opt, lottery, TrainSpec(iterations=14, batch_size=BATCH, eval_every=5), seed=3,
                               capture_at=7)
    assert [p["iteration"] for p in out.curve] == [5, 10, 14]
    assert _same(model.state_dict(), reference)
    _, after_7 = _run(X, y, LoopOptions(batch_size=BATCH, seed=3, max_steps=7))
    assert out.captured is not None and _same(out.captured, after_7)


def test_every_modules_own_mode_comes_back(data):
    model = _net().train()
    model[2].eval()  # dropout deliberately off
    seen = []
    run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), *data, LoopOptions(batch_size=BATCH, max_steps=2),
             callbacks=[lambda m, p: seen.append(m[2].training)])
    assert seen == [True, True]  # training mode while training
    assert model.training and model[0].training and not model[2].training


def test_nothing_to_run_is_an_error_not_an_endless_loop(data):
    X, y = data
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError):  # the sampler refuses empty data already
        run_loop(model, opt, X[:0], y[:0], LoopOptions(batch_size=BATCH, epochs=1))
    with pytest.raises(ValueError, match="past the end of the epoch: batch 9"):
        run_loop(model, opt, X, y, LoopOptions(batch_size=BATCH, epochs=1), start=Position(batch=9))
