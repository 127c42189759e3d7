"""Conv1D and convolutions as (out, in·k) problems; a ResNet-ish CNN end to end; layers one-shot refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.methods.oneshot import UnsupportedLayer, prune_oneshot
from prunekit.methods.oneshot.layers import im2col
from prunekit.methods.oneshot.solvers import Target, magnitude_prune, sparsegpt_prune, wanda_prune

from .zoo import resnet

SEEDS = [0, 1, 2]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def solve(method, W, H, target, blocksize=128):
    if method == "magnitude":
        return magnitude_prune(W, target)[0]
    if method == "wanda":
        return wanda_prune(W, H, target)[0]
    return sparsegpt_prune(W, H, target, blocksize=blocksize)[0]


def gram(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows.T @ rows / rows.shape[0]


# -- transformers Conv1D ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_conv1d_equals_the_transposed_linear(seed, method, sparsity):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(seed)
    conv = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs, weight stored (16, 12)
    conv.weight.data.normal_()
    linear = nn.Linear(16, 12)
    linear.weight.data.copy_(conv.weight.data.t())
    linear.bias.data.copy_(conv.bias.data)
    dense = linear.weight.detach().clone()
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 3, 16)
    for net in (nn.Sequential(conv), nn.Sequential(linear)):
        prune_oneshot(net, [x], method=method, sparsity=sparsity, blocks=False, progress=False)
    # independent reference: the solver on the (out, in) Linear problem built by hand
    want = solve(method, dense, gram(x.reshape(-1, 16)), Target.parse(sparsity))
    torch.testing.assert_close(conv.weight.t(), linear.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(linear.weight.detach(), want, rtol=0, atol=1e-5)
    if sparsity == "2:4":  # groups along the inputs: the (out, in) view, not the stored (in, out) rows
        assert torch.all(conv.weight.t().ne(0).reshape(12, -1, 4).sum(-1) == 2)
        assert not torch.all(conv.weight.ne(0).reshape(16, -1, 4).sum(-1) == 2)


# -- convolutions -----------------------------------------------------------------------------------


CONVS = [
    lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(3, 6, 3, padding=1),
    lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect", dilation=2),
    lambda: nn.Conv2d(2, 4, 3, padding=2, padding_mode="circular", bias=False),
    lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, padding_mode="replicate"),
    lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2),
]


def _input(conv: nn.Module, seed: int) -> torch.Tensor:
    spatial = {1: (9,), 2: (7, 8), 3: (4, 5, 4)}[len(conv.kernel_size)]
    return torch.randn(2, conv.in_channels, *spatial, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", CONVS)
def test_im2col_reproduces_the_convolution_patches(make):
    torch.manual_seed(0)
    conv = make()
    if conv.groups != 1:
        pytest.skip("grouped: covered by the grouped test")
    width = conv.in_channels * int(torch.tensor(conv.kernel_size).prod())
    # a convolution whose filters are the unit vectors outputs exactly its input patches
    probe = copy.deepcopy(conv)
    probe.out_channels = width
    probe.weight = nn.Parameter(torch.eye(width).reshape(width, conv.in_channels, *conv.kernel_size))
    probe.bias = None
    x = _input(conv, 3)
    patches = probe(x).movedim(1, -1).reshape(-1, width)
    torch.testing.assert_close(im2col(conv, x), patches, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", CONVS)
def test_conv_oneshot_equals_the_solver_on_the_im2col_problem(make, method, seed):
    torch.manual_seed(seed)
    conv = make()
    dense = conv.weight.detach().clone()
    x = _input(conv, seed)
    columns = dense[0].numel()
    target = Target.parse(("2:4" if columns % 4 == 0 else "1:3") if seed else 0.5)  # groups along in·k
    prune_oneshot(nn.Sequential(conv), [x], method=method, sparsity=str(target) if seed else 0.5, blocks=False,
                  progress=False, blocksize=24)
    out, g = dense.shape[0], conv.groups
    W = dense.reshape(out, -1)
    per = conv.in_channels // g
    rows = [im2col(conv, x[:, i * per:(i + 1) * per]) for i in range(g)]  # each group's own patches
    if method == "magnitude":  # no data: one ranking over the whole (out, in·k) matrix
        want = solve(method, W, None, target)
    elif g == 1 or target.nm is not None:  # per group: its rows against its own patches
        want = torch.cat([solve(method, W[i * out // g:(i + 1) * out // g], gram(r), target, blocksize=24)
                          for i, r in enumerate(rows)])
    else:
        want = None  # grouped unstructured: the layer's exact count is split over groups (count checked below)
    if want is not None:
        torch.testing.assert_close(conv.weight.detach().reshape(out, -1), want.float(), rtol=0, atol=1e-5)
    assert int(conv.weight.eq(0).sum()) == round(conv.weight.numel() * target.fraction)
    if target.nm is not None:
        assert torch.all(conv.weight.reshape(out, -1, target.nm.m).ne(0).sum(-1) == target.nm.n)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", METHODS)
def test_depthwise_conv_is_solved_per_channel_with_exact_count(seed, method):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # depthwise with multiplier 2
    x = _input(conv, seed)
    prune_oneshot(nn.Sequential(conv), [x], method=method, sparsity=0.4, blocks=False, progress=False)
    assert int(conv.weight.eq(0).sum()) == round(conv.weight.numel() * 0.4)
    with pytest.raises(ValueError, match=r"2:4 at '0' \(Conv2d\).*in·k = 9.*exclude=\['0'\]"):
        prune_oneshot(nn.Sequential(nn.Conv2d(6, 6, 3, groups=6)), [x], method=method, sparsity="2:4",
                      blocks=False, progress=False)


class SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding computed in forward, as EfficientNet ports do."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_same_padding_subclass_is_solved_on_its_real_patches(seed):
    torch.manual_seed(seed)
    conv = SameConv(3, 4, 3, stride=2)
    dense = conv.weight.detach().reshape(4, -1).clone()
    x = torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(seed))
    prune_oneshot(nn.Sequential(conv), [x], method="sparsegpt", sparsity=0.5, blocks=False, progress=False)
    ph, pw = max(3 * 2 + 3 - 8, 0), max(4 * 2 + 3 - 9, 0)
    padded = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    rows = F.unfold(padded, 3, stride=2).transpose(1, 2).reshape(-1, 27)  # independent: torch's own unfold
    want = sparsegpt_prune(dense, gram(rows), Target.parse(0.5))[0]
    torch.testing.assert_close(conv.weight.detach().reshape(4, -1), want, rtol=0, atol=1e-5)


def test_a_subclass_computing_something_else_is_refused():
    with pytest.raises(UnsupportedLayer, match=r"Doubled at '1'.*not the standard linear map.*exclude=\['1'\]"):
        prune_oneshot(nn.Sequential(nn.Linear(4, 4), Doubled(4, 4)), [torch.randn(5, 4)], method="wanda",
                      blocks=False, progress=False)


# -- a ResNet-ish CNN end to end --------------------------------------------------------------------


def block_inputs(model, names, samples):
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        for s in samples:
            model(s)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", [0.6, "2:4"])
def test_resnet_oneshot_calibrates_each_block_on_the_pruned_model(seed, sparsity):
    model, samples = resnet(seed)
    dense = copy.deepcopy(model)
    fed = {}
    report = prune_oneshot(model, samples, method="sparsegpt", sparsity=sparsity, progress=False,
                           on_block_inputs=lambda n, inputs: fed.__setitem__(n, [a[0] for a, _ in inputs]))
    names = ["stage1.0", "stage1.1", "stage2.0", "stage2.1"]
    assert report.blocks == "stage1, stage2" and report.full_captures == ["stage1.0"]
    assert set(report.skipped) == {"stem", "head"} and len(report.layers) == 9
    seen = block_inputs(model, names, samples)
    for n in names:
        for got, want in zip(fed[n], seen[n]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    target = Target.parse(sparsity)
    for r in report.layers:
        weight = model.get_submodule(r.name).weight
        assert int(weight.eq(0).sum()) == round(weight.numel() * target.fraction), r.name
    for n in names:  # the first conv of each block: the solver on its im2col problem from the pruned model's inputs
        conv = model.get_submodule(n).conv1
        rows = torch.cat([im2col(conv, x) for x in seen[n]])
        want = sparsegpt_prune(dense.get_submodule(n).conv1.weight.detach().reshape(conv.out_channels, -1),
                               gram(rows), target)[0]
        torch.testing.assert_close(conv.weight.detach().reshape(conv.out_channels, -1), want, rtol=0, atol=1e-5)


def test_blocks_given_as_names_modules_and_lists():
    model, samples = resnet(0)
    other = copy.deepcopy(model)
    prune_oneshot(model, samples, method="wanda", progress=False)
    report = prune_oneshot(other, samples, method="wanda", progress=False,  # any order: run in call order
                           blocks=[other.stage2[1], "stage2.0", "stage1.1", other.stage1[0]])
    assert report.blocks == "stage1, stage2" and report.full_captures == ["stage1.0"]
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n
    coarse = copy.deepcopy(resnet(0)[0])
    report = prune_oneshot(coarse, samples, method="wanda", progress=False, blocks=["stage2", coarse.stage1])
    assert report.full_captures == ["stage1"] and len(report.layers) == 9  # a Sequential entry is one block


# -- refusals ---------------------------------------------------------------------------------------


class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.up = nn.Linear(4, 4), nn.ConvTranspose1d(4, 4, 2)

    def forward(self, x):
        return self.up(self.lin(x).transpose(1, 2)).transpose(1, 2)[:, :x.shape[1]]


class Stack(nn.Module):
    def __init__(self, block, n=2, repeat=1):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(n))
        self.repeat = repeat

    def forward(self, x):
        for _ in range(self.repeat):
            for b in self.blocks:
                x = b(x)
        return x


def test_refusals_name_the_module_and_the_way_out():
    x = [torch.randn(2, 5, 4)]
    with pytest.raises(UnsupportedLayer, match=r"ConvTranspose1d at 'blocks.0.up'.*exclude=\['blocks.0.up'\]"):
        prune_oneshot(Stack(Up), x, progress=False)
    report = prune_oneshot(Stack(Up), x, progress=False, exclude="*.up")
    assert [r.name for r in report.layers] == ["blocks.0.lin", "blocks.1.lin"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    with pytest.raises(UnsupportedLayer, match=r"MultiheadAttention at 'layers.0.self_attn'.*exclude="):
        prune_oneshot(encoder, [torch.randn(2, 3, 8)], progress=False)
    report = prune_oneshot(encoder, [torch.randn(2, 3, 8)], progress=False, exclude="*.self_attn")
    assert [r.name for r in report.layers] == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
                                               "layers.1.linear2"]
    with pytest.raises(ValueError, match=r"run more than once per forward.*blocks=False"):
        prune_oneshot(Stack(lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), repeat=2), x, progress=False)
    with pytest.raises(ValueError, match=r"found no repeated blocks in Sequential.*blocks=\[.*blocks=False"):
        prune_oneshot(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), x, progress=False)
