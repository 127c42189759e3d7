"""Pruned models save, load (through apply_shapes) and export to ONNX like any model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from structural_zoo import ZOO, build, rel_err

import prunekit
from prunekit.methods.structural import apply_shapes, prune_channels


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("source", ["shapes", "state"])
def test_save_load_round_trip(name: str, source: str, tmp_path) -> None:
    model, x = build(name, 1)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5, round_to=2)
    prunekit.save(pruned, tmp_path / "pruned.pkt")
    if source == "shapes":
        shapes = json.loads(json.dumps(report.shapes))  # survives JSON
    else:
        shapes = prunekit.load(tmp_path / "pruned.pkt")
    torch.manual_seed(99)
    fresh = apply_shapes(ZOO[name][0](), shapes)
    prunekit.load(tmp_path / "pruned.pkt", fresh)
    assert list(fresh.state_dict()) == list(model.state_dict())  # same keys, same order
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


def test_apply_shapes_rejects_bad_shapes() -> None:
    model, _ = build("vgg", 0)
    with pytest.raises(ValueError, match="no module 'nope'"):
        apply_shapes(model, {"nope": {"weight": [1]}})
    with pytest.raises(ValueError, match="cannot become"):
        apply_shapes(model, {"features.0": {"weight": [32, 3, 3, 3]}})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_onnx_export_matches_torch(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = build(name, 2)
    pruned, _ = prune_channels(copy.deepcopy(model), x, 0.5)
    pruned.eval()
    result = prunekit.export_onnx(pruned, x, tmp_path / "pruned.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), pruned(probe)) < 1e-4
