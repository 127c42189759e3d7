"""API misuse fails loudly: replaced layers and parameters, two Pruners on one model, meta-device models.

Every detection has its negative control: the legitimate change that keeps the
parameters (in-place ``load_state_dict``, ``model.to(dtype / device)``,
``half()``, swapping conversions) keeps working, and so does building a new
Pruner after ``remove()`` or ``strip``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit import Pruner, sparsity_report, strip
from prunekit.core.criteria import Magnitude
from prunekit.methods.iterative import iterative_prune
from prunekit.methods.lottery.masks import Targets, rank_masks
from prunekit.methods.obd import Taylor

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["0.weight", "2.weight", "4.weight"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 10)).square().mean().backward()
    optimizer.step()


def zeros_of(t: torch.Tensor) -> int:
    return int((t.detach().float() == 0).sum())


def has_grad_hooks(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_post_accumulate_grad_hooks", None))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------
# layers or parameters replaced after the Pruner was built
# --------------------------------------------------------------------------------------


def replace_module(model):
    model[2] = nn.Linear(16, 12)


def replace_parameter(model):
    model[2].weight = nn.Parameter(torch.randn(12, 16))


def load_assign(model):
    model.load_state_dict(mlp(seed=5).state_dict(), assign=True)


def reshape_data(model):
    model[2].weight.data = torch.randn(6, 16)


def to_meta(model):
    model.to("meta")


def parametrize_weight(model):
    parametrize.register_parametrization(model[2], "weight", nn.Identity())


SWAPS = {
    "module": (replace_module, "module '2' holding pruned parameter '2.weight' was replaced"),
    "parameter": (replace_parameter, "parameter '2.weight' was replaced by another tensor"),
    "load_state_dict(assign=True)": (load_assign, "parameter '0.weight' was replaced by another tensor"),
    "data with a new shape": (reshape_data, "parameter '2.weight' changed shape from (12, 16) to (6, 16)"),
    "to(meta)": (to_meta, "parameter '0.weight' was replaced"),
    "parametrized": (parametrize_weight, "parameter '2.weight' was removed from the model (or parametrized)"),
}

ENTRY_POINTS = {
    "step": lambda pruner, opt: pruner.step(),
    "optimizer.step": lambda pruner, opt: opt.step(),
    "update_masks": lambda pruner, opt: pruner.update_masks(0.7),
    "apply_masks": lambda pruner, opt: pruner.apply_masks(),
    "report": lambda pruner, opt: pruner.report(),
    "sparsity_report": lambda pruner, opt: sparsity_report(pruner.model, pruner=pruner),
    "state_dict": lambda pruner, opt: pruner.state_dict(),
    "attach": lambda pruner, opt: pruner.attach(torch.optim.SGD(pruner.model.parameters(), lr=0.1)),
}


@pytest.mark.parametrize("swap", SWAPS)
def test_swap_is_detected_at_the_next_step_naming_the_parameter(swap):
    change, expected = SWAPS[swap]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, 0.5, optimizer=opt)
    train_step(model, opt)
    change(model)
    with pytest.raises(ValueError) as exc:
        pruner.step()
    text = one_line(exc)
    assert expected in text
    assert text.startswith("Pruner.step: ") and "build a new prunekit.Pruner(" in text and ".remove()" in text
    assert pruner.current_step == 1  # the failed step did not advance the schedule


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("swap", ["module", "parameter", "data with a new shape"])
def test_every_entry_point_detects_a_swap(swap, entry):
    change, expected = SWAPS[swap]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, 0.5, optimizer=opt)
    change(model)
    with pytest.raises(ValueError, match="after this Pruner was built") as exc:
        ENTRY_POINTS[entry](pruner, opt)
    assert expected in one_line(exc)


def test_old_report_would_have_claimed_the_old_sparsity():
    # What the check prevents: the report's rows come from the Pruner's own targets.
    model = mlp()
    pruner = Pruner(model, 0.5)
    assert pruner.report().rows[1].zeros == 96
    model[2] = nn.Linear(16, 12)
    assert zeros_of(model[2].weight) == 0  # the model's layer is dense now
    with pytest.raises(ValueError, match="module '2'"):
        pruner.report()


def test_sparsity_report_refuses_a_pruner_of_another_model():
    model, other = mlp(), mlp()
    pruner = Pruner(model, 0.5)
    with pytest.raises(ValueError, match="the pruner prunes '0.weight', which is not a parameter of model"):
        sparsity_report(other, pruner=pruner)
    wrapper = nn.Sequential(model)  # a model that contains the pruned one is fine
    assert sparsity_report(wrapper, pruner=pruner).zeros == 200


def test_backward_with_a_reshaped_parameter_raises_value_error():
    # A (1, 16) mask would even broadcast over a (3, 1, 16) gradient without the check.
    model = nn.Sequential(nn.Linear(16, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Pruner(model, 0.5, optimizer=opt)
    model[0].weight.data = torch.randn(3, 1, 16)
    w = model[0].weight
    with pytest.raises(ValueError, match=r"changed shape from \(1, 16\) to \(3, 1, 16\)"):
        (w * torch.randn(16)).sum().backward()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x))


def test_untying_a_tied_weight_is_detected_under_the_alias():
    model = Tied()
    pruner = Pruner(model, 0.5)
    assert pruner.names == ["embed.weight"]
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    with pytest.raises(ValueError, match="parameter 'head.weight' was replaced"):
        pruner.step()


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)


def test_deleted_module_is_detected():
    model = Holder()
    pruner = Pruner(model, 0.5)
    del model.fc
    with pytest.raises(ValueError, match="module 'fc' holding pruned parameter 'fc.weight' was removed"):
        pruner.apply_masks()


def test_swap_nested_deep_module_is_detected():
    model = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(4, 4))), nn.Linear(4, 2))
    pruner = Pruner(model, 0.5)
    model[0][0] = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"module '0\.0' holding pruned parameter '0\.0\.0\.weight' was replaced"):
        pruner.step()


# negative controls: changes that keep every parameter object --------------------------


def in_place_load(model):
    model.load_state_dict(mlp(seed=3).state_dict())


def same_module_again(model):
    model[2] = model[2]


def swapping_conversion(model):
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


KEEPS = {
    "load_state_dict": in_place_load,
    "to(float64)": lambda m: m.to(torch.float64),
    "half": lambda m: m.half(),
    "to(cpu)": lambda m: m.to("cpu"),
    "to_empty(cpu) + load": lambda m: in_place_load(m.to_empty(device="cpu")),  # to_empty leaves garbage
    "same module again": same_module_again,
    "swapping conversion": swapping_conversion,
    "requires_grad_(False)": lambda m: m.requires_grad_(False),
}


@pytest.mark.parametrize("change", KEEPS)
def test_identity_keeping_changes_keep_working(change):
    model = mlp()
    params = [id(p) for p in model.parameters()]
    pruner = Pruner(model, 0.5)
    KEEPS[change](model)
    assert [id(p) for p in model.parameters()] == params
    pruner.step()
    pruner.update_masks(0.75)
    pruner.apply_masks()
    report = pruner.report()
    # Independent reference: count zeros in the model itself, layer by layer.
    weights = [model[i].weight for i in (0, 2, 4)]
    expected = [round(0.75 * w.numel()) for w in weights]
    assert [r.zeros for r in report.rows] == [zeros_of(w) for w in weights] == expected
    pruner.state_dict()


def test_training_continues_after_an_in_place_load():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, 0.5, optimizer=opt)
    masks = pruner.masks
    in_place_load(model)  # dense weights come back in place; the next step re-applies the masks
    train_step(model, opt)
    for name, p in model.named_parameters():
        if name in masks:
            assert zeros_of(p[~masks[name]]) == int((~masks[name]).sum())


# after a swap: remove() and strip still work, and a new Pruner over the model as it is now

def test_remove_after_a_swap_leaves_the_new_layer_alone_and_allows_a_new_pruner():
    model = mlp()
    pruner = Pruner(model, 0.5)
    model[2] = nn.Linear(16, 12)
    fresh = model[2].weight.detach().clone()
    with pytest.raises(ValueError, match="already pruned by another live Pruner"):
        Pruner(model, 0.5)  # the old one still owns 0.weight and 4.weight
    assert pruner.remove() is model
    assert torch.equal(model[2].weight, fresh)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    new = Pruner(model, 0.5)
    assert [r.zeros for r in new.report().rows] == [80, 96, 24]


def test_strip_after_a_swap_releases_the_old_pruner():
    model = mlp()
    Pruner(model, 0.5)
    model[2].weight.data = torch.randn(6, 16)
    model[2].bias.data = torch.randn(6)
    model[4] = nn.Linear(6, 4)
    strip(model)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    assert Pruner(model, 0.5).report().rows[1].shape == (6, 16)


# --------------------------------------------------------------------------------------
# two Pruners on the same parameters
# --------------------------------------------------------------------------------------


def test_second_pruner_on_the_same_parameters_is_refused():
    model = mlp()
    first = Pruner(model, 0.5)
    masks = first.masks
    with pytest.raises(ValueError) as exc:
        Pruner(model, 0.9)
    text = one_line(exc)
    assert "'0.weight', '2.weight', '4.weight' already pruned by another live Pruner" in text
    assert ".remove()" in text and "prunekit.strip(model)" in text
    # The refused Pruner changed nothing: masks, weights, hooks are the first one's.
    for name, p in model.named_parameters():
        if name in masks:
            assert zeros_of(p) == int((~masks[name]).sum())
            assert len(p._post_accumulate_grad_hooks) == 1
    first.step()


def test_partial_overlap_names_only_the_shared_parameters_and_disjoint_scopes_coexist():
    model = mlp()
    a = Pruner(model, 0.5, layers=["0"])
    b = Pruner(model, 0.25, layers=["2"])  # disjoint: allowed
    with pytest.raises(ValueError) as exc:
        Pruner(model, 0.5, layers=["2", "4"])
    text = one_line(exc)
    assert text.startswith("Pruner: '2.weight' already pruned") and "4.weight" not in text
    a.step()
    b.step()
    assert [zeros_of(model[i].weight) for i in (0, 2, 4)] == [80, 48, 0]


def test_many_shared_names_are_abbreviated():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    Pruner(model, 0.5)
    with pytest.raises(ValueError, match="'0.weight', '1.weight', '2.weight' and 3 more already pruned"):
        Pruner(model, 0.5)


def test_shared_tied_weight_is_refused_under_any_of_its_names():
    model = Tied()
    Pruner(model, 0.5)
    with pytest.raises(ValueError, match=r"^Pruner: 'weight' \(as 'embed.weight'\) already pruned"):
        Pruner(model.head, 0.5)  # the same tensor, reached as the head's weight


@pytest.mark.parametrize("release", ["remove", "strip"])
def test_a_new_pruner_after_remove_or_strip_works(release):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Pruner(model, 0.5, optimizer=opt)
    first.remove() if release == "remove" else strip(model)
    second = Pruner(model, 0.75, optimizer=opt)
    train_step(model, opt)
    assert second.current_step == 1 and first.current_step == 0
    assert [zeros_of(model[i].weight) for i in (0, 2, 4)] == [120, 144, 36]


def test_detaching_the_optimizer_does_not_release_the_parameters():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Pruner(model, 0.5, optimizer=opt)
    first.detach(opt)  # its gradient hooks still mask: it still prunes these parameters
    with pytest.raises(ValueError, match="already pruned by another live Pruner"):
        Pruner(model, 0.5)


def test_a_copy_of_the_model_is_a_different_model():
    model = mlp()
    Pruner(model, 0.5)
    twin = copy.deepcopy(model)
    assert [r.zeros for r in Pruner(twin, 0.75).report().rows] == [120, 144, 36]


def test_a_failed_construction_keeps_no_hooks_and_owns_nothing():
    model = mlp()
    unrelated = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="updates none of the pruned parameters"):
        Pruner(model, 0.5, optimizer=unrelated)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        Pruner(model, 0.5)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0
    assert [r.zeros for r in Pruner(model, 0.5).report().rows] == [80, 96, 24]


def test_a_criterion_bound_to_another_model_is_refused_before_any_hook():
    model, other = mlp(), mlp(seed=1)
    data = [(torch.randn(8, 10), torch.randint(0, 4, (8,)))]
    criterion = Taylor(data, nn.functional.cross_entropy, model=other)
    with pytest.raises(ValueError, match="bound to a different model .*no parameter '0.weight' sharing storage"):
        Pruner(model, 0.5, criterion=criterion)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    bound = Taylor(data, nn.functional.cross_entropy, model=model)  # bound to the pruned model: fine
    assert Pruner(model, 0.5, criterion=bound).report().zeros == 200


def test_sequential_tools_release_their_pruners():
    # iterative pruning and the lottery's mask ranking build Pruners in turn and remove each.
    model = mlp()
    masks = rank_masks(model, NAMES, Targets(0.5))
    assert [int((~m).sum()) for m in masks.values()] == [80, 96, 24]

    def train_fn(m, pruner):
        pass

    records = iterative_prune(model, criterion=Magnitude(), train_fn=train_fn, sparsities=[0.5, 0.75],
                              train_first=False)
    assert [r["target_sparsity"] for r in records] == [0.5, 0.75]
    assert [r.zeros for r in Pruner(model, 0.75).report().rows] == [120, 144, 36]


def test_a_live_pruner_blocks_the_lottery_ranking_on_the_same_model():
    model = mlp()
    live = Pruner(model, 0.5)
    with pytest.raises(ValueError, match="already pruned by another live Pruner"):
        rank_masks(model, NAMES, Targets(0.5))
    live.remove()
    assert len(rank_masks(model, NAMES, Targets(0.5))) == 3


# --------------------------------------------------------------------------------------
# meta-device models
# --------------------------------------------------------------------------------------


def meta_mlp() -> nn.Sequential:
    with torch.device("meta"):
        return mlp()


def test_pruner_on_a_meta_model_names_the_first_parameter():
    with pytest.raises(ValueError) as exc:
        Pruner(meta_mlp(), 0.5)
    text = one_line(exc)
    assert text.startswith("Pruner: parameter '0.weight' is on the meta device")
    assert "model.to_empty(device=" in text and "load its weights" in text


def test_first_meta_parameter_in_scope_is_named():
    model = mlp()
    model[2].to("meta")
    model[4].to("meta")
    with pytest.raises(ValueError, match="parameter '2.weight' is on the meta device"):
        Pruner(model, 0.5)
    pruner = Pruner(model, 0.5, layers=["0"])  # the meta layers are out of scope: fine
    assert pruner.names == ["0.weight"]


def test_sparsity_report_on_a_meta_model():
    with pytest.raises(ValueError, match="sparsity_report: parameter '0.weight' is on the meta device"):
        sparsity_report(meta_mlp())


def test_materialised_meta_model_prunes():
    model = meta_mlp()
    model.to_empty(device="cpu")
    model.load_state_dict(mlp().state_dict())
    assert [r.zeros for r in Pruner(model, 0.5).report().rows] == [80, 96, 24]
    assert sparsity_report(model).zeros == 200


def test_meta_through_a_swapping_conversion_is_detected():
    # With swap_tensors the parameters keep their identity but lose their data.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, 0.5, optimizer=opt)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert model[0].weight.is_meta
    with pytest.raises(ValueError, match="parameter '0.weight' was moved to the meta device"):
        pruner.step()
    with pytest.raises(ValueError, match="moved to the meta device"):
        pruner.report()
