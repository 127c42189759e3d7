"""``prune_oneshot``: block-by-block propagation of pruned outputs, selection, in-place zeros, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.core.granularity import prune_count
from prunekit.methods.oneshot import find_blocks, prune_oneshot
from prunekit.methods.oneshot.solvers import Target, sparsegpt_prune, wanda_prune


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h + scale * self.fc2(torch.relu(self.fc1(h)))


class Toy(nn.Module):
    """Embedding Linear, a ModuleList of residual blocks (with a keyword argument), a head."""

    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(d, d), nn.Linear(d, 4)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=torch.tensor(scale))
        return self.head(h)


def toy(seed: int) -> tuple[Toy, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = Toy()
    samples = [{"x": torch.randn(5, 7, 16), "scale": 0.5} for _ in range(3)]
    return model, samples


def gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0]


def reference(model: Toy, samples, method: str, target: Target, propagate_pruned: bool) -> Toy:
    """Prune a copy block by block by hand; the next block's inputs come from the pruned or the dense block."""
    pruned, dense = copy.deepcopy(model), copy.deepcopy(model)
    scale = torch.tensor(samples[0]["scale"])
    with torch.no_grad():
        hs = [pruned.embed(s["x"]) for s in samples]
        for block, dense_block in zip(pruned.blocks, dense.blocks):
            inputs = {"fc1": torch.cat(hs), "fc2": torch.relu(block.fc1(torch.cat(hs)))}
            for name, x in inputs.items():
                layer = getattr(block, name)
                solver = wanda_prune if method == "wanda" else sparsegpt_prune
                layer.weight.copy_(solver(layer.weight, gram(x), target)[0])
            hs = [(block if propagate_pruned else dense_block)(h, scale=scale) for h in hs]
    return pruned


def block_weights(model: Toy) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if n.startswith("blocks") and "weight" in n]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.6, "2:4"])
def test_blocks_see_pruned_outputs_of_previous_blocks(seed, method, sparsity):
    model, samples = toy(seed)
    expected = block_weights(reference(model, samples, method, Target.parse(sparsity), propagate_pruned=True))
    from_dense = block_weights(reference(model, samples, method, Target.parse(sparsity), propagate_pruned=False))
    report = prune_oneshot(model, samples, method=method, sparsity=sparsity, progress=False)
    got = block_weights(model)
    assert report.blocks == "blocks" and report.skipped == ["embed", "head"]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    # the check can tell: inputs taken from the dense model give other weights after the first block
    assert not all(torch.allclose(g, d, atol=1e-5) for g, d in zip(got[2:], from_dense[2:]))


def test_one_pass_without_blocks_uses_dense_inputs():
    model, samples = toy(0)
    dense = copy.deepcopy(model)
    prune_oneshot(model, samples, method="sparsegpt", sparsity=0.5, blocks=False, progress=False)
    scale = torch.tensor(0.5)
    with torch.no_grad():
        hs = [dense.embed(s["x"]) for s in samples]
        for i, block in enumerate(dense.blocks):
            x = torch.cat(hs)
            for name, inp in (("fc1", x), ("fc2", torch.relu(block.fc1(x)))):
                want = sparsegpt_prune(getattr(block, name).weight, gram(inp), Target.parse(0.5))[0]
                torch.testing.assert_close(getattr(model.blocks[i], name).weight, want, rtol=0, atol=1e-5)
            hs = [block(h, scale=scale) for h in hs]
    assert model.embed.weight.eq(0).float().mean() == 0.5  # every Linear in the one pass


def test_model_keeps_its_parameters_keys_and_modes():
    model, samples = toy(0)
    model.train()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = prune_oneshot(model, samples, method="wanda", sparsity=0.5, progress=False)
    assert list(model.state_dict()) == keys and model.training
    assert all(p is params[n] for n, p in model.named_parameters())  # in place, no wrappers
    for r in report.layers:
        weight = model.get_submodule(r.name).weight
        assert r.sparsity == 0.5 == weight.eq(0).float().mean().item()
        assert r.error is not None and 0 < r.error < 1
    assert report.sparsity == 0.5 and report.samples == 3


def test_sparsity_mapping_layers_and_exclude():
    model, samples = toy(0)
    report = prune_oneshot(model, samples, method="magnitude", progress=False,
                           sparsity={"blocks.0.*": 0.7, "blocks.1.*": "2:4"}, exclude="*.fc2")
    got = {r.name: (r.target, r.sparsity) for r in report.layers}
    assert got == {"blocks.0.fc1": ("0.7", prune_count(32 * 16, 0.7) / (32 * 16)), "blocks.1.fc1": ("2:4", 0.5)}
    assert model.blocks[2].fc1.weight.ne(0).all() and model.blocks[0].fc2.weight.ne(0).all()


def test_magnitude_without_calibration():
    model, _ = toy(0)
    report = prune_oneshot(model, None, method="magnitude", sparsity=0.25, progress=False)
    assert [r.error for r in report.layers] == [None] * 8 and report.sparsity == 0.25  # no blocks: every Linear


def test_result_saves_and_loads(tmp_path):
    model, samples = toy(1)
    prune_oneshot(model, samples, method="sparsegpt", sparsity="2:4", progress=False)
    prunekit.save(model, tmp_path / "m.pkt")
    fresh = Toy()
    prunekit.load(tmp_path / "m.pkt", fresh)
    for (n, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), n


def test_find_blocks_takes_lists_of_composite_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2)])
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
            self.big = nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(2))

    assert [name for name, _ in find_blocks(Net())] == ["big"] and find_blocks(nn.Linear(2, 2)) == []


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": "obs"}, ValueError, "method"),
    ({"sparsity": "3:2"}, ValueError, "n must be < m"),
    ({"layers": "nothing.*"}, ValueError, "no prunable layer .* matches 'nothing"),
    ({"layers": "head"}, ValueError, "outside the blocks"),
    ({"blocks": "embed"}, ValueError, "ModuleList"),
    ({"blocks": "missing"}, ValueError, "not a submodule"),
    ({"method": "sparsegpt", "sparsity": "2:4", "blocksize": 6}, ValueError, "blocksize"),
    ({"exclude": 3}, TypeError, "exclude"),
])
def test_bad_arguments(kwargs, error, match):
    model, samples = toy(0)
    with pytest.raises(error, match=match):
        prune_oneshot(model, samples, progress=False, **kwargs)


@pytest.mark.parametrize("calibration,error", [(None, ValueError), ([], ValueError), (torch.ones(3), TypeError)])
def test_bad_calibration(calibration, error):
    model, _ = toy(0)
    with pytest.raises(error, match="calibration"):
        prune_oneshot(model, calibration, method="wanda", progress=False)


def test_result_runs_through_accelerate():
    model, samples = toy(2)
    prune_oneshot(model, samples, method="sparsegpt", sparsity=0.9, progress=False)
    example = {"x": torch.randn(5, 7, 16), "scale": 0.5}
    fast, report = prunekit.accelerate(model, example, repeats=2, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(**example), model(**example), rtol=1e-5, atol=1e-6)
    assert len(report.layers) == 8
