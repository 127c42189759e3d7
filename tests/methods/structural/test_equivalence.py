"""Golden tests: zeroing whole coupled units equals removing them, on a zoo of architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from structural_zoo import ZOO, build, reference_macs, rel_err
from torch import nn

from prunekit.methods.structural import build_graph, find_groups, param_masks, prune_channels, select_units
from prunekit.methods.structural.prune import score_groups

CASES = [(name, seed, sparsity, importance)
         for name in ZOO
         for seed, sparsity, importance in ((0, 0.3, "l2"), (1, 0.5, "l1"), (2, 0.7, "bn"), (3, 0.5, "taylor"))]


def _loss(x: torch.Tensor):
    return lambda model: model(x).square().mean()


def masked_copy(model: nn.Module, x: torch.Tensor, sparsity: float, importance: str) -> nn.Module:
    """The dense model with every removed unit's slices set to zero (the oracle)."""
    model = copy.deepcopy(model)
    graph = build_graph(model, x)
    groups = find_groups(graph)
    if importance == "taylor":
        _loss(x)(model).backward()
    keeps = {name: select_units(s, sparsity) for name, s in score_groups(model, groups, importance).items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in param_masks(graph, groups, keeps).items():
            params[name].mul_(mask)
    return model


@pytest.mark.parametrize("name,seed,sparsity,importance", CASES,
                         ids=[f"{c[0]}-s{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_removal_equals_masking(name: str, seed: int, sparsity: float, importance: str) -> None:
    model, x = build(name, seed)
    oracle = masked_copy(model, x, sparsity, importance)
    loss_fn = _loss(x) if importance == "taylor" else None
    pruned, report = prune_channels(copy.deepcopy(model), x, sparsity, importance=importance, loss_fn=loss_fn)
    pruned.eval()
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        assert rel_err(oracle(x), model(x)) > 1e-3  # the masks really change the function
        for _ in range(3):
            probe = torch.randn(x.shape, generator=generator)
            assert rel_err(pruned(probe), oracle(probe)) < 1e-5
    params = sum(p.numel() for p in pruned.parameters())
    assert params == report.params_after < report.params_before == sum(p.numel() for p in model.parameters())
    assert report.macs_after < report.macs_before
    assert all(1 <= g.kept <= g.total for g in report.groups)
    assert any(g.kept < g.total for g in report.groups)


@pytest.mark.parametrize("name", ["vgg", "resnet", "densenet", "mobilenet"])
def test_macs_match_independent_count(name: str) -> None:
    model, x = build(name, 0)
    before = reference_macs(model, x)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5)
    assert report.macs_before == before
    assert report.macs_after == reference_macs(pruned, x) < before


@pytest.mark.parametrize("name", list(ZOO))
def test_outputs_and_inputs_keep_their_shape(name: str) -> None:
    model, x = build(name, 0)
    pruned, _ = prune_channels(copy.deepcopy(model), x, 0.9)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    first = next(m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    last = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    assert getattr(first, "in_channels", getattr(first, "in_features", None)) == x.shape[1 if x.ndim == 4 else -1]
    assert last.out_features == model(x).shape[-1]
