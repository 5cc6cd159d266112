"""The tiny profile in a temporary copy of the repo, end to end, the production way: a Prefect
server on PostgreSQL (both real, started by ``sparseflow postgres`` / ``sparseflow server
--database``), the pipeline deployed to a process work pool with a concurrency limit of 1,
two runs triggered at once and taken by one ``sparseflow worker``. The first reproduces every
stage once (through DVC's Python API), each stage's flow run linked to it and stored as a row
in PostgreSQL; the second waits for the first, then finds nothing to do. Then a DVC remote
round trip and the optional analyses.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    return [r for r in _post(api, "flow_runs/filter") if r["deployment_id"] == deployment_id]


def _deploy_and_work(work: Path, env: dict, api: str) -> tuple[dict, list[dict], list[list[str]]]:
    """``sparseflow deploy`` of ``work`` to a process pool (profile tiny), two runs triggered
    with ``prefect deployment run`` at once, and one ``sparseflow worker`` taking them. Returns
    the deployment, its two flow runs (in start order) and the stages each reproduced (its
    ``pipeline`` artifact). Checks on the way that the two runs never ran at the same time."""
    import signal
    import time

    bindir = Path(sys.executable).parent
    pool = f"e2e-{os.getpid()}"
    _sh([str(bindir / "sparseflow"), "deploy", "--pool", pool, "--name", "e2e", "--profile", "tiny"], work, env)
    deployment = next(d for d in _post(api, "deployments/filter") if d["name"] == "e2e")
    limit = deployment["global_concurrency_limit"]
    assert limit["limit"] == 1 and deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    for _ in range(2):
        _sh([str(bindir / "prefect"), "deployment", "run", "pipeline/e2e"], work, env)
    log = open(work.parent / "worker.log", "w")
    worker = subprocess.Popen([str(bindir / "sparseflow"), "worker", "--pool", pool], cwd=work.parent, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    states_seen: list[list[str]] = []
    try:
        deadline = time.monotonic() + 1200
        while True:
            runs = _flow_runs(api, deployment["id"])
            states = sorted(r["state_type"] for r in runs)
            states_seen.append(states)
            assert states.count("RUNNING") <= 1, states  # the concurrency limit: one run at a time
            if len(runs) == 2 and all(st in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for st in states):
                break
            assert worker.poll() is None, (work.parent / "worker.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (work.parent / "worker.log").read_text()[-4000:]
            time.sleep(1.0)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        log.close()
    worker_log = (work.parent / "worker.log").read_text()
    assert states == ["COMPLETED", "COMPLETED"], worker_log[-5000:]
    # The second run waited for the slot while the first ran.
    assert any("RUNNING" in st and "SCHEDULED" in st for st in states_seen), states_seen
    runs = sorted(_flow_runs(api, deployment["id"]), key=lambda r: r["start_time"])
    reproduced = []
    for run in runs:
        art = next(a for a in _post(api, "artifacts/filter") if a["key"] == "pipeline" and a["flow_run_id"] == run["id"])
        stages = art["data"].split("Stages reproduced: ")[1].split("\n")[0]
        reproduced.append([x.strip() for x in stages.split(",")])
    return deployment, runs, reproduced


def _post(api: str, path: str, page: int = 200) -> list[dict]:
    """Every item of a Prefect ``.../filter`` endpoint, read in pages of ``page`` (its maximum)."""
    items: list[dict] = []
    while True:
        body = json.dumps({"limit": page, "offset": len(items)}).encode()
        req = urllib.request.Request(f"{api}/{path}", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            got = json.loads(r.read())
        items += got
        if len(got) < page:
            return items


def test_dvc_repro_tiny_profile(tmp_path, mirror, postgres_prefect):
    prefect_server = postgres_prefect["api"]
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("sparse_core", "tasks", "flows", "dvc.yaml", ".dvc", "analysis", "curves", "profiles"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item, **({"ignore": shutil.ignore_patterns("__pycache__", "cache", "tmp")} if src.is_dir() else {}))
    shutil.copy(REPO / "params.yaml", work / "params.yaml")  # the served run switches it to the tiny profile
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "SPARSEFLOW_DATA_MIRROR": str(mirror),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_server,  # stages report to this server
        "DVC_NO_ANALYTICS": "1",
    }
    _sh(["git", "init", "-q"], work, env)
    dvc = str(Path(bindir) / "dvc")
    # The whole pipeline as a deployment of a process work pool on Prefect with PostgreSQL,
    # triggered twice and run by a worker: the first run reproduces everything, the second
    # (queued behind the first by the deployment's concurrency limit) finds nothing to do.
    deployment, flow_runs, (reproduced, again) = _deploy_and_work(work, env, prefect_server)
    assert again == ["fastpath"]  # always run: the machine is a dependency DVC cannot see (its output unchanged)
    run_id = flow_runs[0]["id"]
    methods = ("dense", "dpf", "gmp", "oneshot", "rigl", "dst_ensemble", "edst_ensemble", "local_chunked")
    runs = ("dense", "dpf", "gmp", "oneshot", "rigl", "dpf_retrain", "local_chunked")
    # The tiny profile has one training seed (0): per-seed stages end in -0.
    expected = ["code", "prepare", "fastpath", "ood", "corrupt", "warmup@0"] + [f"train@{m}-0" for m in methods] + ["retrain@dpf-0"]
    expected += [f"{stage}@{e}-0" for stage in ("collect", "evaluate_ensemble") for e in ("dst_ensemble", "edst_ensemble")]
    expected += [f"evaluate@{r}-0" for r in runs] + ["report"]
    expected += [f"aggregate@{r}" for r in runs] + [f"aggregate_ensemble@{e}" for e in ("dst_ensemble", "edst_ensemble")]
    assert sorted(reproduced) == sorted(expected)

    for run in ("dense", "dpf", "gmp", "oneshot", "rigl", "dpf_retrain"):
        m = json.loads((work / "metrics" / "seeds" / "s0" / f"{run}.json").read_text())
        agg = json.loads((work / "metrics" / f"{run}.json").read_text())  # aggregate@<run>: n, mean, std, per seed
        assert agg["n"] == 1 and agg["mean"]["test"]["accuracy"] == m["test"]["accuracy"] and agg["per_seed"]["s0"] == m
        assert 0.0 <= m["test"]["accuracy"] <= 1.0
        assert set(m["test"]) == {"accuracy", "nll", "ece", "mce", "brier"}
        assert set(m["corruption"]["type"]) == {"gaussian_noise", "defocus_blur", "fog", "contrast", "saturate"}
        assert set(m["corruption"]["severity"]) == {"s1", "s3", "s5"}
        assert set(m["ood"]) == {"mnist", "gaussian", "uniform", "mean"} and m["ood_missing"] == 1
        assert m["flops"]["training_ratio"] > 0
        n_prunable = 61_470  # LeNet-5 conv + linear weights on 28x28, 10 classes
        target = {"dense": 0.0, "rigl": 0.8}.get(run, 0.9)
        assert m["target_sparsity"] == target
        if run != "rigl":  # an active DST weight can be exactly zero (just regrown), so rigl's count of zeros may exceed the target
            assert abs(m["sparsity"] - target) * n_prunable < 1.0 + 1e-6, (run, m["sparsity"])
    edst = json.loads((work / "metrics" / "seeds" / "s0" / "edst_ensemble.json").read_text())
    assert edst["members"] == 3 and edst["flops"]["training_ratio"] < 1.0
    assert len(json.loads((work / "runs" / "s0" / "edst_ensemble" / "tickets" / "tickets.json").read_text())) == 3
    dst = json.loads((work / "metrics" / "seeds" / "s0" / "dst_ensemble.json").read_text())
    assert dst["members"] == 2 and dst["flops"]["training_ratio"] > edst["flops"]["training_ratio"]
    assert set(dst["ood"]["mnist"]) == {"msp", "entropy", "mi"}  # ensembles add mutual information
    report = (work / "reports" / "report.md").read_text()
    assert "| ⚠ all models | cifar10 |" in report  # the missing optional OOD set is a visible warning row
    assert "| dpf_retrain | 1 |" in report and "| edst_ensemble | 1 |" in report
    claims = json.loads((work / "reports" / "claims.json").read_text())
    assert "## Claims" in report and claims["dpf_ge_gmp"]["n"] == 1 and claims["dpf_ge_gmp"]["verdict"] == "inconclusive (off-paper design)"
    # the tiny profile re-estimates DPF's mask every 4 steps; the paper every 16
    assert "DPF mask period 4 steps (paper 16 steps)" in claims["dpf_ge_gmp"]["design_vs_paper"]
    tidy = pd.read_parquet(work / "reports" / "metrics.parquet")
    assert {"test", "corrupted", "ood/mnist", "model"} <= set(tidy["dataset"])
    for name in ("accuracy_vs_sparsity", "reliability", "corruption_accuracy", "layer_density"):
        assert (work / "reports" / "figures" / f"{name}.png").stat().st_size > 1000
    assert (work / "runs" / "s0" / "dpf" / "masks.safetensors").is_file()
    assert (work / "plots" / "seeds" / "s0" / "history" / "dpf.csv").is_file()
    assert (work / "dvc.lock").is_file()
    local = json.loads((work / "metrics" / "seeds" / "s0" / "local_chunked.json").read_text())
    assert local["method"] == "local_chunked" and local["sparsity"] == 0.0 and local["flops"]["training_ratio"] > 0
    exported = (work / "runs" / "s0" / "local_chunked" / "model.safetensors").read_bytes()
    assert b"heads." not in exported  # auxiliary heads are training-only

    second = _sh([dvc, "repro"], work, env)
    assert re.findall(r"Running stage '([^']+)'", second.stdout) == ["fastpath"]

    # A DVC remote round trip: push to the project's default remote (pointed at a folder of this
    # test), clone the repository elsewhere, pull: nothing is stale and nothing re-runs.
    remote = tmp_path / "remote"
    _sh([dvc, "remote", "modify", "--local", "local", "url", str(remote)], work, env)
    _sh([dvc, "push"], work, env)
    git = ["git", "-c", "user.name=sparseflow-test", "-c", "user.email=test@localhost"]
    _sh(git + ["add", "-A"], work, env)
    _sh(git + ["commit", "-q", "-m", "tiny profile reproduced"], work, env)
    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    _sh([dvc, "remote", "modify", "--local", "local", "url", str(remote)], clone, env)
    _sh([dvc, "pull", "dvc.yaml"], clone, env)
    assert json.loads(_sh([dvc, "status", "--json", "dvc.yaml"], clone, env).stdout) == {"fastpath": ["always changed"]}
    assert re.findall(r"Running stage '([^']+)'", _sh([dvc, "repro"], clone, env).stdout) == ["fastpath"]
    for path in ("runs/s0/dpf/masks.safetensors", "runs/s0/rigl/model.safetensors", "data/prepared/fashion_mnist/data.parquet"):
        assert (clone / path).read_bytes() == (work / path).read_bytes(), path

    # The optional local-parallelism analyses: only on demand, sweep points as Prefect tasks.
    assert not (work / "reports" / "local").exists()
    _sh([dvc, "repro", "analysis/dvc.yaml"], work, env)
    sweep = pd.read_csv(work / "reports" / "local" / "sweep.csv")
    assert len(sweep) == 4 and set(sweep["variant"]) == {"backprop", "chunked"}
    analysis = json.loads((work / "reports" / "local_analysis.json").read_text())
    assert analysis["backprop"]["training_ratio"] == 1.0 and analysis["chunked"]["critical_path_ratio"] < 1.0
    shown = _sh([dvc, "metrics", "show"], work, env).stdout
    assert "metrics/dpf.json" in shown and "sparsity" in shown

    # The stage flows reported to the server, with their artifacts (read over its REST API).
    def post(path: str) -> list[dict]:
        return _post(prefect_server, path)

    flows = {f["id"]: f["name"] for f in post("flows/filter")}
    runs = post("flow_runs/filter")
    completed = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED"}
    keys = {a["key"] for a in post("artifacts/filter")}
    assert {"prepare", "warmup", "train", "retrain", "collect", "evaluate", "evaluate-ensemble"} <= completed
    assert {"metrics-dpf-s0", "sparsity-dpf-s0", "run-dpf-retrain-s0", "report", "pipeline"} <= keys
    assert {"ood", "corrupt", "report", "local-analysis"} <= completed
    # Every stage flow run of the served pipeline run is linked to it by its tag.
    linked = [r for r in runs if f"pipeline-run:{run_id}" in r["tags"]]
    flow_stages = [s for s in expected if s != "code"]  # `code` writes the code manifests without a Prefect flow
    assert len(linked) == len(flow_stages) and all(r["state_type"] == "COMPLETED" for r in linked)
    assert {flows[r["flow_id"]] for r in linked} == {"prepare", "fastpath", "ood", "corrupt", "warmup", "train", "retrain", "collect",
                                                     "evaluate-ensemble", "evaluate", "aggregate", "report"}  # fmt: skip
    # ... and rows of Prefect's PostgreSQL database.
    from flows.pgcluster import psql

    db = postgres_prefect["db"]
    assert psql(db, f"select count(*) from flow_run where deployment_id = '{deployment['id']}'").strip() == "2"
    tagged = psql(db, f"""select count(*) from flow_run where tags @> '["pipeline-run:{run_id}"]'::jsonb""")
    assert int(tagged) == len(flow_stages)

    # The same local run, one process per chunk (local.execution: pipeline), through the CLI flow.
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["local"]["execution"] = "pipeline"
    (work / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    sparseflow = str(Path(bindir) / "sparseflow")
    _sh([sparseflow, "run", "train", "--method", "local_chunked", "--params", "pipeline.yaml"], work, env)
    cfg = json.loads((work / "runs" / "s0" / "local_chunked" / "config.json").read_text())
    assert cfg["local"]["execution"] == "pipeline" and cfg["local"]["launcher"] == "spawn"
    assert len(cfg["local"]["seconds_per_chunk"]) == 2
    hist = pd.read_parquet(work / "runs" / "s0" / "local_chunked" / "history.parquet")
    assert len(hist) == raw["train"]["epochs"] and hist["val_accuracy"].iloc[-1] > 0
    assert b"heads." not in (work / "runs" / "s0" / "local_chunked" / "model.safetensors").read_bytes()
