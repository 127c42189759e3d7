"""Typed, validated recipe configuration: a YAML file -> frozen dataclasses.

Every check raises :class:`RecipeError` (a ``ValueError``) whose message starts
with the field's path and says what is allowed, e.g.
``recipe.training.epochs: must be a positive integer, got -1``. Unknown keys are
rejected with the list of allowed ones. YAML is read with the safe loader of
:mod:`prunekit.apps.recipe.safe_yaml` only: a recipe can never construct Python
objects, and alias expansion, nesting and size are bounded. Which callables
``model.factory`` may name is decided in :mod:`prunekit.apps.recipe.factories`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ...core.schedules import Schedule, schedule_from_dict

__all__ = [
    "check_mobile_runtimes",
    "RecipeError", "Recipe", "ModelConfig", "DataConfig", "CriterionConfig", "GranularityConfig",
    "ScopeConfig", "TrainingConfig", "ExportConfig", "MobileTarget", "StopWhenConfig", "load_recipe", "parse_recipe",
]

DATASETS = ("mnist5k", "digits")
CRITERIA = ("magnitude", "random", "taylor", "obd")
OPTIMIZERS = ("adam", "adamw", "sgd")
RANKINGS = ("layerwise", "global")
STOP_METRICS = ("accuracy", "loss")
STOP_SPLITS = ("test", "train")
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RecipeError(ValueError):
    """An invalid recipe; the message names the field path and what is allowed."""


# -- small checks ------------------------------------------------------------------------------


def _fail(path: str, what: str, value: Any) -> RecipeError:
    return RecipeError(f"{path}: must be {what}, got {value!r}")


def _mapping(path: str, value: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail(path, "a mapping", value)
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise RecipeError(f"{path}.{missing[0]}: required (allowed keys: {', '.join(allowed)})")
    return dict(value)


def _int(path: str, value: Any, minimum: int) -> int:
    words = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, words, value)
    return value


def _opt_int(path: str, value: Any, minimum: int) -> int | None:
    return None if value is None else _int(path, value, minimum)


def _real(path: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise _fail(path, f"a number in {lo}{low:g}, {high:g}{hi}", value)
    return float(value)


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(path, f"one of {', '.join(choices)}", value)
    return value


def _str_list(path: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, "a list of name patterns (strings)", value)
    return tuple(value)


# -- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The model: ``"package.module:attr"`` called with ``kwargs``.

    ``attr`` must be an ``nn.Module`` class or a registered model factory
    (:mod:`prunekit.apps.recipe.factories`); that is checked when the model is built.
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.model") -> "ModelConfig":
        """Validate the ``model`` section (a mapping, or just the factory string)."""
        if isinstance(value, str):
            value = {"factory": value}
        raw = _mapping(path, value, ("factory", "kwargs"), ("factory",))
        factory = raw["factory"]
        if not isinstance(factory, str) or not _FACTORY.match(factory):
            raise _fail(f"{path}.factory", "an import path 'package.module:Callable' (e.g. 'prunekit.apps.models:LeNet5')",
                        factory)
        kwargs = raw.get("kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise _fail(f"{path}.kwargs", "a mapping of keyword arguments", kwargs)
        return cls(factory, dict(kwargs))


@dataclass(frozen=True)
class DataConfig:
    """A bundled dataset, its split, and the batch size.

    ``train_samples`` / ``test_samples`` keep a prefix of each (shuffled,
    class-balanced) split; ``None`` keeps all of it.
    """

    name: str = "mnist5k"
    test_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 64
    flat: bool = False
    train_samples: int | None = None
    test_samples: int | None = None

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.data") -> "DataConfig":
        """Validate the ``data`` section."""
        raw = _mapping(path, value, tuple(cls.__dataclass_fields__), ("name",))
        d = cls()
        return cls(
            name=_choice(f"{path}.name", raw["name"], DATASETS),
            test_fraction=_real(f"{path}.test_fraction", raw.get("test_fraction", d.test_fraction), 0, 1,
                                low_open=True),
            seed=_int(f"{path}.seed", raw.get("seed", d.seed), 0),
            batch_size=_int(f"{path}.batch_size", raw.get("batch_size", d.batch_size), 1),
            flat=_bool(f"{path}.flat", raw.get("flat", d.flat)),
            train_samples=_opt_int(f"{path}.train_samples", raw.get("train_samples"), 1),
            test_samples=_opt_int(f"{path}.test_samples", raw.get("test_samples"), 1),
        )


_CRITERION_PARAMS: dict[str, dict[str, Any]] = {
    "magnitude": {},
    "random": {"seed": 0},
    "taylor": {"samples": 1000},
    "obd": {"estimator": "gauss-newton", "samples": 1000, "probes": 100, "seed": 0},
}
_ESTIMATORS = ("gauss-newton", "fisher", "hutchinson", "exact")


@dataclass(frozen=True)
class CriterionConfig:
    """A saliency criterion and its parameters.

    ``samples``: how many training samples (one batch, a prefix of the training
    split) the data-driven criteria (taylor, obd) see at each mask update.
    """

    name: str = "magnitude"
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.criterion") -> "CriterionConfig":
        """Validate the ``criterion`` section (a mapping, or just the name)."""
        if isinstance(value, str):
            value = {"name": value}
        if value is None:
            value = {"name": "magnitude"}
        name = _choice(f"{path}.name", _mapping(path, value, ("name", "params"), ("name",))["name"], CRITERIA)
        defaults = _CRITERION_PARAMS[name]
        raw = _mapping(f"{path}.params", value.get("params"), tuple(defaults))
        params = {**defaults, **raw}
        for key in ("seed",):
            if key in params:
                params[key] = _int(f"{path}.params.{key}", params[key], 0)
        for key in ("samples", "probes"):
            if key in params:
                params[key] = _int(f"{path}.params.{key}", params[key], 1)
        if "estimator" in params:
            params["estimator"] = _choice(f"{path}.params.estimator", params["estimator"], _ESTIMATORS)
        return cls(name, params)


@dataclass(frozen=True)
class GranularityConfig:
    """Unit of pruning: ``unstructured``, ``channels``, ``n:m`` (e.g. ``"2:4"``) or ``blocks`` of ``block`` = (rows, cols)."""

    type: str = "unstructured"
    n: int | None = None
    m: int | None = None
    block: tuple[int, int] | None = None

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.granularity") -> "GranularityConfig":
        """Validate ``granularity``: ``"unstructured"``, ``"channels"``, ``"N:M"``, or a mapping ``{type, n, m, block}``."""
        if value is None or value == "unstructured":
            return cls()
        if value == "channels":
            return cls("channels")
        if isinstance(value, str):
            match = re.fullmatch(r"(\d+):(\d+)", value.strip())
            if not match:
                raise _fail(path, "'unstructured', 'channels', an N:M pattern like '2:4', or a mapping "
                            "{type: blocks, block: [rows, cols]}", value)
            value = {"type": "nm", "n": int(match[1]), "m": int(match[2])}
        raw = _mapping(path, value, ("type", "n", "m", "block"), ("type",))
        kind = _choice(f"{path}.type", raw["type"], ("unstructured", "channels", "nm", "blocks"))
        if kind == "nm":
            n, m = _int(f"{path}.n", raw.get("n"), 1), _int(f"{path}.m", raw.get("m"), 2)
            if n >= m:
                raise RecipeError(f"{path}: n must be < m (keep n of every m weights), got {n}:{m}")
            return cls("nm", n, m)
        if kind == "blocks":
            block = raw.get("block")
            if not (isinstance(block, list) and len(block) == 2):
                raise _fail(f"{path}.block", "a pair [rows, cols] of positive integers", block)
            return cls("blocks", block=(_int(f"{path}.block[0]", block[0], 1), _int(f"{path}.block[1]", block[1], 1)))
        extra = [k for k in ("n", "m", "block") if raw.get(k) is not None]
        if extra:
            raise RecipeError(f"{path}.{extra[0]}: only allowed with type nm (n, m) or blocks (block)")
        return cls(kind)


@dataclass(frozen=True)
class ScopeConfig:
    """Which parameters are pruned: ``layers`` (``None``: all), ``exclude``, per-pattern ``overrides``, ``ranking``."""

    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)
    ranking: str = "layerwise"

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.scope") -> "ScopeConfig":
        """Validate the ``scope`` section."""
        raw = _mapping(path, value, tuple(cls.__dataclass_fields__))
        layers = raw.get("layers")
        overrides = raw.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise _fail(f"{path}.overrides", "a mapping {name pattern: sparsity in [0, 1)}", overrides)
        checked = {}
        for key, val in overrides.items():
            if not isinstance(key, str) or not key:
                raise _fail(f"{path}.overrides", "keyed by name patterns (strings)", key)
            checked[key] = _real(f"{path}.overrides[{key!r}]", val, 0, 1)
        return cls(layers=None if layers is None else _str_list(f"{path}.layers", layers),
                   exclude=_str_list(f"{path}.exclude", raw.get("exclude") or []), overrides=checked,
                   ranking=_choice(f"{path}.ranking", raw.get("ranking", "layerwise"), RANKINGS))


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation of both phases.

    Attributes:
        epochs: fine-tuning epochs while pruning (>= 1).
        dense_epochs: dense pre-training epochs before pruning (>= 0).
        optimizer: ``adam``, ``adamw`` or ``sgd`` (a fresh one per phase).
        lr: learning rate (> 0).
        momentum: SGD momentum in [0, 1).
        weight_decay: >= 0.
        seed: seed of the initialisation and of both phases' batch orders.
        checkpoint_every: optimizer steps between checkpoints of the pruning phase
            (``None``: once per epoch).
    """

    epochs: int
    dense_epochs: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int | None = None

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.training") -> "TrainingConfig":
        """Validate the ``training`` section."""
        raw = _mapping(path, value, tuple(cls.__dataclass_fields__), ("epochs",))
        d = cls(epochs=1)
        return cls(
            epochs=_int(f"{path}.epochs", raw["epochs"], 1),
            dense_epochs=_int(f"{path}.dense_epochs", raw.get("dense_epochs", d.dense_epochs), 0),
            optimizer=_choice(f"{path}.optimizer", raw.get("optimizer", d.optimizer), OPTIMIZERS),
            lr=_real(f"{path}.lr", raw.get("lr", d.lr), 0, math.inf, low_open=True),
            momentum=_real(f"{path}.momentum", raw.get("momentum", d.momentum), 0, 1),
            weight_decay=_real(f"{path}.weight_decay", raw.get("weight_decay", d.weight_decay), 0, math.inf),
            seed=_int(f"{path}.seed", raw.get("seed", d.seed), 0),
            checkpoint_every=_opt_int(f"{path}.checkpoint_every", raw.get("checkpoint_every"), 1),
        )


