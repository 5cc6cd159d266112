"""Name -> constructor registry. Constructors take ``in_channels``, ``num_classes``,
``image_size`` (pixels, square) and model-specific keyword arguments from ``model.kwargs``."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Raises:
        KeyError: unknown ``name`` (message lists the registered names).
        TypeError: a keyword argument the constructor does not take.
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
    return _MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
