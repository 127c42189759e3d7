"""Pointwise (1x1) SparseConv2d without im2col, against F.conv2d in float64 on the dense-with-zeros weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.runtime import SparseConv2d, accelerate, conv, kernels
from prunekit.runtime.conv import same_pad

KERNEL = kernels.available()[0]
# (format, SparseLinear keyword arguments); weights are pruned to fit each format's structure.
FORMATS = [("csr", {}), ("bsr", {"blocksize": 4})]
if KERNEL:
    FORMATS += [("prunekit", {}), ("prunekit-rows", {"blocksize": 4}), ("prunekit-nm", {"pattern": (2, 4)})]


def _prune(weight: torch.Tensor, fmt: str, g: torch.Generator, sparsity: float = 0.8) -> torch.Tensor:
    out_c, in_c = weight.shape[:2]
    w = weight.reshape(out_c, in_c)
    if fmt == "prunekit-nm":
        idx = w.abs().reshape(out_c, -1, 4).topk(2, dim=2).indices
        mask = torch.zeros(out_c, in_c // 4, 4).scatter_(2, idx, 1.0).reshape(out_c, in_c)
    elif fmt in ("prunekit-rows", "bsr"):  # whole 4x1 (rows) or 4x4 (bsr) blocks
        cols = 4 if fmt == "bsr" else 1
        keep = torch.rand(out_c // 4, 1, in_c // cols, 1, generator=g) >= sparsity
        mask = keep.expand(-1, 4, -1, cols).reshape(out_c, in_c).float()
    else:
        mask = (torch.rand(out_c, in_c, generator=g) >= sparsity).float()
    w = w * mask
    w[0] = 0  # a fully pruned filter
    return w.reshape(weight.shape)


def _conv(in_c: int, out_c: int, fmt: str, seed: int, cls: type = nn.Conv2d, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    layer = cls(in_c, out_c, 1, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(_prune(layer.weight, fmt, torch.Generator().manual_seed(seed)))
    return layer


def _reference(layer: nn.Conv2d, x: torch.Tensor, pads: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """float64 F.conv2d of the dense-with-zeros weight after ``pads`` (left, right, top, bottom)."""
    b = None if layer.bias is None else layer.bias.double()
    xd = F.pad(x.double(), list(pads))
    return F.conv2d(xd, layer.weight.double(), b, layer.stride, layer.padding)


def _close(out: torch.Tensor, ref: torch.Tensor, in_c: int) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    err = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    assert err <= (in_c + 1) * 2.0**-24 * max(scale, 1.0) * 4, err


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pointwise_matches_conv2d(fmt, kw, seed):
    g = torch.Generator().manual_seed(100 + seed)
    in_c, out_c = 4 * int(torch.randint(1, 12, (1,), generator=g)), 4 * int(torch.randint(1, 9, (1,), generator=g))
    layer = _conv(in_c, out_c, fmt, seed, bias=seed != 1)
    sparse = SparseConv2d(layer, fmt, **kw)
    assert sparse.pointwise
    for batch, (h, w) in ((1, (7, 9)), (3, (5, 13)), (1, (1, 1)), (3, (16, 16))):
        x = torch.randn(batch, in_c, h, w, generator=g)
        with torch.inference_mode():
            out = sparse(x)
            _close(out, _reference(layer, x), in_c)
            _close(sparse(x[0]), _reference(layer, x[:1])[0], in_c)  # unbatched
            empty = torch.zeros(batch, h, w) if layer.bias is None else layer.bias[0].expand(batch, h, w)
            assert torch.equal(out[:, 0], empty)  # the fully pruned filter gives exactly its bias


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("stride,padding", [(2, 0), (2, 1), (1, 2), ((3, 2), (0, 1))])
def test_strided_and_padded_pointwise(fmt, kw, stride, padding):
    layer = _conv(8, 12, fmt, 3, stride=stride, padding=padding)
    sparse = SparseConv2d(layer, fmt, **kw)
    for batch, (h, w) in ((1, (9, 11)), (3, (8, 7)), (1, (2, 3))):
        x = torch.randn(batch, 8, h, w)
        with torch.inference_mode():
            _close(sparse(x), _reference(layer, x), 8)


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
def test_channels_last_and_strided_inputs(fmt, kw):
    layer = _conv(16, 8, fmt, 4)
    sparse = SparseConv2d(layer, fmt, **kw)
    x = torch.randn(3, 16, 9, 7)
    with torch.inference_mode():
        ref = _reference(layer, x)
        _close(sparse(x.to(memory_format=torch.channels_last)), ref, 16)
        big = torch.randn(3, 20, 9, 10)
        big[:, 2:18, :, 1:8] = x
        _close(sparse(big[:, 2:18, :, 1:8]), ref, 16)  # a non-contiguous slice


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("batch", [1, 3])
def test_fully_pruned_pointwise(fmt, kw, batch):
    layer = nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        layer.weight.zero_()
    sparse = SparseConv2d(layer, fmt, **kw)
    x = torch.randn(batch, 8, 5, 3)
    with torch.inference_mode():
        assert torch.equal(sparse(x), layer.bias.reshape(1, 4, 1, 1).expand(batch, 4, 5, 3).contiguous())


class SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding computed in forward (as EfficientNet ports do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pad(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        return F.conv2d(F.pad(x, list(pads)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StaticConv(nn.Conv2d):
    """A fixed ZeroPad2d before the convolution (EfficientNet ports' static-size variant)."""

    def __init__(self, *args, pad: tuple[int, int, int, int] = (0, 0, 0, 0), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("cls,extra", [(SameConv, {}), (SameConv, {"stride": 2}), (StaticConv, {}),
                                       (StaticConv, {"pad": (1, 0, 2, 1)})], ids=["same", "same-s2", "static0",
                                                                                  "static-pad"])
def test_subclasses(fmt, kw, cls, extra):
    layer = _conv(12, 8, fmt, 5, cls=cls, **extra)
    sparse = SparseConv2d(layer, fmt, **kw)
    assert sparse.pointwise
    for batch, (h, w) in ((1, (7, 9)), (3, (8, 5))):
        x = torch.randn(batch, 12, h, w)
        with torch.inference_mode():
            ref = layer(x).double()
            _close(sparse(x), ref, 12)
            # The subclass's own output agrees with the independent float64 reference.
            pads = same_pad((h, w), (1, 1), layer.stride, (1, 1)) if cls is SameConv else extra.get("pad", (0,) * 4)
            _close(sparse(x), _reference(layer, x, pads), 12)


def test_pointwise_path_does_not_unfold(monkeypatch):
    def no_unfold(*args, **kwargs):
        raise AssertionError("unfold called")

    monkeypatch.setattr(conv.F, "unfold", no_unfold)
    layer = _conv(8, 8, "csr", 0, stride=2)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        _close(SparseConv2d(layer, "csr")(x), _reference(layer, x), 8)
        # Negative control: a 3x3 convolution still goes through im2col.
        with pytest.raises(AssertionError, match="unfold called"):
            SparseConv2d(nn.Conv2d(8, 8, 3), "csr")(x)


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=[f for f, _ in FORMATS])
def test_pointwise_agrees_with_im2col(fmt, kw):
    layer = _conv(16, 12, fmt, 6, stride=2)
    sparse = SparseConv2d(layer, fmt, **kw)
    x = torch.randn(2, 16, 11, 10)
    with torch.inference_mode():
        a, b = sparse(x), sparse._im2col(x)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_wrong_weight_is_detected():
    """Negative control for the comparison used above."""
    layer = _conv(8, 8, "csr", 1)
    sparse = SparseConv2d(layer, "csr")
    with torch.no_grad():
        layer.weight[3, 2] += 0.01
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode(), pytest.raises(AssertionError):
        _close(sparse(x), _reference(layer, x), 8)


class _Mobile(nn.Module):
    """An inverted-residual-like block: 1x1 expand, depthwise 3x3 (kept dense), 1x1 project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = SameConv(64, 24, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))


@pytest.mark.parametrize("batch", [1, 3])
def test_accelerate_on_pointwise_model(batch):
    torch.manual_seed(0)
    model = _Mobile().eval()
    with torch.no_grad():
        for layer in (model.expand, model.project):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.8)
    x = torch.randn(batch, 16, 15, 15)
    formats = ("prunekit",) if KERNEL else ("csr",)
    fast, report = accelerate(model, x, formats=formats, repeats=1, progress=False)
    assert isinstance(fast.expand, SparseConv2d) and isinstance(fast.project, SparseConv2d)
    assert fast.expand.pointwise and fast.project.pointwise
    with torch.inference_mode():
        ref = model(x)
        out = fast(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_pointwise_exports_with_a_dynamic_batch(seed):
    """Traced, the 1x1 path makes one product over (in, B*H*W): no Python loop over the batch."""
    from prunekit.runtime import SparseConv2d

    torch.manual_seed(seed)
    conv = nn.Conv2d(16, 24, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
    model = nn.Sequential(SparseConv2d(conv, "prunekit")).eval()
    program = torch.export.export(model, (torch.randn(3, 16, 7, 9),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    for batch in (1, 2, 5):
        x = torch.randn(batch, 16, 7, 9, dtype=torch.float64)
        with torch.inference_mode():
            got = program.module()(x.float()).double()
            ref = F.conv2d(x, conv.weight.double(), conv.bias.double())
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), batch
