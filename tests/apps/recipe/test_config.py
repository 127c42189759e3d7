"""Recipe validation: every invalid field is named by its path, with what is allowed."""

from __future__ import annotations

import re

import pytest
import yaml
from recipe_helpers import EXAMPLES, TINY, merged, write_recipe

from prunekit import NM, Blocks, Channels, PolynomialDecay, Unstructured
from prunekit.apps.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from prunekit.apps.recipe.build import build_granularity

BAD = [
    ("negative epochs", dict(training={"epochs": -1}), "recipe.training.epochs: must be a positive integer, got -1"),
    ("bool epochs", dict(training={"epochs": True}), "recipe.training.epochs: must be a positive integer, got True"),
    ("float dense epochs", dict(training={"dense_epochs": 1.5}),
     "recipe.training.dense_epochs: must be a non-negative integer, got 1.5"),
    ("zero lr", dict(training={"lr": 0}), "recipe.training.lr: must be a number in (0, inf), got 0"),
    ("bad optimizer", dict(training={"optimizer": "lbfgs"}),
     "recipe.training.optimizer: must be one of adam, adamw, sgd, got 'lbfgs'"),
    ("unknown training key", dict(training={"epoch": 3}),
     "recipe.training: unknown key 'epoch'; allowed: epochs, dense_epochs, optimizer, lr, momentum, weight_decay, "
     "seed, checkpoint_every"),
    ("unknown top-level key", dict(extra=1), "recipe: unknown key 'extra'; allowed: name, model, data, schedule"),
    ("missing training", dict(training=None), "recipe.training: required"),
    ("bad factory", dict(model={"factory": "prunekit.apps.models.LeNet5"}),
     "recipe.model.factory: must be an import path 'package.module:Callable'"),
    ("bad kwargs", dict(model={"kwargs": [1]}), "recipe.model.kwargs: must be a mapping of keyword arguments"),
    ("bad dataset", dict(data={"name": "cifar"}), "recipe.data.name: must be one of mnist5k, digits, got 'cifar'"),
    ("bad fraction", dict(data={"test_fraction": 1.0}), "recipe.data.test_fraction: must be a number in (0, 1)"),
    ("zero batch", dict(data={"batch_size": 0}), "recipe.data.batch_size: must be a positive integer, got 0"),
    ("bad schedule type", dict(schedule={"type": "Cubic"}),
     "recipe.schedule: schedule_from_dict: 'type' must be one of ConstantSparsity, PolynomialDecay"),
    ("bad schedule value", dict(schedule={**TINY["schedule"], "final_sparsity": 1.5}),
     "recipe.schedule: PolynomialDecay: final_sparsity must be in [0, 1)"),
    ("schedule not mapping", dict(schedule=0.5), "recipe.schedule: must be a mapping"),
    ("bad criterion", dict(criterion={"name": "wanda"}),
     "recipe.criterion.name: must be one of magnitude, random, taylor, obd, got 'wanda'"),
    ("bad criterion param", dict(criterion={"name": "obd", "params": {"probes": 0}}),
     "recipe.criterion.params.probes: must be a positive integer, got 0"),
    ("unknown criterion param", dict(criterion={"name": "random", "params": {"samples": 5}}),
     "recipe.criterion.params: unknown key 'samples'; allowed: seed"),
    ("bad estimator", dict(criterion={"name": "obd", "params": {"estimator": "kfac"}}),
     "recipe.criterion.params.estimator: must be one of gauss-newton, fisher, hutchinson, exact"),
    ("bad pattern", dict(granularity="2-4"), "recipe.granularity: must be 'unstructured', 'channels', an N:M pattern"),
    ("n >= m", dict(granularity="4:2"), "recipe.granularity: n must be < m"),
    ("bad block", dict(granularity={"type": "blocks", "block": [4]}),
     "recipe.granularity.block: must be a pair [rows, cols] of positive integers, got [4]"),
    ("bad ranking", dict(scope={"ranking": "per-layer"}),
     "recipe.scope.ranking: must be one of layerwise, global, got 'per-layer'"),
    ("bad override", dict(scope={"overrides": {"fc3": 1.2}}),
     "recipe.scope.overrides['fc3']: must be a number in [0, 1), got 1.2"),
    ("bad layers", dict(scope={"layers": [1]}), "recipe.scope.layers: must be a list of name patterns"),
    ("bad export flag", dict(export={"onnx": "yes"}), "recipe.export.onnx: must be true or false, got 'yes'"),
    ("bad name", dict(name="a/b"), "recipe.name: must be 1-64 letters, digits"),
]


def _without_epochs():
    data = merged(TINY)
    del data["training"]["epochs"]
    return data


@pytest.mark.parametrize("changes,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_invalid_field_is_named_with_what_is_allowed(changes, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(merged(TINY, **changes))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_field_names_it():
    with pytest.raises(RecipeError, match=r"^recipe\.training\.epochs: required"):
        parse_recipe(_without_epochs())


def test_defaults_are_filled_and_to_dict_round_trips():
    recipe = parse_recipe(TINY)
    assert recipe.criterion.name == "magnitude" and recipe.scope.ranking == "layerwise"
    assert recipe.schedule == PolynomialDecay(0.5, 0.8, 0, 16, frequency=4)
    again = parse_recipe(recipe.to_dict())
    assert again == recipe and again.digest == recipe.digest
    assert re.fullmatch(r"tiny-[0-9a-f]{12}", recipe.run_name)


def test_digest_follows_content_not_spelling():
    # Defaults written out, or left out, are the same recipe; any real change is another one.
    explicit = merged(TINY, criterion={"name": "magnitude", "params": {}}, granularity="unstructured",
                      scope={"ranking": "layerwise"})
    assert parse_recipe(explicit).digest == parse_recipe(TINY).digest
    changed = merged(TINY, training={"lr": 0.004})
    assert parse_recipe(changed).digest != parse_recipe(TINY).digest


@pytest.mark.parametrize("spec,expected", [("2:4", NM(2, 4)), ({"type": "nm", "n": 1, "m": 8}, NM(1, 8)),
                                           ({"type": "blocks", "block": [1, 4]}, Blocks((1, 4))),
                                           ("channels", Channels()), ({"type": "channels"}, Channels()),
                                           ("unstructured", Unstructured())])
def test_granularity_forms(spec, expected):
    built = build_granularity(parse_recipe(merged(TINY, granularity=spec)).granularity)
    assert type(built) is type(expected) and repr(built) == repr(expected)


def test_yaml_is_read_with_safe_load_only(tmp_path):
    # A Python object tag would run code under yaml.load; safe_load refuses it.
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_examples_are_valid_recipes():
    for name in ("demo", "obd"):
        recipe = load_recipe(EXAMPLES / f"{name}.yaml")
        assert isinstance(recipe, Recipe) and recipe.name == name


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_write_and_load_match(tmp_path):
    assert load_recipe(write_recipe(tmp_path / "r.yaml", TINY)) == parse_recipe(yaml.safe_load(yaml.safe_dump(TINY)))
