"""The one mask keeper (prunekit.core.masks): manual masks, ownership, versioned state, old checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import MaskKeeper, PolynomialDecay, Pruner, StructuredPruner

V1 = Path(__file__).with_name("data") / "pruner_v1.pt"


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _random_mask(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4


def test_checkpoint_of_the_previous_release_resumes_bit_identically():
    """tests/core/data/pruner_v1.pt was written by prunekit 0.1.0 before the keeper existed (Pruner state v1)."""
    ckpt = torch.load(V1, weights_only=True)
    assert ckpt["pruner"]["format"] == "prunekit.Pruner" and ckpt["pruner"]["version"] == 1
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner = Pruner(model, PolynomialDecay(0.2, 0.7, begin_step=2, end_step=10, frequency=2), optimizer=opt)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    pruner.load_state_dict(ckpt["pruner"])
    assert pruner.current_step == 5
    _train(model, opt, ckpt["data"][5:])
    assert pruner.current_step == 16
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["final"][name]), name
    for name, mask in pruner.masks.items():
        assert torch.equal(mask, ckpt["final_masks"][name]), name
    assert any(not m.all() for m in pruner.masks.values())  # the masks the run reached are not trivial


def test_checkpoint_negative_control_without_the_pruner_state_differs():
    ckpt = torch.load(V1, weights_only=True)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    Pruner(model, PolynomialDecay(0.2, 0.7, begin_step=2, end_step=10, frequency=2), optimizer=opt)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])  # pruner left at step 0: its schedule replays from the start
    _train(model, opt, ckpt["data"][5:])
    assert any(not torch.equal(v, ckpt["final"][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("engine", ["pruner", "keeper", "structured"])
def test_unknown_state_versions_are_refused_with_the_version(engine):
    model = _mlp()
    if engine == "pruner":
        owner = Pruner(model, 0.5)
    elif engine == "keeper":
        owner = MaskKeeper(model, ["0.weight"])
    else:
        owner = StructuredPruner(model, torch.randn(1, 6), 0.5)
    state = owner.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="99"):
        owner.load_state_dict(state)


def test_structured_pruner_state_written_before_versioning_loads():
    model = _mlp()
    pruner = StructuredPruner(model, torch.randn(1, 6), 0.5)
    state = pruner.state_dict()
    del state["version"]  # the layout of earlier releases: same keys, no version
    other = StructuredPruner(_mlp(1), torch.randn(1, 6), 0.0)
    other.load_state_dict(state)
    assert {k: v.tolist() for k, v in other.keeps.items()} == {k: v.tolist() for k, v in pruner.keeps.items()}


def test_keeper_masks_any_parameter_and_keeps_it_through_training():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    keeper = MaskKeeper(model, ["0.weight", "0.bias"], optimizer=opt)
    masks = {"0.weight": _random_mask((12, 6), 1), "0.bias": _random_mask((12,), 2)}
    keeper.set_masks(masks)
    g = torch.Generator().manual_seed(3)
    _train(model, opt, [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)])
    for name, param in model.named_parameters():
        if name in masks:
            assert torch.equal(param[~masks[name]], torch.zeros_like(param[~masks[name]])), name
            assert bool((param[masks[name]] != 0).all()), name  # kept entries trained
            momentum = opt.state[param]["momentum_buffer"]
            assert torch.equal(momentum[~masks[name]], torch.zeros_like(momentum[~masks[name]]))
    assert keeper.names == ["0.weight", "0.bias"]


def test_keeper_tied_weight_is_one_mask_by_either_name():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    keeper = MaskKeeper(model, ["head.weight", "emb.weight"])
    assert keeper.names == ["emb.weight"]
    keeper.set_masks({"head.weight": _random_mask((10, 4), 4)})
    assert torch.equal(keeper.masks["emb.weight"], _random_mask((10, 4), 4))


@pytest.mark.parametrize("bad,exc,match", [
    (["nope.weight"], ValueError, "'nope.weight' is not a parameter"),
    ([3], TypeError, "must be str"),
    ([], ValueError, "no parameter to mask"),
])
def test_keeper_rejects_bad_names(bad, exc, match):
    with pytest.raises(exc, match=match):
        MaskKeeper(_mlp(), bad)


def test_keeper_rejects_bad_masks_and_leaves_weights_alone():
    model = _mlp()
    keeper = MaskKeeper(model, ["0.weight"])
    before = model[0].weight.detach().clone()
    for bad in (torch.ones(12, 6), torch.ones(6, 12, dtype=torch.bool), "mask"):
        with pytest.raises(ValueError, match="must be a bool tensor of shape"):
            keeper.set_masks({"0.weight": bad})
    with pytest.raises(KeyError, match="not masked here"):
        keeper.set_masks({"2.weight": torch.ones(3, 12, dtype=torch.bool)})
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("second", ["keeper", "pruner", "structured"])
def test_two_live_engines_over_one_parameter_are_refused(second):
    model = _mlp()
    first = MaskKeeper(model, ["0.weight"])
    with pytest.raises(ValueError, match="already pruned by another live MaskKeeper"):
        if second == "keeper":
            MaskKeeper(model, ["0.weight"])
        elif second == "pruner":
            Pruner(model, 0.5)
        else:
            StructuredPruner(model, torch.randn(1, 6), 0.5)
    first.remove()
    Pruner(model, 0.5)  # released: a new engine may take it


def test_keeper_state_round_trip_into_a_fresh_keeper():
    model = _mlp()
    keeper = MaskKeeper(model, ["0.weight", "2.weight"])
    keeper.set_masks({"0.weight": _random_mask((12, 6), 5), "2.weight": _random_mask((3, 12), 6)})
    state = keeper.state_dict()
    assert state["format"] == "prunekit.MaskKeeper" and state["version"] == 1
    copy_model = copy.deepcopy(model)
    prunekit.strip(model)
    fresh = MaskKeeper(copy_model, ["0.weight", "2.weight"])
    fresh.load_state_dict(state)
    for name in state["masks"]:
        assert torch.equal(fresh.masks[name], state["masks"][name])
    with pytest.raises(ValueError, match="missing \\['2.weight'\\]"):
        fresh.load_state_dict({**state, "masks": {"0.weight": state["masks"]["0.weight"]}})
    with pytest.raises(ValueError, match="not a prunekit MaskKeeper state"):
        fresh.load_state_dict({"masks": state["masks"]})


def test_manual_pruner_never_changes_masks_on_its_own():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner.manual(model, overrides={"2": 0.25}, optimizer=opt)
    assert all(bool(m.all()) for m in pruner.masks.values())
    pruner.update_masks(0.5)
    first = pruner.masks
    assert [int((~m).sum()) for m in first.values()] == [36, 9]
    g = torch.Generator().manual_seed(7)
    _train(model, opt, [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)])
    assert pruner.current_step == 4
    assert all(torch.equal(first[k], v) for k, v in pruner.masks.items())


def test_manual_pruner_needs_a_target():
    pruner = Pruner.manual(_mlp())
    with pytest.raises(ValueError, match="manual .* pass a sparsity"):
        pruner.update_masks()
    with pytest.raises(ValueError, match="fixed float targets only"):
        Pruner.manual(_mlp(1), overrides={"2": PolynomialDecay(0.1, 0.5, 0, 10, frequency=1)})


def test_manual_pruner_set_masks_records_the_sparsity():
    model = _mlp()
    pruner = Pruner.manual(model)
    mask = torch.arange(72).reshape(12, 6) % 4 != 0
    pruner.set_masks({"0.weight": mask})
    assert pruner.target_sparsity("0.weight") == 0.25
    assert torch.equal(model[0].weight == 0, ~mask | (model[0].weight == 0))


def test_no_never_firing_schedules_remain():
    source = Path(prunekit.__file__).parent
    hits = [str(p.relative_to(source)) for p in source.rglob("*.py") if "2**62" in p.read_text()
            and p.name != "manifest.py"]  # manifest bounds tensor dimensions with it, not a schedule
    assert hits == []
