"""The method registry: every training method declares, in its own file, what the rest of
sparseflow needs to know about it; config validation, method construction, the FLOPs
accounting, the stages, the sweep and the README's method table read it from here.

A method is a :class:`~sparse_core.methods.base.Method` subclass decorated with
:func:`register_method` in a module of ``sparse_core/methods/``::

    @register_method(name="mest", family="dst", paper="Yuan et al. 2021, ...", sparsity="dst")
    class MEST(SET):
        ...

A variant without a class of its own (the ``local_*`` methods, ``dst_ensemble``) is declared
with a module-level call ``declare_method(name=..., family=..., ...)``.

**Why the declarations are read from the source.** Every stage validates ``params.yaml``,
and most stages (``prepare``, ``aggregate``, ``report``, ...) never import torch; importing the
method modules to learn their names would cost each of them the torch import (about 1 s,
measured, README "Speed"). So the registry reads the ``register_method(...)`` /
``declare_method(...)`` calls of ``sparse_core/methods/*.py`` with :mod:`ast`, without
importing anything, and imports a method's module only when its class is needed. The
arguments of those calls must therefore be literals (strings, numbers, booleans, None);
anything else is refused with an error naming the file and line. A method registered at run
time from another module (a test, a user's plug-in) is added directly by the decorator.

Families (``family``): ``dense``, ``gradual`` (pruning during or after training),
``pai`` (pruning at initialisation), ``dst`` (dynamic sparse training), ``ensemble``,
``local`` (local parallelism), ``internal`` (``retrain``: used by a stage, not listed in
``train.methods``).
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

FAMILIES = ("dense", "gradual", "pai", "dst", "ensemble", "local", "internal")
#: Params sections that can hold a method's target sparsity (``train.<section>.sparsity``).
SPARSITY_SECTIONS = ("pruning", "dst")

METHODS_DIR = Path(__file__).resolve().parent
PACKAGE = "sparse_core.methods"


class RegistryError(ValueError):
    """A method declaration is malformed, or a name is unknown or taken twice."""


@dataclass(frozen=True)
class MethodSpec:
    """What the system knows about one method (its ``register_method`` / ``declare_method`` arguments).

    Attributes:
        name: the params name (``train.methods``, ``train@<name>`` stages, run folders).
        family: one of :data:`FAMILIES`.
        paper: the source: authors, year, title and venue.
        sparsity: the section ``train.<sparsity>`` whose ``sparsity`` key is the method's target,
            or None (dense, ``local_*``: their sparse method is ``local.sparse_method``).
        start: ``warmup`` (from the dense warmup when ``train.from_warmup``) or ``init`` (from
            its own seeded initialisation, as every method that is sparse from the first step).
        ensemble: None, ``members`` (independent runs of ``train.dst_ensemble.method``,
            trained and collected as one ensemble) or ``tickets`` (one run that exports several
            tickets, ``runs/<name>/tickets/``).
        local_variant: for the ``local`` family, the window variant of
            :class:`~sparse_core.local.model.LocalNet` (``greedy``, ``overlapping``, ``chunked``).
        sweep: whether the sparsity sweep and the curves stages may run it (single runs with a
            sparsity section only).
        pruning_schedule: whether it follows ``train.pruning``'s gradual schedule (start, end,
            update period), which params validation then checks against the run's step count.
        params_key: the method's own params section, ``train.<params_key>``, whose keys the
            class declares next to it as ``Options`` (a pydantic model; see
            :meth:`~sparse_core.methods.base.Method.options`); None when it has none.
        summary: one line for the README's method table.
        module, qualname: where the class lives (empty qualname: no class, see ``declare_method``).
        source: ``file:line`` of the declaration (for error messages).
    """

    name: str
    family: str
    paper: str
    sparsity: str | None = None
    start: Literal["warmup", "init"] = "warmup"
    ensemble: Literal["members", "tickets"] | None = None
    local_variant: str | None = None
    sweep: bool = False
    pruning_schedule: bool = False
    params_key: str | None = None
    summary: str = ""
    module: str = field(default="", compare=False)
    qualname: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise RegistryError(f"method name {self.name!r}{where} must be a lower-case identifier")
        if self.family not in FAMILIES:
            raise RegistryError(f"method {self.name!r}{where}: family {self.family!r} not in {FAMILIES}")
        if self.sparsity not in (None, *SPARSITY_SECTIONS):
            raise RegistryError(f"method {self.name!r}{where}: sparsity {self.sparsity!r} not in {SPARSITY_SECTIONS} or None")
        if self.start not in ("warmup", "init"):
            raise RegistryError(f"method {self.name!r}{where}: start {self.start!r} must be 'warmup' or 'init'")
        if self.ensemble not in (None, "members", "tickets"):
            raise RegistryError(f"method {self.name!r}{where}: ensemble {self.ensemble!r} must be None, 'members' or 'tickets'")
        if (self.family == "local") != (self.local_variant is not None):
            raise RegistryError(f"method {self.name!r}{where}: local_variant is required for, and only for, family 'local'")
        if self.params_key is not None and not (self.params_key.isidentifier() and self.params_key == self.params_key.lower()):
            raise RegistryError(f"method {self.name!r}{where}: params_key {self.params_key!r} must be a lower-case identifier")
        if self.sweep and (self.sparsity is None or self.ensemble is not None):
            raise RegistryError(f"method {self.name!r}{where}: sweep needs a sparsity section and a single run")
        if not self.paper:
            raise RegistryError(f"method {self.name!r}{where}: paper (its source) is required")


_FIELDS = {f.name for f in fields(MethodSpec)} - {"module", "qualname", "source"}
_DECORATOR, _DECLARE = "register_method", "declare_method"

_specs: dict[str, MethodSpec] | None = None  # the static index, built on first use
_runtime: dict[str, MethodSpec] = {}  # registered from outside sparse_core/methods
_classes: dict[str, type] = {}


# ----- the static index --------------------------------------------------------------------
def _call_name(node: ast.expr) -> str | None:
    func = node.func if isinstance(node, ast.Call) else None
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _literal_kwargs(call: ast.Call, where: str) -> dict[str, Any]:
    if call.args:
        raise RegistryError(f"{where}: {_call_name(call)}() takes keyword arguments only")
    out = {}
    for kw in call.keywords:
        if kw.arg is None or kw.arg not in _FIELDS:
            raise RegistryError(f"{where}: unknown argument {kw.arg!r} of {_call_name(call)}(); allowed: {sorted(_FIELDS)}")
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise RegistryError(
                f"{where}: argument {kw.arg!r} of {_call_name(call)}() must be a literal (the registry reads it "
                f"without importing the module; see sparse_core/methods/registry.py)"
            ) from None
    return out


def scan_file(path: Path) -> list[MethodSpec]:
    """The declarations in one source file, in file order (no import).

    Raises:
        RegistryError: a declaration with a non-literal or unknown argument, or an invalid one.
        SyntaxError: the file does not parse.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = f"{PACKAGE}.{path.stem}"
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and _call_name(deco) == _DECORATOR:
                    where = f"{path}:{deco.lineno}"
                    found.append(MethodSpec(**_literal_kwargs(deco, where), module=module, qualname=node.name, source=where))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _call_name(node.value) == _DECLARE:
            where = f"{path}:{node.lineno}"
            found.append(MethodSpec(**_literal_kwargs(node.value, where), module=module, source=where))
    return found


