"""Recipe ``export:`` entries for the phone runtimes: validation, the run's files, results, resume.

References are independent of the export stage: file sizes from the bytes on disk (gzip -9 computed
here), accuracies from the runtime's own bindings run here on the written file (and from the torch
model the run ended with), the digest of recipes without phone entries as computed before these
entries existed.
"""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest
import torch
from recipe_helpers import TINY, merged

from prunekit.apps.recipe import parse_recipe, run_recipe
from prunekit.apps.recipe.build import load_data
from prunekit.apps.recipe.config import ExportConfig, MobileTarget, RecipeError
from prunekit.apps.recipe.stages import STAGES, load_final_model
from prunekit.formats import mobile
from prunekit.training.loop import evaluate

pytestmark = pytest.mark.usefixtures("single_thread")

BOTH = pytest.mark.skipif(not (mobile.runtime_available("executorch") and mobile.runtime_available("litert")),
                          reason=f"ExecuTorch and LiteRT not both installed: {mobile.EXECUTORCH_INSTALL}; "
                                 f"{mobile.LITERT_INSTALL}")
ENTRIES = [{"to": "prunekit", "quantize": "int8"}, {"to": "executorch", "quantize": "int8"}, {"to": "litert"}]
PHONE_FILES = ("model_int8.pte", "model.tflite")


def test_list_and_mapping_spell_the_same_recipe():
    listed = parse_recipe(merged(TINY, export=[{"to": "prunekit"}, {"to": "prunekit", "quantize": "int8"},
                                               {"to": "executorch", "quantize": "int8"}, "litert"]))
    mapped = parse_recipe(merged(TINY, export={"mobile": [{"to": "executorch", "quantize": "int8"},
                                                          {"to": "litert"}]}))
    assert listed == mapped and listed.digest == mapped.digest
    assert listed.export.mobile == (MobileTarget("executorch", "int8"), MobileTarget("litert", None))
    assert [t.file_name for t in listed.export.mobile] == ["model_int8.pte", "model.tflite"]
    assert parse_recipe(listed.to_dict()) == listed  # recipe.json of a run reads back to the same recipe
    only = ExportConfig.parse([{"to": "litert", "quantize": "int8"}])
    assert (only.prunekit, only.int8, only.onnx) == (False, False, False)  # a list names exactly the files


def test_recipes_without_phone_entries_keep_their_digest():
    # computed with the recipe code before phone entries existed
    assert parse_recipe(copy.deepcopy(TINY)).digest == \
        "b97f900bc68e0616b782a87c7948fc93a5509e942b03c7ef4606b615348df1b4"
    assert parse_recipe(merged(TINY, export={"mobile": []})).digest == parse_recipe(copy.deepcopy(TINY)).digest
    assert parse_recipe(merged(TINY, export={"mobile": [{"to": "litert"}]})).digest != \
        parse_recipe(copy.deepcopy(TINY)).digest


