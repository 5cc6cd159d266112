"""The house rules of the source tree (issue 14, part 6): no import cycle, no import pointing
up a layer (sparse_core < tasks < flows), no two modules with one file name; checked on the
import graph read from the source (sparse_core.imports)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sparse_core.imports import closure, cycles, import_graph, project_modules, upward_imports

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycle_and_no_upward_import():
    graph = import_graph(ROOT)
    assert len(graph) > 60  # every module of sparse_core, tasks and flows was read
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def test_the_checks_see_function_level_imports(tmp_path):
    """A lazy import inside a function is an edge; a cycle through one is found, and so is an
    import from the library up into flows."""
    for package in ("sparse_core", "tasks", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "sparse_core" / "a.py").write_text("from sparse_core import b\n")
    (tmp_path / "sparse_core" / "b.py").write_text("def f():\n    from sparse_core.a import x\n    import flows.cli\n")
    (tmp_path / "flows" / "cli.py").write_text("from .. import sparse_core\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["sparse_core.a", "sparse_core.b"]]
    assert upward_imports(graph) == [("sparse_core.b", "flows"), ("sparse_core.b", "flows.cli")]
    assert closure(graph, "sparse_core.a") >= {"sparse_core.a", "sparse_core.b", "flows.cli", "flows"}


def test_no_two_modules_share_a_file_name():
    names = Counter(path.name for path in project_modules(ROOT).values() if path.name != "__init__.py")
    assert [n for n, k in names.items() if k > 1] == []