def _index() -> dict[str, MethodSpec]:
    global _specs
    if _specs is None:
        specs: dict[str, MethodSpec] = {}
        for path in sorted(METHODS_DIR.glob("*.py")):
            if path.name == "registry.py":
                continue
            for spec in scan_file(path):
                if spec.name in specs:
                    raise RegistryError(f"method {spec.name!r} declared twice: {specs[spec.name].source} and {spec.source}")
                specs[spec.name] = spec
        # Family order (dense, gradual, pai, dst, ensemble, local, internal), then file order.
        _specs = dict(sorted(specs.items(), key=lambda kv: FAMILIES.index(kv[1].family)))
    return {**_specs, **_runtime}


# ----- registration ------------------------------------------------------------------------
T = TypeVar("T", bound=type)


def register_method(**declaration: Any) -> Callable[[T], T]:
    """Class decorator: register a :class:`~sparse_core.methods.base.Method` subclass under
    ``declaration["name"]`` (arguments: the fields of :class:`MethodSpec`). In
    ``sparse_core/methods/`` the arguments must be literals (module docstring).

    Raises:
        RegistryError: an invalid declaration, or a name already taken by another class.
    """
    def decorate(cls: T) -> T:
        spec = MethodSpec(**declaration, module=cls.__module__, qualname=cls.__qualname__,
                          source=f"{cls.__module__}.{cls.__qualname__}")  # fmt: skip
        known = _index().get(spec.name)
        if known is not None and (known.module, known.qualname) != (spec.module, spec.qualname):
            raise RegistryError(f"method name {spec.name!r} is taken by {known.source}")
        if not cls.__module__.startswith(PACKAGE + "."):
            _runtime[spec.name] = spec
        _classes[spec.name] = cls
        cls.spec = spec
        return cls

    return decorate