MOBILE_TARGETS = ("executorch", "litert")
EXPORT_TARGETS = ("prunekit", "onnx", *MOBILE_TARGETS)
_SUFFIX = {"executorch": ".pte", "litert": ".tflite"}


@dataclass(frozen=True)
class MobileTarget:
    """One phone-runtime file of the export stage: ``to`` (``executorch`` or ``litert``), ``quantize`` (``int8``).

    Example:
        >>> t = MobileTarget("executorch", "int8")
        >>> t.format, t.file_name
        ('executorch-int8', 'model_int8.pte')
    """

    to: str
    quantize: str | None = None

    @property
    def format(self) -> str:
        """The ``prunekit export --to`` name of this file's format."""
        return self.to + ("-int8" if self.quantize else "")

    @property
    def file_name(self) -> str:
        """Its name in the run directory: ``model[_int8].pte`` or ``model[_int8].tflite``."""
        return f"model{'_int8' if self.quantize else ''}{_SUFFIX[self.to]}"


@dataclass(frozen=True)
class ExportConfig:
    """Artifacts of the export stage: the prunekit file (lossless), its int8 variant, ONNX, phone-runtime files.

    Two spellings of one thing. A mapping ``{prunekit, int8, onnx, mobile}`` (``prunekit`` and ``int8``
    default to true), where ``mobile`` lists ``{to: executorch|litert, quantize: int8}`` entries; or a
    list of entries ``{to: prunekit|onnx|executorch|litert, quantize: int8}``, which names exactly the
    files written (``{to: prunekit, quantize: int8}`` is the int8 prunekit file). Equal sets of files
    give equal recipes (and digests); recipes without phone files keep the digest they always had.

    Example:
        >>> ExportConfig.parse([{"to": "executorch", "quantize": "int8"}, {"to": "litert"}]).to_dict()
        {'prunekit': False, 'int8': False, 'onnx': False, 'mobile': [{'to': 'executorch', 'quantize': 'int8'}, \
{'to': 'litert', 'quantize': None}]}
    """

    prunekit: bool = True
    int8: bool = True
    onnx: bool = False
    mobile: tuple[MobileTarget, ...] = ()

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.export") -> "ExportConfig":
        """Validate the ``export`` section (a mapping of flags, or a list of entries)."""
        if isinstance(value, list):
            return cls._parse_entries(value, path, EXPORT_TARGETS)
        if value is not None and not isinstance(value, Mapping):
            raise _fail(path, "a mapping {prunekit, int8, onnx, mobile} or a list of entries {to, quantize}", value)
        raw = _mapping(path, value, tuple(cls.__dataclass_fields__))
        flags = {k: _bool(f"{path}.{k}", v) for k, v in raw.items() if k != "mobile"}
        mobile = raw.get("mobile")
        if mobile is None:
            return cls(**flags)
        if not isinstance(mobile, list):
            raise _fail(f"{path}.mobile", "a list of entries {to: executorch|litert, quantize: int8}", mobile)
        return replace(cls(**flags), mobile=cls._parse_entries(mobile, f"{path}.mobile", MOBILE_TARGETS).mobile)

    @classmethod
    def _parse_entries(cls, entries: list[Any], path: str, targets: tuple[str, ...]) -> "ExportConfig":
        seen: dict[tuple[str, str | None], int] = {}
        for i, entry in enumerate(entries):
            where = f"{path}[{i}]"
            raw = _mapping(where, {"to": entry} if isinstance(entry, str) else entry, ("to", "quantize"), ("to",))
            to = _choice(f"{where}.to", raw["to"], targets)
            quantize = raw.get("quantize")
            if quantize is not None:
                quantize = _choice(f"{where}.quantize", quantize, ("int8",))
                if to == "onnx":
                    raise RecipeError(f"{where}.quantize: the ONNX export is fp32 only; drop quantize "
                                      "(int8 files: {to: prunekit, quantize: int8} or a phone runtime)")
            if (to, quantize) in seen:
                raise RecipeError(f"{where}: the same file as {path}[{seen[to, quantize]}] "
                                  f"({to}{', ' + quantize if quantize else ''}); list each file once")
            seen[to, quantize] = i
        return cls(prunekit=("prunekit", None) in seen, int8=("prunekit", "int8") in seen, onnx=("onnx", None) in seen,
                   mobile=tuple(MobileTarget(t, q) for t, q in seen if t in MOBILE_TARGETS))

    def to_dict(self) -> dict[str, Any]:
        """The canonical mapping form; ``mobile`` only when there are phone files (older digests stay)."""
        out: dict[str, Any] = {"prunekit": self.prunekit, "int8": self.int8, "onnx": self.onnx}
        if self.mobile:
            out["mobile"] = [{"to": t.to, "quantize": t.quantize} for t in self.mobile]
        return out


