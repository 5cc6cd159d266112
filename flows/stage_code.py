"""The code each DVC stage runs, so that a change re-runs only the stages it touches.

A stage process (``sparseflow run <stage>``) runs its flow in :mod:`flows.stage_flows`, whose
tasks (:mod:`tasks.stage_tasks`) import the library module of their job by name
(:func:`tasks.timing.stage_work`). Its code is therefore the import closure
(:mod:`sparse_core.imports`, read from the source) of ``flows.stage_flows`` and of the job
modules named by the tasks that the stage's flow uses, found by reading those two files, plus
the modules loaded by name at run time: every method module (:mod:`sparse_core.methods.registry`
imports a method's class when it is built) where methods are built, and every model module
where models are built. ``flows/cli.py`` (the dispatcher) is listed as a file of its own.

In ``dvc.yaml`` a folder whose every file the stage runs is listed as the folder
(:func:`collapse`): the same files, one entry instead of several. Every entry costs DVC a
block in ``dvc.lock``, which it parses and rewrites (ruamel.yaml, round trip) after every
stage, so the lock file's size is paid once per stage (README, "Orchestration").

``sparseflow deps`` prints these lists; ``sparseflow deps --write`` puts them in the ``deps``
of every stage of ``dvc.yaml``, ``curves/dvc.yaml`` and ``analysis/dvc.yaml``;
``tests/test_stage_code.py`` fails when the files drift from them. The training stages'
run fingerprint (:func:`sparse_core.jobs.rundirs.code_fingerprint`) hashes the library part
of the same set.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from sparse_core.imports import closure, import_graph, library_code, project_modules

FLOWS, TASKS = "flows/stage_flows.py", "tasks/stage_tasks.py"
ENTRY = "flows.stage_flows"
CLI_FILE = "flows/cli.py"
DVC_FILES = ("dvc.yaml", "curves/dvc.yaml", "analysis/dvc.yaml")


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def job_modules(root: Path) -> dict[str, set[str]]:
    """``{stage: library modules its tasks load by name}``, read from the two files.

    A stage ``s`` is the flow function ``_<s>_flow``; its tasks are the ``t.<task>`` names it
    uses; a task's job modules are the string arguments of its ``stage_work(...)`` calls.

    Raises:
        ValueError: a task a flow uses is not in ``tasks/stage_tasks.py``.
    """
    tasks = _functions(root / TASKS)
    modules_of = {}
    for name, fn in tasks.items():
        found = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "stage_work":
                found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and "." in a.value)
        modules_of[name] = found
    stages = {}
    for name, fn in _functions(root / FLOWS).items():
        m = re.fullmatch(r"_(\w+)_flow", name)
        if not m or not any(getattr(getattr(d, "func", None), "id", None) == "_lazy_flow" for d in fn.decorator_list):
            continue
        used = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "t"}
        unknown = used - set(modules_of)
        if unknown:
            raise ValueError(f"{FLOWS}: {name} uses tasks {sorted(unknown)} that {TASKS} does not define")
        stages[m.group(1)] = set().union(*(modules_of[u] for u in used)) if used else set()
    return stages


def stage_files(root: Path, stage: str, graph: dict[str, set[str]] | None = None) -> list[str]:
    """The source files (relative, sorted) that stage ``stage`` runs.

    Raises:
        KeyError: no flow ``_<stage>_flow`` in ``flows/stage_flows.py``.
    """
    graph = graph if graph is not None else import_graph(root)
    jobs = job_modules(root)[stage]
    modules = closure(graph, ENTRY) | library_code(graph, sorted(jobs), root)
    paths = project_modules(root)
    return sorted({paths[m].relative_to(root).as_posix() for m in modules} | {CLI_FILE})


def _dvc_files(root: Path, folder: str) -> frozenset[str]:
    """The files DVC hashes for a folder dependency ``folder``: all files below it except
    ``__pycache__/`` folders and ``*.pyc`` (what the project's ``.dvcignore`` leaves out)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root / folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found.update((Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if not f.endswith(".pyc"))
    return frozenset(found)


def collapse(root: Path, files: list[str]) -> list[str]:
    """``files`` (relative paths) with every folder whose files are all in ``files`` written as
    the folder (the highest such folder; the project root never), sorted.

    DVC hashes a folder dependency as the set of its files, so the entries cover exactly the
    same files; a file added to such a folder later changes the folder's hash, which is right
    for ``sparse_core/methods/`` (the registry reads every method file) and is otherwise caught
    by ``tests/test_stage_code.py`` (the folder no longer collapses).
    """
    wanted = set(files)
    cache: dict[str, bool] = {}

    def covered(folder: str) -> bool:
        if folder not in cache:
            cache[folder] = _dvc_files(root, folder) <= wanted
        return cache[folder]

    out = set()
    for f in wanted:
        parts = f.split("/")
        out.add(next(("/".join(parts[:i]) for i in range(1, len(parts)) if covered("/".join(parts[:i]))), f))
    return sorted(out)


def stage_deps(root: Path, stage: str, graph: dict[str, set[str]] | None = None) -> list[str]:
    """The code deps of stage ``stage`` as written in ``dvc.yaml``: :func:`stage_files` through
    :func:`collapse`."""
    return collapse(root, stage_files(root, stage, graph))


_CMD = re.compile(r"^\s*cmd: sparseflow run (\w+)")
_CODE = re.compile(r"^(\s*)- (sparse_core|tasks|flows)(/\S*)?\s*$")


def rewrite_deps(text: str, files_of: dict[str, list[str]]) -> str:
    """``text`` (a dvc.yaml) with each stage's code deps (the run of ``- sparse_core…``,
    ``- tasks/…``, ``- flows/…`` lines in its ``deps``) replaced by ``files_of[<its CLI stage>]``;
    other deps (data, upstream outputs) and everything else stay as written.

    Raises:
        ValueError: a stage whose command is not ``sparseflow run <stage>``, or whose deps hold
            no code entry to replace.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage: str | None = None
    seen: list[str] = []
    replaced: set[str] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("cmd:"):
            m = _CMD.match(line)
            if not m:
                raise ValueError(f"line {i + 1}: {line.strip()!r} is not `sparseflow run <stage>`")
            stage = m.group(1)
            if stage not in files_of:
                raise ValueError(f"line {i + 1}: stage {stage!r} has no flow in {FLOWS}")
            seen.append(stage)
        code = _CODE.match(line)
        if code and stage is not None:
            indent = code.group(1)
            while i < len(lines) and _CODE.match(lines[i]):
                i += 1
            out.extend(f"{indent}- {f}\n" for f in files_of[stage])
            replaced.add(stage)
            continue
        out.append(line)
        i += 1
    missing = [s for s in seen if s not in replaced]
    if missing:
        raise ValueError(f"stages {missing} list no code deps (sparse_core/..., tasks/..., flows/...) to replace")
    return "".join(out)


def write_all(root: Path) -> list[Path]:
    """Rewrite the code deps of every stage in :data:`DVC_FILES`; returns the files changed."""
    graph = import_graph(root)
    stages = job_modules(root)
    files_of = {s: stage_deps(root, s, graph) for s in stages}
    changed = []
    for name in DVC_FILES:
        path = root / name
        old = path.read_text(encoding="utf-8")
        try:
            new = rewrite_deps(old, files_of)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if new != old:
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)
            changed.append(path)
    return changed
