"""Scheduling and fan-out: the workspace lock, concurrent pipeline runs, the process work pool
deployment, ``sparseflow server`` and DST Ensemble members on a 2-worker Dask cluster.

Everything runs against real processes: a Prefect server on a loopback port (the session
fixture ``prefect_server``), real DVC repos in temporary folders, a real LocalCluster.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.workspace import WorkspaceBusy, holder, workspace_lock
from tests.conftest import REPO, _free_port

BIN = Path(sys.executable).parent


def _env(prefect_server: str, tmp_path: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def _slow_repo(root: Path, seconds: float) -> Path:
    """A git + DVC project whose one stage sleeps ``seconds`` and appends a line to ``runs.log``
    (so the number of times the stage ran can be counted) before writing ``out.txt``."""
    root.mkdir()
    (root / "stage.py").write_text(textwrap.dedent(f"""
        import time
        with open("runs.log", "a") as log:
            log.write("start\\n")
        time.sleep({seconds})
        with open("out.txt", "w") as out:
            out.write("complete output\\n")
    """))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {"cmd": "python stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return root


def _post(api: str, path: str, body: dict | None = None) -> list[dict]:
    req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body or {"limit": 200}).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ----- the workspace lock, in-process ----------------------------------------------------------
def test_workspace_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    (tmp_path / ".dvc").mkdir()
    with workspace_lock(tmp_path, flow_run_id="run-A"):
        assert holder(tmp_path)["flow_run_id"] == "run-A" and holder(tmp_path)["pid"] == os.getpid()
        t0 = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=r"another pipeline run .*flow run run-A.*waited 1 s") as err:
            with workspace_lock(tmp_path, timeout=1.0):
                pass
        assert time.monotonic() - t0 >= 1.0
        assert str(tmp_path.resolve()) in str(err.value)
    with workspace_lock(tmp_path, timeout=0):  # released on exit
        pass


def test_workspace_lock_is_released_when_its_holder_is_killed(tmp_path):
    (tmp_path / ".dvc").mkdir()
    code = f"from flows.workspace import workspace_lock\nimport time\nwith workspace_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy):
            with workspace_lock(tmp_path, timeout=0):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with workspace_lock(tmp_path, timeout=5):  # the kernel dropped the dead holder's lock
            pass
    finally:
        proc.kill()


def test_workspace_lock_needs_a_dvc_project(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DVC project"):
        with workspace_lock(tmp_path):
            pass


# ----- two pipeline runs on one workspace ------------------------------------------------------
def _launch_pipelines(repo: Path, env: dict, wait: str) -> list[subprocess.CompletedProcess]:
    cmd = [str(BIN / "sparseflow"), "pipeline", "--wait", wait]
    procs = [subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        outs.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return outs


def test_two_pipeline_runs_on_one_workspace_one_is_refused(tmp_path, prefect_server):
    repo = _slow_repo(tmp_path / "repo", seconds=12)
    env = _env(prefect_server, tmp_path)
    first, second = sorted(_launch_pipelines(repo, env, "0"), key=lambda p: p.returncode)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 1, second.stderr[-3000:]
    assert "another pipeline run is reproducing this workspace" in second.stderr and "Nothing was changed" in second.stderr
    # The winner's outputs are complete and recorded; the refused run touched nothing.
    assert (repo / "out.txt").read_text() == "complete output\n"
    assert (repo / "runs.log").read_text() == "start\n"
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}


def test_two_pipeline_runs_on_one_workspace_the_second_waits(tmp_path, prefect_server):
    repo = _slow_repo(tmp_path / "repo", seconds=6)
    env = _env(prefect_server, tmp_path)
    runs = _launch_pipelines(repo, env, "-1")
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    # Serialised: the stage ran once; whoever came second found it up to date.
    assert (repo / "runs.log").read_text() == "start\n"
    assert (repo / "out.txt").read_text() == "complete output\n"


# ----- a process work pool deployment, picked up by a real worker -------------------------------
def test_deploy_to_a_process_pool_and_a_worker_runs_it(tmp_path, prefect_server):
    """A pipeline deployment run by a worker reproduces the checkout, its stages with a fork
    server (the stage's environment names its socket, which answers)."""
    from flows import forkserver

    repo = _slow_repo(tmp_path / "repo", seconds=0)
    with open(repo / "stage.py", "a") as stage:  # (DVC has not run it yet: its hash is not recorded)
        stage.write(textwrap.dedent(f"""
            import os, socket
            path, answers = os.environ.get({forkserver.ENV!r}), False
            if path is not None:
                s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
                answers = True
            open("fork.txt", "w").write(f"{{path}} {{answers}}")
        """))
    # The checkout's code: the deployment's entry point, and the fork server its run starts there.
    for package in ("flows", "tasks"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(prefect_server, tmp_path)
    pool = f"sf-test-{os.getpid()}"
    done = subprocess.run([str(BIN / "sparseflow"), "deploy", "--pool", pool, "--name", "nightly", "--cron", "0 3 * * *"],
                          cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sparseflow worker --pool {pool}" in done.stdout
    deployment = next(d for d in _post(prefect_server, "deployments/filter") if d["name"] == "nightly")
    assert deployment["work_pool_name"] == pool and deployment["parameters"]["repo_dir"] == str(repo.resolve())
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    pools = {p["name"]: p["type"] for p in _post(prefect_server, "work_pools/filter", {})}
    assert pools[pool] == "process"

    run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "pipeline/nightly"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert (repo / "out.txt").read_text() == "complete output\n"  # the worker reproduced the checkout
    fork = (repo / "fork.txt").read_text().split() if (repo / "fork.txt").exists() else worker.stdout[-3000:] + worker.stderr[-3000:]
    assert fork[0].endswith("fork.sock") and fork[1] == "True", fork
    runs = [r for r in _post(prefect_server, "flow_runs/filter") if r["deployment_id"] == deployment["id"]]
    assert any(r["state_type"] == "COMPLETED" for r in runs)


# ----- sparseflow server -----------------------------------------------------------------------
def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_sparseflow_server_binds_loopback_and_stops_cleanly(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "sparseflow"), "server", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        assert (tmp_path / "home" / "prefect.db").is_file()  # embedded SQLite under PREFECT_HOME
        other = _non_loopback_address()
        if other is not None:  # nothing answers on the machine's public interface
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]
    assert f"http://127.0.0.1:{port}/api" in out


# ----- fan-out: DST Ensemble members on a local 2-worker Dask cluster --------------------------
@pytest.fixture
def tiny_project(tmp_path, mirror, monkeypatch):
    """The tiny profile (2 DST Ensemble members) with its data prepared, in a temporary working
    directory."""
    from sparse_core.config import load_params
    from sparse_core.jobs.rundirs import stage_prepare

    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["train"]["dst_ensemble"]["members"] = 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    stage_prepare(load_params("params.yaml"))
    return tmp_path


def _member_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "runs" / "s0" / "dst_ensemble").rglob("*.safetensors"))}