@dataclass(frozen=True)
class StopWhenConfig:
    """``stop_when``: stop raising sparsity at the first mask update that takes the metric out of tolerance.

    The prune-train phase runs a :class:`prunekit.StopWhen` hook: after every scheduled
    mask update it evaluates ``metric`` on ``split`` (its first ``samples`` samples);
    the first update worse than the dense model by more than ``max_drop`` (a fraction
    of the dense value when ``relative``) is undone and the sparsity held there for the
    rest of the phase (fine-tuning goes on). Needs a gradual schedule (PolynomialDecay).

    Attributes:
        metric: ``accuracy`` (higher is better; an absolute ``max_drop`` is a fraction, 0.005 = 0.5 pt)
            or ``loss`` (mean cross-entropy; lower is better).
        max_drop: how much worse than dense the metric may get (>= 0).
        relative: ``max_drop`` is relative to the dense value.
        split: ``test`` (the split the results report) or ``train``.
        samples: a prefix of that split (``None``: all of it).

    Example:
        >>> StopWhenConfig.parse({"metric": "accuracy", "max_drop": 0.005}).split
        'test'
    """

    metric: str
    max_drop: float
    relative: bool = False
    split: str = "test"
    samples: int | None = None

    @classmethod
    def parse(cls, value: Any, path: str = "recipe.stop_when") -> "StopWhenConfig":
        """Validate the ``stop_when`` section."""
        raw = _mapping(path, value, tuple(cls.__dataclass_fields__), ("metric", "max_drop"))
        metric = _choice(f"{path}.metric", raw["metric"], STOP_METRICS)
        relative = _bool(f"{path}.relative", raw.get("relative", False))
        bounded = metric == "accuracy" and not relative
        max_drop = _real(f"{path}.max_drop", raw["max_drop"], 0, 1 if bounded else math.inf, high_open=not bounded)
        return cls(metric, max_drop, relative, _choice(f"{path}.split", raw.get("split", "test"), STOP_SPLITS),
                   _opt_int(f"{path}.samples", raw.get("samples"), 1))


