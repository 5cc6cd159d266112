"""Stages re-run only what a change touches (issue 14, part 5): each DVC stage's code deps are
the modules it imports (flows.stage_code), the dvc.yaml files hold exactly those, and a real
``dvc status`` after an edit names exactly the stages that run the edited file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.stage_code import DVC_FILES, collapse, job_modules, rewrite_deps, stage_deps, stage_files
from sparse_core.imports import import_graph, library_code, project_modules

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_files_hold_the_computed_code_deps():
    graph = import_graph(ROOT)
    files_of = {s: stage_deps(ROOT, s, graph) for s in job_modules(ROOT)}
    for name in DVC_FILES:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert rewrite_deps(text, files_of) == text, f"{name}: code deps are stale; run `sparseflow deps --write`"


def test_each_stage_runs_its_own_job():
    jobs = job_modules(ROOT)
    assert jobs["report"] == {"sparse_core.report"} and jobs["aggregate"] == {"sparse_core.aggregate"}
    assert jobs["corrupt"] == {"sparse_core.corrupted_sets"} and jobs["train"] == {"sparse_core.jobs.training"}
    report, train = stage_files(ROOT, "report"), stage_files(ROOT, "train")
    assert "sparse_core/report.py" in report and "sparse_core/engine.py" not in report
    assert "sparse_core/report.py" not in train and "sparse_core/corruptions.py" not in train
    # Methods and models are loaded by name (registries): every training stage lists them all.
    assert {"sparse_core/methods/gradual.py", "sparse_core/methods/topkast.py", "sparse_core/models/small.py"} <= set(train)


def test_the_fingerprint_hashes_what_training_runs():
    """The run fingerprint (code_fingerprint) hashes the library part of the training stages'
    deps: a report or corruption change leaves checkpoints resumable, an engine change does not."""
    code = library_code(import_graph(ROOT), "sparse_core.jobs.training", ROOT)
    train = {f for f in stage_files(ROOT, "train") if f.startswith("sparse_core/")}
    paths = {m: p.relative_to(ROOT).as_posix() for m, p in project_modules(ROOT).items()}
    assert {paths[m] for m in code if m.startswith("sparse_core")} == train
    assert "sparse_core.engine" in code and "sparse_core.report" not in code and "sparse_core.corruptions" not in code


def test_collapse_writes_a_folder_only_when_the_stage_runs_all_of_it(tmp_path):
    for rel in ["a/x.py", "a/y.py", "a/__pycache__/x.cpython-311.pyc", "a/z.pyc", "b/z.py", "b/w.py", "c/d/e.py", "f.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert collapse(tmp_path, ["a/x.py", "a/y.py", "b/z.py", "c/d/e.py", "f.py"]) == ["a", "b/z.py", "c", "f.py"]
    (tmp_path / "a" / "notes.txt").write_text("")  # DVC would hash it too: no longer the folder
    assert collapse(tmp_path, ["a/x.py", "a/y.py"]) == ["a/x.py", "a/y.py"]
    # what collapse leaves out is what DVC ignores here
    assert {"__pycache__/", "*.pyc"} <= set((ROOT / ".dvcignore").read_text().split())
    # the training stages run every method file (the registry reads them all): one entry
    assert "sparse_core/methods" in stage_deps(ROOT, "train") and "sparse_core/methods" not in stage_deps(ROOT, "report")


def test_rewrite_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="not `sparseflow run <stage>`"):
        rewrite_deps("stages:\n  x:\n    cmd: python train.py\n    deps:\n      - sparse_core\n", {"train": ["a.py"]})
    with pytest.raises(ValueError, match="list no code deps"):
        rewrite_deps("stages:\n  x:\n    cmd: sparseflow run train\n    deps:\n      - data\n", {"train": ["a.py"]})
    text = "stages:\n  x:\n    cmd: sparseflow run train\n    deps:\n      - data\n      - sparse_core\n      - tasks/t.py\n    outs:\n      - o\n"
    assert rewrite_deps(text, {"train": ["b.py", "c.py"]}) == text.replace("      - sparse_core\n      - tasks/t.py\n", "      - b.py\n      - c.py\n")


def _copy_project(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "sparse_core", "tasks", "flows"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in [*listed, "dvc.yaml"]:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy2(ROOT / "profiles" / "tiny.yaml", dest / "params.yaml")


def test_dvc_status_names_exactly_the_stages_an_edit_touches(tmp_path):
    """In a copy of the project (tiny profile): every stage committed as up to date with
    placeholder outputs (``dvc commit``, nothing trained), then one file edited at a time."""
    from dvc.repo import Repo

    _copy_project(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        Repo.init(".", no_scm=True)
        repo = Repo(".")
        names = [s.addressing for s in repo.index.stages]
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x")
        repo.commit(force=True)
        assert repo.status() == {}

        def touched(rel: str) -> set[str]:
            path = Path(rel)
            original = path.read_text()
            path.write_text(original + "\n# edited\n")
            try:
                return set(repo.status())
            finally:
                path.write_text(original)

        def named(*prefixes: str) -> set[str]:
            return {n for n in names if n.split("@")[0] in prefixes}

        evaluation = named("evaluate", "collect", "evaluate_ensemble")
        training = named("warmup", "train", "retrain")
        assert touched("sparse_core/report.py") == {"report"}
        assert touched("sparse_core/corruptions.py") == {"corrupt"}
        assert touched("sparse_core/calibration.py") == evaluation
        assert touched("sparse_core/methods/gradual.py") == training | evaluation  # a method file
        assert touched("sparse_core/engine.py") == training | evaluation
    finally:
        os.chdir(cwd)
