"""The fork server (flows/forkserver.py): a stage forked from it is the stage a fresh
``sparseflow run`` process runs (same files, byte for byte; same exit status and messages),
and whatever the server cannot vouch for (another environment, changed code) runs in the
caller's own process instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import start_fork_server, terminate
from flows import forkserver
from tests.test_stop import _no_timings, _tiny_copy


def test_without_a_server_the_command_runs_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.delenv(forkserver.ENV, raising=False)
    assert forkserver.forward(["sparseflow", "run", "report"]) is None
    monkeypatch.setenv(forkserver.ENV, str(tmp_path / "no-such.sock"))
    assert forkserver.forward(["sparseflow", "run", "report"]) is None
    assert forkserver.forward(["sparseflow", "validate"]) is None  # only stages are handed over


def test_the_server_refuses_another_directory_or_environment(tmp_path):
    env = {"PATH": "/bin", "PREFECT_API_URL": "http://127.0.0.1:1/api", "SPARSEFLOW_TIMINGS": "/tmp/t"}
    ok = {"cwd": str(tmp_path), "env": {**env, "DVC_STAGE": "train@dpf-0", "DVC_ROOT": "/x", "PWD": "/y", "SHLVL": "2"}}
    assert forkserver.refusal(ok, tmp_path, env) is None
    (tmp_path / "sub").mkdir()
    assert "is not" in forkserver.refusal({**ok, "cwd": str(tmp_path / "sub")}, tmp_path, env)
    assert forkserver.refusal({**ok, "env": {**env, "OMP_NUM_THREADS": "1"}}, tmp_path, env) == "environment variable OMP_NUM_THREADS differs"
    missing = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    assert forkserver.refusal({**ok, "env": missing}, tmp_path, env) == "environment variable PREFECT_API_URL differs"


def _stage_pids(timings: Path) -> list[int]:
    return [r["pid"] for r in map(json.loads, timings.read_text().splitlines()) if r["kind"] == "stage"]


def test_a_forked_stage_equals_a_fresh_one(tmp_path, mirror, prefect_server):
    work, env = _tiny_copy(tmp_path / "repo", mirror, prefect_server, warmup_epochs=2, train_subset=600)
    timings = tmp_path / "timings.jsonl"
    env = {**env, "SPARSEFLOW_TIMINGS": str(timings)}
    subprocess.run(["sparseflow", "run", "prepare"], cwd=work, env=env, check=True, capture_output=True)
    run_dir = work / "runs" / "s0" / "warmup"

    def run(*argv: str, env: dict) -> tuple[subprocess.CompletedProcess, int]:
        proc = subprocess.Popen(["sparseflow", *argv], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid

    fresh, pid = run("run", "warmup", env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert _stage_pids(timings)[-1] == pid  # the command's own process ran the stage
    reference = {p.name: p.read_bytes() for p in run_dir.glob("*.safetensors")}
    history = _no_timings(run_dir / "history.parquet")
    shutil.rmtree(work / "runs")

    server, served = start_fork_server(work, env)
    try:
        forked, pid = run("run", "warmup", env=served)
        assert forked.returncode == 0, forked.stderr[-3000:]
        assert _stage_pids(timings)[-1] != pid  # a child of the server ran it
        assert "Finished in state Completed()" in forked.stdout + forked.stderr  # its output reached the caller
        assert {p.name: p.read_bytes() for p in run_dir.glob("*.safetensors")} == reference and "model.safetensors" in reference
        assert _no_timings(run_dir / "history.parquet").equals(history)
        assert len(history) == 2

        bad, pid = run("run", "aggregate", "--run", "nosuch", env=served)  # an error: same status, same message
        assert bad.returncode == 1 and "aggregate --run 'nosuch' is unknown" in bad.stderr, bad.stderr
        assert _stage_pids(timings)[-1] != pid

        other, pid = run("run", "aggregate", "--run", "nosuch", env={**served, "SPARSEFLOW_SOMETHING": "1"})
        assert other.returncode == 1 and "is unknown" in other.stderr
        assert _stage_pids(timings)[-1] == pid  # refused: ran in its own process

        report = work / "sparse_core" / "report.py"  # code changed under the server: it stops serving
        report.write_text(report.read_text() + "\n# edited\n")
        stale, pid = run("run", "aggregate", "--run", "nosuch", env=served)
        assert stale.returncode == 1 and _stage_pids(timings)[-1] == pid
        server.wait(timeout=20)
        assert not Path(served[forkserver.ENV]).exists()
        log = (work.parent / f"fork-{work.name}.log").read_text()
        assert "environment variable SPARSEFLOW_SOMETHING differs" in log and "report.py changed since the server started" in log
    finally:
        terminate(server)
    assert os.path.exists(work / "params.yaml")


PROBE = """
import json, sys
from flows.forkserver import preload
preload()
before = set(sys.modules)
from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow(name="probe")
def probe(x: int, path: str = "params.yaml") -> int:
    return double(x)

assert probe(2) == 4
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_a_flow_run_imports_nothing_the_server_could_have(tmp_path, prefect_server):
    """After preload(), a flow run with a task run (what every stage starts) imports no module
    of Prefect or of what Prefect loads on the way (FLOW_RUN_MODULES): each would cost every
    stage forked from the server its import again."""
    import sys

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = ("prefect", "fastapi", "starlette", "pydantic", "graphviz", "opentelemetry", "sparse_core", "flows")
    assert [m for m in new if m.split(".")[0] in heavy] == []