_SECTIONS = ("name", "model", "data", "schedule", "criterion", "granularity", "scope", "training", "export")
_OPTIONAL = ("stop_when",)  # in to_dict (and the digest) only when given: older recipes keep their run directory


@dataclass(frozen=True)
class Recipe:
    """A whole pruning run. Build it with :func:`parse_recipe` or :func:`load_recipe`."""

    name: str
    model: ModelConfig
    data: DataConfig
    schedule: Schedule
    training: TrainingConfig
    criterion: CriterionConfig = CriterionConfig()
    granularity: GranularityConfig = GranularityConfig()
    scope: ScopeConfig = ScopeConfig()
    export: ExportConfig = ExportConfig()
    stop_when: StopWhenConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The canonical plain-data form (every default filled in); :func:`parse_recipe` inverts it."""
        out = {k: _plain(asdict(getattr(self, k))) for k in _SECTIONS if k not in ("name", "schedule", "export")}
        out["export"] = self.export.to_dict()
        out.update({k: _plain(asdict(getattr(self, k))) for k in _OPTIONAL if getattr(self, k) is not None})
        return {"name": self.name, "schedule": self.schedule.to_dict(), **out}

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict`: equal recipes share a run directory."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def run_name(self) -> str:
        """``<name>-<first 12 hex digits of the digest>``."""
        return f"{self.name}-{self.digest[:12]}"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe given as plain data (the parsed YAML).

    Raises:
        RecipeError: the first invalid field, named by its path.

    Example:
        >>> r = parse_recipe({"name": "t", "model": "prunekit.apps.models:LeNet5", "data": {"name": "mnist5k"},
        ...                   "schedule": {"type": "ConstantSparsity", "target_sparsity": 0.5},
        ...                   "training": {"epochs": 1}})
        >>> r.training.optimizer, r.run_name.startswith("t-")
        ('adam', True)
    """
    raw = _mapping("recipe", data, _SECTIONS + _OPTIONAL, ("name", "model", "data", "schedule", "training"))
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail("recipe.name", "1-64 letters, digits, '_', '.' or '-' (a directory name)", name)
    schedule = _schedule(raw["schedule"])
    return Recipe(
        name=name,
        model=ModelConfig.parse(raw["model"]),
        data=DataConfig.parse(raw["data"]),
        schedule=schedule,
        training=TrainingConfig.parse(raw["training"]),
        criterion=CriterionConfig.parse(raw.get("criterion")),
        granularity=GranularityConfig.parse(raw.get("granularity")),
        scope=ScopeConfig.parse(raw.get("scope")),
        export=ExportConfig.parse(raw.get("export")),
        stop_when=_stop_when(raw.get("stop_when"), schedule),
    )


