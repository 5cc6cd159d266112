"""DVC's experiment queue runs sparseflow sweeps: two experiments queued with ``dvc exp run
--queue -S train.pruning.sparsity=…`` (the tiny profile, up to ``train@gmp-0``) and started with
``dvc queue start -j 2`` (``make queue``) run at the same time, each in its own temporary
workspace, with the stage commands found through the Makefile's PATH; ``dvc exp show`` and
``sparseflow compare`` read their results, and the workspace is left as it was."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _sh(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_queued_experiments_run_in_parallel_and_are_compared(tmp_path, mirror, prefect_server):
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("sparse_core", "tasks", "flows", "dvc.yaml", ".dvc", "profiles", "Makefile"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
        else:
            shutil.copy(src, work / item)
    shutil.copy(REPO / "profiles" / "tiny.yaml", work / "params.yaml")
    (work / ".venv").symlink_to(BIN.parent)  # the Makefile's .venv
    (work / ".gitignore").write_text(".venv\n")
    # PATH without the venv: `make queue` must put it there for the stage commands.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {**os.environ, "PATH": path, "SPARSEFLOW_DATA_MIRROR": str(mirror), "PREFECT_API_URL": prefect_server,
           "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(tmp_path / "prefect-home")}  # fmt: skip
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    _sh(["git", "init", "-q"], work, env)
    _sh(git + ["add", "-A"], work, env)
    _sh(git + ["commit", "-q", "-m", "tiny"], work, env)
    dvc = str(BIN / "dvc")
    for sparsity in ("0.85", "0.95"):
        _sh([dvc, "exp", "run", "--queue", "-S", f"train.pruning.sparsity={sparsity}", "-n", f"sp{sparsity[2:]}", "train@gmp-0"],
            work, env)  # fmt: skip
    _sh(["make", "queue", "JOBS=2"], work, {**env, "MAKEFLAGS": ""})
    started, deadline = time.monotonic(), time.monotonic() + 900
    while True:
        status = _sh([dvc, "queue", "status"], work, env)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        # No worker left while experiments wait: the queue's workers could not start.
        assert not ("0 active" in status and "Running" not in status and time.monotonic() - started > 60), status
        time.sleep(3)
    assert status.count("Success") == 2, status + _sh([dvc, "queue", "logs", "sp85"], work, env)[-3000:]
    # Both ran at once, each in its own temporary workspace (DVC's queue logs name the folder).
    shown = list(csv.DictReader(io.StringIO(_sh([dvc, "exp", "show", "--csv", "--no-pager"], work, env))))
    by_name = {row["Experiment"]: row for row in shown if row["Experiment"] in ("sp85", "sp95")}
    assert set(by_name) == {"sp85", "sp95"}, shown
    col = next(c for c in shown[0] if c.endswith("live/gmp/metrics.json:sparsity") or c == "sparsity")
    assert abs(float(by_name["sp85"][col]) - 0.85) < 0.01 and abs(float(by_name["sp95"][col]) - 0.95) < 0.01
    assert float(by_name["sp85"]["train.pruning.sparsity"]) == 0.85
    compared = _sh([str(BIN / "sparseflow"), "compare", "sp85", "sp95"], work, env)
    assert "train.pruning.sparsity" in compared and "0.85" in compared and "0.95" in compared
    # The workspace itself is untouched: no run folder, params as committed.
    assert not (work / "runs").exists()
    assert yaml.safe_load((work / "params.yaml").read_text())["train"]["pruning"]["sparsity"] == 0.9