def test_an_ended_child_is_reported_to_its_caller_and_its_pidfd_closed():
    """The server's loop waits on a pidfd per child (not only its 0.2 s poll); `_reap` sends the
    caller the child's status and closes the child's pidfd, so a long `make repro` (about 100
    stages) leaks no descriptor."""
    import select
    import socket

    if not hasattr(os, "pidfd_open"):
        import pytest

        pytest.skip("os.pidfd_open needs Linux 5.3+ and Python 3.9+")
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    server_end, caller_end = socket.socketpair()
    clients, exits = {pid: server_end}, {pid: os.pidfd_open(pid)}
    pidfd = exits[pid]
    assert select.select([pidfd], [], [], 10.0)[0] == [pidfd]  # readable once the child has ended
    forkserver._reap(clients, exits)
    assert clients == {} and exits == {}
    assert caller_end.recv(64) == b"exit 3\n"
    try:
        os.fstat(pidfd)
        closed = False
    except OSError:
        closed = True
    assert closed, "the pidfd of a reaped child was left open"
    caller_end.close()


def test_a_process_start_time_is_on_the_wall_clock():
    """tasks.timing.process_start_time against time.time() taken around the process's spawn
    (psutil's create_time was 0.71 s early here: it adds the boot time in whole seconds)."""
    import sys
    import time

    before = time.time()
    out = subprocess.run([sys.executable, "-c", "from tasks.timing import process_start_time; print(repr(process_start_time()))"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    after = time.time()
    start = float(out.stdout)
    assert before - 0.05 <= start <= after, (before, start, after)  # 10 ms ticks


def test_a_stopped_server_lets_its_running_stages_end_and_reports_them():
    """Stopped while a stage runs (everything of a flow run signalled at once), the server waits
    for the stage, which stops on the signal its caller passes on, and reports its real status;
    a SIGTERM of its own would be a second signal, which stops a stage at once. It waits only so
    long."""
    import socket
    import time

    pid = os.fork()
    if pid == 0:
        time.sleep(0.5)
        os._exit(7)
    server_end, caller_end = socket.socketpair()
    clients = {pid: server_end}
    exits = {pid: os.pidfd_open(pid)} if hasattr(os, "pidfd_open") else {}
    forkserver._drain(clients, exits, 20.0)
    assert clients == {} and caller_end.recv(64) == b"exit 7\n"
    caller_end.close()

    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    server_end, caller_end = socket.socketpair()
    clients, t0 = {pid: server_end}, time.monotonic()
    forkserver._drain(clients, {}, 0.3)
    assert list(clients) == [pid] and time.monotonic() - t0 < 5.0  # left to the server's SIGTERM
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    server_end.close()
    caller_end.close()


def test_a_stopped_worker_spares_the_fork_server_of_its_flow_run(tmp_path, monkeypatch):
    """`sparseflow worker` stopping its flow runs sends SIGTERM to the flow-run process and its
    children, but not to a fork server among them (nor its forked stages, which their callers
    signal once): the flow run stops its server after its stages."""
    import subprocess
    import sys
    import textwrap
    import time

    from flows import worker

    monkeypatch.setattr(worker, "_unfinished", lambda ids: ids)
    monkeypatch.setattr(worker, "_crash_unfinished", lambda ids, name: [])
    child = textwrap.dedent("""
        import os, signal, sys, time
        out, parent = sys.argv[1], os.getppid()
        signal.signal(signal.SIGTERM, lambda *a: (open(out, "w").write("SIGTERM"), sys.exit(0)))
        open(out + ".ready", "w").close()
        while os.getppid() == parent:  # ends with its flow run, as a fork server does
            time.sleep(0.05)
        open(out, "w").write("parent gone")
    """)
    # A stand-in fork server runs as `python -m flows.forkserver` (a package of that name in its
    # working directory); the flow run's own command line names the module too, and is not a server.
    (tmp_path / "fake" / "flows").mkdir(parents=True)
    (tmp_path / "fake" / "flows" / "__init__.py").write_text("")
    (tmp_path / "fake" / "flows" / "forkserver.py").write_text(child)
    flow_run = textwrap.dedent(f"""
        import subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-m", "flows.forkserver", {str(tmp_path / "forks")!r}],
                                 cwd={str(tmp_path / "fake")!r}),  # `-m` puts the working directory first
                subprocess.Popen([sys.executable, "-c", {child!r}, {str(tmp_path / "stage")!r}, "run", "warmup"])]
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", flow_run, "-m", "flows.forkserver"],
                            env={**os.environ, "PREFECT__FLOW_RUN_ID": "run-1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_path / "forks.ready").exists() and (tmp_path / "stage.ready").exists()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        stopped, crashed = worker.stop_flow_runs(os.getpid(), "SIGTERM", grace=20.0)
    finally:
        proc.kill()
        proc.wait()
    assert stopped == {"run-1"} and crashed == []
    assert (tmp_path / "stage").read_text() == "SIGTERM"
    deadline = time.monotonic() + 10
    while not (tmp_path / "forks").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (tmp_path / "forks").read_text() == "parent gone"


def test_a_zombie_counts_as_ended_and_a_live_process_as_running():
    """``flows.signals.running``: what the stop paths wait on. An exited child that its parent
    has not reaped yet (a zombie, as a stage is until DVC reaps it) has ended."""
    import sys
    import time

    from flows.signals import running

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert running(proc.pid) and running(os.getpid())
    finally:
        proc.stdin.close()  # it exits; not reaped until wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not running(proc.pid)
    proc.wait()
    assert not running(proc.pid)  # gone
