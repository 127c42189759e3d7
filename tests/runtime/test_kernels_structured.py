"""prunekit's kernels on structured sparsity (row blocks, N:M, blocks) against the dense oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.core.granularity import NM, Blocks, Unstructured
from prunekit.runtime import SparseLinear, accelerate, kernels
from prunekit.runtime.selection import build_candidates, nm_pattern, relative_error, row_blocksize

OK, WHY = kernels.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"prunekit kernel unavailable: {WHY}")
RTOL = 1e-5
BATCHES = (1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 130)


def _block_weight(out_f: int, in_f: int, rows: int, cols: int, sparsity: float, seed: int,
                  holes: float = 0.0, empty_groups: int = 0) -> torch.Tensor:
    """A weight pruned in (rows x cols) blocks; ``holes``: extra zeros inside kept blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    keep = Blocks((rows, cols)).mask(torch.rand(out_f, in_f, generator=g), sparsity)
    w = w * keep * (torch.rand(out_f, in_f, generator=g) >= holes)
    if empty_groups:
        groups = torch.randperm(out_f // rows, generator=g)[:empty_groups]
        for grp in groups.tolist():
            w[grp * rows:(grp + 1) * rows] = 0
    return w


def _oracle(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rows,cols,out_f,in_f", [
    (2, 1, 6, 13), (4, 1, 36, 29), (8, 1, 40, 70), (16, 1, 48, 33), (12, 1, 24, 9), (4, 4, 32, 64),
    (3, 2, 21, 10), (1, 1, 17, 19)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.95, 1.0])
def test_row_block_kernel_matches_dense_oracle(seed, rows, cols, out_f, in_f, sparsity):
    w = _block_weight(out_f, in_f, rows, cols, sparsity, seed, holes=0.1 * seed,
                      empty_groups=1 if out_f // rows > 2 else 0)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 50))
    blocks = kernels.row_blocks(w, rows)
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed + batch))
        y = kernels.spmm_rows(*blocks, rows, b, x)
        assert y.shape == (batch, out_f) and y.dtype == torch.float32
        assert relative_error(y, _oracle(w, b, x)) <= RTOL, (batch, rows, cols, sparsity)
        assert relative_error(kernels.spmm_rows(*blocks, rows, None, x), _oracle(w, None, x)) <= RTOL


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_row_blocks_round_trip_and_layout(rows):
    w = _block_weight(32, 20, rows, 1, 0.7, 3, holes=0.2)
    gptr, col, val = kernels.row_blocks(w, rows)
    assert gptr.dtype == col.dtype == torch.int32 and val.shape == (col.numel(), rows)
    rebuilt = torch.zeros_like(w)
    for g in range(32 // rows):
        for k in range(int(gptr[g]), int(gptr[g + 1])):
            rebuilt[g * rows:(g + 1) * rows, int(col[k])] = val[k]
    assert torch.equal(rebuilt, w)
    module = SparseLinear(w, None, "prunekit-rows", rows)
    assert torch.equal(module.to_dense_weight(), w)
    with pytest.raises(ValueError, match="divisor"):
        kernels.row_blocks(w, 5)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 64, 65, 200])
