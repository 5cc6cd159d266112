"""Masks, magnitude criteria and sparsity schedules.

The names below load on first access (PEP 562): ``from sparse_core.sparsity.schedules import
...`` (pure arithmetic, used when params are validated) then does not import torch through
:mod:`~sparse_core.sparsity.masks`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "filter_masks": "criteria",
    "magnitude_masks": "criteria",
    "n_keep": "criteria",
    "LAYER_TABLE_SCHEMA": "masks",
    "MaskSet": "masks",
    "prunable_parameters": "masks",
    "cubic_sparsity": "schedules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
