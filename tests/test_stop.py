"""SIGTERM and Ctrl-C stop a stage, and the whole pipeline, within seconds, at a step boundary,
with one line saying what was kept and no traceback; the next run resumes from what was kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import mirror_path, terminate
from flows.signals import descendants, running
from sparse_core import artifacts, schemas

REPO = Path(__file__).resolve().parents[1]
#: Each test times how fast a stop takes effect: `make test` runs them alone, after the parallel
#: part (beside other xdist workers, stops took 6.4-6.6 s against the 5 s bound, 2026-12-01).
pytestmark = pytest.mark.serial
#: The issue's bound: the command ends within this many seconds of the signal.
STOP_SECONDS = 10.0


def _tiny_copy(root: Path, mirror: Path, prefect_server: str, warmup_epochs: int, train_subset: int,
               num_threads: int = 0) -> tuple[Path, dict]:  # fmt: skip
    """A copy of the project (a git + DVC repository) in ``root`` on the tiny profile with the
    given warmup length (and ``base.num_threads``), and the environment of its stage processes
    (which import the copy)."""
    root.mkdir()
    for item in ("sparse_core", "tasks", "flows", "dvc.yaml", ".dvc", "profiles"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
        else:
            shutil.copy(src, root / item)
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["warmup"]["epochs"] = warmup_epochs
    raw["data"]["train_subset"] = train_subset
    raw["base"]["num_threads"] = num_threads
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "SPARSEFLOW_DATA_MIRROR": str(mirror),
           "PREFECT_API_URL": prefect_server, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root),
           "PREFECT_HOME": str(root.parent / f"prefect-home-{root.name}")}  # fmt: skip
    env.pop("SPARSEFLOW_DEBUG", None)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root, env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """``data/prepared`` of :func:`project`'s params, prepared once for this module, in this
    process (what ``sparseflow run prepare`` writes; a stage process costs about 12 s here)."""
    from sparse_core.config import parse_params
    from sparse_core.jobs.rundirs import stage_prepare

    root = tmp_path_factory.mktemp("prepared")
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["data"]["train_subset"] = 2000
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror_path()))
        stage_prepare(parse_params(raw, "profiles/tiny.yaml (train_subset 2000)"))
    return root / "data" / "prepared"


@pytest.fixture
def project(tmp_path, mirror, prefect_server, prepared):
    """The tiny profile with a warmup long enough to be stopped mid-way, data prepared."""
    work, env = _tiny_copy(tmp_path / "repo", mirror, prefect_server, warmup_epochs=400, train_subset=2000)
    shutil.copytree(prepared, work / "data" / "prepared")
    return work, env


def _stop_when(proc: subprocess.Popen, ready: Path | None, signum: int, timeout: float = 240.0) -> tuple[float, str]:
    """Wait until ``ready`` exists (or 3 s when None), send ``signum``; returns (seconds the
    process took to end after it, its output: stdout then stderr)."""
    deadline = time.monotonic() + timeout
    if ready is None:
        time.sleep(3.0)
    while ready is not None and not ready.exists():
        assert proc.poll() is None, proc.communicate()[0]  # stdout, with stderr merged in or not
        assert time.monotonic() < deadline, "the stage never wrote its first checkpoint"
        time.sleep(0.2)
    family = [proc.pid, *descendants(proc.pid)]
    t0 = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    alive = [p for p in family if running(p)]
    assert alive == [], f"processes left running: {alive}"
    return took, (out or "") + (err or "")


# Through the fork server with SIGTERM only: the caller passes SIGINT on with the same handler.
@pytest.mark.parametrize("signum,via", [(signal.SIGTERM, "own process"), (signal.SIGINT, "own process"),
                                        (signal.SIGTERM, "fork server")])  # fmt: skip
def test_a_training_stage_stops_at_a_step_boundary_and_resumes(project, signum, via):
    """Also when the stage runs in a child of the fork server (``sparseflow with-server``):
    the caller passes the signal on, and returns the child's status."""
    from tests.conftest import start_fork_server

    work, env = project
    server = None
    if via == "fork server":
        server, env = start_fork_server(work, env)
    last = work / "runs" / "s0" / "warmup" / "last.pt"
    proc = subprocess.Popen(["sparseflow", "run", "warmup"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        took, err = _stop_when(proc, last, signum)
        if server is not None:
            assert descendants(server.pid) == []  # its child, the stage, is gone too
            assert server.poll() is None  # and it serves on
    finally:
        if server is not None:
            terminate(server)
    assert took < STOP_SECONDS, (took, err)
    assert proc.returncode == 128 + signum
    assert "Traceback" not in err, err
    name = signal.Signals(signum).name
    line = [x for x in err.splitlines() if x.startswith("sparseflow: ")]
    assert len(line) == 1 and f"stopped by {name} at dense epoch" in line[0], err
    assert f"kept {Path('runs/s0/warmup/last.pt')} (after epoch" in line[0]
    kept_epoch = int(line[0].split("(after epoch ")[1].split(")")[0])
    assert kept_epoch >= 1 and last.is_file()
    # The next run resumes from the kept checkpoint: its history starts with the kept epochs.
    import torch

    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == kept_epoch


def test_a_stage_outside_training_stops_at_once(project):
    work, env = project
    shutil.rmtree(work / "data" / "prepared")
    proc = subprocess.Popen(["sparseflow", "run", "prepare"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    took, err = _stop_when(proc, None, signal.SIGTERM)
    assert took < STOP_SECONDS and proc.returncode == 143, (took, proc.returncode, err)
    assert "Traceback" not in err and "sparseflow: stopped by SIGTERM; every file written so far is complete" in err, err
    leftovers = [p for p in (work / "data").rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []


def _up_to_date(work: Path, stages: list[str]) -> None:
    """Record ``stages`` (``code`` and those after it, whose outputs are in place) in
    ``dvc.lock`` as if DVC had run them, so that DVC's next run skips them."""
    from dvc.repo import Repo

    from flows import stage_code
    from sparse_core.config import load_params

    stage_code.write_manifests(work, load_params(work / "params.yaml"), work / "stage_code")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("DVC_NO_ANALYTICS", "1")
        with Repo(str(work)) as repo:
            for stage in stages:
                repo.commit(stage, force=True)


@pytest.mark.parametrize("server", ["shared", "temporary"])
def test_the_pipeline_stops_its_stage_and_ends_quietly(project, server):
    """The issue's case: SIGTERM to `sparseflow pipeline` during warmup took 2.5 minutes and
    printed API-connection tracebacks. With a shared server (PREFECT_API_URL) and without one
    (Prefect starts a temporary server for the pipeline and one for each stage, which must
    outlive the stage's last report)."""
    work, env = project
    _up_to_date(work, ["code", "prepare"])  # the stage to stop comes first
    if server == "temporary":
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(work.parent / "prefect-home")
    last = work / "runs" / "s0" / "warmup" / "last.pt"
    proc = subprocess.Popen(["sparseflow", "pipeline", "warmup@0"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    took, out = _stop_when(proc, last, signal.SIGTERM)
    assert took < STOP_SECONDS, (took, out)
    assert proc.returncode != 0 and "Traceback" not in (out or ""), out
    assert "stopped by SIGTERM at dense epoch" in out and "kept" in out, out
    assert "Running stage 'prepare'" not in out, out  # (recorded up to date above)
    history = artifacts.read_parquet(last.parent / "history.parquet", schema=schemas.HISTORY_SCHEMA) if (last.parent / "history.parquet").exists() else None
    assert history is None  # the run did not finish: nothing was exported as if it had


def test_the_pipeline_refused_by_a_shell_dvc_repro_says_so_in_one_line(project):
    """DVC's own lock held by another DVC process (a `dvc repro` in a shell): `sparseflow
    pipeline` stops before running anything, with one line naming the lock, no traceback."""
    work, env = project
    (work / ".dvc" / "tmp").mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "from dvc.lock import make_lock; import time; l = make_lock('.dvc/tmp/lock'); "
                               "l.lock(); print('locked', flush=True); time.sleep(300)"], cwd=work, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run(["sparseflow", "pipeline", "warmup@0"], cwd=work, env=env, capture_output=True, text=True, timeout=180)
        text = out.stdout + out.stderr
        assert out.returncode == 1 and "Traceback" not in text, text
        line = [x for x in text.splitlines() if x.startswith("sparseflow: ")]
        assert len(line) == 1 and "DVC's lock (.dvc/tmp/lock) is held by another DVC command" in line[0], text
        assert not (work / "runs").exists()
    finally:
        holder.kill()
        holder.wait()


# ----- a Prefect worker stopped during a deployment's run ------------------------------------
def _deployment_runs(api: str, name: str) -> list[dict]:
    import json
    import urllib.request

    def post(path: str) -> list[dict]:
        req = urllib.request.Request(f"{api}/{path}", data=b'{"limit": 200}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    dep = next(d for d in post("deployments/filter") if d["name"] == name)
    return sorted((r for r in post("flow_runs/filter") if r["deployment_id"] == dep["id"]), key=lambda r: r["created"])


def _no_timings(path: Path):
    hist = artifacts.read_parquet(path, schema=schemas.HISTORY_SCHEMA)
    return hist.drop(columns=["seconds", "images_per_s"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_worker_crashes_its_run_and_the_next_run_resumes(tmp_path, mirror, prefect_server, signum):
    """The issue's case: `prefect worker start` on SIGTERM let the training stage run to its end
    and then never exited. `sparseflow worker` stopped by SIGTERM (a service manager) or Ctrl-C
    (SIGINT to its terminal's process group): the stage stops at a step boundary within 5 s, the
    flow run ends Crashed (not Running), and (after SIGTERM; a resume does not depend on the
    signal that stopped the run) the next run resumes from the checkpoint and ends with the
    weights and history of an uninterrupted run."""
    import torch

    # The stop comes at the first checkpoint, after epoch 1. One thread: the reference below runs
    # beside the resumed run (two 2-thread processes on two cores took twice as long as in turn).
    epochs, threads = 8, 1
    work, env = _tiny_copy(tmp_path / "repo", mirror, prefect_server, warmup_epochs=epochs, train_subset=6000, num_threads=threads)
    name = signal.Signals(signum).name
    pool, deployment = f"stop-{os.getpid()}-{name}", f"stop-{name}"
    sh = dict(cwd=work, env=env, check=True, capture_output=True, text=True)
    subprocess.run(["sparseflow", "deploy", "--pool", pool, "--name", deployment, "--target", "warmup@0"], **sh)
    subprocess.run(["prefect", "deployment", "run", f"pipeline/{deployment}"], **sh)
    worker = subprocess.Popen(["sparseflow", "worker", "--pool", pool], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    last = work / "runs" / "s0" / "warmup" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert worker.poll() is None, worker.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the stage never wrote its first checkpoint"
        time.sleep(0.1)
    stages = [p for p in descendants(worker.pid) if "run warmup" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()]
    assert stages, "no training stage under the worker"
    t0 = time.monotonic()
    if signum == signal.SIGINT:
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    else:
        worker.send_signal(signal.SIGTERM)
    # Ended: gone, or exited and not yet reaped by DVC in the flow-run process, which ends after
    # its fork server has reported the stage's end (the stage's caller is DVC's child).
    while any(running(p) for p in stages) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    stage_took = time.monotonic() - t0
    out = worker.communicate(timeout=90)[0]
    assert stage_took < 5.0, (stage_took, out[-4000:])
    assert worker.returncode == 128 + signum, out[-4000:]
    assert f"sparseflow worker: stopped by {name}" in out, out[-4000:]
    kept = torch.load(last, weights_only=True)
    assert 1 <= kept["epoch"] < epochs and not (last.parent / "history.parquet").exists()
    deadline = time.monotonic() + 60
    while (state := _deployment_runs(prefect_server, deployment)[-1]["state_type"]) not in ("CRASHED", "CANCELLED"):
        assert state in ("RUNNING", "PENDING"), state
        assert time.monotonic() < deadline, f"the stopped run stayed {state}"
        time.sleep(0.5)
    if signum != signal.SIGTERM:
        return

    # The uninterrupted reference (started only now: the stop above is timed on a quiet machine)
    # runs beside the next run of the deployment, which resumes from the kept checkpoint.
    ref, ref_env = _tiny_copy(tmp_path / "ref", mirror, prefect_server, warmup_epochs=epochs, train_subset=6000, num_threads=threads)
    reference = subprocess.Popen(["sh", "-c", "sparseflow run prepare && sparseflow run warmup"], cwd=ref, env=ref_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        subprocess.run(["prefect", "deployment", "run", f"pipeline/{deployment}"], **sh)
        again = subprocess.run(["sparseflow", "worker", "--pool", pool, "--run-once"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
        ref_out = reference.communicate(timeout=600)[0]
    finally:
        if reference.poll() is None:  # the test failed on the way: the shell and its stage
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert reference.returncode == 0, ref_out[-4000:]
    assert _deployment_runs(prefect_server, deployment)[-1]["state_type"] == "COMPLETED"
    run, ref_run = work / "runs" / "s0" / "warmup", ref / "runs" / "s0" / "warmup"
    assert (run / "model.safetensors").read_bytes() == (ref_run / "model.safetensors").read_bytes()
    assert _no_timings(run / "history.parquet").equals(_no_timings(ref_run / "history.parquet"))
    # Resumed, not retrained: the kept epochs keep the timings measured before the stop.
    hist = artifacts.read_parquet(run / "history.parquet", schema=schemas.HISTORY_SCHEMA)
    before = [h["seconds"] for h in kept["history"]]
    assert hist["seconds"].tolist()[: len(before)] == before
