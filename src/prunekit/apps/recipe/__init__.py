"""Recipes: a whole pruning run (model, data, schedule, criterion, granularity, scope, training, export) in YAML.

* :func:`load_recipe` / :func:`parse_recipe`: YAML (a bounded ``yaml.SafeLoader``, :mod:`.safe_yaml`) or plain
  data -> a validated :class:`Recipe`; errors name the field path
  (``recipe.training.epochs: must be a positive integer, got -1``).
* ``model.factory`` may name only ``nn.Module`` classes and factories registered with :func:`model_factory` /
  :func:`register_model_factory` or an entry point in group ``prunekit.model_factories``
  (:mod:`.factories`); anything else is refused before it is called.
* ``stop_when: {metric, max_drop, relative, split, samples}``: during a gradual prune-train phase, stop raising
  sparsity at the first mask update that takes the metric out of tolerance (:class:`prunekit.StopWhen`); the
  stop step and the sparsity reached are in ``stages/prune-train.json`` and ``results.json``.
* :func:`run_recipe` / ``prunekit prune --recipe R.yaml``: run it in ``runs/<name>-<hash12>``, stage by stage
  (dense-train, prune-train, export, evaluate); finished stages are skipped, an interrupted one resumes from its
  last checkpoint (safetensors + JSON, no pickle).

Example:
    >>> from prunekit.apps.recipe import run_recipe
    >>> result = run_recipe("examples/demo.yaml", "runs")  # doctest: +SKIP
"""

from .config import (
                     CriterionConfig,
                     DataConfig,
                     ExportConfig,
                     GranularityConfig,
                     ModelConfig,
                     Recipe,
                     RecipeError,
                     ScopeConfig,
                     StopWhenConfig,
                     TrainingConfig,
                     load_recipe,
                     parse_recipe,
)
from .factories import ENTRY_POINT_GROUP, model_factory, register_model_factory
from .run import RunResult, resolve_run, run_dir_for, run_recipe

__all__ = [
    "CriterionConfig", "DataConfig", "ENTRY_POINT_GROUP", "ExportConfig", "GranularityConfig", "ModelConfig", "Recipe",
    "RecipeError", "RunResult", "ScopeConfig", "StopWhenConfig", "TrainingConfig", "load_recipe", "model_factory",
    "parse_recipe", "register_model_factory", "resolve_run", "run_dir_for", "run_recipe",
]
