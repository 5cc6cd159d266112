"""Training methods behind one protocol of hooks (see :mod:`sparse_core.methods.base`),
each registered in its own file (:mod:`sparse_core.methods.registry`).

This package module imports nothing itself: :mod:`sparse_core.config` reads the registry
without loading torch. ``from sparse_core.methods import create_method`` (and ``Method``,
``MaskedMethod``, ``MethodContext``, ``DPF``, ``GMP``, ``OneShot``) loads the method modules on
first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Method": "base", "MaskedMethod": "base", "MethodContext": "base", "create_method": "base",
         "DPF": "gradual", "GMP": "gradual", "OneShot": "gradual"}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
