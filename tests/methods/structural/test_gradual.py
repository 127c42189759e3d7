"""Gradual structural pruning: whole units zeroed on a schedule, then removed with the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from structural_zoo import build, rel_err
from torch import nn

from prunekit import PolynomialDecay
from prunekit.methods.structural import StructuredPruner


def _unit_state(pruner: StructuredPruner) -> None:
    """Every unit is either zero in all its member slices, or kept (and then not all zero)."""
    params = dict(pruner.model.named_parameters())
    for group in pruner.groups:
        keep = pruner.keeps[group.name]
        for unit in range(group.size):
            norms = []
            for slot in group.slots:
                name = f"{slot.member.path}.{slot.member.param}"
                if name not in params:
                    continue  # buffers
                idx = torch.nonzero(slot.unit == unit).flatten()
                norms.append(float(params[name].detach().index_select(slot.member.dim, idx).abs().sum()))
            if keep[unit]:
                assert sum(norms) > 0, (group.name, unit)
            else:
                assert norms and all(n == 0 for n in norms), (group.name, unit, norms)


@pytest.mark.parametrize("name,optim", [("resnet", "sgd"), ("mobilenet", "adam"), ("transformer", "sgd"),
                                        ("lstm", "adam")])
def test_masks_are_unit_consistent_and_removal_is_exact(name: str, optim: str) -> None:
    model, x = build(name, 0)
    model.train()
    target = torch.randn(model(x).shape)
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    pruner = StructuredPruner(model, x, PolynomialDecay(0.0, 0.6, 0, 12, frequency=3), optimizer=opt)
    kept_before = None
    for step in range(16):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        if pruner.schedule.should_update(pruner.current_step) or step == 15:
            _unit_state(pruner)
            kept = {k: v.clone() for k, v in pruner.keeps.items()}
            if kept_before is not None:  # units, once removed, stay removed while the target rises
                assert all(not (kept[k] & ~kept_before[k]).any() for k in kept)
            kept_before = kept
    assert any(not k.all() for k in pruner.keeps.values())
    model.eval()
    masked = copy.deepcopy(model)
    pruned, report = pruner.finalize()
    assert report.params_after < report.params_before
    pruned.eval()
    with torch.no_grad():
        for seed in range(3):
            probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            assert rel_err(pruned(probe), masked(probe)) < 1e-5
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


def test_state_dict_round_trip_restores_masks() -> None:
    model, x = build("vgg", 0)
    pruner = StructuredPruner(model, x, 0.5)
    state = pruner.state_dict()
    other_model, _ = build("vgg", 1)
    other = StructuredPruner(other_model, x, PolynomialDecay(0.0, 0.5, 5, 10, frequency=5))
    other.load_state_dict(state)
    assert all(torch.equal(other.keeps[k], v) for k, v in pruner.keeps.items())
    assert {k: v.sum() for k, v in other.masks.items()} == {k: v.sum() for k, v in pruner.masks.items()}
    with pytest.raises(ValueError, match="not a StructuredPruner state"):
        other.load_state_dict({"format": "x"})


def test_rejects_bad_arguments() -> None:
    model, x = build("vgg", 0)
    with pytest.raises(TypeError, match="schedule must be"):
        StructuredPruner(model, x, "half")
    with pytest.raises(ValueError, match="taylor"):
        StructuredPruner(model, x, 0.5, importance="taylor")


def test_refuses_parameters_a_live_pruner_owns() -> None:
    import prunekit

    model, x = build("vgg", 0)
    pruner = prunekit.Pruner(model, 0.5)
    with pytest.raises(ValueError, match=r"StructuredPruner: .* already pruned by another live Pruner"):
        StructuredPruner(model, x, 0.5)
    pruner.remove()  # released: the structural engine may take the model now
    assert StructuredPruner(model, x, 0.5).current_step == 0
