"""prunekit.sensitivity: each layer pruned alone over a grid, the model restored bit for bit; checked by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit import NM, Channels, Magnitude, Pruner, SensitivityResult, Taylor, sensitivity
from prunekit.apps.models import LeNet5, LeNet300100
from prunekit.methods.sensitivity import DEFAULT_SPARSITIES

GRID = (0.0, 0.25, 0.5, 0.9)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet300100(num_classes=4, in_features=12)


def lenet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet5(num_classes=4)


def data_for(model: nn.Module, seed: int, n: int = 48):
    g = torch.Generator().manual_seed(1000 + seed)
    shape = (n, 12) if isinstance(model, LeNet300100) else (n, 1, 28, 28)
    return torch.randn(shape, generator=g), torch.randint(0, 4, (n,), generator=g)


def loss_of(X, y):
    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(X), y))
    return evaluate


def magnitude_pruned(model: nn.Module, names: list[str], sparsity: float) -> nn.Module:
    """A copy with each named weight pruned by hand: keep the n - round(n*s) largest |w| (torch.topk)."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name in names:
            w = params[name]
            n = w.numel()
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.topk(w.abs().flatten(), n - round(n * sparsity)).indices] = True
            w.mul_(keep.reshape(w.shape))
    return out


def full_state(model: nn.Module) -> dict:
    """Everything sensitivity promises to put back: values, storage, grads, requires_grad, buffers, modes."""
    return {
        "params": {n: (p.detach().clone(), p.data_ptr(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b.data_ptr()) for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    now = full_state(model)
    assert now["modes"] == before["modes"]
    assert now["params"].keys() == before["params"].keys() and now["buffers"].keys() == before["buffers"].keys()
    for name, (value, ptr, requires_grad, grad) in before["params"].items():
        v, p, r, g = now["params"][name]
        assert torch.equal(v, value) and v.dtype == value.dtype and p == ptr and r == requires_grad, name
        assert (g is None) == (grad is None) and (grad is None or torch.equal(g, grad)), name
    for name, (value, ptr) in before["buffers"].items():
        assert torch.equal(now["buffers"][name][0], value) and now["buffers"][name][1] == ptr, name


# -- the curves equal an independent computation ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [mlp, lenet], ids=["mlp", "lenet5"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_equal_pruning_a_copy_by_hand(make, seed, single_thread):
    model = make(seed)
    X, y = data_for(model, seed)
    evaluate = loss_of(X, y)
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    result = sensitivity(model, evaluate, sparsities=GRID, higher_is_better=False, progress=False)
    assert result.layers == names and result.sparsities == list(GRID)
    assert result.dense == evaluate(model)
    for name in names:
        expected = [(s, evaluate(magnitude_pruned(model, [name], s))) for s in GRID]
        assert result.curves[name] == expected, name
        assert result.sizes[name] == dict(model.named_parameters())[name].numel()
    assert result.evaluations == 1 + len(names) * len(GRID) and result.seconds >= 0
    # Negative control: the hand reference does distinguish sparsities (a constant curve would pass otherwise).
    assert len({m for _, m in result.curves[names[0]]}) == len(GRID)


def test_every_evaluation_sees_exactly_one_layer_pruned_and_the_rest_dense(single_thread):
    model = lenet(3)
    X, y = data_for(model, 3)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    calls = []

    def evaluate(m: nn.Module) -> float:
        changed = {n: p for n, p in m.named_parameters() if not torch.equal(p, dense[n])}
        calls.append({n: int((p == 0).sum() - (dense[n] == 0).sum()) for n, p in changed.items()})
        for n, p in changed.items():  # only zeros were written, into the pruned layer
            assert torch.equal(p[p != 0], dense[n][p != 0])
        return float(nn.functional.cross_entropy(m(X), y).detach())

    sensitivity(model, evaluate, sparsities=(0.3, 0.6), progress=False)
    expected = [{}] + [{n: round(dense[n].numel() * s)} for n in names for s in (0.3, 0.6)]
    assert calls == expected  # a leftover from the previous trial would show up as a second layer


# -- restoring the model ---------------------------------------------------------------------------------------------


class Odd(nn.Module):
    """BatchNorm (buffers), dropout, a frozen layer, a submodule kept in eval mode, grads already present."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.fc2.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x)))))))


def odd_model(seed: int = 0):
    torch.manual_seed(seed)
    model = Odd().train()
    model.drop.eval()
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(X), y).backward()  # grads present before the analysis
    return model, X, y


def meddling(X, y, *, fail_at: int | None = None):
    """An evaluate that changes everything it can: modes, BN statistics, grads, requires_grad, dtype; may raise."""
    count = [0]

    def evaluate(model: nn.Module) -> float:
        count[0] += 1
        model.train()
        loss = nn.functional.cross_entropy(model(X), y)  # updates the running statistics
        for p in model.parameters():
            p.requires_grad_(True)
        loss.backward()
        if fail_at is not None and count[0] == fail_at:
            raise RuntimeError("evaluation broke")
        model.double()
        return float(loss.detach())

    return evaluate, count


@pytest.mark.parametrize("seed", [0, 1])
def test_model_restored_bit_for_bit_after_a_meddling_evaluate(seed):
    model, X, y = odd_model(seed)
    before = full_state(model)
    evaluate, count = meddling(X, y)
    result = sensitivity(model, evaluate, sparsities=(0.2, 0.7), progress=False)
    assert count[0] == result.evaluations == 1 + 3 * 2
    assert_same_state(model, before)
    # Negative control: the same evaluate without sensitivity's restore does change the state.
    meddling(X, y)[0](model)
    with pytest.raises(AssertionError):
        assert_same_state(model, before)


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_an_evaluate_that_raises_leaves_the_model_restored_and_unowned(fail_at):
    model, X, y = odd_model()
    before = full_state(model)
    evaluate, _ = meddling(X, y, fail_at=fail_at)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        sensitivity(model, evaluate, sparsities=(0.5, 0.9), progress=False)
    assert_same_state(model, before)
    Pruner(model, 0.5).remove()  # no hook or ownership left behind


def test_a_layer_the_granularity_cannot_prune_leaves_the_model_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    before = full_state(model)
    with pytest.raises(ValueError, match=r"layer '4.weight' at sparsity 0.5: .*NM"):
        sensitivity(model, lambda m: 0.0, sparsities=(0.5,), granularity=NM(2, 4), progress=False)
    assert_same_state(model, before)


# -- groups, ranking, granularity, data-driven criteria --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_groups_are_pruned_together(seed, single_thread):
    model = lenet(seed)
    X, y = data_for(model, seed)
    evaluate = loss_of(X, y)
    groups = {"convs": [nn.Conv2d], "hidden": ["fc1", "fc2"]}
    result = sensitivity(model, evaluate, groups=groups, sparsities=(0.4, 0.8), progress=False)
    assert result.layers == ["convs", "hidden"]
    assert result.parameters == {"convs": ("conv1.weight", "conv2.weight"), "hidden": ("fc1.weight", "fc2.weight")}
    params = dict(model.named_parameters())
    assert result.sizes["hidden"] == params["fc1.weight"].numel() + params["fc2.weight"].numel()
    for name, members in result.parameters.items():
        assert result.curves[name] == [(s, evaluate(magnitude_pruned(model, list(members), s))) for s in (0.4, 0.8)]
    unnamed = sensitivity(model, evaluate, groups=[["fc3"], ["conv1", "fc1"]], sparsities=(0.5,), progress=False)
    assert unnamed.layers == ["fc3.weight", "conv1.weight+fc1.weight"]
    # exclude applies across groups: here it removes fc2 from one group and touches the other not at all.
    partial = sensitivity(model, evaluate, groups=groups, exclude=["fc2"], sparsities=(0.4,), progress=False)
    assert partial.parameters == {"convs": ("conv1.weight", "conv2.weight"), "hidden": ("fc1.weight",)}
    assert partial.curves["hidden"] == [(0.4, evaluate(magnitude_pruned(model, ["fc1.weight"], 0.4)))]


def test_global_ranking_within_a_group_ranks_across_its_layers(single_thread):
    model = mlp(4)
    X, y = data_for(model, 4)
    evaluate = loss_of(X, y)
    result = sensitivity(model, evaluate, groups={"all": ["fc1", "fc2"]}, ranking="global", sparsities=(0.6,),
                         progress=False)
    ref = copy.deepcopy(model)
    ws = [ref.fc1.weight, ref.fc2.weight]
    flat = torch.cat([w.detach().abs().flatten() for w in ws])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, flat.numel() - round(flat.numel() * 0.6)).indices] = True
    with torch.no_grad():
        for w, k in zip(ws, keep.split([w.numel() for w in ws])):
            w.mul_(k.reshape(w.shape))
    assert result.curves["all"] == [(0.6, evaluate(ref))]
    assert result.curves["all"] != [(0.6, evaluate(magnitude_pruned(model, ["fc1.weight", "fc2.weight"], 0.6)))]


def test_channels_granularity_removes_whole_output_rows(single_thread):
    model = mlp(5)
    X, y = data_for(model, 5)
    rows = []

    def evaluate(m: nn.Module) -> float:
        rows.append(int((m.fc1.weight.abs().sum(1) == 0).sum()))
        return loss_of(X, y)(m)

    sensitivity(model, evaluate, layers=["fc1"], granularity=Channels(), sparsities=(0.25, 0.5), progress=False)
    n = model.fc1.weight.shape[0]
    assert rows == [0, round(n * 0.25), round(n * 0.5)]


@pytest.mark.parametrize("seed", [0, 1])
def test_taylor_criterion_matches_hand_computed_first_order_saliency(seed, single_thread):
    model = mlp(seed)
    X, y = data_for(model, seed)
    evaluate = loss_of(X, y)
    criterion = Taylor([(X, y)], nn.functional.cross_entropy)  # unbound: sensitivity binds it
    result = sensitivity(model, evaluate, criterion=criterion, sparsities=(0.3, 0.7), progress=False)
    assert criterion.model is model and criterion.estimates == 1  # one estimate on the dense model, not one per trial
    loss = nn.functional.cross_entropy(model(X), y)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name in result.layers:
        saliency = (params[name].detach().double() * grads[name].double()).abs().flatten()
        for s, metric in result.curves[name]:
            ref = copy.deepcopy(model)
            w = dict(ref.named_parameters())[name]
            n = w.numel()
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.topk(saliency, n - round(n * s)).indices] = True
            with torch.no_grad():
                w.mul_(keep.reshape(w.shape))
            assert metric == evaluate(ref), (name, s)
    # Negative control: magnitude picks other weights, so other metrics.
    magnitude = sensitivity(model, evaluate, sparsities=(0.3, 0.7), progress=False)
    assert magnitude.curves != result.curves


def test_obd_bound_to_another_model_is_refused():
    model, other = mlp(0), mlp(1)
    X, y = data_for(model, 0)
    criterion = prunekit.OBD([(X, y)], nn.functional.cross_entropy, model=other)
    before = full_state(model)
    with pytest.raises(ValueError, match="bound to a different model"):
        sensitivity(model, loss_of(X, y), criterion=criterion, sparsities=(0.5,), progress=False)
    assert_same_state(model, before)


def test_obd_runs_and_uses_one_estimate(single_thread):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    criterion = prunekit.OBD([(X, y)], nn.functional.cross_entropy, estimator="fisher")
    result = sensitivity(model, loss_of(X, y), criterion=criterion, sparsities=(0.5, 0.9), progress=False,
                         higher_is_better=False)
    assert criterion.estimates == 1 and result.criterion == repr(criterion)
    assert all(d > -1 for layer in result.layers for _, d in result.drop(layer))


# -- the result: dict, table, plot -----------------------------------------------------------------------------------


@pytest.fixture
def small_result():
    model = mlp(0)
    X, y = data_for(model, 0)
    return sensitivity(model, loss_of(X, y), sparsities=(0.5, 0.9), progress=False, higher_is_better=False)


def test_to_dict_is_json_and_round_trips(small_result):
    d = json.loads(json.dumps(small_result.to_dict()))
    assert d["format"] == "prunekit.sensitivity" and d["version"] == 1 and d["higher_is_better"] is False
    assert d["sparsities"] == [0.5, 0.9] and d["cost"]["evaluations"] == 7
    assert [r["name"] for r in d["layers"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert d["layers"][0]["numel"] == 300 * 12 and d["layers"][0]["curve"][1][0] == 0.9
    assert SensitivityResult.from_dict(d) == small_result
    with pytest.raises(ValueError, match="missing format marker"):
        SensitivityResult.from_dict({"layers": []})
    with pytest.raises(ValueError, match="unsupported version 7"):
        SensitivityResult.from_dict({**d, "version": 7})


def test_drop_sign_follows_the_metric_direction(small_result):
    for name in small_result.layers:
        for (s, metric), (s2, drop) in zip(small_result.curves[name], small_result.drop(name)):
            assert s == s2 and drop == pytest.approx(metric - small_result.dense, abs=1e-12)
    flipped = SensitivityResult(**{**small_result.__dict__, "higher_is_better": True})
    assert flipped.drop("fc1.weight")[0][1] == pytest.approx(-small_result.drop("fc1.weight")[0][1])
    with pytest.raises(KeyError, match="no layer 'nope'"):
        small_result.drop("nope")


def test_table_markdown_and_text(small_result):
    md = small_result.table()
    lines = md.splitlines()
    assert lines[0] == "| layer | weights | 50% | 90% |" and lines[1] == "|---|---:|---:|---:|"
    assert lines[2].startswith("| (dense) | |") and len(lines) == 2 + 1 + 3
    assert f"| fc1.weight | 3,600 | {small_result.curves['fc1.weight'][0][1]:.4f} |" in md
    text = small_result.table("text").splitlines()
    assert len(text) == 5 and "|" not in "".join(text) and len({len(t) for t in text}) == 1  # aligned columns
    with pytest.raises(ValueError, match="fmt must be one of"):
        small_result.table("html")


def test_plot_writes_a_png_atomically(small_result, tmp_path):
    path = tmp_path / "s.png"
    small_result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = path.read_bytes()
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full while rendering")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            small_result.plot(path)
    assert path.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_plot_without_matplotlib_says_how_to_install(small_result, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install 'prunekit\[plot\]'"):
        small_result.plot(tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_progress_bar_counts_every_evaluation(capsys):
    model = mlp(0)
    X, y = data_for(model, 0)
    sensitivity(model, loss_of(X, y), sparsities=(0.5,), progress=True)
    err = capsys.readouterr().err
    assert "sensitivity" in err and "4/4" in err


# -- errors ----------------------------------------------------------------------------------------------------------


def _run(**kwargs):
    model = mlp(0)
    X, y = data_for(model, 0)
    args = {"sparsities": (0.5,), "progress": False, **kwargs}
    evaluate = args.pop("evaluate", loss_of(X, y))
    return sensitivity(args.pop("model", model), evaluate, **args)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"sparsities": ()}, ValueError, "sparsities is empty"),
    ({"sparsities": (0.5, 1.0)}, ValueError, r"sparsities\[1\] must be in \[0, 1\), got 1.0"),
    ({"sparsities": (-0.1,)}, ValueError, r"sparsities\[0\] must be in \[0, 1\)"),
    ({"sparsities": (math.nan,)}, ValueError, "must be finite"),
    ({"sparsities": (0.5, 0.5)}, ValueError, "duplicates"),
    ({"sparsities": "0.5"}, TypeError, "sequence of numbers"),
    ({"sparsities": (True,)}, TypeError, "must be a real number"),
    ({"layers": ["nope"]}, ValueError, "sensitivity: layers: 'nope' matched no prunable parameter"),
    ({"exclude": ["fc*"]}, ValueError, "no prunable parameter in scope"),
    ({"groups": {"g": ["nope"]}}, ValueError, "group 'g': layers: 'nope' matched no prunable parameter"),
    ({"groups": {}}, ValueError, "groups is empty"),
    ({"groups": {"g": ["fc1"]}, "exclude": ["fc1"]}, ValueError, "group 'g' has no prunable parameter"),
    ({"groups": {"g": ["fc1"]}, "exclude": ["nope"]}, ValueError, "sensitivity: exclude: 'nope' matched no"),
    ({"groups": {"a": ["fc1"]}, "layers": ["fc1"]}, ValueError, "not both"),
    ({"groups": "fc1"}, TypeError, "groups must be a dict"),
    ({"granularity": NM(2, 4), "sparsities": DEFAULT_SPARSITIES}, ValueError,
     r"NM\(2, 4\) fixes the sparsity at 0.5, got 0.1 in sparsities"),
    ({"granularity": NM(2, 4), "sparsities": (0.25,)}, ValueError, r"fixes the sparsity at 0.5.*sparsities=\(0.5,\)"),
    ({"criterion": "magnitude"}, TypeError, "criterion must be a prunekit Criterion"),
    ({"granularity": Channels}, TypeError, "granularity must be a prunekit Granularity"),
    ({"ranking": "both"}, ValueError, "ranking must be one of"),
    ({"higher_is_better": 1}, TypeError, "higher_is_better must be True or False"),
    ({"evaluate": "acc"}, TypeError, "evaluate must be a callable"),
    ({"model": "net"}, TypeError, "model must be an nn.Module"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        _run(**kwargs)


def test_nm_with_its_own_sparsity_works():
    result = _run(granularity=NM(2, 4), sparsities=(0.0, 0.5), layers=["fc1", "fc2"])
    assert result.sparsities == [0.0, 0.5]


@pytest.mark.parametrize("value,error,message", [
    (None, TypeError, "must return a real number .*got NoneType None for layer 'fc2.weight' at sparsity 0.5"),
    ("0.9", TypeError, "got str '0.9' for layer 'fc2.weight' at sparsity 0.5"),
    (torch.ones(2), TypeError, "got Tensor"),
    (math.nan, ValueError, "evaluate returned nan for layer 'fc2.weight' at sparsity 0.5; the metric must be finite"),
    (math.inf, ValueError, "returned inf for layer 'fc2.weight'"),
])
def test_evaluate_returning_a_non_number_names_layer_and_sparsity(value, error, message):
    model = mlp(0)
    before = full_state(model)
    calls = [0]

    def evaluate(m):  # calls: the dense model, fc1 at 0.5, then fc2 at 0.5
        calls[0] += 1
        return value if calls[0] == 3 else 1.0

    with pytest.raises(error, match=message):
        sensitivity(model, evaluate, sparsities=(0.5,), progress=False)
    assert_same_state(model, before)


def test_evaluate_failing_on_the_dense_model_says_so():
    with pytest.raises(TypeError, match="got NoneType None for the dense model"):
        _run(evaluate=lambda m: None)


def test_tensor_and_numpy_metrics_are_accepted():
    import numpy as np

    assert _run(evaluate=lambda m: torch.tensor(0.5)).dense == 0.5
    assert _run(evaluate=lambda m: np.float32(0.25)).dense == 0.25


def test_evaluate_that_swaps_a_layer_or_parameter_gets_the_originals_back():
    model = mlp(0)
    before = full_state(model)
    fc2, bias = model.fc2, model.fc1.bias

    def evaluate(m):
        m.fc1.bias = nn.Parameter(m.fc1.bias.detach() * 2)
        m.fc2 = nn.Linear(300, 100)
        return 1.0

    _run(model=model, evaluate=evaluate)
    assert model.fc2 is fc2 and model.fc1.bias is bias
    assert_same_state(model, before)


def test_public_exports():
    assert prunekit.sensitivity is sensitivity and "sensitivity" in prunekit.__all__
    assert "SensitivityResult" in prunekit.__all__
    assert isinstance(Magnitude(), prunekit.Criterion)
