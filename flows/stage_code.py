"""The code each DVC stage runs and the params it reads, so that a change re-runs only the stages it
touches.

A stage process (``sparseflow run <stage>``) runs its flow in :mod:`flows.stage_flows`, whose
tasks (:mod:`tasks.stage_tasks`) import the library module of their job by name
(:func:`tasks.timing.stage_work`). Its code is therefore the import closure
(:mod:`sparse_core.imports`, read from the source) of ``flows.stage_flows`` and of the job
modules named by the tasks that the stage's flow uses, found by reading those two files, plus
the modules loaded by name at run time: every model module where models are built, and the
method modules of the methods the stage builds (:mod:`sparse_core.methods.registry` imports a
method's class when it is built). ``flows/cli.py`` (the dispatcher) is listed as a file of its own.

**Which methods a stage builds.** A stage whose items each run one method or run
(:data:`ITEMS`: ``train@<method>``, ``evaluate@<run>``, ...) builds that run's method, the
member method of a ``members`` ensemble (``train.dst_ensemble.method``), the sparse method of a
``local_*`` run (``local.sparse_method``) and, for a ``<run>_retrain`` run, also the internal
``retrain`` method (:func:`methods_of`); ``warmup`` builds ``dense`` and ``retrain@<run>``
``retrain`` (:data:`FIXED`); any other stage that reaches the method base class counts every
method module. An edit inside ``mest.py`` re-runs the stages that build ``mest`` only. Names a
package loads on first access (PEP 562 tables such as ``sparse_core.sparsity._EXPORTS``) count
as imports of their submodules (:func:`sparse_core.imports.lazy_exports`).

**Method declarations.** The registry scans every method file for the declarations
(``register_method(...)`` arguments). A stage that builds a known set of methods depends on
their declarations through their files, and on no other: the others can change which params
validate and the defaults of method lists, not what training ``dpf`` computes, so adding a
method does not retrain the others. Every other stage that reads the registry (``report``'s
method table, ``aggregate``, ``prepare``'s validation, ...) depends on all declarations: its
manifest holds their digest (:func:`declarations_digest`).

**Params.** :data:`PARAMS` names the keys or sections each stage reads; its manifest holds the
validated value of every leaf under them, one ``# param <key> = <JSON>`` line each (defaults
filled in). Only the ``code`` stage lists ``params.yaml`` in ``dvc.yaml`` (all of it, so ``dvc
params diff`` and ``dvc exp show`` see every key); a params change re-runs ``code``, which
rewrites the manifests, and the stages whose manifests changed. This is finer than DVC's own
``params:`` lists, which a ``matrix`` stage shares among its items: the lists that only name the
items (``train.methods``, ``evaluate.runs``, ...) are left out of an :data:`ITEMS` stage's
manifests, so adding a method trains it alone.

**Manifests.** The ``code`` stage of ``dvc.yaml`` (``sparseflow deps --manifests stage_code``)
writes one small file per stage, or per item of an :data:`ITEMS` stage:
``stage_code/<stage>.txt`` or ``stage_code/<stage>/<method or run>.txt``, holding the sha256
of every file the stage runs (``sha256sum`` format), the methods it builds, the params values it
reads and, where it reads the whole registry, a digest of the method declarations. Each stage
lists its manifest as its one code and params dependency
(``sparseflow deps --write`` puts them in ``dvc.yaml``, ``curves/dvc.yaml`` and
``analysis/dvc.yaml``; ``tests/test_stage_code.py`` fails when they drift). DVC re-runs a
stage when its manifest's bytes change, i.e. when a file it runs or a value it reads changes,
and the ``code`` stage itself re-runs on any source or params change (about a second). Two
reasons for the indirection:

* DVC gives all items of a ``matrix`` stage one ``deps`` list, where only ``${item.*}``
  interpolation varies; the method a ``dst_ensemble`` or ``local_*`` item runs is chosen by
  params, so only a file written from params can name its code.
* DVC parses and rewrites the whole ``dvc.lock`` (ruamel.yaml, round trip) after every stage,
  so the lock's size is paid once per stage (README, "Orchestration"); one manifest entry per
  stage instead of 18 to 39 code entries halved it, and its params values (two thirds of what
  was left: DVC records every value of every listed section, per stage) are in the manifests.

What DVC's ``dvc status`` reports follows: after an edit it names the ``code`` stage (its
folders or ``params.yaml`` changed); once ``code`` has run (``dvc repro code``), it names the stages whose
manifests changed. A training run's fingerprint (:func:`sparse_core.jobs.rundirs.code_fingerprint`)
hashes the library part of its manifest (a checkpoint is resumed only by the same code).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from sparse_core.imports import closure, import_graph, library_code, project_modules
from sparse_core.methods.registry import MethodSpec, scan_file

FLOWS, TASKS = "flows/stage_flows.py", "tasks/stage_tasks.py"
ENTRY = "flows.stage_flows"
CLI_FILE = "flows/cli.py"
DVC_FILES = ("dvc.yaml", "curves/dvc.yaml", "analysis/dvc.yaml")
MANIFESTS = "stage_code"
REGISTRY = "sparse_core.methods.registry"
METHODS_DIR = "sparse_core/methods"
#: Stages whose items each run one method or run (``--method``/``--run`` in their command),
#: with the params lists that name the items.
ITEMS = {
    "train": ("train.methods",),
    "curves": ("curves.methods",),
    "retrain": ("retrain.runs",),
    "evaluate": ("evaluate.runs",),
    "collect": ("collect.ensembles",),
    "evaluate_ensemble": ("collect.ensembles",),
}
#: Stages that build a fixed set of methods, whatever their item (``retrain@<run>`` fine-tunes
#: the run's exported weights with the internal ``retrain`` method, not with the run's method).
#: ``fastpath`` times the model alone and builds no method.
FIXED = {"warmup": ("dense",), "retrain": ("retrain",), "fastpath": ()}
#: The params keys that choose the other methods an item builds (:func:`methods_of`).
MEMBER_KEYS = ("train.dst_ensemble.method", "local.sparse_method")
#: How a manifest line holding a param value starts.
PARAM_PREFIX = "# param "

_DEVICE = ("base.device", "base.precision", "base.channels_last", "base.deterministic", "base.num_threads")
_LOCAL = ("local.chunks", "local.split_points", "local.head", "local.head_hidden")  # a local_* run's network
#: The params each stage reads: keys or whole sections of the validated params (a key a params
#: file leaves out counts with its default). Its manifest lists the value of every leaf under
#: them (``# param <key> = <JSON>``), so a stage re-runs when a value it reads changes, as a
#: ``params:`` entry in dvc.yaml would make it; an :data:`ITEMS` stage leaves out the lists that
#: only name the items (``train.methods``, ``evaluate.runs``, ...): adding ``set`` to
#: ``train.methods`` runs ``train@set-*`` and re-runs no other training. ``base.precision`` and
#: ``base.channels_last`` are read wherever a model runs. Left out as they change no finished
#: result: ``base.resume``, ``base.progress``, ``orchestration`` and ``base.nonfinite_*`` (how
#: a run retries after a NaN; a change would re-run every training for the runs that met none).
#: ``sweep`` is not a DVC stage.
PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("base.seed", "base.data_dir", "data"),
    "fastpath": (*_DEVICE, "base.allow_slow_bf16", "base.data_dir", "base.runs_dir", "base.metrics_dir", "data.dataset",
                 "model", "train.optim.batch_size"),
    "ood": ("base.seed", "base.data_dir", "data", "ood"),
    "corrupt": ("base.seed", "base.data_dir", "data", "corrupt"),
    "warmup": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.plots_dir", "data", "augment", "model", "warmup"),
    "train": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.plots_dir", "data", "augment", "model", "warmup", "train",
              *_LOCAL, "local.optimizer", "local.execution", "local.backend", "local.sparse_method"),
    "retrain": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.plots_dir", "data", "augment", "model", "train.pruning",
                "retrain"),
    "collect": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.ensembles_dir", "data", "model", "train", "collect"),
    "evaluate_ensemble": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.ensembles_dir", "base.metrics_dir",
                          "base.plots_dir", "data", "model", "warmup", "train", "evaluate"),
    "evaluate": (*_DEVICE, "base.data_dir", "base.runs_dir", "base.metrics_dir", "base.plots_dir", "data", "model",
                 "warmup", "train", "retrain", "evaluate", *_LOCAL, "local.sparse_method"),
    "aggregate": ("base.seeds", "base.metrics_dir", "evaluate.runs", "collect.ensembles"),
    # data and train: the claims table's design ratios (sparse_core/recipes.py) are read off them.
    "report": ("base.seeds", "base.data_dir", "base.metrics_dir", "base.plots_dir", "base.reports_dir", "data",
               "model.name", "train.epochs", "train.optim.batch_size", "train.pruning", "train.dst", "train.edst",
               "train.dst_ensemble", "evaluate.runs", "collect.ensembles"),
    "curves": (*_DEVICE, "base.reports_dir", "base.data_dir", "base.runs_dir", "data", "augment", "model", "warmup", "train",
               "retrain", "evaluate.batch_size", "curves.sparsities"),
    "curves_report": ("base.seeds", "base.metrics_dir", "base.reports_dir", "data.dataset", "model.name", "curves",
                      "retrain.epochs", "train.pruning.scope"),
    "local_analysis": ("base.data_dir", "base.reports_dir", "base.seed", "data.dataset", "model", "local"),
    "sweep": (),
}


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


def stage_files(root: Path, stage: str, graph: dict[str, set[str]] | None = None,
                method_modules: list[str] | None = None) -> list[str]:
    """The source files (relative, sorted) that stage ``stage`` runs.

    Args:
        method_modules: the modules of the methods the stage builds (:func:`methods_of`); None
            counts every method module where the stage reaches the method base class.

    Raises:
        KeyError: no flow ``_<stage>_flow`` in ``flows/stage_flows.py``.
    """
    graph = graph if graph is not None else import_graph(root)
    modules = closure(graph, ENTRY) | library_code(graph, sorted(job_modules(root)[stage]), root, method_modules)
    paths = project_modules(root)
    return sorted({paths[m].relative_to(root).as_posix() for m in modules} | {CLI_FILE})


def method_specs(root: Path) -> dict[str, MethodSpec]:
    """The method declarations under ``root`` (``sparse_core/methods/*.py``, read with
    :func:`~sparse_core.methods.registry.scan_file`, nothing imported), in file order."""
    specs: dict[str, MethodSpec] = {}
    for path in sorted((root / METHODS_DIR).glob("*.py")):
        if path.name != "registry.py":
            specs.update((s.name, s) for s in scan_file(path))
    return specs


def declarations_digest(specs: dict[str, MethodSpec]) -> str:
    """sha256 of every declaration's fields, in file order (its ``file:line`` left out: an edit
    above a declaration moves it without changing it)."""
    h = hashlib.sha256()
    for spec in specs.values():
        h.update(repr({k: v for k, v in dataclasses.asdict(spec).items() if k != "source"}).encode())
    return h.hexdigest()


def methods_of(specs: dict[str, MethodSpec], params: Any, run: str) -> list[str]:
    """The methods a stage item for ``run`` (a method name or ``<method>_retrain``) builds: the
    run's method; ``train.dst_ensemble.method`` for a ``members`` ensemble; ``local.sparse_method``
    for a ``local_*`` run; ``retrain`` for a fine-tuned run (whose evaluation also costs the run
    it started from, :func:`sparse_core.jobs.scoring.run_cost`).

    Raises:
        ValueError: ``run`` names no declared method.
    """
    method = run if run in specs else run.removesuffix("_retrain")
    if method not in specs:
        raise ValueError(f"{run!r} is neither a declared method nor <method>_retrain; declared: {', '.join(specs)}")
    found = [method]
    members, sparse = MEMBER_KEYS
    if specs[method].ensemble == "members":
        found.append(_param(params, members))
    if specs[method].family == "local":
        found.append(_param(params, sparse))
    if method != run:
        found.append("retrain")
    return list(dict.fromkeys(found))


def _param(params: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), params)


def param_values(params: Any, keys: tuple[str, ...], skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """``{leaf key: value}`` for every leaf of the validated ``params`` (a
    :class:`~sparse_core.config.Params`) under ``keys``, sorted, leaving out the keys in ``skip``
    and what lies under them. A leaf is a value that is not a mapping, or an empty mapping;
    method sections that ``train`` allows as extras (``train.<params_key>``) count as written.

    Raises:
        ValueError: a key that is not in the params.
    """
    tree = params.model_dump(mode="json")
    out: dict[str, Any] = {}

    def walk(key: str, value: Any) -> None:
        if key in skip:
            return
        if isinstance(value, dict) and value:
            for sub, v in value.items():
                walk(f"{key}.{sub}", v)
        else:
            out[key] = value

    for key in keys:
        node = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{key!r} is not a params key (flows/stage_code.py, PARAMS)")
            node = node[part]
        walk(key, node)
    return dict(sorted(out.items()))


def manifests(root: Path, params: Any) -> dict[str, str]:
    """``{path relative to stage_code/: text}`` for every stage, and for every item of the
    :data:`ITEMS` stages named in ``params`` (a :class:`~sparse_core.config.Params`).

    Raises:
        ValueError: a stage without a :data:`PARAMS` entry, or an entry naming a key the params
            do not have.
    """
    graph, specs, jobs = import_graph(root), method_specs(root), job_modules(root)
    digest = declarations_digest(specs)
    reads_registry = {m for m, targets in graph.items() if REGISTRY in targets} | {REGISTRY}

    @functools.cache
    def sha256(rel: str) -> str:
        return hashlib.sha256((root / rel).read_bytes()).hexdigest()

    paths = project_modules(root)
    registry_files = {paths[m].relative_to(root).as_posix() for m in reads_registry if m in paths}

    item_lists = {k for keys in ITEMS.values() for k in keys}

    def text(stage: str, title: str, methods: tuple[str, ...] | None) -> str:
        mods = None if methods is None else [specs[m].module for m in methods]
        files = stage_files(root, stage, graph, mods)
        lines = [f"# {title}: the code it runs and the params it reads (flows/stage_code.py; written by the `code` "
                 "stage of dvc.yaml)"]
        if methods is not None:
            lines.append(f"# methods built: {' '.join(methods) or '(none)'}")
        if methods is None and registry_files & set(files):
            lines.append(f"# method declarations (every file of {METHODS_DIR}/): {digest}")
        if stage not in PARAMS:
            raise ValueError(f"stage {stage!r} has no entry in PARAMS (flows/stage_code.py): list the params it reads")
        values = param_values(params, PARAMS[stage], item_lists if stage in ITEMS else frozenset())
        lines += [f"{PARAM_PREFIX}{k} = {json.dumps(v, sort_keys=True)}" for k, v in values.items()]
        lines += [f"{sha256(f)}  {f}" for f in files]
        return "\n".join(lines) + "\n"

    out = {}
    for stage in sorted(jobs):
        if stage not in ITEMS:
            out[f"{stage}.txt"] = text(stage, f"sparseflow run {stage}", FIXED.get(stage))
    for stage, keys in ITEMS.items():
        arg = "--method" if stage in ("train", "curves") else "--run"
        for run in dict.fromkeys(r for k in keys for r in _param(params, k)):
            built = FIXED.get(stage) or tuple(methods_of(specs, params, run))
            out[f"{stage}/{run}.txt"] = text(stage, f"sparseflow run {stage} {arg} {run}", built)
    return out


def write_manifests(root: Path, params: Any, folder: Path) -> int:
    """Write :func:`manifests` into ``folder`` (replaced as a whole: built beside it, then
    renamed); returns the number of files."""
    files = manifests(root, params)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for leftover in (tmp, old):  # of a run killed between the steps below
        shutil.rmtree(leftover, ignore_errors=True)
    for rel, body in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(body, encoding="utf-8")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return len(files)


_CMD = re.compile(r"^\s*cmd: sparseflow (run (\w+)(?:.*?--(?:method|run) (\S+))?|deps\b.*)")
_CODE = re.compile(rf"^(\s*)- (sparse_core|tasks|flows|{MANIFESTS})(/\S*)?\s*$")
_STAGE = re.compile(r"^( {2})?[A-Za-z_][\w-]*:")


def manifest_dep(stage: str, item: str | None) -> str:
    """The code dependency of stage ``stage`` in a dvc.yaml: ``stage_code/<stage>/<item>.txt``
    for the :data:`ITEMS` stages (``item`` is the ``--method``/``--run`` argument of the
    command, e.g. ``${item.method}``), else ``stage_code/<stage>.txt``.

    Raises:
        ValueError: an :data:`ITEMS` stage whose command names no method or run.
    """
    if stage in ITEMS:
        if item is None:
            raise ValueError(f"stage {stage!r} runs one method or run per item, but its command has no --method/--run")
        return f"{MANIFESTS}/{stage}/{item}.txt"
    return f"{MANIFESTS}/{stage}.txt"


def rewrite_deps(text: str, stages: set[str]) -> str:
    """``text`` (a dvc.yaml) with each stage's code deps (the run of ``- sparse_core…``,
    ``- tasks…``, ``- flows…``, ``- stage_code…`` lines in its ``deps``) replaced by its
    :func:`manifest_dep`; the ``code`` stage (``sparseflow deps …``), other deps and everything
    else stay as written. ``stages``: the stages with a flow.

    Raises:
        ValueError: a command that is neither ``sparseflow run <stage>`` nor ``sparseflow deps``,
            a stage without a flow, or a stage whose deps hold no code entry to replace.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    current: str | None = None
    seen: list[str] = []
    replaced: set[str] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if _STAGE.match(line):  # a new stage (or top-level key): no code deps until its cmd
            current = None
        if line.lstrip().startswith("cmd:"):
            m = _CMD.match(line)
            if not m:
                raise ValueError(f"line {i + 1}: {line.strip()!r} is not `sparseflow run <stage>`")
            stage, current = m.group(2), None
            if stage is not None:
                if stage not in stages:
                    raise ValueError(f"line {i + 1}: stage {stage!r} has no flow in {FLOWS}")
                current = manifest_dep(stage, m.group(3))
                seen.append(current)
        code = _CODE.match(line)
        if code and current is not None:
            while i < len(lines) and _CODE.match(lines[i]):
                i += 1
            out.append(f"{code.group(1)}- {current}\n")
            replaced.add(current)
            continue
        out.append(line)
        i += 1
    missing = [s for s in seen if s not in replaced]
    if missing:
        raise ValueError(f"stages with code deps {missing} list no code deps (sparse_core/..., tasks/..., flows/..., "
                         f"{MANIFESTS}/...) to replace")
    return "".join(out)


def write_all(root: Path) -> list[Path]:
    """Rewrite the code deps of every stage in :data:`DVC_FILES`; returns the files changed."""
    stages = set(job_modules(root))
    changed = []
    for name in DVC_FILES:
        path = root / name
        old = path.read_text(encoding="utf-8")
        try:
            new = rewrite_deps(old, stages)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if new != old:
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)
            changed.append(path)
    return changed
