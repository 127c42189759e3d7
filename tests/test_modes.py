"""prunekit._modes.in_mode: every module's own train/eval flag comes back exactly, exception or not."""

from __future__ import annotations

import pytest
from torch import nn

from prunekit._modes import in_mode


def _mixed() -> nn.Module:
    # A training model with parts deliberately in eval mode: a frozen BatchNorm and a nested block.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(), nn.Linear(4, 2))).train()
    model[1].eval()
    model[2][0].eval()
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("training", [False, True])
def test_mixed_modes_come_back_exactly(training):
    model = _mixed()
    before = _flags(model)
    with in_mode(model, training=training) as inside:
        assert inside is model
        assert set(_flags(model).values()) == {training}
    assert _flags(model) == before


def test_modes_come_back_after_an_exception():
    model = _mixed()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="boom"):
        with in_mode(model, training=False):
            raise RuntimeError("boom")
    assert _flags(model) == before


def test_an_overridden_train_method_cannot_move_the_restored_flags():
    class FrozenNorm(nn.BatchNorm1d):
        def train(self, mode: bool = True) -> "FrozenNorm":
            return super().train(False)  # always eval, the usual way to freeze statistics

    model = nn.Sequential(nn.Linear(2, 2), FrozenNorm(2)).train()
    before = _flags(model)
    with in_mode(model, training=False):
        pass
    assert _flags(model) == before == {"": True, "0": True, "1": False}


def test_denormals_flushed_inside_and_restored_after_even_on_error():
    import torch

    from prunekit._modes import _flushing_denormals, denormals_flushed

    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)  # the smallest positive denormal
    assert not _flushing_denormals() and (tiny * 1.0).item() > 0
    with pytest.raises(RuntimeError, match="inside"), denormals_flushed():
        assert _flushing_denormals() and (tiny * 1.0).item() == 0.0
        raise RuntimeError("inside")
    assert not _flushing_denormals() and (tiny * 1.0).item() > 0
    torch.set_flush_denormal(True)  # a caller that flushes already keeps flushing afterwards
    try:
        with denormals_flushed():
            pass
        assert _flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