def test_row_block_kernel_thread_count_does_not_change_bits(batch):
    w = _block_weight(256, 96, 8, 1, 0.8, 4, empty_groups=3)
    b = torch.randn(256)
    x = torch.randn(batch, 96)
    blocks = kernels.row_blocks(w, 8)
    outs = [kernels.spmm_rows(*blocks, 8, b, x, threads) for threads in (1, 2, 3, 4)]
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@needs_kernel
@pytest.mark.parametrize("batch", [2, 33, 64, 100, 129])
def test_csr_batch_chunk_does_not_change_bits(batch, monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(70, 90, generator=g) * (torch.rand(70, 90, generator=g) > 0.85)
    x = torch.randn(batch, 90, generator=g)
    outs = []
    for chunk in (32, 48, 64):
        monkeypatch.setattr(kernels, "BATCH_CHUNK", chunk)
        outs.append(kernels.spmm(*kernels._csr32(w), None, x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert relative_error(outs[0], _oracle(w, None, x)) <= RTOL


@needs_kernel
def test_spmm_rows_rejects_bad_arguments():
    w = _block_weight(8, 6, 4, 1, 0.5, 0)
    gptr, col, val = kernels.row_blocks(w, 4)
    with pytest.raises(ValueError, match="values"):
        kernels.spmm_rows(gptr, col, val, 2, None, torch.randn(3, 6))
    with pytest.raises(TypeError, match="x"):
        kernels.spmm_rows(gptr, col, val, 4, None, torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        kernels.spmm_rows(gptr, col, val, 4, torch.randn(5), torch.randn(3, 6))


def test_row_blocksize_detects_row_blocks_only():
    assert row_blocksize(_block_weight(64, 32, 16, 1, 0.8, 0)) == 16
    assert row_blocksize(_block_weight(64, 32, 4, 2, 0.8, 0)) == 4
    assert row_blocksize(_block_weight(64, 32, 1, 4, 0.8, 0)) is None
    assert row_blocksize(torch.zeros(8, 8)) is None
    # Kept blocks only 50% full: storing r values per column would waste half.
    assert row_blocksize(_block_weight(64, 32, 8, 1, 0.5, 0, holes=0.5)) is None


GRANULARITIES = [Unstructured(), NM(2, 4), NM(4, 8), NM(1, 4), Blocks((1, 4)), Blocks((4, 1)), Blocks((16, 1)),
                 Blocks((4, 4))]


def _pruned_mlp(granularity, sparsity: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 16))
    s = granularity.sparsity if isinstance(granularity, NM) else sparsity
    prunekit.Pruner(model, s, granularity=granularity)
    return prunekit.strip(model)


@needs_kernel
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_granularity_every_format_matches_dense(granularity, seed):
    model = _pruned_mlp(granularity, 0.75, seed)
    for lin in (m for m in model if isinstance(m, nn.Linear)):
        for batch in (1, 64):
            x = torch.randn(batch, lin.in_features, generator=torch.Generator().manual_seed(seed + batch))
            cands, notes = build_candidates(lin, ("csr", "bsr", "prunekit", "prunekit-rows", "prunekit-nm"), x, RTOL)
            assert "prunekit" in cands and "csr" in cands
            rows = isinstance(granularity, Blocks) and granularity.shape[0] > 1
            assert ("prunekit-rows" in cands) == rows, notes
            if isinstance(granularity, (NM, Unstructured)):  # blocks may happen to fit some N:M pattern too
                assert ("prunekit-nm" in cands) == isinstance(granularity, NM), notes
            with torch.inference_mode():
                ref = lin(x)
                for fmt, module in cands.items():
                    assert relative_error(module(x), ref) <= RTOL, (fmt, batch)


@needs_kernel
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_accelerate_on_structured_models(granularity):
    model = _pruned_mlp(granularity, 0.8, 3)
    for batch in (1, 64):
        x = torch.randn(batch, 48)
        fast, report = accelerate(model, x, repeats=2, progress=False)
        with torch.inference_mode():
            assert relative_error(fast(x), model(x)) <= RTOL
        rows = isinstance(granularity, Blocks) and granularity.shape[0] > 1
        pruned_layers = [layer for layer in report.layers if layer.sparsity > 0]
        assert all(("prunekit-rows" in layer.timings_ms) == rows for layer in pruned_layers)


@needs_kernel
def test_accelerate_records_row_block_choice():
    model = _pruned_mlp(Blocks((8, 1)), 0.9, 0)
    fast, report = accelerate(model, torch.randn(64, 48), formats=("prunekit-rows",), repeats=2, progress=False)
    chosen = [layer for layer in report.layers if layer.format == "prunekit-rows"]
    assert chosen and all(layer.blocksize == 8 for layer in chosen)
    assert "prunekit-rows 8x1 rows" in report.table()
    modules = [m for m in fast if isinstance(m, SparseLinear)]
    assert modules and all(m.fmt == "prunekit-rows" and m.blocksize == 8 for m in modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prunekit_rows_falls_back_without_kernel(dtype, monkeypatch):
    w = _block_weight(16, 12, 4, 1, 0.5, 1)
    b = torch.randn(16)
    module = SparseLinear(w, b, "prunekit-rows", 4).to(dtype)
    monkeypatch.setattr(kernels, "_state", (False, "disabled for the test", None))
    x = torch.randn(5, 12, dtype=dtype)
    with torch.no_grad():
        assert relative_error(module(x), _oracle(w, b, x)) <= RTOL
        assert relative_error(module(x[:1]), _oracle(w, b, x[:1])) <= RTOL


def test_prunekit_rows_arguments():
    w = _block_weight(16, 12, 4, 1, 0.5, 1)
    with pytest.raises(ValueError, match="blocksize is required"):
        SparseLinear(w, None, "prunekit-rows")
    with pytest.raises(ValueError, match="out_features"):
        SparseLinear(w, None, "prunekit-rows", 3)
    with pytest.raises(TypeError, match="float32"):
        SparseLinear(w.double(), None, "prunekit-rows", 4)
    assert "blocksize=4" in repr(SparseLinear(w, None, "prunekit-rows", 4))


# ---- N:M kernel ----

def _nm_weight(out_f: int, in_f: int, n: int, m: int, seed: int, holes: float = 0.0,
               zero_rows: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = w * NM(n, m).mask(torch.rand(out_f, in_f, generator=g), 1 - n / m)
    w = w * (torch.rand(out_f, in_f, generator=g) >= holes)  # some groups keep fewer than n
    if zero_rows:
        w[: out_f // 4] = 0  # fully pruned rows: all padding
    return w


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16), (1, 2), (16, 32)])
@pytest.mark.parametrize("groups", [1, 3, 17, 40])
def test_nm_kernel_matches_dense_oracle(seed, n, m, groups):
    w = _nm_weight(37, m * groups, n, m, seed, holes=0.15 * seed)
    b = torch.randn(37, generator=torch.Generator().manual_seed(seed + 9))
    packed = kernels.nm_pack(w, n, m)
    for batch in BATCHES:
        x = torch.randn(batch, m * groups, generator=torch.Generator().manual_seed(seed + batch))
        y = kernels.spmm_nm(*packed, n, m, b, x)
        assert relative_error(y, _oracle(w, b, x)) <= RTOL, (n, m, groups, batch)
        assert relative_error(kernels.spmm_nm(*packed, n, m, None, x), _oracle(w, None, x)) <= RTOL


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 64, 65, 200])
def test_nm_kernel_thread_count_does_not_change_bits(batch):
    w = _nm_weight(300, 96, 2, 4, 5, holes=0.1)
    x = torch.randn(batch, 96)
    packed = kernels.nm_pack(w, 2, 4)
    outs = [kernels.spmm_nm(*packed, 2, 4, None, x, threads) for threads in (1, 2, 3, 4)]
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 8)])
def test_nm_pack_round_trip(n, m):
    w = _nm_weight(12, 4 * m, n, m, 3, holes=0.3)
    offsets, values = kernels.nm_pack(w, n, m)
    assert offsets.dtype == torch.uint8 and values.shape == offsets.shape == (12, 4 * n)
    rebuilt = torch.zeros_like(w)
    cols = torch.arange(4 * n) // n * m + offsets.long()
    rebuilt.scatter_(1, cols, values)
    assert torch.equal(rebuilt, w)
    assert (cols.diff(dim=1) > 0).all()  # column order within each row: distinct, ascending
    module = SparseLinear(w, None, "prunekit-nm", pattern=(n, m))
    assert torch.equal(module.to_dense_weight(), w)


