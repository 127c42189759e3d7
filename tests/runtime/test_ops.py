"""prunekit's kernels as torch operators: torch.compile, torch.export and a reload without prunekit's module
classes, the pure-torch fallback without the compiled library, opcheck; everything against float64 oracles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.runtime import SparseConv2d, SparseLinear, kernels, ops
from prunekit.runtime.selection import relative_error

KERNEL, WHY = kernels.available()
needs_kernel = pytest.mark.skipif(not KERNEL, reason=f"prunekit kernel unavailable: {WHY}")
RTOL = 1e-5
OPS = ("spmm_csr", "spmm_rows", "spmm_nm")
DISABLED = (False, "disabled for the test", None)


# -- weights and a model with every prunekit format -----------------------------------------------------------------


def _sparse(out_f: int, in_f: int, sparsity: float, g: torch.Generator, empty_rows: int = 0) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) >= sparsity)
    w[torch.randperm(out_f, generator=g)[:empty_rows]] = 0
    return w


def _block_rows(out_f: int, in_f: int, rows: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(out_f // rows, in_f, generator=g) >= sparsity).repeat_interleave(rows, 0)
    w = torch.randn(out_f, in_f, generator=g) * keep
    w[0, :] = 0  # a block with some rows empty: its stored zeros must stay zeros
    return w


def _nm(out_f: int, in_f: int, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """At most ``n`` nonzeros per group of ``m`` inputs; some groups have fewer (padding), some rows none."""
    w = torch.randn(out_f, in_f, generator=g)
    ranks = torch.rand(out_f, in_f // m, m, generator=g).argsort(dim=2).argsort(dim=2)
    w = w * (ranks < n).reshape(out_f, in_f)
    w[torch.rand(out_f, in_f, generator=g) < 0.2] = 0
    w[1] = 0
    return w


def _pruned_conv(cin: int, cout: int, k: int, g: torch.Generator, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, **kwargs)
    with torch.no_grad():
        shape = conv.weight.shape
        conv.weight.copy_(torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) > 0.7))
        conv.weight[0] = 0  # a fully pruned filter
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


def _models(seed: int, pointwise: bool = True) -> tuple[nn.Module, nn.Module]:
    """``(sparse, dense)``: the same function, once with prunekit's modules in every kernel format and once
    as the dense layers with exact zeros (the oracle, run in float64)."""
    g = torch.Generator().manual_seed(seed)
    convs = [_pruned_conv(3, 8, 3, g, padding=1)] + ([_pruned_conv(8, 8, 1, g)] if pointwise else [])
    specs = [  # (weight, bias, format, blocksize, pattern)
        (_sparse(48, 200, 0.9, g, empty_rows=3), torch.randn(48, generator=g), "prunekit", None, None),
        (_block_rows(36, 48, 4, 0.5, g), None, "prunekit-rows", 4, None),
        (_nm(20, 36, 2, 4, g), torch.randn(20, generator=g), "prunekit-nm", None, (2, 4)),
        (_nm(9, 20, 1, 4, g), None, "prunekit-nm", None, (1, 4)),
        (torch.zeros(7, 9), torch.randn(7, generator=g), "prunekit", None, None),  # fully pruned
    ]
    sparse, dense = [], []
    for conv in convs:
        sparse += [SparseConv2d(conv, "prunekit"), nn.ReLU()]
        dense += [conv, nn.ReLU()]
    sparse.append(nn.Flatten())
    dense.append(nn.Flatten())
    for w, b, fmt, block, pattern in specs:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        sparse += [SparseLinear(w, b, fmt, block, pattern), nn.ReLU()]
        dense += [lin, nn.ReLU()]
    return nn.Sequential(*sparse[:-1]).eval(), nn.Sequential(*dense[:-1]).eval()


def _input(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(1000 + seed + batch))


def _oracle(dense: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dense.double()(x.double())


def _op_counts(graph: torch.fx.Graph) -> dict[str, int]:
    counts = {name: 0 for name in OPS}
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("prunekit."):
            counts[str(node.target).split(".")[1]] += 1
    return counts


# -- eager -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [1, 3, 67])
def test_the_model_matches_its_dense_oracle(batch, seed):
    sparse, dense = _models(seed)
    x = _input(batch, seed)
    with torch.inference_mode():
        assert relative_error(sparse(x), _oracle(dense, x)) <= RTOL


def test_registration_is_idempotent_and_by_call():
    ops.register()
    ops.register()
    for name in OPS:
        assert getattr(torch.ops.prunekit, name).default.name() == f"prunekit::{name}"
    first = ops.define("test_twice", "(Tensor x) -> Tensor", lambda x: x + 1, lambda x: torch.empty_like(x))
    again = ops.define("test_twice", "(Tensor x) -> Tensor", lambda x: x - 1, lambda x: torch.empty_like(x))
    assert again is first and first(torch.zeros(2)).tolist() == [1.0, 1.0]


# -- torch.compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 67])
def test_compile_fullgraph_matches_eager(batch):
    torch._dynamo.reset()
    sparse, dense = _models(0)
    x = _input(batch)
    with torch.inference_mode():
        eager = sparse(x)
        compiled = torch.compile(sparse, fullgraph=True)(x)
    assert compiled.shape == eager.shape
    assert relative_error(compiled, eager) <= 1e-6
    assert relative_error(compiled, _oracle(dense, x)) <= RTOL


def test_compile_traces_the_fake_implementations_and_runs_each_op_once(monkeypatch):
    # A graph-capturing backend: one graph (fullgraph) holding every op; while tracing, the ops run on fake
    # tensors, so the one compiled call runs each layer's CPU implementation exactly once.
    torch._dynamo.reset()
    sparse, dense = _models(1)
    graphs, calls = [], []

    def backend(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    def counting(fn):
        def wrapper(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapper

    for name in ("linear_unchecked", "rows_linear_unchecked", "nm_linear_unchecked"):
        monkeypatch.setattr(kernels, name, counting(getattr(kernels, name)))
    monkeypatch.setattr(ops, "_sparse_product", counting(ops._sparse_product))
    x = _input(3)
    with torch.no_grad():
        out = torch.compile(sparse, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1
    # CSR: the 3x3 convolution, the 1x1 one (traced: one product over the whole batch), two linears.
    assert _op_counts(graphs[0]) == {"spmm_csr": 4, "spmm_rows": 1, "spmm_nm": 2}
    assert len(calls) == 7
    assert relative_error(out, _oracle(dense, x)) <= RTOL


def test_explain_sees_no_graph_break():
    torch._dynamo.reset()
    sparse, _ = _models(2)
    with torch.no_grad():
        explanation = torch._dynamo.explain(sparse)(_input(4))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@needs_kernel
def test_negative_control_a_direct_ctypes_call_breaks_the_graph():
    # What the operators exist for: calling the ctypes kernel from a traced forward is a graph break.
    lin = SparseLinear(_sparse(16, 12, 0.5, torch.Generator().manual_seed(3)), None, "prunekit")

    class Direct(nn.Module):
        def forward(self, x):
            return kernels.linear_unchecked(lin.crow_indices, lin.col_indices, lin.values, None, x)

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(Direct())(torch.randn(3, 12))
    assert explained.graph_break_count >= 1 or explained.break_reasons, explained


def test_compile_without_the_kernel_runs_the_torch_fallback(monkeypatch):
    monkeypatch.setattr(kernels, "_state", DISABLED)
    torch._dynamo.reset()
    sparse, dense = _models(3)
    for batch in (1, 6):
        x = _input(batch)
        with torch.no_grad():
            compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)(x)
            assert relative_error(compiled, sparse(x)) <= RTOL  # eager: SparseLinear's own CSR path
        assert relative_error(compiled, _oracle(dense, x)) <= RTOL
    torch._dynamo.reset()


# -- torch.export, reloaded in a fresh process -----------------------------------------------------------------------


_RELOAD = """
import json, sys
import torch
import prunekit.runtime.ops as ops  # registers nothing by itself
from prunekit.runtime import exported  # exported.load registers every prunekit operator, then loads


