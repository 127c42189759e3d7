"""``prune_oneshot`` never leaves a layer dense in silence when a sparsity mapping or ``layers`` asks for it.

Layers outside the blocks (an embedding projection, the head) are calibrated by no
block; a plain sparsity (or the catch-all key ``"*"``) leaves them dense and lists
them in ``skipped``, but a mapping key that selects them (an :class:`~prunekit.Allocation`
over the whole model, a glob naming the head) raises, naming the layers and the ways out.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunekit import allocate
from prunekit.methods.oneshot import prune_oneshot

from .test_prune import toy

SEEDS = [0, 1, 2]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity,named", [
    ({"blocks.*": 0.5, "head": 0.5}, ["head"]),
    ({"embed": 0.3, "*": 0.5}, ["embed"]),
    ({"*.weight": 0.5}, ["embed", "head"]),  # a glob over weight names reaches them too
])
def test_mapping_key_outside_the_blocks_raises_and_leaves_the_model(seed, sparsity, named):
    model, samples = toy(seed)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="outside the blocks") as info:
        prune_oneshot(model, samples, method="wanda", sparsity=sparsity, progress=False)
    message = str(info.value)
    assert message.startswith(f"prune_oneshot: {', '.join(named)} {'lies' if len(named) == 1 else 'lie'} outside")
    assert "blocks=False" in message and "sparsity mapping" in message
    assert _same(model, before)  # nothing pruned before the refusal


@pytest.mark.parametrize("seed", SEEDS)
def test_allocation_over_the_whole_model_raises_over_the_blocks_works(seed):
    model, samples = toy(seed)
    whole = allocate(model, 0.5, "erk")  # the output layer is out of scope by default: the input projection is not
    with pytest.raises(ValueError, match=r"embed lies outside the blocks.*'embed.weight'.*allocate\(\.\.\., layers="):
        prune_oneshot(model, samples, method="wanda", sparsity=whole, progress=False)
    alloc = allocate(model, 0.5, "erk", layers=["blocks"])
    report = prune_oneshot(model, samples, method="wanda", sparsity=alloc, progress=False)
    zeros = sum(int(model.get_submodule(n.removesuffix(".weight")).weight.eq(0).sum()) for n in alloc.names)
    assert zeros == alloc.pruned and report.skipped == []  # independent count; the others match no key
    assert all(int(torch.count_nonzero(m.weight)) == m.weight.numel() for m in (model.embed, model.head))


@pytest.mark.parametrize("seed", SEEDS)
def test_catch_all_still_leaves_them_dense_like_a_plain_sparsity(seed):
    model, samples = toy(seed)
    plain = copy.deepcopy(model)
    report = prune_oneshot(model, samples, method="wanda", sparsity={"*": 0.5}, progress=False)
    want = prune_oneshot(plain, samples, method="wanda", sparsity=0.5, progress=False)
    assert report.skipped == want.skipped == ["embed", "head"] and _same(model, plain)


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_target_and_one_pass_are_allowed(seed):
    model, samples = toy(seed)
    report = prune_oneshot(model, samples, method="wanda", sparsity={"head": 0.0, "*": 0.5}, progress=False)
    assert "head" not in {r.name for r in report.layers}  # a zero target selects nothing
    model, samples = toy(seed)
    report = prune_oneshot(model, samples, method="wanda", sparsity={"blocks.*": 0.5, "head": 0.5}, blocks=False,
                           progress=False)
    assert int(model.head.weight.eq(0).sum()) == model.head.weight.numel() // 2
    assert report.skipped == []


def test_explicit_layers_still_raise():
    model, samples = toy(0)
    with pytest.raises(ValueError, match="head lies outside the blocks but layers= selects it"):
        prune_oneshot(model, samples, method="wanda", layers=["head", "blocks"], progress=False)