def test_dst_members_on_a_two_worker_dask_cluster_are_byte_identical(tiny_project, prefect_server, monkeypatch):
    import shutil

    from prefect_dask import DaskTaskRunner

    from flows.runners import task_threads
    from flows.stage_flows import train_flow
    from sparse_core.config import load_params, seeded
    from sparse_core.jobs.training import stage_train_member

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)  # for the Dask worker processes
    params = seeded(load_params("params.yaml"))  # the first training seed, as the flow picks it
    threads = task_threads(params)
    for i in range(2):  # sequential reference, in this process
        stage_train_member(params, "dst_ensemble", i, threads)
    sequential = _member_files(tiny_project)
    assert len(sequential) == 4  # model + masks of each member
    shutil.rmtree(tiny_project / "runs" / "s0" / "dst_ensemble")

    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                            cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None})  # fmt: skip
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        train_flow.with_options(task_runner=runner)("dst_ensemble", str(tiny_project / "params.yaml"))
    assert _member_files(tiny_project) == sequential


def test_task_runner_selection_and_environment_override(monkeypatch):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import make_task_runner
    from sparse_core.config import ConfigError, OrchestrationSection

    monkeypatch.delenv("SPARSEFLOW_TASK_RUNNER", raising=False)
    monkeypatch.delenv("SPARSEFLOW_DASK_ADDRESS", raising=False)
    seq = make_task_runner(OrchestrationSection())
    assert isinstance(seq, ThreadPoolTaskRunner) and seq._max_workers == 1
    assert isinstance(make_task_runner(OrchestrationSection(task_runner="process", max_workers=3)), ProcessPoolTaskRunner)
    monkeypatch.setenv("SPARSEFLOW_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    dask = make_task_runner(OrchestrationSection())
    assert isinstance(dask, DaskTaskRunner) and dask.address == "tcp://10.0.0.5:8786"
    monkeypatch.setenv("SPARSEFLOW_TASK_RUNNER", "spark")
    with pytest.raises(ConfigError, match="SPARSEFLOW_TASK_RUNNER='spark'"):
        make_task_runner(OrchestrationSection())


def test_sweep_points_train_at_their_sparsity_and_seed(tiny_project, prefect_server):
    import pandas as pd
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.stage_flows import sweep_flow
    from sparse_core.artifacts import load_tensors
    from sparse_core.config import load_params
    from sparse_core.jobs.sweeps import stage_sweep_point

    with pytest.raises(ValueError, match="sweep: method 'dense' has no target sparsity"):
        stage_sweep_point(load_params("params.yaml"), "dense", 0.5, 0)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        out = sweep_flow("rigl", [0.5, 0.7], [1, 2], str(tiny_project / "params.yaml"))
    table = pd.read_csv(out)
    assert list(zip(table["sparsity"], table["seed"])) == [(0.5, 1), (0.5, 2), (0.7, 1), (0.7, 2)]
    assert (table["realised_sparsity"] - table["sparsity"]).abs().max() < 1e-3  # ERK counts round per layer
    assert table["test_accuracy"].between(0, 1).all()
    masks = {(s, k): load_tensors(tiny_project / "runs" / f"s{k}" / "sweeps" / "rigl" / f"s{s:.4f}-seed{k}" / "masks.safetensors")
             for s in (0.5, 0.7) for k in (1, 2)}  # fmt: skip
    assert any(not (masks[0.5, 1][n] == masks[0.5, 2][n]).all() for n in masks[0.5, 1])  # the seed reaches the masks


def test_with_server_runs_a_command_against_one_temporary_server(tmp_path, monkeypatch):
    """``sparseflow with-server`` (what ``make repro`` runs): the command sees a live API, the
    server is gone afterwards, the command's exit status comes back; with ``PREFECT_API_URL``
    set, that server is used and none is started."""
    import urllib.request

    from flows.server import with_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    probe = ("import os, sys, urllib.request; url = os.environ['PREFECT_API_URL']; "
             "open(sys.argv[1], 'w').write(url); urllib.request.urlopen(url + '/health', timeout=5); sys.exit(3)")  # fmt: skip
    assert with_server([sys.executable, "-c", probe, str(tmp_path / "url")]) == 3
    url = (tmp_path / "url").read_text()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    with pytest.raises(OSError):  # stopped with the command
        urllib.request.urlopen(url + "/health", timeout=2)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert with_server([sys.executable, "-c", "import os, sys; sys.exit(os.environ['PREFECT_API_URL'] != 'http://127.0.0.1:9/api')"]) == 0


def test_with_server_runs_a_fork_server_for_the_command(tmp_path, monkeypatch):
    """The fork server lives exactly as long as the command (its socket listens while the
    command runs; no process of it is left after); ``fork_server=False`` starts none."""
    import socket

    from flows import forkserver
    from flows.server import with_server
    from flows.signals import descendants

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no Prefect server needed here
    probe = f"""
import os, socket, sys, time
path = os.environ.get({forkserver.ENV!r})
if path is None:
    sys.exit(7)
open(sys.argv[1], "w").write(path)
deadline = time.monotonic() + 120
while not os.path.exists(path):  # the server imports torch and Prefect first
    assert time.monotonic() < deadline
    time.sleep(0.2)
s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
sys.exit(5)
"""
    assert with_server([sys.executable, "-c", probe, str(tmp_path / "sock")]) == 5
    path = Path((tmp_path / "sock").read_text())
    assert not path.exists() and not path.parent.exists()  # stopped, its folder removed
    assert not any("flows.forkserver" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                   for p in descendants(os.getpid()) if Path(f"/proc/{p}/cmdline").exists())  # fmt: skip
    assert with_server([sys.executable, "-c", probe, str(tmp_path / "none")], fork_server=False) == 7
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(str(path))


def test_sparseflow_pipeline_starts_its_stages_from_a_fork_server(tmp_path, prefect_server):
    """`sparseflow pipeline` with a Prefect server: a fork server for the stages while DVC
    reproduces (the stage's environment names its socket, which answers; the stage sees the
    pipeline's own flow run running on the server), gone afterwards; ``--no-fork-server``
    starts none, nor does a pipeline without a server (each stage then starts Prefect's
    temporary server, as before)."""
    from flows import forkserver
    from flows.signals import descendants
    from flows.stage_flows import PIPELINE_RUN_ENV

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe.py").write_text(textwrap.dedent(f"""
        import json, os, socket, sys, time, urllib.request
        url, path = os.environ.get("PREFECT_API_URL"), os.environ.get({forkserver.ENV!r})
        state = None
        if url:
            run = json.loads(urllib.request.urlopen(url + "/flow_runs/" + os.environ[{PIPELINE_RUN_ENV!r}], timeout=30).read())
            state = run["state_type"]
        if path is not None:
            deadline = time.monotonic() + 120
            while not os.path.exists(path):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
        json.dump({{"fork_server": path, "pipeline_run": state}}, open(sys.argv[1], "w"))
    """))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": {"cmd": f"{sys.executable} probe.py seen.json", "deps": ["probe.py"],
                                                                        "outs": ["seen.json"]}}}))  # fmt: skip
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    env = _env(prefect_server, tmp_path)
    no_server = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    for extra, run_env, forked in (([], env, True), (["--no-fork-server", "--force"], env, False), (["--force"], no_server, False)):
        out = subprocess.run([str(BIN / "sparseflow"), "pipeline", *extra], cwd=repo, env=run_env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        seen = json.loads((repo / "seen.json").read_text())
        assert (seen["fork_server"] is not None) == forked, extra
        if run_env is env:
            assert seen["pipeline_run"] == "RUNNING"
        if forked:
            assert not Path(seen["fork_server"]).exists() and not Path(seen["fork_server"]).parent.exists()
    assert not any(b"flows.forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()
                   for p in descendants(os.getpid()) if Path(f"/proc/{p}/cmdline").exists())  # fmt: skip


def test_deploy_a_sweep_and_a_worker_runs_it(tiny_project, prefect_server, mirror):
    """`sparseflow deploy --flow sweep`: the sweep of a workspace as a deployment with the same
    concurrency limit of 1 as the pipeline's; a `sparseflow worker` runs it under the workspace
    lock and writes the sweep table."""
    import pandas as pd

    repo = tiny_project
    (repo / "dvc.yaml").write_text("stages: {}\n")
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):  # the workspace lock needs a DVC project
        subprocess.run(cmd, cwd=repo, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    (repo / "flows").mkdir()
    (repo / "flows" / "repro_flow.py").write_text((REPO / "flows" / "repro_flow.py").read_text())
    env = _env(prefect_server, repo.parent / f"{repo.name}-env", SPARSEFLOW_DATA_MIRROR=str(mirror))
    pool = f"sf-sweep-{os.getpid()}"
    bad = subprocess.run([str(BIN / "sparseflow"), "deploy", "--flow", "sweep", "--method", "rigll", "--sparsity", "0.6",
                          "--pool", pool, "--name", "typo"], cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "deploy --method 'rigll' is unknown" in bad.stderr, bad.stderr[-2000:]
    done = subprocess.run([str(BIN / "sparseflow"), "deploy", "--flow", "sweep", "--method", "rigl", "--sparsity", "0.6",
                           "--seeds", "1", "--pool", pool, "--name", "rigl-sweep"], cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prefect deployment run sweep-deployment/rigl-sweep" in done.stdout
    deployment = next(d for d in _post(prefect_server, "deployments/filter") if d["name"] == "rigl-sweep")
    assert deployment["parameters"] == {"method": "rigl", "sparsities": [0.6], "seeds": [1], "repo_dir": str(repo.resolve()),
                                        "wait_seconds": 0.0}  # fmt: skip
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    subprocess.run([str(BIN / "prefect"), "deployment", "run", "sweep-deployment/rigl-sweep"], cwd=repo, env=env, check=True,
                   capture_output=True)  # fmt: skip
    worker = subprocess.run([str(BIN / "sparseflow"), "worker", "--pool", pool, "--run-once"], cwd=repo.parent, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    runs = [r for r in _post(prefect_server, "flow_runs/filter") if r["deployment_id"] == deployment["id"]]
    assert [r["state_type"] for r in runs] == ["COMPLETED"], [r["state"]["message"] for r in runs]
    table = pd.read_csv(repo / "reports" / "sweeps" / "rigl.csv")
    assert list(zip(table["sparsity"], table["seed"])) == [(0.6, 1)]


def test_serve_runs_the_pipeline_of_this_checkout(tmp_path, prefect_server):
    """`sparseflow serve`: the pipeline of the working directory served as a deployment (one run
    at a time); a run triggered through the Prefect client reproduces the checkout."""
    repo = _slow_repo(tmp_path / "repo", seconds=0)
    (repo / "flows").mkdir()
    (repo / "flows" / "repro_flow.py").write_text((REPO / "flows" / "repro_flow.py").read_text())
    env = _env(prefect_server, tmp_path)
    serve = subprocess.Popen([str(BIN / "sparseflow"), "serve", "--interval", "86400", "--name", "served"], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    code = textwrap.dedent("""
        import time
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound
        for _ in range(120):  # until the served deployment is registered
            try:
                run = run_deployment("pipeline/served", timeout=300, poll_interval=1)
                break
            except ObjectNotFound:
                time.sleep(1)
        print(run.state.type.value)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    finally:
        serve.terminate()
        log = serve.communicate(timeout=60)[0]
    assert done.returncode == 0 and done.stdout.split()[-1] == "COMPLETED", done.stderr[-3000:] + log[-3000:]
    assert (repo / "out.txt").read_text() == "complete output\n"
