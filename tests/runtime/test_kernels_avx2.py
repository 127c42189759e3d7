"""Edge cases of the SIMD paths of prunekit's fp32 kernels (AVX2 on this machine), against float64 references.

The AVX2 paths split the batch into 64-column chunks of 8-lane vectors plus a masked tail of 1..7
columns, keep 1, 2 or 4 accumulator sets per row depending on the chunk's width, take row blocks
4 rows at a time and pick N:M entries at batch 1 by in-register permutes; every boundary of those
(batch sizes around multiples of 8 and 64, rows with 0..9 nonzeros, odd sizes, strided inputs) is
exercised here for the CSR, row-block and N:M kernels.
"""

from __future__ import annotations

import pytest
import torch

from prunekit.runtime import kernels

OK, WHY = kernels.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"prunekit kernel unavailable: {WHY}")
BATCHES = (1, 7, 8, 9, 63, 64, 65, 100)
ROW_NNZ = (0, 1, 7, 8, 9)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _weight(out_f: int, in_f: int, seed: int, density: float = 0.3) -> torch.Tensor:
    """Random sparse weight whose first rows hold exactly 0, 1, 7, 8, 9 nonzeros (where ``in_f`` allows)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    for i, nnz in enumerate(ROW_NNZ[:out_f]):
        w[i] = 0
        cols = torch.randperm(in_f, generator=g)[:nnz]
        w[i, cols] = torch.randn(cols.numel(), generator=g)
    return w


def _check(y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> None:
    """``y`` (B, out) against the float64 ``x @ w.T + b``, elementwise within the fp32 summation bound."""
    ref = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    if b is not None:
        ref, bound = ref + b.double(), bound + b.double().abs()
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    # n * eps * sum |w x| with n <= in_features + 1; a far tighter test than a relative norm.
    tol = (w.shape[1] + 1) * 2.0**-24 * bound
    assert bool((err <= tol).all()), float((err - tol).max())
    empty = (w == 0).all(dim=1)  # rows with no weight: exactly the bias
    expect = torch.zeros(int(empty.sum())) if b is None else b[empty]
    assert torch.equal(y[:, empty], expect.expand(y.shape[0], -1))


@needs_kernel
def test_simd_path_reported_matches_cpu():
    flags = _cpu_flags()
    if "avx512f" in flags:
        assert WHY.startswith("avx512")
    elif {"avx2", "fma"} <= flags:
        assert WHY.startswith("avx2")
    else:
        assert WHY.startswith("generic")


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 9), (37, 29), (64, 17), (101, 131)])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_edges(seed, shape, bias):
    w = _weight(*shape, seed)
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 7)) if bias else None
    csr = kernels._csr32(w)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed * 1000 + batch))
        _check(kernels.spmm(*csr, b, x, 1), w, b, x)


@needs_kernel
@pytest.mark.parametrize("batch", BATCHES)
def test_csr_strided_input_and_threads(batch):
    """X^T rows further apart than the batch (ldx > B): masked tails must not read the next row's values."""
    w = _weight(70, 45, 3)
    b = torch.randn(70)
    wide = torch.randn(45, batch + 13, generator=torch.Generator().manual_seed(batch))
    xt = wide[:, 5:5 + batch]  # unit column stride, row stride batch + 13
    csr = kernels._csr32(w)
    y1 = kernels.spmm_t(*csr, b, xt, 1)
    _check(y1.t(), w, b, xt.t())
    assert torch.equal(y1, kernels.spmm_t(*csr, b, xt, 2))


@needs_kernel
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
@pytest.mark.parametrize("batch", [1, 8, 9, 65])
def test_dense_and_fully_pruned(sparsity, batch):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(33, 27, generator=g) * (torch.rand(33, 27, generator=g) >= sparsity)
    b = torch.randn(33, generator=g)
    x = torch.randn(batch, 27, generator=g)
    _check(kernels.spmm(*kernels._csr32(w), b, x, 1), w, b, x)
    _check(kernels.spmm_rows(*kernels.row_blocks(w[:32], 4), 4, b[:32], x, 1), w[:32], b[:32], x)
    if sparsity == 1.0:
        assert torch.equal(kernels.spmm(*kernels._csr32(w), b, x), b.expand(batch, -1))


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
def test_row_block_edges(seed, rows):
    out_f = rows * 7
    g = torch.Generator().manual_seed(seed)
    for in_f in (1, 13, 64):
        # Whole row blocks kept or dropped per column (plus scattered zeros inside kept blocks).
        keep = torch.rand(7, 1, in_f, generator=g) < 0.4
        w = torch.randn(out_f, in_f, generator=g) * keep.expand(-1, rows, -1).reshape(out_f, in_f)
        w = w * (torch.rand(out_f, in_f, generator=g) > 0.1)
        w[:rows] = 0  # an empty block
        b = torch.randn(out_f, generator=g)
        packed = kernels.row_blocks(w, rows)
        for batch in BATCHES:
            x = torch.randn(batch, in_f, generator=g)
            y = kernels.spmm_rows(*packed, rows, b, x, 1)
            _check(y, w, b, x)
            assert torch.equal(y, kernels.spmm_rows(*packed, rows, b, x, 2))
            _check(kernels.spmm_rows(*packed, rows, None, x, 1), w, None, x)


def _nm_weight(out_f: int, in_f: int, n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = w * kernels._nm_mask(w, n, m)
    w[0] = 0  # a fully pruned row
    if out_f > 1:  # a row whose groups keep fewer than n (padded entries)
        w[1, ::2] = 0
    return w


@needs_kernel
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (1, 4), (2, 8), (1, 8), (8, 16), (16, 32), (2, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nm_edges(n, m, seed):
    for out_f, groups in ((1, 1), (9, 3), (40, 7), (17, 16)):
        in_f = groups * m
        w = _nm_weight(out_f, in_f, n, m, seed)
        b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed))
        packed = kernels.nm_pack(w, n, m)
        for batch in BATCHES:
            x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed + batch))
            y = kernels.spmm_nm(*packed, n, m, b, x, 1)
            _check(y, w, b, x)
            assert torch.equal(y, kernels.spmm_nm(*packed, n, m, b, x, 2))


@needs_kernel
def test_negative_control_detects_a_wrong_weight():
    """The check used above rejects a kernel result for a weight that differs in one entry."""
    w = _weight(20, 30, 0)
    x = torch.randn(9, 30)
    y = kernels.spmm(*kernels._csr32(w), None, x, 1)
    w2 = w.clone()
    w2[10, 3] += 1e-3
    with pytest.raises(AssertionError):
        _check(y, w2, None, x)
