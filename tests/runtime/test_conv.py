"""SparseConv2d (im2col + sparse product) and accelerate on convolutions, against the dense oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.core.granularity import NM, Blocks, Unstructured
from prunekit.runtime import SparseConv2d, accelerate, kernels
from prunekit.runtime.selection import build_candidates, relative_error

RTOL = 1e-5
KERNEL = kernels.available()[0]
SPARSE_FORMATS = ["csr", "prunekit"] if KERNEL else ["csr"]

CONVS = [  # Conv2d keyword arguments
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=6, out_channels=16, kernel_size=5, stride=2, padding=2),
    dict(in_channels=4, out_channels=5, kernel_size=(3, 2), dilation=(2, 1), padding=(1, 0)),
    dict(in_channels=1, out_channels=6, kernel_size=5, padding=2, bias=False),
    dict(in_channels=8, out_channels=4, kernel_size=1),
]


def _pruned_conv(kwargs: dict, sparsity: float, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) >= sparsity)
        conv.weight[0] = 0  # a fully pruned filter
    return conv


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
@pytest.mark.parametrize("kwargs", CONVS, ids=lambda k: f"{k['in_channels']}to{k['out_channels']}k{k['kernel_size']}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_conv_matches_dense(fmt, kwargs, seed):
    conv = _pruned_conv(kwargs, 0.8, seed)
    sparse = SparseConv2d(conv, fmt)
    for batch, (h, w) in ((1, (11, 13)), (3, (9, 9)), (17, (12, 7))):
        x = torch.randn(batch, kwargs["in_channels"], h, w, generator=torch.Generator().manual_seed(seed + batch))
        with torch.inference_mode():
            ref, out = conv(x), sparse(x)
            assert out.shape == ref.shape and out.is_contiguous()
            assert relative_error(out, ref) <= RTOL, (fmt, batch)
            assert relative_error(sparse(x[0]), conv(x[0])) <= RTOL  # unbatched input


@pytest.mark.skipif(not KERNEL, reason="prunekit kernel unavailable")
@pytest.mark.parametrize("fmt,granularity,pattern,blocksize", [
    ("prunekit-rows", Blocks((4, 1)), None, 4), ("prunekit-nm", NM(2, 4), (2, 4), None)])
def test_structured_formats_on_convolutions(fmt, granularity, pattern, blocksize):
    conv = nn.Conv2d(8, 16, 3, padding=1)  # weight seen as 16 x 72 for pruning and for the kernel
    prunekit.Pruner(conv, 0.75 if isinstance(granularity, Blocks) else 0.5, granularity=granularity)
    prunekit.strip(conv)
    sparse = SparseConv2d(conv, fmt, blocksize, pattern)
    x = torch.randn(5, 8, 10, 10)
    with torch.inference_mode():
        assert relative_error(sparse(x), conv(x)) <= RTOL


def test_unsupported_convolutions_are_refused():
    with pytest.raises(TypeError, match="groups=2"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="padding_mode"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="padding='same'"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="input"):
        SparseConv2d(nn.Conv2d(4, 4, 3))(torch.randn(2, 3, 8, 8))


def test_copy_state_dict_and_repr():
    conv = _pruned_conv(CONVS[1], 0.9, 4)
    sparse = SparseConv2d(conv, "csr")
    x = torch.randn(2, 6, 10, 10)
    clone = copy.deepcopy(sparse)
    fresh = SparseConv2d(_pruned_conv(CONVS[1], 0.9, 4), "csr")
    fresh.load_state_dict(sparse.state_dict())
    with torch.inference_mode():
        for module in (clone, fresh):
            assert relative_error(module(x), conv(x)) <= RTOL
    assert "format=csr" in repr(sparse) and "stride=(2, 2)" in repr(sparse)
    assert list(sparse.parameters()) == []


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32 * 8 * 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.grouped(x))
        return self.fc(x.view(x.shape[0], -1))  # .view: the replaced convolution's output must be contiguous


@pytest.mark.parametrize("granularity", [Unstructured(), Blocks((4, 1))], ids=repr)
@pytest.mark.parametrize("batch", [1, 16])
def test_accelerate_handles_convolutions(granularity, batch):
    torch.manual_seed(0)
    model = _CNN()
    prunekit.Pruner(model, 0.9, granularity=granularity, layers=["conv1", "conv2", "grouped", "fc"])
    prunekit.strip(model)
    x = torch.randn(batch, 3, 16, 16)
    fast, report = accelerate(model, x, formats=("dense", *SPARSE_FORMATS), repeats=2, progress=False)
    with torch.inference_mode():
        assert relative_error(fast(x), model(x)) <= RTOL
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"conv1", "conv2", "grouped", "fc"}
    assert by_name["conv2"].kind == "Conv2d" and by_name["conv2"].in_features == 16 * 9
    assert set(by_name["conv2"].timings_ms) == {"dense", *SPARSE_FORMATS}
    assert by_name["grouped"].format == "dense" and "groups=4" in " ".join(by_name["grouped"].notes)
    forced, report = accelerate(model, x, formats=("csr",), repeats=1, progress=False)
    assert isinstance(forced.conv1, SparseConv2d) and isinstance(forced.conv2, SparseConv2d)
    with torch.inference_mode():
        assert relative_error(forced(x), model(x)) <= RTOL


def test_build_candidates_for_a_convolution():
    conv = _pruned_conv(CONVS[0], 0.9, 0)
    x = torch.randn(2, 3, 8, 8)
    cands, notes = build_candidates(conv, ("dense", "csr", "bsr"), x, RTOL)
    assert cands["dense"] is conv and isinstance(cands["csr"], SparseConv2d)
    assert notes["bsr"] == "zeros not blocky"
