"""Row-major entry points of the fp32 kernels (csrc/layout.c) and the layout rule of kernels.batch_major.

A row-major input must give a contiguous result with the same bits as the transposed entry point on the
same data (the blocks start at multiples of the batch chunk and sum in the same order), for every format,
odd sizes, a last block of one row, empty and fully pruned rows, several seeds and thread counts; a
transposed input (a previous kernel's output) keeps the kernels' own layout.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.runtime import SparseLinear, kernels

pytestmark = pytest.mark.skipif(not kernels.available()[0], reason=f"kernel: {kernels.available()[1]}")

# (out, in, batch): one block, several, a last block of 1 row (65, 129), of 2 rows (130), batch below a vector.
SHAPES = [(7, 5, 3), (48, 96, 65), (33, 130, 200), (64, 32, 129), (40, 24, 130), (96, 64, 64), (12, 8, 2)]


def _weight(out_f: int, in_f: int, g: torch.Generator, sparsity: float = 0.8) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) > sparsity)
    w[: max(1, out_f // 8)] = 0  # empty rows
    return w


def _packed(fmt: str, w: torch.Tensor):
    """``(run(x, bias), dense weight it computes with)`` for one format."""
    if fmt == "csr":
        crow, col, val = kernels._csr32(w)
        return (lambda x, b: kernels.linear_unchecked(crow, col, val, b, x)), w
    if fmt == "rows":
        gptr, col, val = kernels.row_blocks(w, 4)
        return (lambda x, b: kernels.rows_linear_unchecked(gptr, col, val, 4, b, x)), w
    wn = w * kernels._nm_mask(w, 2, 4)
    off, val = kernels.nm_pack(wn, 2, 4)
    return (lambda x, b: kernels.nm_linear_unchecked(off, val, 2, 4, b, x)), wn


@pytest.mark.parametrize("fmt", ["csr", "rows", "nm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_row_major_equals_the_transposed_entry_point_bit_for_bit(fmt, seed, shape):
    out_f, in_f, batch = shape
    out_f, in_f = (out_f + 3) // 4 * 4, (in_f + 3) // 4 * 4  # row blocks of 4, groups of 4 inputs
    g = torch.Generator().manual_seed(seed)
    run, w = _packed(fmt, _weight(out_f, in_f, g))
    bias = torch.randn(out_f, generator=g) if seed != 1 else None
    x = torch.randn(batch, in_f, generator=g)
    with torch.inference_mode():
        rm = run(x, bias)
        t = run(x.t().contiguous().t(), bias)  # the same values, batch-major: the transposed entry point
    assert rm.is_contiguous() and rm.shape == (batch, out_f)
    assert t.t().is_contiguous() and not t.is_contiguous()
    assert torch.equal(rm, t)
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    assert (rm.double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_major_results_do_not_depend_on_the_thread_count(threads):
    g = torch.Generator().manual_seed(5)
    w = _weight(200, 300, g, 0.9)
    crow, col, val = kernels._csr32(w)
    x = torch.randn(257, 300, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear_unchecked(crow, col, val, None, x)
        torch.set_num_threads(threads)
        many = kernels.linear_unchecked(crow, col, val, None, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_fully_pruned_and_strided_inputs():
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(9, generator=g)
    crow, col, val = kernels._csr32(torch.zeros(9, 16))
    x = torch.randn(70, 16, generator=g)
    assert torch.equal(kernels.linear_unchecked(crow, col, val, bias, x), bias.expand(70, 9))
    w = _weight(9, 16, g)
    crow, col, val = kernels._csr32(w)
    wide = torch.randn(70, 32, generator=g)
    strided = wide[:, ::2]  # neither layout: taken row-major after a copy
    y = kernels.linear_unchecked(crow, col, val, None, strided)
    assert y.is_contiguous() and torch.equal(y, kernels.linear_unchecked(crow, col, val, None, strided.contiguous()))


def test_batch_major_rule():
    x = torch.randn(5, 8)
    assert not kernels.batch_major(x)
    assert kernels.batch_major(x.t().contiguous().t())
    assert kernels.batch_major(x[:1]) and kernels.batch_major(x[:0])
    assert not kernels.batch_major(torch.randn(5, 1))  # one feature: both layouts, taken row-major


def test_sparse_linear_keeps_row_major_models_row_major_and_chains_transposed():
    g = torch.Generator().manual_seed(4)
    lins = [nn.Linear(32, 64), nn.Linear(64, 16)]
    with torch.no_grad():
        for lin in lins:
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) > 0.7)
    a, b = (SparseLinear.from_linear(lin, "prunekit") for lin in lins)
    x = torch.randn(3, 70, 32, generator=g)
    with torch.inference_mode():
        h = a(x)
        assert h.is_contiguous()  # what a layer norm or attention after it wants
        chained = b(torch.relu(a(x.reshape(-1, 32)).t().contiguous().t()))
        ref = lins[1](torch.relu(lins[0](x.reshape(-1, 32))))
        assert chained.t().is_contiguous()  # a batch-major input keeps the kernels' layout, no transposes
        assert (chained - ref).abs().max() <= 1e-5
        assert (h - lins[0](x)).abs().max() <= 1e-5