def error(y, ref):
    if y.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return (y.double() - ref.double()).abs().max().item() / max(ref.abs().max().item(), 1e-30)


program = exported.load(sys.argv[1])
module = program.module()
data = torch.load(sys.argv[2], weights_only=True)
result = {"kernel": list(ops.kernels.available()),
          "classes": sorted({type(m).__module__.split(".")[0] for m in module.modules()}), "errors": {}}
with torch.inference_mode():
    for key, x in data["inputs"].items():
        result["errors"][key] = error(module(x), data["outputs"][key])
    for key, args in data.get("op_args", {}).items():
        y = getattr(torch.ops.prunekit, key.split("/")[0]).default(*args)
        result["errors"]["op " + key] = error(y, data["op_outputs"][key])
print(json.dumps(result))
"""


def _run_fresh(program: Path, data: Path, *extra: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(program), str(data), *extra], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(tmp_path: Path, pointwise: bool, dynamic: bool) -> tuple[Path, Path, dict]:
    sparse, dense = _models(4, pointwise)
    example = _input(5)
    shapes = {"input": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    with torch.no_grad():
        program = torch.export.export(sparse, (example,), dynamic_shapes=shapes)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    batches = (1, 5, 67) if dynamic else (5,)
    inputs = {str(b): _input(b) for b in batches}
    with torch.inference_mode():
        outputs = {k: sparse(x) for k, x in inputs.items()}
    for k, x in inputs.items():
        assert relative_error(outputs[k], _oracle(dense, x)) <= RTOL
    data = tmp_path / "data.pt"
    torch.save({"inputs": inputs, "outputs": outputs}, data)
    return path, data, _op_counts(program.graph)


@pytest.mark.slow
def test_export_with_dynamic_batch_reloads_in_a_fresh_process_without_prunekit_classes(tmp_path):
    path, data, counts = _export(tmp_path, pointwise=False, dynamic=True)
    assert counts == {"spmm_csr": 3, "spmm_rows": 1, "spmm_nm": 2}
    result = _run_fresh(path, data)
    assert result["kernel"][0] == KERNEL
    assert result["classes"] == ["torch"]  # the reloaded module is torch's, with prunekit's ops in its graph
    assert set(result["errors"]) == {"1", "5", "67"}
    assert all(err <= 1e-6 for err in result["errors"].values()), result["errors"]


@pytest.mark.slow
def test_export_with_a_pointwise_convolution_reloads_at_any_batch(tmp_path):
    # Traced, SparseConv2d's 1x1 path is one product over (in, B*H*W), so the batch stays dynamic.
    path, data, counts = _export(tmp_path, pointwise=True, dynamic=True)
    assert counts == {"spmm_csr": 3 + 1, "spmm_rows": 1, "spmm_nm": 2}  # the 1x1 convolution: one product
    result = _run_fresh(path, data)
    assert result["classes"] == ["torch"] and all(err <= 1e-6 for err in result["errors"].values()), result


def test_negative_control_an_exported_program_needs_the_ops_registered(tmp_path):
    lin = SparseLinear(_sparse(8, 6, 0.5, torch.Generator().manual_seed(5)), None, "prunekit")
    with torch.no_grad():
        torch.export.save(torch.export.export(lin, (torch.randn(2, 6),)), tmp_path / "lin.pt2")
    code = f"import torch\ntorch.export.load({str(tmp_path / 'lin.pt2')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "prunekit.spmm_csr" in proc.stderr


# -- the fallback: the same operators without the compiled library ---------------------------------------------------


def _op_cases(seed: int) -> list[tuple[str, tuple, torch.Tensor]]:
    """``(op, args, float64 oracle)`` for random odd shapes, empty rows, fully pruned weights and batch 0/1/odd."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 8 * int(torch.randint(1, 9, (1,), generator=g)) + 4, 4 * int(torch.randint(1, 30, (1,), generator=g))
    cases = []
    for batch in (0, 1, 7, 70):
        x = torch.randn(batch, in_f, generator=g)
        bias = torch.randn(out_f, generator=g) if batch % 2 else None
        w_csr = _sparse(out_f, in_f, 0.85, g, empty_rows=3)
        w_rows = _block_rows(out_f, in_f, 4, 0.6, g)
        w_nm = _nm(out_f, in_f, 2, 4, g)
        for name, w, args in (
                ("spmm_csr", w_csr, (*kernels._csr32(w_csr), bias, x)),
                ("spmm_csr", torch.zeros(out_f, in_f), (*kernels._csr32(torch.zeros(out_f, in_f)), bias, x)),
                ("spmm_rows", w_rows, (*kernels.row_blocks(w_rows, 4), 4, bias, x)),
                ("spmm_nm", w_nm, (*kernels.nm_pack(w_nm, 2, 4), 2, 4, bias, x))):
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            cases.append((name, args, ref))
    return cases


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False], ids=["kernel", "fallback"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ops_match_the_float64_oracle(kernel, seed, monkeypatch):
    if not kernel:
        monkeypatch.setattr(kernels, "_state", DISABLED)
    for name, args, ref in _op_cases(seed):
        with torch.inference_mode():
            y = getattr(ops, name)(*args)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert y.is_contiguous()  # the operators' contiguous (B, out) result, also in the fallback
        assert relative_error(y, ref) <= RTOL, (name, tuple(ref.shape))


@pytest.mark.slow
def test_fallback_in_a_fresh_process_without_the_kernel(tmp_path):
    path, data, _ = _export(tmp_path, pointwise=False, dynamic=True)
    saved = torch.load(data, weights_only=True)
    op_args, op_outputs = {}, {}
    for i, (name, args, ref) in enumerate(_op_cases(7)):
        with torch.inference_mode():
            op_outputs[f"{name}/{i}"] = getattr(ops, name)(*args).contiguous()  # with the kernel where it built
        op_args[f"{name}/{i}"] = args
        assert relative_error(op_outputs[f"{name}/{i}"], ref) <= RTOL
    torch.save({**saved, "op_args": op_args, "op_outputs": op_outputs}, data)
    result = _run_fresh(path, data, PRUNEKIT_KERNEL="0")
    assert result["kernel"] == [False, "disabled by PRUNEKIT_KERNEL=0"]
    assert result["classes"] == ["torch"]
    assert len(result["errors"]) == 3 + len(op_args)
    assert all(err <= RTOL for err in result["errors"].values()), result["errors"]


# -- opcheck and argument errors -------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck not in this torch")
@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False], ids=["kernel", "fallback"])
def test_opcheck(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(kernels, "_state", DISABLED)
    ops.register()
    seen = set()
    for name, args, _ in _op_cases(3):
        if args[-1].shape[0] in (1, 7):  # opcheck runs each case several times; two batches suffice
            torch.library.opcheck(getattr(torch.ops.prunekit, name).default, args)
            seen.add(name)
    assert seen == set(OPS)


def test_negative_control_opcheck_catches_a_fake_with_the_wrong_strides():
    op = ops.define("test_wrong_fake", "(Tensor x) -> Tensor", lambda x: (2 * x).t().contiguous().t(),
                    lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))
    with pytest.raises(Exception, match="[Ss]tride"):
        torch.library.opcheck(op, (torch.randn(3, 4),))


