"""Training methods behind one protocol of hooks (see :mod:`sparse_core.methods.base`)."""

from sparse_core.methods.base import MaskedMethod, Method, create_method
from sparse_core.methods.gradual import DPF, GMP, OneShot

__all__ = ["DPF", "GMP", "MaskedMethod", "Method", "OneShot", "create_method"]
