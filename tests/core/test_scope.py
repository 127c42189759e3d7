"""Scope: default layer coverage, selection by pattern/type/predicate, overrides, unknown layers, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import Pruner, prunable_parameter_names, register_prunable, sparsity_report
from prunekit.core.scope import resolve_scope

pytestmark = pytest.mark.usefixtures("single_thread")


class Custom(nn.Module):
    """A layer type prunekit does not know."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.zeros(4))
        self.register_buffer("table", torch.randn(4, 4))

    def forward(self, x):
        return x @ self.kernel + self.bias


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 8, 3)
        self.conv2 = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.deconv = nn.ConvTranspose2d(3, 2, 2)
        self.deconv1 = nn.ConvTranspose1d(3, 2, 2)
        self.deconv3 = nn.ConvTranspose3d(3, 2, 2)
        self.ln = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True)
        self.lstmp = nn.LSTM(8, 6, proj_size=2)
        self.gru = nn.GRU(8, 4, bias=False)
        self.rnn = nn.RNN(8, 4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.xattn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
        self.cell = nn.LSTMCell(4, 4)
        self.bil = nn.Bilinear(3, 4, 5)
        self.bag = nn.EmbeddingBag(7, 3)
        self.gn = nn.GroupNorm(1, 3)
        self.prelu = nn.PReLU()
        self.rms = nn.RMSNorm(8)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 2, bias=False))


BIG_EXPECTED = [
    "emb.weight", "conv1.weight", "conv2.weight", "conv3.weight", "deconv.weight", "deconv1.weight",
    "deconv3.weight",
    "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse",
    "lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.weight_ih_l1_reverse", "lstm.weight_hh_l1_reverse",
    "lstmp.weight_ih_l0", "lstmp.weight_hh_l0", "lstmp.weight_hr_l0",
    "gru.weight_ih_l0", "gru.weight_hh_l0",
    "rnn.weight_ih_l0", "rnn.weight_hh_l0",
    "attn.in_proj_weight", "attn.out_proj.weight",
    "xattn.q_proj_weight", "xattn.k_proj_weight", "xattn.v_proj_weight", "xattn.out_proj.weight",
    "cell.weight_ih", "cell.weight_hh",
    "bil.weight", "bag.weight",
    "head.0.weight", "head.2.weight",
]


def names(scope):
    return [t.name for t in scope.targets]


def test_default_scope_covers_every_known_layer_in_model_order():
    scope = resolve_scope(Big())
    assert names(scope) == BIG_EXPECTED
    assert scope.skipped == []
    sd = Big().state_dict()
    assert set(BIG_EXPECTED) <= set(sd)
    # nothing else that is a parameter is pruned: biases and norms are never in scope
    for t in scope.targets:
        assert "bias" not in t.name
        assert not isinstance(t.module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.RMSNorm))
        assert t.param is dict(t.module.named_parameters(recurse=False))[t.param_name]


def test_targets_expose_module_and_param():
    model = Big()
    t = {t.name: t for t in resolve_scope(model).targets}
    assert t["attn.out_proj.weight"].module is model.attn.out_proj
    assert t["attn.out_proj.weight"].module_name == "attn.out_proj"
    assert t["lstm.weight_hh_l1_reverse"].param is model.lstm.weight_hh_l1_reverse
    assert t["head.2.weight"].param_name == "weight"


def test_root_layer_is_named_without_dot():
    t = resolve_scope(nn.Linear(3, 2)).targets
    assert [(x.name, x.module_name) for x in t] == [("weight", "")]


