"""A recipe's ``model.factory`` may call only nn.Module classes and registered factories; nothing else ever runs.

Every refused callable here would write a marker file if it were called: the
file must not exist afterwards. Positive controls show that the same marker
appears as soon as the callable is allowed, so the tests can see a call.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest
import recipe_models
from recipe_helpers import TINY, merged, write_recipe
from torch import nn

from prunekit.apps.cli import main
from prunekit.apps.recipe import ENTRY_POINT_GROUP, RecipeError, model_factory, register_model_factory
from prunekit.apps.recipe.build import build_model
from prunekit.apps.recipe.config import ModelConfig
from prunekit.apps.recipe.factories import is_model_factory, resolve_factory

REFUSED = [
    # (factory, what the message says it is)
    ("os:system", "standard library"),
    ("subprocess:run", "standard library"),
    ("builtins:exec", "standard library"),
    ("prunekit.apps.cli:os.system", "a built-in function"),  # os reached through a module that imported it
    ("torch:zeros", "a built-in function"),
    ("recipe_models:write_marker", "a function that is not registered"),
    ("recipe_models:lambda_factory", "a lambda"),
    ("recipe_models:NotAModule", "a class that is not an nn.Module (recipe_models.NotAModule)"),
    ("recipe_models:MarkerNet.tiny", "a function that is not registered"),
    ("recipe_models:MODULE_INSTANCE", "a Linear object"),
    ("prunekit.apps.recipe:register_model_factory", "a function that is not registered"),
]


def _prune(tmp_path, capsys, factory: str, kwargs: dict) -> tuple[int, list[str]]:
    recipe = write_recipe(tmp_path / "r.yaml", merged(TINY, model={"factory": factory, "kwargs": kwargs}))
    code = main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "runs"), "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


def _kwargs(factory: str, marker) -> dict:
    return {"command": f"touch {marker}"} if factory.endswith("system") else {"path": str(marker)}


@pytest.mark.parametrize("factory,what", REFUSED, ids=[f for f, _ in REFUSED])
def test_refused_before_it_is_called(factory, what, tmp_path, capsys):
    marker = tmp_path / "marker"
    code, err = _prune(tmp_path, capsys, factory, _kwargs(factory, marker))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"prunekit: error: recipe.model.factory: ") and what in err[0], err[0]
    assert "register" in err[0] and ENTRY_POINT_GROUP in err[0]  # says how to make it allowed
    assert not marker.exists(), f"{factory} was called"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_os_system_really_would_have_run(tmp_path):
    # The negative control of the os:system case: the command itself works, so its absence above is the refusal.
    import os

    os.system(f"touch {tmp_path / 'marker'}")
    assert (tmp_path / "marker").exists()


def test_a_function_is_called_once_registered(tmp_path, capsys):
    marker = tmp_path / "marker"
    with pytest.raises(RecipeError, match="not registered"):
        resolve_factory("recipe_models:write_marker")
    register_model_factory(recipe_models.write_marker)
    model = build_model(ModelConfig("recipe_models:write_marker", {"path": str(marker)}))
    assert isinstance(model, nn.Sequential) and marker.read_text() == "called"


def test_a_classmethod_is_allowed_once_its_function_is_registered(tmp_path):
    register_model_factory(recipe_models.MarkerNet.tiny)  # a bound method: its function is what counts
    model = build_model(ModelConfig("recipe_models:MarkerNet.tiny", {"path": str(tmp_path / "m")}))
    assert type(model) is recipe_models.MarkerNet and (tmp_path / "m").exists()


def test_module_classes_need_no_registration(tmp_path):
    model = build_model(ModelConfig("recipe_models:MarkerNet", {"path": str(tmp_path / "m")}))
    assert type(model) is recipe_models.MarkerNet and (tmp_path / "m").exists()
    assert resolve_factory("torch.nn:Linear") is nn.Linear
    assert resolve_factory("prunekit.apps.models:LeNet300100").__name__ == "LeNet300100"


def test_decorator_registers_without_changing_the_function(tmp_path, monkeypatch):
    module = tmp_path / "deco_models_pk.py"
    module.write_text(textwrap.dedent("""
        from torch import nn
        from prunekit.apps.recipe import model_factory

        @model_factory
        def mlp(hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def unregistered(hidden=16):
            return mlp(hidden)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig("deco_models_pk:mlp", {"hidden": 7}))
    assert model[1].out_features == 7 and sys.modules["deco_models_pk"].mlp.__name__ == "mlp"
    with pytest.raises(RecipeError, match="'deco_models_pk:unregistered' is a function that is not registered"):
        build_model(ModelConfig("deco_models_pk:unregistered", {}))


def test_registering_a_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match="register_model_factory: factory must be callable, got int 3"):
        register_model_factory(3)
    assert model_factory is register_model_factory


def test_is_model_factory():
    assert is_model_factory(nn.Module) and is_model_factory(recipe_models.DropNet)
    assert not is_model_factory(recipe_models.MODULE_INSTANCE) and not is_model_factory(type)
    assert not is_model_factory(recipe_models.NotAModule) and not is_model_factory(print)


def _fake_entry_points(value: str):
    real = importlib.metadata.entry_points

    def entry_points(**params):
        if params.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(
                [importlib.metadata.EntryPoint(name="marker", value=value, group=ENTRY_POINT_GROUP)])
        return real(**params)

    return entry_points


def test_entry_point_factory_is_allowed(tmp_path, monkeypatch):
    config = ModelConfig("recipe_models:write_marker", {"path": str(tmp_path / "m")})
    with pytest.raises(RecipeError, match="not registered"):
        build_model(config)
    assert not (tmp_path / "m").exists()
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points("recipe_models:write_marker [extra]"))
    assert isinstance(build_model(config), nn.Module) and (tmp_path / "m").exists()


def test_entry_point_for_another_callable_does_not_allow_this_one(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points("recipe_models:lambda_factory"))
    with pytest.raises(RecipeError, match="not registered"):
        build_model(ModelConfig("recipe_models:write_marker", {"path": str(tmp_path / "m")}))
    assert not (tmp_path / "m").exists()


def test_entry_point_of_an_installed_distribution(tmp_path, monkeypatch):
    # A real (if minimal) installed distribution: a dist-info folder on sys.path, found by importlib.metadata.
    (tmp_path / "pk_fake_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def small(classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, classes))
    """))
    info = tmp_path / "pk_fake_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pk-fake-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nsmall = pk_fake_models:small\n")
    config = ModelConfig("pk_fake_models:small", {"classes": 3})
    sys.path.insert(0, str(tmp_path))  # importable, but not yet "installed" (no dist-info visible: other dir)
    try:
        info.rename(tmp_path / "hidden")
        with pytest.raises(RecipeError, match="not registered"):
            build_model(config)
        (tmp_path / "hidden").rename(info)
        importlib.invalidate_caches()
        assert build_model(config)[1].out_features == 3
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pk_fake_models", None)


def test_stdlib_is_refused_before_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "antigravity", raising=False)  # importing it opens a web browser
    with pytest.raises(RecipeError, match="standard library"):
        resolve_factory("antigravity:geohash")
    assert "antigravity" not in sys.modules


def test_import_failures_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "pk_broken_models.py").write_text("raise RuntimeError('broken\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError) as info:
        resolve_factory("pk_broken_models:Net")
    assert str(info.value) == "recipe.model.factory: cannot import module 'pk_broken_models' (broken)"