def test_bad_arguments_are_named():
    w = _sparse(6, 8, 0.5, torch.Generator().manual_seed(0))
    crow, col, val = kernels._csr32(w)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="prunekit::spmm_csr: crow must be a contiguous torch.int32"):
        ops.spmm_csr(crow.long(), col, val, None, x)
    with pytest.raises(ValueError, match="prunekit::spmm_csr: x must be a 2-D float32"):
        ops.spmm_csr(crow, col, val, None, x.double())
    with pytest.raises(ValueError, match=r"bias must be .* shape \(6,\)"):
        ops.spmm_csr(crow, col, val, torch.zeros(5), x)
    with pytest.raises(ValueError, match="prunekit::spmm_rows: needs gptr"):
        ops.spmm_rows(*kernels.row_blocks(w, 2), 3, None, x)
    with pytest.raises(ValueError, match="prunekit::spmm_nm: 3:4"):
        ops.spmm_nm(*kernels.nm_pack(torch.zeros(6, 8), 2, 4), 3, 4, None, x)
    with pytest.raises(ValueError, match="prunekit::spmm_nm: offsets and values"):
        ops.spmm_nm(*kernels.nm_pack(torch.zeros(6, 8), 2, 4), 2, 4, None, torch.randn(2, 12))
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.spmm_csr(crow, col, val, None, x.requires_grad_())


