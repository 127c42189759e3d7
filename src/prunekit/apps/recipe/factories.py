"""Which callables a recipe's ``model.factory`` may name: recipes are data, not programs.

A recipe names its model as ``"package.module:attr"``. prunekit imports the
module and looks the attribute up, then calls it only if it is

* an ``nn.Module`` subclass (checked on the class, before it is instantiated), or
* a callable registered with :func:`register_model_factory` (``@model_factory``), or
* named by an entry point of an installed distribution in the group
  :data:`ENTRY_POINT_GROUP` (``prunekit.model_factories``) whose value is the same
  ``"package.module:attr"``.

Anything else (``os:system``, ``builtins:eval``, a plain function, a lambda, a
class that is not a module) is refused before it is called, with a
:class:`~prunekit.apps.recipe.config.RecipeError` that says how to register it.
Modules of Python's standard library are refused before they are imported: none
of them defines a model, and some act when imported (``antigravity`` opens a
browser). Importing any other module runs its top-level code, as ``import`` does
anywhere: a recipe can make prunekit import installed (or ``PYTHONPATH``)
modules, and call only module classes and registered factories.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from typing import Any, Callable, TypeVar

from torch import nn

from .config import RecipeError

__all__ = ["ENTRY_POINT_GROUP", "register_model_factory", "model_factory", "is_model_factory", "resolve_factory"]

ENTRY_POINT_GROUP = "prunekit.model_factories"

F = TypeVar("F", bound=Callable[..., Any])

# id -> the callable itself: identity, not equality, decides (and holding it keeps the id unique).
_REGISTRY: dict[int, Callable[..., Any]] = {}

_HOW = ("to allow a factory function, decorate it with @prunekit.apps.recipe.model_factory (or call "
        f"prunekit.apps.recipe.register_model_factory(fn)) or declare it as an entry point in group {ENTRY_POINT_GROUP!r}")


def register_model_factory(factory: F) -> F:
    """Allow recipes to call ``factory`` (a function returning an ``nn.Module``); returns it unchanged.

    Usable as a decorator. Registration happens when the defining module runs,
    which is when a recipe naming ``"that.module:factory"`` imports it.
    ``nn.Module`` classes need no registration.

    Raises:
        TypeError: ``factory`` is not callable.

    Example:
        >>> @register_model_factory
        ... def tiny_mlp(hidden: int = 8) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        >>> is_model_factory(tiny_mlp), is_model_factory(print)
        (True, False)
    """
    if not callable(factory):
        raise TypeError(f"register_model_factory: factory must be callable, got {type(factory).__name__} "
                        f"{factory!r}")
    target = factory.__func__ if inspect.ismethod(factory) else factory
    _REGISTRY[id(target)] = target
    return factory


model_factory = register_model_factory
"""Decorator spelling of :func:`register_model_factory`: ``@prunekit.apps.recipe.model_factory``."""


def is_model_factory(obj: Any) -> bool:
    """Whether a recipe may call ``obj``: an ``nn.Module`` subclass or a registered factory (not entry points).

    Example:
        >>> is_model_factory(nn.Linear), is_model_factory(nn.Linear(2, 2)), is_model_factory(len)
        (True, False, False)
    """
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    # A classmethod or method is reached as a fresh bound method on every lookup: its function decides.
    target = obj.__func__ if inspect.ismethod(obj) else obj
    return _REGISTRY.get(id(target)) is target


def _entry_point_values() -> set[str]:
    # Looked up at call time (not cached): installing a package makes its factories available at once.
    values = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        values.add(ep.value.split("[", 1)[0].replace(" ", ""))  # "mod:attr [extra]" -> "mod:attr"
    return values


def _import(module_name: str, path: str) -> Any:
    top = module_name.partition(".")[0]
    if top in sys.stdlib_module_names:
        raise RecipeError(f"{path}: {module_name!r} is in Python's standard library, which defines no models (a "
                          f"recipe never imports it); name an nn.Module class or a factory of your own; {_HOW}")
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # the recipe named it: any failure to import is the recipe's problem, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{path}: cannot import module {module_name!r} ({first})") from None


def _describe(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"a class that is not an nn.Module ({obj.__module__}.{obj.__qualname__})"
    if getattr(obj, "__name__", None) == "<lambda>":
        return "a lambda"
    if inspect.isbuiltin(obj):
        return "a built-in function"
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return "a function that is not registered as a model factory"
    return f"a {type(obj).__name__} object"


# Modules of earlier releases that recipes may name, and where they live now: recipes are
# data written once, so they keep working when the package is rearranged.
_MOVED = {"prunekit.models": "prunekit.apps.models"}


def resolve_factory(factory: str, path: str = "recipe.model.factory") -> Callable[..., Any]:
    """Import ``"package.module:attr"`` and return it if a recipe may call it (see the module docstring).

    Raises:
        RecipeError: the module cannot be imported, has no such attribute, or the attribute is not an
            ``nn.Module`` class, a registered factory or an entry point's target; nothing is called.

    Example:
        >>> resolve_factory("prunekit.apps.models:LeNet5").__name__
        'LeNet5'
        >>> resolve_factory("prunekit.models:LeNet5").__name__  # the path of earlier releases
        'LeNet5'
        >>> resolve_factory("prunekit.apps.models:check_int")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        prunekit.apps.recipe.config.RecipeError: recipe.model.factory: 'prunekit.apps.models:check_int' is a function ...
    """
    module_name, _, attr = factory.partition(":")
    module_name = _MOVED.get(module_name, module_name)
    obj: Any = _import(module_name, path)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{path}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if is_model_factory(obj) or (callable(obj) and factory in _entry_point_values()):
        return obj
    raise RecipeError(f"{path}: {factory!r} is {_describe(obj)}; a recipe may call only nn.Module classes and "
                      f"registered model factories; {_HOW}")
