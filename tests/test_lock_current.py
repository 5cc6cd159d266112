"""Every committed ``dvc.lock`` records the code and params the checkout has now.

The committed metrics, reports, curves and analyses are what their ``dvc.lock`` says produced
them; when a stage's code manifest (``stage_code/...``, the code and params values it reads) or
a params value changed since, those results are stale and the README would draw conclusions
from results the code no longer produces. Outputs are not checked: a fresh clone has no runs,
prepared data or DVC cache, and a dependency that is another stage's output (missing or partly
tracked by git) is that stage's business.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ["dvc.yaml", "curves/dvc.yaml", "analysis/dvc.yaml"]


def stale_dependencies(repo_root: Path, target: str) -> dict[str, list[str]]:
    """``{stage: [what changed]}`` for the stages of ``target`` whose command, params or
    dependencies in git (source folders, the code manifests: every dependency that neither is,
    lies in, nor holds an output DVC caches) differ from its ``dvc.lock``."""
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        repo = Repo(".")
        # Outputs DVC caches (not in git): absent or partial in a fresh clone.
        cached = [os.path.normpath(str(out.fs_path)) for stage in repo.index.stages for out in stage.outs if out.use_cache]

        def cached_output(path: str) -> bool:
            """``path`` is, lies in, or holds (plots/seeds) an output DVC caches."""
            full = os.path.normpath(os.path.join(repo.root_dir, path))
            return any(full == out or full.startswith(out + os.sep) or out.startswith(full + os.sep) for out in cached)

        stale: dict[str, list[str]] = {}
        for stage, entries in repo.status(targets=[target]).items():
            for entry in entries:
                if entry == "always changed":  # the fastpath stage: it depends on the machine, not on code
                    continue
                if isinstance(entry, str):  # "changed command"
                    stale.setdefault(stage, []).append(entry)
                    continue
                for path, change in entry.get("changed deps", {}).items():
                    if isinstance(change, dict):  # params: {key: "modified" | "new" | "deleted"}
                        stale.setdefault(stage, []).extend(f"{path}: {key} {what}" for key, what in change.items())
                    elif not cached_output(path):
                        stale.setdefault(stage, []).append(f"{path} {change}")
        return stale
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("target", PIPELINES)
def test_the_committed_lock_matches_the_code_and_params(target):
    stale = stale_dependencies(REPO, target)
    assert not stale, (
        f"{target}: dvc.lock records code or params that changed since its results were produced; re-run those "
        f"stages (`make repro`, `make curves`, `make analysis`) and commit the lock and results: {stale}"
    )


def test_the_check_catches_changed_code_and_params_and_spares_missing_outputs(tmp_path):
    """On a small DVC project: after ``dvc repro`` it passes, also with the cached output and the
    cache gone (a fresh clone); an edited code dependency, an edited params value and an edited
    command each fail it."""
    import shutil
    import subprocess
    import sys

    import yaml

    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "code.txt").write_text("v1\n")
    (tmp_path / "params.yaml").write_text("a: 1\nb: 2\n")
    stages = {"stages": {
        "make": {"cmd": "cat code.txt > out.txt", "deps": ["code.txt"], "params": ["a"], "outs": ["out.txt"]},
        "use": {"cmd": "cat out.txt > used.txt", "deps": ["out.txt"], "outs": [{"used.txt": {"cache": False}}]},
    }}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    subprocess.run([*dvc, "repro", "-q"], cwd=tmp_path, check=True)
    assert stale_dependencies(tmp_path, "dvc.yaml") == {}
    (tmp_path / "out.txt").unlink()  # a fresh clone: no cached outputs, no cache
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    assert stale_dependencies(tmp_path, "dvc.yaml") == {}
    (tmp_path / "params.yaml").write_text("a: 1\nb: 3\n")  # a key no stage reads
    assert stale_dependencies(tmp_path, "dvc.yaml") == {}
    (tmp_path / "params.yaml").write_text("a: 5\nb: 3\n")
    assert stale_dependencies(tmp_path, "dvc.yaml") == {"make": ["params.yaml: a modified"]}
    (tmp_path / "params.yaml").write_text("a: 1\nb: 3\n")
    (tmp_path / "code.txt").write_text("v2\n")
    assert stale_dependencies(tmp_path, "dvc.yaml") == {"make": ["code.txt modified"]}
    (tmp_path / "code.txt").write_text("v1\n")
    stages["stages"]["use"]["cmd"] = "cp out.txt used.txt"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    assert stale_dependencies(tmp_path, "dvc.yaml") == {"use": ["changed command"]}
