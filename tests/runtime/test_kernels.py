"""prunekit's own sparse x dense kernel against the dense oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.runtime import SparseLinear, accelerate, kernels
from prunekit.runtime.selection import build_candidates, relative_error

OK, WHY = kernels.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"prunekit kernel unavailable: {WHY}")
RTOL = 1e-5


def _weight(out_f: int, in_f: int, sparsity: float, seed: int, empty_rows: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[torch.rand(out_f, in_f, generator=g) < sparsity] = 0
    if empty_rows:
        w[torch.randperm(out_f, generator=g)[:empty_rows]] = 0
    return w


def _oracle(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _run(w, b, x, threads=None):
    crow, col, val = kernels._csr32(w)
    return kernels.spmm(crow, col, val, b, x, threads)


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 17), (64, 64), (129, 97), (300, 50), (20, 700)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_matches_dense_oracle(seed, shape, sparsity):
    w = _weight(*shape, sparsity, seed, empty_rows=shape[0] // 5)
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 100))
    for batch in (1, 2, 3, 15, 16, 17, 63, 64, 65, 130):
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + batch))
        y = _run(w, b, x)
        assert y.shape == (batch, shape[0]) and y.dtype == torch.float32
        assert relative_error(y, _oracle(w, b, x)) <= RTOL, (batch, shape, sparsity)
        assert relative_error(_run(w, None, x), _oracle(w, None, x)) <= RTOL


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 64, 65])
def test_fully_pruned_weight_gives_bias(batch):
    w = torch.zeros(40, 30)
    b = torch.randn(40)
    x = torch.randn(batch, 30)
    assert torch.equal(_run(w, b, x), b.expand(batch, 40))
    assert torch.equal(_run(w, None, x), torch.zeros(batch, 40))


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 63, 64, 65, 200])
def test_thread_count_does_not_change_bits(batch):
    w = _weight(512, 384, 0.9, 3, empty_rows=10)
    b = torch.randn(512)
    x = torch.randn(batch, 384)
    outs = [_run(w, b, x, threads) for threads in (1, 2, 3, 4)]
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
    assert relative_error(outs[0], _oracle(w, b, x)) <= RTOL


@needs_kernel
def test_strided_and_transposed_inputs():
    w = _weight(48, 40, 0.8, 4)
    crow, col, val = kernels._csr32(w)
    base = torch.randn(80, 70)
    for x in (base[::2, :40], base[:40, :40].t(), base[:, 5:45], base[:1, :40], base[:40, :1].t()):
        y = kernels.spmm(crow, col, val, None, x)
        assert relative_error(y, _oracle(w, None, x)) <= RTOL
    xt = base[:40, :64]  # already (in, B) with unit column stride: used in place
    assert relative_error(kernels.spmm_t(crow, col, val, None, xt).t(), _oracle(w, None, xt.t())) <= RTOL


@needs_kernel
def test_rejects_bad_dtypes():
    crow, col, val = kernels._csr32(_weight(8, 6, 0.5, 0))
    with pytest.raises(TypeError, match="xt"):
        kernels.spmm_t(crow, col, val, None, torch.randn(6, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="crow"):
        kernels.spmm_t(crow.long(), col, val, None, torch.randn(6, 3))


# ---- SparseLinear(fmt="prunekit") ----

def _linear(out_f: int, in_f: int, sparsity: float, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(out_f, in_f, sparsity, seed))
    return lin


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lead", [(1,), (2,), (63,), (64,), (65,), (3, 5), (2, 1, 33), ()])
def test_sparse_linear_any_leading_shape(seed, lead):
    lin = _linear(70, 45, 0.9, seed)
    module = SparseLinear.from_linear(lin, "prunekit")
    x = torch.randn(*lead, 45)
    with torch.inference_mode():
        y, ref = module(x), lin(x)
    assert y.shape == ref.shape
    assert relative_error(y, ref) <= RTOL


@needs_kernel
def test_sparse_linear_chain_and_relu_views():
    torch.manual_seed(0)
    layers = [_linear(96, 64, 0.85, 1), nn.ReLU(), _linear(64, 96, 0.85, 2), nn.ReLU(), _linear(10, 64, 0.5, 3)]
    dense = nn.Sequential(*layers)
    fast = nn.Sequential(*[SparseLinear.from_linear(m, "prunekit") if isinstance(m, nn.Linear) else m
                           for m in layers])
    for batch in (1, 2, 64, 65):
        x = torch.randn(batch, 64)
        with torch.inference_mode():
            assert relative_error(fast(x), dense(x)) <= RTOL


def test_sparse_linear_other_dtypes_fall_back_to_csr():
    lin = _linear(20, 12, 0.7, 5).double()
    module = SparseLinear.from_linear(lin, "prunekit")
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(module(x), lin(x)) <= 1e-12
        assert module(torch.randn(0, 12, dtype=torch.float64)).shape == (0, 20)
    assert "format=prunekit" in repr(module)
    assert torch.equal(module.to_dense_weight(), lin.weight.detach())


@needs_kernel
def test_sparse_linear_empty_batch_and_no_bias():
    lin = _linear(20, 12, 0.7, 6, bias=False)
    module = SparseLinear.from_linear(lin, "prunekit")
    with torch.inference_mode():
        assert module(torch.randn(0, 12)).shape == (0, 20)
        x = torch.randn(5, 12)
        assert relative_error(module(x), lin(x)) <= RTOL


@needs_kernel
def test_accelerate_can_choose_the_kernel():
    model = nn.Sequential(_linear(128, 64, 0.9, 7), nn.ReLU(), _linear(32, 128, 0.9, 8))
    x = torch.randn(16, 64)
    fast, report = accelerate(model, x, formats=("prunekit",), repeats=2, progress=False)
    assert [layer.format for layer in report.layers] == ["prunekit", "prunekit"]
    assert all(isinstance(m, SparseLinear) and m.fmt == "prunekit" for m in (fast[0], fast[2]))
    with torch.inference_mode():
        assert relative_error(fast(x), model(x)) <= RTOL
    _, report = accelerate(model, x, repeats=2, progress=False)  # default formats include it
    assert all("prunekit" in layer.timings_ms for layer in report.layers)


def test_unavailable_kernel_is_skipped_and_module_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    ok, why = kernels.available()
    assert not ok and "compiler" in why
    lin = _linear(30, 20, 0.9, 9)
    x = torch.randn(8, 20)
    cands, notes = build_candidates(lin, ("dense", "csr", "prunekit"), x, RTOL)
    assert "prunekit" not in cands and notes["prunekit"].startswith("skipped")
    module = SparseLinear.from_linear(lin, "prunekit")
    with torch.inference_mode():
        assert relative_error(module(x), lin(x)) <= RTOL
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.spmm(*kernels._csr32(lin.weight.detach()), None, x)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setenv("PRUNEKIT_KERNEL", "0")
    assert kernels.available() == (False, "disabled by PRUNEKIT_KERNEL=0")


@needs_kernel
def test_build_into_fresh_cache_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    lib = kernels._build()
    assert lib.exists() and lib.parent == tmp_path / "cache"
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name]  # no temporary left behind
    assert kernels._build() == lib  # second call reuses the cached library


@needs_kernel
@pytest.mark.parametrize("tile_bytes", [64, 4096])
def test_tiled_path_matches_and_is_thread_invariant(tile_bytes, monkeypatch):
    monkeypatch.setattr(kernels, "TILE_BYTES", tile_bytes)
    w = _weight(200, 333, 0.9, 11, empty_rows=7)
    b = torch.randn(200)
    for batch in (1, 2, 17, 64, 65, 130):
        x = torch.randn(batch, 333)
        outs = [_run(w, b, x, threads) for threads in (1, 2, 3)]
        assert all(torch.equal(y, outs[0]) for y in outs[1:])
        assert relative_error(outs[0], _oracle(w, b, x)) <= RTOL
    assert torch.equal(_run(torch.zeros(9, 40), b[:9], torch.randn(5, 40)), b[:9].expand(5, 9))