def _stop_when(value: Any, schedule: Schedule) -> StopWhenConfig | None:
    if value is None:
        return None
    config = StopWhenConfig.parse(value)
    kind = type(schedule).__name__
    if kind != "PolynomialDecay":
        raise RecipeError(f"recipe.stop_when: needs a gradual schedule (type PolynomialDecay: sparsity rising over "
                          f"several mask updates), got {kind}; a one-step schedule has nothing to stop")
    return config


def _schedule(value: Any) -> Schedule:
    if not isinstance(value, Mapping):
        raise _fail("recipe.schedule", "a mapping with 'type' (ConstantSparsity, PolynomialDecay) and its fields",
                    value)
    try:
        return schedule_from_dict(dict(value))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe.schedule: {exc}") from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML recipe (with the bounded safe loader of :mod:`prunekit.apps.recipe.safe_yaml`).

    Raises:
        FileNotFoundError: no such file.
        OSError: the file cannot be read (a directory, no permission, a name too long).
        RecipeError: too large, not UTF-8, not valid YAML (or beyond the loader's bounds: alias expansion,
            nesting, duplicate keys), or an invalid field.

    Example:
        >>> load_recipe("examples/demo.yaml").model.factory  # doctest: +SKIP
        'prunekit.apps.models:LeNet5'
    """
    import yaml

    from .safe_yaml import describe_yaml_error, load_yaml

    path = Path(path)
    text = _read_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r}: not valid YAML ({describe_yaml_error(exc)})") from None
    return parse_recipe(data)


def _read_text(path: Path) -> str:
    from .safe_yaml import MAX_RECIPE_BYTES

    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe file {str(path)!r} not found") from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a recipe file", str(path))
    if not stat.S_ISREG(info.st_mode):
        # A FIFO would block the read, a device may never end.
        raise RecipeError(f"recipe {str(path)!r}: not a regular file")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {str(path)!r}: larger than {MAX_RECIPE_BYTES:,} bytes; recipes are small YAML "
                          "files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {str(path)!r}: not valid YAML (not UTF-8: {exc.reason} at byte "
                          f"{exc.start})") from None


def check_mobile_runtimes(export: Any, path: str = "recipe.export") -> None:
    """Refuse (before anything is written) phone-runtime entries of ``export`` whose runtime is not installed.

    Raises:
        RecipeError: names the entry's runtime and the pip command that installs it.

    Example:
        >>> check_mobile_runtimes(ExportConfig())  # no phone files: nothing to check
    """
    if not export.mobile:
        return
    from ...formats.mobile import EXECUTORCH_INSTALL, LITERT_INSTALL, runtime_available

    for target in export.mobile:
        if not runtime_available(target.to):
            command = EXECUTORCH_INSTALL if target.to == "executorch" else LITERT_INSTALL
            raise RecipeError(f"{path}: {target.format} needs the {target.to} runtime, which is not installed; "
                              f"install it with: {command}")