def declare_method(**declaration: Any) -> MethodSpec:
    """Declare a method without a class of its own (module-level call; see the module docstring)."""
    return MethodSpec(**declaration)


def unregister(name: str) -> None:
    """Remove a method registered at run time (tests); built-in methods stay."""
    _runtime.pop(name, None)
    if _specs is None or name not in _specs:
        _classes.pop(name, None)


# ----- queries -----------------------------------------------------------------------------
def specs() -> dict[str, MethodSpec]:
    """Every method, by name (built-in ones in file order, then those registered at run time)."""
    return _index()


def spec(name: str) -> MethodSpec:
    """The declaration of ``name``.

    Raises:
        RegistryError: unknown name (the message lists the known ones).
    """
    found = _index().get(name)
    if found is None:
        raise RegistryError(f"unknown method {name!r}; known: {', '.join(trainable())}")
    return found


def names(**where: Any) -> list[str]:
    """Names whose declarations match every ``field=value`` given, e.g. ``names(family="dst")``."""
    return [n for n, s in _index().items() if all(getattr(s, k) == v for k, v in where.items())]


def params_keys() -> dict[str, str]:
    """``{params_key: method name}`` of every method with a params section of its own."""
    return {s.params_key: n for n, s in _index().items() if s.params_key}


def trainable() -> list[str]:
    """Names ``train.methods`` accepts: every family but ``internal``."""
    return [n for n, s in _index().items() if s.family != "internal"]


def method_class(name: str) -> type:
    """The class of ``name``, importing its module on first use.

    Raises:
        RegistryError: unknown name, or a declaration without a class (``declare_method``).
    """
    s = spec(name)
    if name not in _classes:
        if not s.qualname:
            raise RegistryError(f"method {name!r} ({s.source}) has no class of its own: a stage handles it")
        importlib.import_module(s.module)
        if name not in _classes:
            raise RegistryError(f"{s.source}: importing {s.module} did not register {name!r}")
    return _classes[name]


def markdown_table() -> str:
    """The README's method table (``sparseflow methods``): one row per method that
    ``train.methods`` accepts, then the internal ones, from their declarations."""
    start = {"warmup": "the dense warmup", "init": "its own seeded init"}
    rows = ["| method | family | starts from | target sparsity | what it does | source |", "|---|---|---|---|---|---|"]
    for name, s in sorted(_index().items(), key=lambda kv: kv[1].family == "internal"):
        key = f"`train.{s.sparsity}.sparsity`" if s.sparsity else ("`local.sparse_method`'s" if s.family == "local" else "—")
        what = s.summary.replace("|", "\\|")
        origin = "the run it fine-tunes" if s.family == "internal" else start[s.start]
        rows.append(f"| `{name}` | {s.family} | {origin} | {key} | {what} | {s.paper} |")
    return "\n".join(rows)