def test_tied_parameters_appear_once_under_their_first_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    assert names(resolve_scope(Tied())) == ["emb.weight"]


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,expected", [
    (["head.*"], ["head.0.weight", "head.2.weight"]),
    (["head.0"], ["head.0.weight"]),
    (["head.0.weight"], ["head.0.weight"]),
    (["lstm.weight_hh_*"], ["lstm.weight_hh_l0", "lstm.weight_hh_l0_reverse", "lstm.weight_hh_l1",
                            "lstm.weight_hh_l1_reverse"]),
    (["*_reverse"], ["lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse", "lstm.weight_ih_l1_reverse",
                     "lstm.weight_hh_l1_reverse"]),
    (["conv?"], ["conv1.weight", "conv2.weight", "conv3.weight"]),
    (["conv[12]", "bag"], ["conv1.weight", "conv2.weight", "bag.weight"]),
    ([nn.Conv2d], ["conv2.weight"]),
    ([nn.ConvTranspose2d, nn.Embedding], ["emb.weight", "deconv.weight"]),
    ([nn.Linear], ["attn.out_proj.weight", "xattn.out_proj.weight", "head.0.weight", "head.2.weight"]),
    # A type also selects what is inside a matching module: MHA's out_proj comes along.
    ([nn.MultiheadAttention], ["attn.in_proj_weight", "attn.out_proj.weight", "xattn.q_proj_weight",
                               "xattn.k_proj_weight", "xattn.v_proj_weight", "xattn.out_proj.weight"]),
    ([nn.RNNBase], [n for n in BIG_EXPECTED if n.split(".")[0] in ("lstm", "lstmp", "gru", "rnn")]),
    ([lambda name, m: name.startswith("x")], ["xattn.q_proj_weight", "xattn.k_proj_weight", "xattn.v_proj_weight",
                                              "xattn.out_proj.weight"]),
    ([lambda name, m: name == "xattn"], ["xattn.q_proj_weight", "xattn.k_proj_weight", "xattn.v_proj_weight"]),
    ([lambda name, m: isinstance(m, nn.Linear) and m.out_features == 2], ["head.2.weight"]),
    (nn.GRU, ["gru.weight_ih_l0", "gru.weight_hh_l0"]),  # a single selector, not in a list
    ("cell", ["cell.weight_ih", "cell.weight_hh"]),
    ((nn.Bilinear, "emb"), ["emb.weight", "bil.weight"]),
])
def test_layer_selection(layers, expected):
    assert names(resolve_scope(Big(), layers=layers)) == expected


@pytest.mark.parametrize("exclude,removed", [
    (["lstm*"], [n for n in BIG_EXPECTED if n.startswith("lstm")]),
    ([nn.MultiheadAttention, "head.2"], ["attn.in_proj_weight", "attn.out_proj.weight", "xattn.q_proj_weight",
                                         "xattn.k_proj_weight", "xattn.v_proj_weight", "xattn.out_proj.weight",
                                         "head.2.weight"]),
    ([lambda n, m: isinstance(m, nn.Linear)], ["attn.out_proj.weight", "xattn.out_proj.weight",
                                                "head.0.weight", "head.2.weight"]),
    (["*.weight_hr_*"], ["lstmp.weight_hr_l0"]),
])
def test_exclude(exclude, removed):
    assert names(resolve_scope(Big(), exclude=exclude)) == [n for n in BIG_EXPECTED if n not in removed]


def test_layers_and_exclude_combine():
    got = names(resolve_scope(Big(), layers=[nn.Linear, "conv*"], exclude=["*out_proj*", "conv3"]))
    assert got == ["conv1.weight", "conv2.weight", "head.0.weight", "head.2.weight"]