@pytest.mark.parametrize("export, message", [
    ([{"to": "tflite"}], "recipe.export[0].to: must be one of prunekit, onnx, executorch, litert, got 'tflite'"),
    ([{"to": "litert"}, {"to": "executorch", "quantize": "int4"}],
     "recipe.export[1].quantize: must be one of int8, got 'int4'"),
    ([{"to": "litert", "quant": "int8"}], "recipe.export[0]: unknown key 'quant'; allowed: to, quantize"),
    ([{"quantize": "int8"}], "recipe.export[0].to: required"),
    ([{"to": "onnx", "quantize": "int8"}], "recipe.export[0].quantize: the ONNX export is fp32 only"),
    (["litert", {"to": "litert", "quantize": None}], "recipe.export[1]: the same file as recipe.export[0]"),
    ({"mobile": [{"to": "prunekit"}]}, "recipe.export.mobile[0].to: must be one of executorch, litert"),
    ({"mobile": "litert"}, "recipe.export.mobile: must be a list of entries"),
    ({"mobile": [{"to": "litert"}, 7]}, "recipe.export.mobile[1]: must be a mapping, got 7"),
    (3, "recipe.export: must be a mapping {prunekit, int8, onnx, mobile} or a list of entries"),
])
def test_bad_entries_are_refused_with_their_path(export, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(merged(TINY, export=export))
    assert str(info.value).startswith(message), str(info.value)


def test_a_missing_runtime_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(mobile, "runtime_available", lambda runtime: runtime != "litert")
    recipe = parse_recipe(merged(TINY, export=ENTRIES))
    with pytest.raises(RecipeError, match=r"recipe.export: litert needs the litert runtime.*pip install"):
        run_recipe(recipe, tmp_path, progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def phone_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = parse_recipe(merged(TINY, export=ENTRIES))
    return recipe, run_recipe(recipe, out, progress=False, log=None)  # its stages run on one thread


@BOTH
@pytest.mark.slow  # the tiny run and three exports (about half a minute) happen in this test's setup
def test_export_stage_writes_each_file_and_records_its_figures(phone_run):
    recipe, result = phone_run
    run_dir = result.run_dir
    stage = json.loads((run_dir / "stages" / "export.json").read_text())
    assert sorted(k for k in stage if k != "seconds") == ["model.tflite", "model_int8.pkt", "model_int8.pte"]
    assert not (run_dir / "model.pkt").exists() and not (run_dir / "model_int8.tflite").exists()
    for name, runtime, quantize in (("model_int8.pte", "executorch", "int8"), ("model.tflite", "litert", None)):
        data = (run_dir / name).read_bytes()
        entry = stage[name]
        assert entry["path"] == name and entry["runtime"] == runtime and entry["quantize"] == quantize
        assert entry["bytes"] == len(data) and entry["gzip_bytes"] == len(gzip.compress(data, 9))
        assert entry["calibration_samples"] == (256 if quantize else 0)
        assert entry["max_rel_error"] <= (mobile.INT8_RTOL if quantize else 1e-4)
    assert stage["model.tflite"]["fp32_rel_error"] == stage["model.tflite"]["max_rel_error"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("model")) == \
        ["model.tflite", "model_int8.pkt", "model_int8.pte"]  # atomic writes leave no temporary files


@BOTH
@pytest.mark.slow
def test_results_hold_accuracy_measured_in_each_runtime(phone_run):
    recipe, result = phone_run
    run_dir, data = result.run_dir, load_data(recipe.data)
    results = json.loads((run_dir / "results.json").read_text())
    torch_model = load_final_model(recipe, run_dir)
    torch_acc = evaluate(torch_model, data.X_test, data.y_test)["accuracy"]
    for name, load in (("model_int8.pte", mobile.load_executorch), ("model.tflite", mobile.load_litert)):
        run = load(run_dir / name, threads=1)  # the runtime's own bindings on the written file
        predicted = np.array([int(np.asarray(run([x[None]])[0]).argmax()) for x in data.X_test])
        assert results[name]["accuracy"] == pytest.approx(float((predicted == data.y_test.numpy()).mean()), abs=1e-6)
        assert results[name]["bytes"] == (run_dir / name).stat().st_size
        assert abs(results[name]["accuracy"] - torch_acc) <= 0.03, (name, results[name]["accuracy"], torch_acc)
    assert results["model.tflite"]["accuracy"] == pytest.approx(torch_acc, abs=0.011)  # fp32: at most one digit
    assert 0.1 < torch_acc  # negative control: the tiny run learned something, so agreement means something


@BOTH
@pytest.mark.slow
def test_resume_does_not_redo_the_export_stage(phone_run):
    recipe, first = phone_run
    run_dir = first.run_dir
    before = {name: ((run_dir / name).stat().st_mtime_ns, (run_dir / name).read_bytes()) for name in PHONE_FILES}
    (run_dir / "stages" / "evaluate.json").unlink()
    again = run_recipe(recipe, run_dir.parent, progress=False, log=None)
    assert again.executed == ["evaluate"] and again.skipped == [s for s in STAGES if s != "evaluate"]
    assert again.results["export"] == first.results["export"]
    for name in PHONE_FILES:
        assert ((run_dir / name).stat().st_mtime_ns, (run_dir / name).read_bytes()) == before[name]
    assert again.results["evaluate"]["model_int8.pte"] == first.results["evaluate"]["model_int8.pte"]
