"""``sparseflow worker``: a Prefect process worker that stops its flow runs when it is stopped.

``prefect worker start --pool NAME`` (Prefect 3.9) treats SIGTERM as "finish what is running":
a training stage runs on to its end (minutes to hours) and the worker process does not exit
afterwards (measured: still alive 30 s after the SIGTERM, 18 s after its run finished). A service manager that
stops a worker, or Ctrl-C in its terminal, expects it to stop now. This command runs Prefect's
own worker as a child process (its own session, so a terminal's Ctrl-C reaches only this
process) and on SIGTERM or SIGINT:

1. sends SIGTERM to every flow-run process of the worker and their children (but servers:
   :func:`flows.signals.servers`; a stage forked by a pipeline run's fork server gets it from
   its caller, once): a training stage
   stops at its next step boundary and keeps its checkpoint (:mod:`sparse_core.interrupt`),
   Prefect's engine marks the flow run ``Crashed`` ("aborted by a termination signal");
2. waits up to ``grace`` seconds for them, then kills what is left;
3. marks any of those flow runs that is still not final ``Crashed`` through the API (a run
   must never stay ``Running`` with nothing running it);
4. stops Prefect's worker (SIGTERM, SIGKILL after 5 s) and exits with 128 + the signal number.

The next run of the deployment finds the checkpoint and resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.signals import descendants, running, servers

#: How long flow-run processes get to stop after SIGTERM before they are killed (seconds).
GRACE_SECONDS = 30.0


def _flow_run_id(pid: int) -> str | None:
    """The ``PREFECT__FLOW_RUN_ID`` of process ``pid`` (a flow-run process of a worker), if any."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"PREFECT__FLOW_RUN_ID="):
            return item.split(b"=", 1)[1].decode() or None
    return None


def _unfinished(run_ids: set[str]) -> set[str]:
    """The flow runs of ``run_ids`` not in a final state (a finished run's process may linger)."""
    if not run_ids:
        return set()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {rid for rid in run_ids if (st := client.read_flow_run(rid).state) is None or not st.is_final()}


def _crash_unfinished(run_ids: set[str], signame: str) -> list[str]:
    """Mark the flow runs of ``run_ids`` that are not in a final state ``Crashed``; their ids."""
    if not run_ids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    marked = []
    with get_client(sync_client=True) as client:
        for rid in run_ids:
            run = client.read_flow_run(rid)
            if run.state is None or not run.state.is_final():
                client.set_flow_run_state(rid, Crashed(message=f"the worker was stopped by {signame}"), force=True)
                marked.append(rid)
    return marked


def stop_flow_runs(worker_pid: int, signame: str, grace: float = GRACE_SECONDS) -> tuple[set[str], list[str]]:
    """Step 1-3 of the module docstring for the worker ``worker_pid``; returns (the ids of the
    flow runs it stopped, the ids it had to mark ``Crashed`` itself)."""
    runs = [p for p in descendants(worker_pid) if _flow_run_id(p)]
    run_ids = _unfinished({rid for p in runs if (rid := _flow_run_id(p))})
    family = [q for p in runs for q in (p, *descendants(p))]
    # Not the servers a flow run started (a pipeline run's fork server, whose stages get the
    # signal from their callers): the flow run stops them once its stages have ended.
    spared = servers(family)
    for p in family:
        if p in spared:
            continue
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(running(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in family:
        if running(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return run_ids, _crash_unfinished(run_ids, signame)


def main(pool: str, run_once: bool = False) -> int:
    """``sparseflow worker --pool NAME [--run-once]``: Prefect's process worker for ``pool`` until
    it ends (``--run-once``) or this process gets SIGTERM / SIGINT (module docstring)."""
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
           *(["--run-once"] if run_once else [])]  # fmt: skip
    got: list[int] = []

    def _stop(signum, _frame):
        got.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    proc = subprocess.Popen(cmd, start_new_session=True)
    while proc.poll() is None and not got:
        time.sleep(0.1)
    if not got:
        return proc.returncode
    signum = got[0]
    name = signal.Signals(signum).name
    print(f"sparseflow worker: {name}: stopping the flow runs of pool {pool!r} (their stages keep their last checkpoint)",
          file=sys.stderr, flush=True)  # fmt: skip
    found, marked = stop_flow_runs(proc.pid, name)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    runs = ", ".join(sorted(found)) or "none"
    extra_note = f"; marked Crashed by the worker: {', '.join(marked)}" if marked else ""
    print(f"sparseflow worker: stopped by {name}; flow runs stopped: {runs}{extra_note}", file=sys.stderr, flush=True)
    return 128 + signum
