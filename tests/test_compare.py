"""``sparseflow compare``: DVC metric/params diffs between commits, the workspace and experiments, as markdown.

Each test works in a throwaway git + DVC repository (one stage writing ``metrics/run.json`` from ``train.lr``)
and passes ``root=`` so nothing depends on the current directory (which is this project, itself a DVC repo).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.compare import add_parser, compare, run

TRAIN = """\
import json, os, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
os.makedirs("metrics", exist_ok=True)
json.dump({"test": {"accuracy": round(5 * lr, 6), "loss": 1.0}}, open("metrics/run.json", "w"))
"""

DVC_YAML = """\
stages:
  train:
    cmd: "\\"{python}\\" train.py"
    deps:
      - train.py
    params:
      - train.lr
    metrics:
      - metrics/run.json:
          cache: false
"""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}


def _sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _dvc(repo: Path, *args: str) -> str:
    return _sh(repo, sys.executable, "-m", "dvc", *args)


def _set_lr(repo: Path, lr: float) -> None:
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n")


def _commit(repo: Path, message: str) -> None:
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Commit 1 (lr 0.1, tagged ``first``), commit 2 (lr 0.2); clean workspace."""
    repo = tmp_path_factory.mktemp("compare") / "repo"
    repo.mkdir()
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.name", "Test")
    _sh(repo, "git", "config", "user.email", "test@example.com")
    _sh(repo, "git", "config", "commit.gpgsign", "false")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    (repo / "train.py").write_text(TRAIN)
    (repo / "dvc.yaml").write_text(DVC_YAML.format(python=Path(sys.executable).as_posix()))
    _set_lr(repo, 0.1)
    _dvc(repo, "repro", "-q")
    _commit(repo, "lr 0.1")
    _sh(repo, "git", "tag", "first")
    _set_lr(repo, 0.2)
    _dvc(repo, "repro", "-q")
    _commit(repo, "lr 0.2")
    return repo


@pytest.fixture
def repo(base_repo: Path, tmp_path: Path) -> Path:
    """A private copy, so a test may dirty the workspace or add experiments."""
    return Path(shutil.copytree(base_repo, tmp_path / "repo", symlinks=True))


def test_two_commits(base_repo: Path) -> None:
    out = compare("HEAD~1", "HEAD", root=base_repo)
    assert "| file | metric | HEAD~1 | HEAD | change |" in out
    assert "| metrics/run.json | test.accuracy | 0.5 | 1.0 | +0.5 |" in out
    assert "| file | param | HEAD~1 | HEAD |" in out
    assert "| params.yaml | train.lr | 0.1 | 0.2 |" in out
    assert "test.loss" not in out  # unchanged rows only with all_rows
    backwards = compare("HEAD", "HEAD~1", root=str(base_repo))
    assert "| metrics/run.json | test.accuracy | 1.0 | 0.5 | -0.5 |" in backwards


def test_all_rows_and_precision(base_repo: Path) -> None:
    out = compare("HEAD~1", "HEAD", root=base_repo, all_rows=True, precision=2)
    lines = out.splitlines()
    rows = [line for line in lines if line.startswith("| metrics/run.json")]
    assert rows == [  # sorted by file, then metric
        "| metrics/run.json | test.accuracy | 0.5 | 1.0 | +0.5 |",
        "| metrics/run.json | test.loss | 1.0 | 1.0 | 0 |",
    ]


def test_clean_workspace_has_no_differences(base_repo: Path) -> None:
    out = compare("HEAD", None, root=base_repo)
    assert "No metric differences between HEAD and workspace." in out
    assert "No params differences between HEAD and workspace." in out
    assert "|" not in out


def test_same_commit_under_two_names(base_repo: Path) -> None:
    # DVC keys results by "name1,name2" when both revisions are one commit; compare still shows the rows.
    assert "No metric differences between first and HEAD~1." in compare("first", "HEAD~1", root=base_repo)
    out = compare("first", "HEAD~1", root=base_repo, all_rows=True)
    assert "| metrics/run.json | test.accuracy | 0.5 | 0.5 | 0 |" in out
    assert "| params.yaml | train.lr | 0.1 | 0.1 |" in out


def test_dirty_workspace(repo: Path) -> None:
    _set_lr(repo, 0.25)  # params changed, not reproduced: metrics equal
    out = compare(root=repo)
    assert "No metric differences between HEAD and workspace." in out
    assert "| params.yaml | train.lr | 0.2 | 0.25 |" in out
    (repo / "metrics" / "run.json").unlink()  # a metric missing on one side still shows, with a note
    out = compare(root=repo)
    assert "| metrics/run.json | test.accuracy | 1.0 | — | — |" in out
    assert "DVC could not load metrics file `metrics/run.json` at workspace" in out


def test_experiment_name_as_revision(repo: Path) -> None:
    _dvc(repo, "exp", "run", "-q", "-S", "train.lr=0.3", "-n", "exp1")
    _sh(repo, "git", "checkout", "-q", "--", ".")  # exp run leaves its results in the workspace
    out = compare("HEAD", "exp1", root=repo)  # DVC resolves experiment names as revisions
    assert "| file | metric | HEAD | exp1 | change |" in out
    assert "| metrics/run.json | test.accuracy | 1.0 | 1.5 | +0.5 |" in out
    assert "| params.yaml | train.lr | 0.2 | 0.3 |" in out
    assert "No metric differences" in compare("HEAD", None, root=repo)


def test_unknown_revision(base_repo: Path) -> None:
    with pytest.raises(ValueError, match="unknown revision 'no-such-rev'"):
        compare("HEAD", "no-such-rev", root=base_repo)
    with pytest.raises(ValueError, match="unknown revision 'HEAD~9'"):
        compare("HEAD~9", root=base_repo)


def test_not_a_dvc_repo(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a DVC repository") as info:
        compare(root=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_cli(base_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="sparseflow")
    add_parser(parser.add_subparsers(dest="command"))
    defaults = parser.parse_args(["compare"])
    got = (defaults.rev_a, defaults.rev_b, defaults.all, defaults.precision, defaults.root)
    assert got == ("HEAD", None, False, 4, ".")
    args = parser.parse_args(["compare", "HEAD~1", "HEAD", "--all", "--precision", "3", "--root", str(base_repo)])
    assert run(args) == 0
    assert "| metrics/run.json | test.loss | 1.0 | 1.0 | 0 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown revision 'nope'"):
        run(parser.parse_args(["compare", "nope", "--root", str(base_repo)]))


def test_sparseflow_command(base_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["compare", "HEAD~1", "HEAD", "--root", str(base_repo)]) == 0
    out = capsys.readouterr().out
    assert "test.accuracy" in out and "train.lr" in out
    assert main(["compare", "nope", "--root", str(base_repo)]) == 1  # clear error, exit status 1
    assert "unknown revision 'nope'" in capsys.readouterr().err