def test_nm_pack_rejects_what_does_not_fit():
    w = _nm_weight(8, 16, 2, 4, 0)
    with pytest.raises(ValueError, match="more than 1"):
        kernels.nm_pack(w, 1, 4)
    with pytest.raises(ValueError, match="power of two"):
        kernels.nm_pack(w, 3, 4)
    with pytest.raises(ValueError, match="in_features"):
        kernels.nm_pack(w, 2, 32)


def test_nm_pattern_detects_nm_only():
    assert nm_pattern(_nm_weight(16, 64, 2, 4, 0, zero_rows=False)) == (2, 4)
    assert nm_pattern(_nm_weight(16, 64, 1, 8, 0, zero_rows=False)) == (1, 8)
    assert nm_pattern(_nm_weight(16, 64, 4, 8, 0, zero_rows=False)) == (4, 8)
    assert nm_pattern(_nm_weight(16, 64, 2, 4, 0, zero_rows=True)) is None  # a quarter of the rows is padding
    g = torch.Generator().manual_seed(0)
    dense_ish = torch.randn(16, 64, generator=g) * (torch.rand(16, 64, generator=g) > 0.5)
    assert nm_pattern(dense_ish) is None
    assert nm_pattern(torch.zeros(4, 8)) is None
    assert nm_pattern(torch.ones(4, 6)) is None  # no group size divides the inputs and leaves zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prunekit_nm_falls_back_without_kernel(dtype, monkeypatch):
    w = _nm_weight(16, 32, 2, 4, 1)
    b = torch.randn(16)
    module = SparseLinear(w, b, "prunekit-nm", pattern=(2, 4)).to(dtype)
    monkeypatch.setattr(kernels, "_state", (False, "disabled for the test", None))
    x = torch.randn(5, 32, dtype=dtype)
    with torch.no_grad():
        assert relative_error(module(x), _oracle(w, b, x)) <= RTOL
        assert relative_error(module(x[:1]), _oracle(w, b, x[:1])) <= RTOL


def test_prunekit_nm_arguments():
    w = _nm_weight(16, 32, 2, 4, 1)
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear(w, None, "prunekit-nm")
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear(w, None, "csr", pattern=(2, 4))
    with pytest.raises(TypeError, match="pattern"):
        SparseLinear(w, None, "prunekit-nm", pattern="2:4")
    with pytest.raises(TypeError, match="float32"):
        SparseLinear(w.double(), None, "prunekit-nm", pattern=(2, 4))
    with pytest.raises(ValueError, match="more than"):
        SparseLinear(torch.ones(4, 8), None, "prunekit-nm", pattern=(2, 4))
    assert "pattern=2:4" in repr(SparseLinear(w, None, "prunekit-nm", pattern=(2, 4)))


@needs_kernel
def test_accelerate_records_nm_choice():
    model = _pruned_mlp(NM(2, 4), 0.5, 0)
    fast, report = accelerate(model, torch.randn(64, 48), formats=("prunekit-nm",), repeats=2, progress=False)
    assert [layer.pattern for layer in report.layers] == ["2:4"] * 3
    assert "prunekit-nm 2:4" in report.table()
    assert all(m.fmt == "prunekit-nm" for m in fast if isinstance(m, SparseLinear))
    state = fast.state_dict()
    assert any(k.endswith("offsets") and v.dtype == torch.uint8 for k, v in state.items())
