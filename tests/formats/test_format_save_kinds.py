"""``save`` refuses tensors it cannot store as plain values, with a TypeError naming the key; views are values."""

from __future__ import annotations

import pytest
import torch

import prunekit.formats as pf
from prunekit.formats import UnsupportedTensorError


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.randn(4, 4), scale=0.1, zero_point=0, dtype=torch.qint8)


REFUSED = [
    ("sparse_coo", lambda: torch.eye(3).to_sparse(), "sparse_coo tensor; save its dense values"),
    ("sparse_csr", lambda: torch.eye(3).to_sparse_csr(), "sparse_csr tensor"),
    ("nested", lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensor"),
    ("meta", lambda: torch.empty(3, 3, device="meta"), "meta device and has no values"),
    ("quantized", _quantized, "torch quantized tensor"),
    ("complex", lambda: torch.ones(2, dtype=torch.complex64), "dtype torch.complex64 cannot be stored"),
    ("float8", lambda: torch.zeros(2, dtype=torch.float8_e4m3fn), "cannot be stored"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # beta/prototype/deprecated notices of the kinds themselves
@pytest.mark.parametrize("kind, make, match", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_tensor_kinds_are_a_type_error_naming_the_key(tmp_path, kind, make, match):
    state = {"fine": torch.ones(2), f"layer.{kind}": make()}
    with pytest.raises(TypeError, match=match) as info:
        pf.save(state, tmp_path / "m.pkt")
    assert isinstance(info.value, UnsupportedTensorError) and isinstance(info.value, ValueError)
    assert f"'layer.{kind}'" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "m.pkt").exists()
    with pytest.raises(TypeError, match=match):
        pf.dumps(state)


def test_a_meta_model_is_refused_before_anything_is_written(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match="'weight' is on the meta device"):
        pf.save(model, tmp_path / "m.pkt")
    assert list(tmp_path.iterdir()) == []


def test_views_of_a_larger_storage_are_saved_as_their_values():
    base = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    state = {"row": base[3], "col": base[:, 2], "block": base[2:5, 4:8], "strided": base[::3, ::4],
             "scalar": base[7, 7], "expanded": torch.ones(1, 3).expand(4, 3)}
    data = pf.dumps(state)
    out = pf.loads(data)
    for name, view in state.items():
        assert torch.equal(out[name], view) and out[name].shape == view.shape
        assert out[name].untyped_storage().nbytes() == view.numel() * 4  # its values only, not the base
    assert data == pf.dumps({k: v.clone() for k, v in state.items()})  # exactly as if they were copies


def test_a_tensor_with_the_negative_bit_is_saved_as_its_values():
    t = torch.tensor([1.0, -2.0, 3.0])
    neg = torch._neg_view(t)
    assert neg.is_neg()
    out = pf.loads(pf.dumps({"t": t, "n": neg}))  # same storage, same strides, other values: not tied
    assert torch.equal(out["n"], -t) and torch.equal(out["t"], t)
