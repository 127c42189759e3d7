"""prunekit.apps.demo: the end-to-end LeNet-5 pruning demo (quick variant)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from prunekit.apps.demo import FULL, QUICK, demo_schedule, run_demo
from prunekit.apps.models import LeNet5
from prunekit.core.schedules import PolynomialDecay, schedule_from_dict
from prunekit.training.data import load_mnist5k
from prunekit.training.loop import evaluate

WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight")


def _quiet_run(out: Path, seed: int = 0) -> tuple[dict, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        results = run_demo(out, seed=seed, quick=True, progress=False)
    return results, buffer.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results, printed = _quiet_run(out)
    return out, results, printed


def _numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("seconds", "latency")}  # wall-clock figures vary


def test_writes_results_json_with_the_documented_fields(quick):
    out, results, _ = quick
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("dense_accuracy", "pruned_accuracy", "sparsity", "bytes", "seed", "schedule", "layers", "seconds"):
        assert key in on_disk, key
    assert set(on_disk["bytes"]) == {"dense_raw", "dense_gzip", "pruned_raw", "pruned_gzip",
                                     "prunekit", "prunekit_int8"}
    assert 0.0 <= on_disk["int8_accuracy"] <= 1.0 and 0.0 <= on_disk["prunekit_accuracy"] <= 1.0
    assert on_disk["seed"] == 0 and on_disk["quick"] is True and on_disk["seconds"] > 0
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pkt", "model.safetensors",
                                                     "model_int8.pkt", "results.json"]


def test_pruned_model_file_has_exactly_80_percent_zeros_per_layer(quick):
    out, results, _ = quick
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(LeNet5().state_dict())  # the model's own keys: no weight_orig / masks
    numel = zeros = 0
    for name in WEIGHTS:
        w = tensors[name]
        assert int((w == 0).sum()) == round(w.numel() * 0.8), name
        numel, zeros = numel + w.numel(), zeros + int((w == 0).sum())
    assert results["sparsity"] == pytest.approx(zeros / numel)
    assert results["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert all(int((tensors[n.replace("weight", "bias")] == 0).sum()) == 0 for n in WEIGHTS)  # biases unpruned
    rows = {row["name"]: row for row in results["layers"]["layers"]}
    assert list(rows) == list(WEIGHTS)
    assert all(rows[n]["zeros"] == round(rows[n]["numel"] * 0.8) and rows[n]["target"] == 0.8 for n in WEIGHTS)


def test_reported_sizes_match_an_independent_serialisation(quick):
    out, results, _ = quick
    raw = (out / "model.safetensors").read_bytes()
    sizes = results["bytes"]
    assert sizes["pruned_raw"] == len(raw) == len(save(load_file(out / "model.safetensors")))
    assert sizes["pruned_gzip"] == len(gzip.compress(raw, 9))
    assert sizes["dense_raw"] == sizes["pruned_raw"]  # zeros still take 4 bytes each uncompressed
    assert sizes["pruned_gzip"] < 0.5 * sizes["dense_gzip"]  # but compress well


def test_saved_model_reproduces_the_reported_accuracy(quick):
    out, results, _ = quick
    model = LeNet5()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    X_test, y_test = load_mnist5k("test")
    n = results["test_samples"]
    assert evaluate(model, X_test[:n], y_test[:n])["accuracy"] == results["pruned_accuracy"]


def test_quick_run_learns_and_keeps_its_schedule(quick):
    _, results, _ = quick
    assert results["dense_accuracy"] > 0.4 and results["pruned_accuracy"] > 0.4  # chance is 0.1
    assert results["dense_sparsity"] < 0.01
    schedule = schedule_from_dict(results["schedule"])
    assert isinstance(schedule, PolynomialDecay)
    assert (schedule.initial_sparsity, schedule.final_sparsity, schedule.begin_step) == (0.5, 0.8, 0)
    assert schedule == demo_schedule(QUICK, results["train_samples"])


def test_prints_the_table_and_the_layer_report(quick):
    out, results, printed = quick
    assert "dense" in printed and "pruned" in printed
    assert f"{results['pruned_accuracy']:.2%}" in printed and "80.00%" in printed
    assert "gzip" in printed and "fc1.weight" in printed and "total" in printed
    assert f"wrote results.json, model.safetensors, model.pkt, model_int8.pkt, model.onnx to {out}" in printed
    assert "prunekit file, int8" in printed and "ONNX: model.onnx" in printed


def test_same_seed_gives_identical_results_and_files(quick, tmp_path):
    out, results, _ = quick
    again, _ = _quiet_run(tmp_path)
    assert _numbers(again) == _numbers(results)
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_other_seed_gives_other_weights(quick, tmp_path):
    _, results, _ = quick
    other, _ = _quiet_run(tmp_path, seed=1)
    assert other["seed"] == 1 and other["dense_loss"] != results["dense_loss"]


def test_demo_leaves_global_torch_state_alone(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    _quiet_run(tmp_path)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("config", [FULL, QUICK], ids=["full", "quick"])
def test_schedule_reaches_final_sparsity_before_the_end(config):
    n_train = config.train_samples or 4000
    total = math.ceil(n_train / config.batch_size) * config.finetune_epochs
    s = demo_schedule(config, n_train)
    # tfmot semantics: the last update is at end_step only if it is on the frequency grid.
    assert (s.end_step - s.begin_step) % s.frequency == 0
    assert s.should_update(s.end_step) and s.sparsity(s.end_step) == 0.8
    assert 0.5 * total <= s.end_step <= 0.8 * total


def test_run_demo_rejects_bad_arguments(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        run_demo(a_file, quick=True)
    with pytest.raises(ValueError, match="seed"):
        run_demo(tmp_path, seed=-1, quick=True)
    with pytest.raises(TypeError, match="seed"):
        run_demo(tmp_path, seed="1", quick=True)
    with pytest.raises(TypeError, match="quick"):
        run_demo(tmp_path, quick="yes")
    with pytest.raises(TypeError, match="out"):
        run_demo(None, quick=True)


def test_shipped_files_reload_to_the_reported_accuracies_and_sizes(quick):
    import prunekit

    out, results, _ = quick
    X_test, y_test = load_mnist5k("test")
    n = results["test_samples"]
    for name, acc_key, size_key in (("model.pkt", "prunekit_accuracy", "prunekit"),
                                    ("model_int8.pkt", "int8_accuracy", "prunekit_int8")):
        assert (out / name).stat().st_size == results["bytes"][size_key]
        model = LeNet5()
        prunekit.load(out / name, model)
        assert evaluate(model, X_test[:n], y_test[:n])["accuracy"] == results[acc_key]
    # Lossless means lossless: the same accuracy as the stripped model, and 80% zeros make it smaller than gzip.
    assert results["prunekit_accuracy"] == results["pruned_accuracy"]
    assert results["bytes"]["prunekit"] < results["bytes"]["pruned_gzip"]
    assert results["bytes"]["prunekit_int8"] < results["bytes"]["prunekit"] / 2


def test_onnx_export_matches_torch(quick):
    out, results, _ = quick
    assert (out / results["onnx"]["path"]).stat().st_size == results["onnx"]["bytes"]
    assert results["onnx"]["max_rel_error"] <= 1e-4


def test_latency_row_compares_dense_and_accelerated(quick):
    _, results, printed = quick
    lat = results["latency"]
    assert lat["batch"] == 64 and lat["dense_ms"] > 0 and lat["accelerated_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["dense_ms"] / lat["accelerated_ms"])
    assert set(lat["formats"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}  # every prunable layer was considered
    assert "latency, batch 64" in printed and "prunekit.accelerate" in printed
