"""The project's import graph, read from the source with :mod:`ast` (nothing is imported).

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a lazy
import is still a dependency), and importing ``a.b.c`` also runs the package modules ``a`` and
``a.b``. Only modules of the project's own packages (``sparse_core``, ``tasks``, ``flows``) are
nodes. Imports by name at run time (``importlib.import_module("sparse_core.jobs.training")``,
as :func:`tasks.timing.stage_work` and the method registry do) are invisible here: callers that
need them add those edges themselves.

Layers: ``sparse_core`` (the library) < ``tasks`` (Prefect tasks) < ``flows`` (flows and the
CLI); a module may import its own layer and those below, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("sparse_core", "tasks", "flows")
#: Names whose package loads a module by name when they are called (PEP 562 and registries):
#: importing the name counts as importing that module.
LAZY_NAMES = {("sparse_core.models", "create_model"): "sparse_core.models.builders"}
LAYER = {name: i for i, name in enumerate(PACKAGES)}


def module_name(path: Path, root: Path) -> str:
    """``sparse_core/jobs/training.py`` -> ``sparse_core.jobs.training`` (``__init__.py`` -> the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of :data:`PACKAGES` under ``root``: ``{dotted name: file}``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lazy_exports(path: Path, package: str, modules: dict[str, Path]) -> dict[str, str]:
    """``{name: submodule}`` that package ``package`` (its ``__init__.py`` at ``path``) loads on
    first access (PEP 562): the entries of its module-level dict literals whose values name a
    submodule, when it defines a module ``__getattr__`` (``sparse_core.sparsity._EXPORTS``,
    ``sparse_core.methods._LAZY``). ``from package import name`` then runs that submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        return {}
    found = {}
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str) \
                        and f"{package}.{v.value}" in modules:
                    found[k.value] = f"{package}.{v.value}"
    return found


def imports_of(path: Path, current: str, modules: dict[str, Path], lazy: dict[str, dict[str, str]] | None = None) -> set[str]:
    """The project modules that ``path`` (module ``current``) imports, with their parent packages.
    ``lazy``: the :func:`lazy_exports` of each package (``from pkg import name`` runs its submodule).

    Raises:
        SyntaxError: the file does not parse (the message names it).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, current, path.name == "__init__.py")
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
            targets.update(LAZY_NAMES[(base, a.name)] for a in node.names if (base, a.name) in LAZY_NAMES)
            targets.update((lazy or {}).get(base, {})[a.name] for a in node.names if a.name in (lazy or {}).get(base, {}))
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:i])
            if name in modules and name != current:
                found.add(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: the project modules it imports}`` for every project module under ``root``."""
    modules = project_modules(root)
    lazy = {name: lazy_exports(path, name, modules) for name, path in modules.items() if path.name == "__init__.py"}
    return {name: imports_of(path, name, modules, lazy) for name, path in modules.items()}


def closure(graph: dict[str, set[str]], start: str | list[str]) -> set[str]:
    """``start`` and every module it reaches (transitively)."""
    todo = [start] if isinstance(start, str) else list(start)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, as the module lists of the strongly connected components with more
    than one module (Tarjan's algorithm), each sorted; a package importing its own submodule
    and the submodule its package (``a`` <-> ``a.b``) is not counted: Python runs ``a`` first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return [w for w in graph.get(v, ()) if not (w.startswith(v + ".") or v.startswith(w + "."))]

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs where a module imports a layer above its own."""
    layer = lambda name: LAYER[name.split(".")[0]]  # noqa: E731
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


#: Modules loaded by name at run time, which the source's import statements do not show:
#: ``{trigger: package}``: where the closure holds ``trigger``, every module of ``package``
#: counts (the method registry imports a method's module when the method is built; building a
#: model imports every model module).
METHODS = "sparse_core.methods"
DYNAMIC = {"sparse_core.methods.base": METHODS, "sparse_core.models.builders": "sparse_core.models"}


def library_code(graph: dict[str, set[str]], start: str | list[str], root: Path,
                 method_modules: list[str] | None = None) -> set[str]:
    """The closure of ``start`` with the modules of :data:`DYNAMIC` it loads by name (and their
    closures): the code a job runs. ``method_modules``: the modules of the methods the job
    builds, instead of every method module (:data:`METHODS`)."""
    modules = closure(graph, [start] if isinstance(start, str) else start)
    dynamic = DYNAMIC
    if method_modules is not None:
        modules |= closure(graph, list(method_modules))
        dynamic = {k: v for k, v in DYNAMIC.items() if v != METHODS}
    names = project_modules(root)
    for trigger, package in dynamic.items():
        if trigger in modules:
            modules |= closure(graph, [m for m in names if m.startswith(package + ".")])
    return modules
