"""Model registry (timm-style): ``@register_model`` names a constructor; ``create_model`` builds it
with the input shape and class count of the dataset.

The model modules (and torch with them) are imported on first use of the registry
(:func:`create_model`, :func:`register_model`, or a model module named as an attribute), not
when this package is imported: validating params (``sparse_core.config``) asks only for
:func:`available_models`, which :data:`BUILTIN_MODELS` answers without torch, so a stage's
command line and validation start in a fraction of a second. ``tests/test_cli_imports.py``
checks that :data:`BUILTIN_MODELS` equals what the modules register.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

#: The modules whose import registers the built-in models.
MODEL_MODULES = ("resnet_cifar", "small", "vgg", "wrn")

#: Names the built-in model modules register (kept equal to the registry by a test).
BUILTIN_MODELS = frozenset({"lenet5", "lenet_300_100", "resnet8", "resnet20", "resnet32", "resnet56", "vgg16", "wrn", "wrn28_10"})

__all__ = ["BUILTIN_MODELS", "available_models", "create_model", "register_model"]


def _registry():
    """The registry, with every built-in model module imported (registered)."""
    for name in MODEL_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return importlib.import_module(f"{__name__}.builders")


def available_models() -> list[str]:
    """Sorted names of the built-in models and of any model registered in this process."""
    registry = sys.modules.get(f"{__name__}.builders")
    registered = registry.available_models() if registry is not None else []
    return sorted(BUILTIN_MODELS.union(registered))


def create_model(name: str, **kwargs: Any):
    """Build a registered model (see :func:`sparse_core.models.builders.create_model`).

    Raises:
        KeyError: unknown ``name`` (message lists the registered names).
        TypeError: a keyword argument the constructor does not take.
    """
    return _registry().create_model(name, **kwargs)


def register_model(name: str) -> Callable:
    """Decorator registering a model constructor under ``name`` (see
    :func:`sparse_core.models.builders.register_model`).

    Raises:
        ValueError: ``name`` is registered already (built-in names included).
    """
    return _registry().register_model(name)


def __getattr__(name: str) -> Any:
    if name in MODEL_MODULES or name == "registry":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