def test_fake_checks_run_at_trace_time():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _sparse(6, 8, 0.5, torch.Generator().manual_seed(0))
    ops.register()
    real = kernels._csr32(w)
    with FakeTensorMode() as mode:
        crow, col, val = (mode.from_tensor(t) for t in real)
        x = mode.from_tensor(torch.randn(3, 8))
        assert not ops.eager(x)
        y = ops.spmm_csr(crow, col, val, None, x)
        assert y.shape == (3, 6) and y.stride() == (6, 1)
        with pytest.raises(ValueError, match="bias must be"):
            ops.spmm_csr(crow, col, val, mode.from_tensor(torch.zeros(4)), x)


def test_eager_is_false_under_tracing_and_modes():
    x = torch.randn(2, 3)
    assert ops.eager(x)
    with torch.device("cpu"):  # a torch-function mode
        assert not ops.eager(x)
    seen = []
    torch.jit.trace(lambda t: seen.append(ops.eager(t)) or t * 1, (x,), check_trace=False)
    assert seen == [False]


# -- the int8 kernels through the same helper (once runtime/int8.py defines its operators with ops.define) -----------


def _int8_model() -> nn.Module:
    from prunekit.runtime import int8

    g = torch.Generator().manual_seed(8)
    layers = []
    for out_f, in_f, w, kw in ((48, 32, _sparse(48, 32, 0.8, g, empty_rows=2), {"fmt": "csr"}),
                               (40, 48, _block_rows(40, 48, 4, 0.5, g), {"fmt": "rows", "blocksize": 4,
                                                                          "granularity": "token"}),
                               (24, 40, _nm(24, 40, 2, 4, g), {"fmt": "nm", "pattern": (2, 4), "activations": "static",
                                                               "act_scale": 0.05})):
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers += [int8.Int8Linear.from_linear(lin, **kw), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.slow
def test_int8_operators_compile_export_and_reload_bit_for_bit(tmp_path):
    from prunekit.runtime import int8

    if not hasattr(int8, "register_ops"):
        pytest.skip("runtime/int8.py does not define its operators yet")
    model = _int8_model()
    inputs = {str(b): torch.randn(b, 32, generator=torch.Generator().manual_seed(b)) for b in (1, 5, 67)}
    with torch.inference_mode():
        outputs = {k: model(x) for k, x in inputs.items()}
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert all(torch.equal(compiled(x), outputs[k]) for k, x in inputs.items())  # exact integer sums
        program = torch.export.export(model, (inputs["5"],),
                                      dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=1024)}})
    assert [str(n.target) for n in program.graph.nodes if "prunekit" in str(n.target)] == [
        "prunekit.i8_csr.default", "prunekit.i8_rows.default", "prunekit.i8_nm.default"]
    torch.export.save(program, tmp_path / "int8.pt2")
    torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / "data.pt")
    for env in ({}, {"PRUNEKIT_KERNEL": "0"}):
        result = _run_fresh(tmp_path / "int8.pt2", tmp_path / "data.pt", "int8", **env)
        assert result["classes"] == ["torch"] and result["kernel"][0] == (KERNEL and not env)
        assert all(err == 0 for err in result["errors"].values()), (env, result["errors"])
