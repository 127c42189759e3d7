"""Tied tensors (an LM's embedding and output head) are stored once and come back tied."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import edit_manifest, read_manifest
from torch import nn

import prunekit
import prunekit.formats as pf
from prunekit.formats import FormatError


class TiedLM(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_tied_weights_stored_once_and_reloaded_tied(tmp_path, seed, quantize):
    model = TiedLM(seed)
    prunekit.Pruner(model, 0.7)
    path = tmp_path / "m.pkt"
    size = prunekit.save(model, path, quantize=quantize)
    manifest = read_manifest(path.read_bytes())
    assert [t["name"] for t in manifest["tensors"]] == ["embed.weight", "body.weight", "body.bias"]
    assert manifest["aliases"] == [["head.weight", "embed.weight"]]
    # Reference: the same file without the duplicate is the size of a state without the head.
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    assert size < len(pf.dumps(untied, quantize=quantize))
    fresh = TiedLM(seed + 10)
    state = prunekit.load(path, fresh)
    assert state["head.weight"] is state["embed.weight"]
    assert fresh.head.weight is fresh.embed.weight
    ids = torch.randint(0, 32, (3, 5))
    if quantize is None:
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    assert torch.equal(fresh.head.weight == 0, model.head.weight == 0)


def test_untied_copies_are_stored_twice():
    w = torch.randn(4, 4)
    data = pf.dumps({"a": w, "b": w.clone(), "c": w[:2]})  # equal values, or a different view: not tied
    assert "aliases" not in read_manifest(data)
    assert sorted(pf.loads(data)) == ["a", "b", "c"]


def test_size_summary_counts_tied_weights_once():
    model = TiedLM(0)
    summary = prunekit.size_summary(model)
    assert summary["numel"] == sum(p.numel() for p in model.parameters())  # parameters() dedupes ties
    assert summary["prunekit_bytes"] == len(pf.dumps(model))


def test_strict_load_checks_alias_names_against_the_model(tmp_path):
    data = pf.dumps(TiedLM(0))
    state = pf.loads(data, expected={k: tuple(v.shape) for k, v in TiedLM(1).state_dict().items()})
    assert set(state) == {"embed.weight", "body.weight", "body.bias", "head.weight"}
    with pytest.raises(FormatError, match=r"unexpected \['head.weight'\]"):
        pf.loads(data, expected={"embed.weight": (32, 16), "body.weight": (16, 16), "body.bias": (16,)})


ALIAS_EDITS = [
    ("not_list", lambda m: m.update(aliases={}), r"'aliases' must be a list"),
    ("not_pair", lambda m: m.update(aliases=[["x"]]), r"aliases\[0\] must be \[alias, source\]"),
    ("not_strings", lambda m: m.update(aliases=[["x", 3]]), r"aliases\[0\] must be \[alias, source\]"),
    ("empty_alias", lambda m: m.update(aliases=[["", "embed.weight"]]), r"non-empty string"),
    ("alias_is_tensor", lambda m: m.update(aliases=[["body.bias", "embed.weight"]]), r"already a tensor or alias"),
    ("alias_twice", lambda m: m.update(aliases=[["x", "embed.weight"], ["x", "body.bias"]]),
     r"aliases\[1\]: 'x' is already"),
    ("missing_source", lambda m: m.update(aliases=[["x", "nope"]]), r"source 'nope' is not a tensor"),
    ("alias_of_alias", lambda m: m.update(aliases=[["x", "embed.weight"], ["y", "x"]]), r"source 'x' is not a tensor"),
]


@pytest.mark.parametrize("name, edit, match", ALIAS_EDITS, ids=[e[0] for e in ALIAS_EDITS])
def test_hostile_aliases_are_format_errors(name, edit, match):
    data = pf.dumps(TiedLM(0))
    with pytest.raises(FormatError, match=match):
        pf.loads(edit_manifest(data, edit))