def test_overrides_are_attached_to_matching_targets():
    sentinel = object()
    scope = resolve_scope(Big(), overrides={"head.*": 0.9, "lstm.weight_hh_l1": sentinel, "emb": 0.1})
    got = {t.name: t.override for t in scope.targets if t.override is not None}
    assert got == {"emb.weight": 0.1, "lstm.weight_hh_l1": sentinel, "head.0.weight": 0.9, "head.2.weight": 0.9}


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(layers=["nothing"]), ValueError, r"layers: 'nothing' matched no prunable parameter"),
    (dict(layers=["head.*", "nope.*"]), ValueError, r"layers: 'nope\.\*' matched no prunable parameter"),
    (dict(layers=[nn.Dropout]), ValueError, r"layers: .*Dropout.* matched no prunable parameter"),
    (dict(layers=[nn.LayerNorm]), ValueError, r"layers: .*LayerNorm.* matched no prunable parameter"),
    (dict(layers=["lstm.bias_ih_l0"]), ValueError, r"layers: 'lstm.bias_ih_l0' matched no prunable"),
    (dict(layers=[lambda n, m: False]), ValueError, r"layers: .* matched no prunable parameter"),
    (dict(exclude=["ghost"]), ValueError, r"exclude: 'ghost' matched no prunable parameter"),
    (dict(layers=["head.*"], exclude=["conv1"]), ValueError, r"exclude: 'conv1' matched no prunable"),
    (dict(overrides={"ghost*": 0.5}), ValueError, r"overrides: 'ghost\*' matched no prunable parameter"),
    (dict(overrides={"head.*": 0.5, "head.0": 0.7}), ValueError,
     r"overrides: parameter 'head.0.weight' is matched by several patterns \['head.\*', 'head.0'\]"),
    (dict(overrides={"lstm": 0.5, "*_reverse": 0.7}), ValueError, r"overrides: .* several patterns"),
    (dict(layers=[3]), TypeError, r"layers: each entry must be a name pattern"),
    (dict(layers=[nn.Linear(2, 2)]), TypeError, r"layers: each entry must be a name pattern"),
    (dict(layers=[int]), TypeError, r"layers: each entry must be a name pattern"),
    (dict(layers=nn.Linear(2, 2)), TypeError, r"layers: each entry must be a name pattern"),
    (dict(exclude=[nn.ReLU()]), TypeError, r"exclude: each entry must be a name pattern"),
    (dict(layers=4), TypeError, r"layers must be a list"),
    (dict(layers={"head"}), TypeError, r"layers must be a list"),
    (dict(exclude=[None]), TypeError, r"exclude: each entry must be a name pattern"),
    (dict(exclude=3.5), TypeError, r"exclude must be a list"),
    (dict(overrides=[("head.*", 0.5)]), TypeError, r"overrides must be a dict"),
    (dict(overrides={nn.Linear: 0.5}), TypeError, r"overrides: keys must be name patterns \(str\)"),
])
def test_selection_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        resolve_scope(Big(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        resolve_scope({"weight": torch.ones(2)})


# --------------------------------------------------------------------------------------
# Unknown layers
# --------------------------------------------------------------------------------------


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.custom = Custom()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.custom(self.fc(x)))


def test_unknown_layer_is_skipped_and_listed():
    scope = resolve_scope(WithCustom())
    assert names(scope) == ["fc.weight", "out.weight"]
    assert len(scope.skipped) == 1
    module, reason = scope.skipped[0]
    assert module == "custom" and "Custom" in reason and "register_prunable" in reason
    # through the Pruner and its report
    model = WithCustom()
    pruner = Pruner(model, 0.5)
    assert pruner.names == ["fc.weight", "out.weight"]
    assert pruner.skipped == scope.skipped
    assert torch.count_nonzero(model.custom.kernel) == 16
    report = pruner.report()
    assert report.to_dict()["skipped"] == [{"module": "custom", "reason": reason}]
    assert "skipped custom" in str(report)


def test_unknown_root_with_own_parameters_is_listed_as_root():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.ones(3, 3))
            self.fc = nn.Linear(3, 3)

    scope = resolve_scope(Net())
    assert names(scope) == ["fc.weight"]
    assert [m for m, _ in scope.skipped] == [""]
    assert "skipped <root>" in str(sparsity_report(Net()))


def test_containers_without_own_parameters_are_not_listed():
    scope = resolve_scope(nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([nn.Linear(2, 2)])))
    assert names(scope) == ["0.0.weight", "1.0.weight"] and scope.skipped == []


@pytest.mark.parametrize("selector", ["custom", Custom, "custom.kernel"], ids=["name", "type", "param-name"])
def test_naming_an_unknown_layer_explicitly_is_an_error(selector):
    with pytest.raises(ValueError, match=r"layers: .*custom.*Custom.*register_prunable\(Custom"):
        resolve_scope(WithCustom(), layers=["fc", selector])
    with pytest.raises(ValueError, match=r"register_prunable"):
        Pruner(WithCustom(), 0.5, layers=[selector])


def test_glob_or_predicate_over_unknown_layer_skips_it():
    scope = resolve_scope(WithCustom(), layers=["*"])
    assert names(scope) == ["fc.weight", "out.weight"] and [m for m, _ in scope.skipped] == ["custom"]
    scope = resolve_scope(WithCustom(), layers=[lambda n, m: True])
    assert names(scope) == ["fc.weight", "out.weight"] and [m for m, _ in scope.skipped] == ["custom"]


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_register_prunable_makes_a_custom_layer_prunable():
    assert prunable_parameter_names(Custom()) is None
    register_prunable(Custom, ["kernel"])
    assert prunable_parameter_names(Custom()) == ["kernel"]
    model = WithCustom()
    pruner = Pruner(model, 0.5, layers=["custom"])
    assert pruner.names == ["custom.kernel"] and pruner.skipped == []
    assert int((model.custom.kernel == 0).sum()) == 8
    assert torch.count_nonzero(model.custom.bias) == 0 and torch.count_nonzero(model.fc.weight) == 16


