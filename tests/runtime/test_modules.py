"""SparseLinear in every format against the dense-with-zeros oracle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from prunekit.runtime import SparseLinear
from prunekit.runtime.selection import relative_error

RTOL = 1e-5


def _pruned_linear(out_f: int, in_f: int, sparsity: float, seed: int, *, bias: bool = True,
                   block: int | None = None, empty_rows: int = 0, dtype=torch.float32) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype))
        if block:
            keep = torch.rand(out_f // block, in_f // block, generator=g) >= sparsity
            keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
        else:
            keep = torch.rand(out_f, in_f, generator=g) >= sparsity
        lin.weight.mul_(keep)
        lin.weight[:empty_rows] = 0
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    return lin


def _check(lin: nn.Linear, module: SparseLinear, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ref, out = lin(x), module(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= RTOL


CASES = [  # (out, in, sparsity, block)
    (37, 53, 0.9, None),
    (1, 7, 0.5, None),
    (64, 3, 0.0, None),      # 0-sparse
    (29, 31, 1.0, None),     # fully pruned
    (48, 32, 0.8, 4),
    (32, 64, 0.7, 16),
    (10, 6, 0.5, 2),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("out_f,in_f,sparsity,block", CASES)
@pytest.mark.parametrize("lead", [(1,), (33,), (3, 5), ()], ids=["b1", "b33", "NxT", "1d"])
def test_formats_match_dense(out_f, in_f, sparsity, block, lead, seed):
    lin = _pruned_linear(out_f, in_f, sparsity, seed, block=block, empty_rows=min(3, out_f - 1))
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(seed + 100))
    _check(lin, SparseLinear.from_linear(lin, "csr"), x)
    if block:
        _check(lin, SparseLinear.from_linear(lin, "bsr", block), x)


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 4)])
def test_no_bias_float64_and_empty_batch(fmt, block):
    lin = _pruned_linear(16, 12, 0.75, 3, bias=False, dtype=torch.float64)
    module = SparseLinear.from_linear(lin, fmt, block)
    assert module.bias is None and module.values.dtype == torch.float64
    _check(lin, module, torch.randn(7, 12, dtype=torch.float64))
    _check(lin, module, torch.randn(1, 12, dtype=torch.float64))
    with torch.no_grad():
        assert module(torch.randn(0, 12, dtype=torch.float64)).shape == (0, 16)


def test_from_linear_leaves_source_and_reports():
    lin = _pruned_linear(20, 10, 0.9, 0)
    before = lin.weight.detach().clone()
    module = SparseLinear.from_linear(lin, "csr")
    assert torch.equal(lin.weight, before)
    assert module.nnz == int((before != 0).sum())
    assert module.density == pytest.approx(module.nnz / 200)
    assert torch.equal(module.to_dense_weight(), before)
    text = repr(module)
    assert "format=csr" in text and "density=" in text and "in_features=10" in text
    assert "blocksize=4" in repr(SparseLinear.from_linear(_pruned_linear(8, 8, 0.5, 0, block=4), "bsr", 4))
    assert module.crow_indices.dtype == torch.int32


def test_deepcopy_pickle_state_dict_and_cast():
    lin = _pruned_linear(24, 16, 0.8, 5)
    module = SparseLinear.from_linear(lin, "csr")
    x = torch.randn(4, 16)
    _check(lin, module, x)  # fills the cache
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        _check(lin, clone, x)
    fresh = SparseLinear.from_linear(_pruned_linear(24, 16, 0.8, 5), "csr")
    fresh.load_state_dict(module.state_dict())
    _check(lin, fresh, x)
    double = copy.deepcopy(module).double()
    assert double.crow_indices.dtype == torch.int32 and double.values.dtype == torch.float64
    with torch.no_grad():
        assert relative_error(double(x.double()), lin(x).double()) <= RTOL


def test_inference_only_and_works_without_grad_context():
    lin = _pruned_linear(8, 6, 0.5, 0)
    module = SparseLinear.from_linear(lin, "csr")
    with pytest.raises(RuntimeError, match="inference"):
        module(torch.randn(2, 6, requires_grad=True))
    with torch.no_grad():
        module(torch.randn(2, 6, requires_grad=True))
    assert module(torch.randn(2, 6)).shape == (2, 8)  # input without grad: fine anywhere
    assert list(module.parameters()) == []


def test_bad_arguments():
    lin = _pruned_linear(8, 6, 0.5, 0)
    with pytest.raises(ValueError, match="fmt"):
        SparseLinear.from_linear(lin, "coo")
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear.from_linear(lin, "bsr")
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear.from_linear(lin, "bsr", 4)  # 6 is not a multiple of 4
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear.from_linear(lin, "csr", 2)
    with pytest.raises(TypeError, match="blocksize"):
        SparseLinear.from_linear(lin, "bsr", 2.0)
    with pytest.raises(TypeError, match="linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1), "csr")
    with pytest.raises(TypeError, match="weight"):
        SparseLinear(torch.ones(3, dtype=torch.float32))
    with pytest.raises(TypeError, match="weight"):
        SparseLinear(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        SparseLinear(torch.ones(3, 3), torch.ones(4))
    module = SparseLinear.from_linear(lin, "csr")
    with pytest.raises(ValueError, match="input"):
        module(torch.randn(2, 5))