def test_register_prunable_with_callable_and_non_parameters_filtered():
    register_prunable(Custom, lambda m: ["kernel", "table", "missing", "bias"])
    # buffers and missing attributes are not parameters, so they are dropped
    assert prunable_parameter_names(Custom()) == ["kernel", "bias"]


def test_registration_is_inherited_and_the_most_specific_wins():
    class Sub(Custom):
        pass

    register_prunable(Custom, ["kernel"])
    assert prunable_parameter_names(Sub()) == ["kernel"]
    register_prunable(Sub, ["bias"])
    assert prunable_parameter_names(Sub()) == ["bias"]
    assert prunable_parameter_names(Custom()) == ["kernel"]

    class MyLinear(nn.Linear):
        pass

    assert prunable_parameter_names(MyLinear(2, 2)) == ["weight"]


def test_register_empty_marks_known_but_never_pruned():
    register_prunable(Custom, [])
    scope = resolve_scope(WithCustom())
    assert names(scope) == ["fc.weight", "out.weight"] and scope.skipped == []


def test_builtin_names():
    assert prunable_parameter_names(nn.Linear(2, 3)) == ["weight"]
    assert prunable_parameter_names(nn.LayerNorm(3)) == []
    assert prunable_parameter_names(nn.BatchNorm1d(3)) == []
    assert prunable_parameter_names(nn.Dropout()) is None
    assert prunable_parameter_names(nn.GRU(2, 3, num_layers=2)) == ["weight_ih_l0", "weight_hh_l0",
                                                                    "weight_ih_l1", "weight_hh_l1"]
    assert prunable_parameter_names(nn.MultiheadAttention(4, 2, kdim=3)) == ["q_proj_weight", "k_proj_weight",
                                                                              "v_proj_weight"]


@pytest.mark.parametrize("args,match", [
    ((Custom(), ["kernel"]), "module_type must be an nn.Module subclass"),
    ((int, ["kernel"]), "module_type must be an nn.Module subclass"),
    (("Custom", ["kernel"]), "module_type must be an nn.Module subclass"),
    ((Custom, "kernel"), "params must be a list of parameter names or a callable"),
    ((Custom, 3), "params must be a list of parameter names or a callable"),
    ((Custom, None), "params must be a list of parameter names or a callable"),
    ((Custom, ["kernel", 3]), "params must contain only strings"),
])
def test_register_prunable_rejects(args, match):
    with pytest.raises(TypeError, match="register_prunable: " + match):
        register_prunable(*args)
    assert prunable_parameter_names(Custom()) is None


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.attn = nn.MultiheadAttention(4, 2)


class _EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.decoder = nn.Linear(4, 4)


@pytest.mark.parametrize("selector", ["encoder", "enc*", _Encoder], ids=["name", "glob", "type"])
def test_selecting_a_container_selects_the_layers_inside(selector):
    scope = resolve_scope(_EncDec(), layers=[selector])
    assert names(scope) == ["encoder.block.0.weight", "encoder.block.2.weight",
                            "encoder.attn.in_proj_weight", "encoder.attn.out_proj.weight"]


def test_excluding_a_container_and_overriding_it_reach_the_layers_inside():
    scope = resolve_scope(_EncDec(), exclude=["encoder.attn"], overrides={"encoder.block": 0.3})
    assert names(scope) == ["encoder.block.0.weight", "encoder.block.2.weight", "decoder.weight"]
    assert [t.override for t in scope.targets] == [0.3, 0.3, None]


def test_predicates_are_asked_about_each_module_alone():
    # "encoder" has no prunable parameter of its own, and a predicate does not reach inside it.
    with pytest.raises(ValueError, match="layers: .* matched no prunable parameter"):
        resolve_scope(_EncDec(), layers=[lambda name, module: name == "encoder"])
    scope = resolve_scope(_EncDec(), layers=[lambda name, module: name.startswith("encoder")])
    assert names(scope)[0] == "encoder.block.0.weight" and "decoder.weight" not in names(scope)


def test_parametrized_weights_are_skipped_and_reported_not_silently_ignored():
    from torch.nn.utils.parametrizations import weight_norm

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    weight_norm(net[2])
    scope = resolve_scope(net)
    assert names(scope) == ["0.weight"]
    assert scope.skipped == [("2", "'weight' is parametrized (torch.nn.utils.parametrize); "
                                   "remove the parametrization to prune it")]
    assert "skipped 2: 'weight' is parametrized" in str(sparsity_report(net))
