"""Starting and stopping the fork server of stage processes (:mod:`flows.forkserver`), for
``sparseflow with-server`` (:func:`flows.server.with_server`) and for a pipeline flow run
(:mod:`flows.repro_flow`). Imports nothing of the project, so both can import it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: Environment variable naming the fork server's socket (:mod:`flows.forkserver`).
FORK_SERVER_ENV = "SPARSEFLOW_FORK_SERVER"


def stop_process(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc`` and wait for it (SIGKILL after 20 s)."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def stage_fork_server(home: Path, env: dict[str, str], wait_seconds: float = 0.0) -> Iterator[subprocess.Popen]:
    """A :mod:`flows.forkserver` for the working directory, with ``env`` as its environment,
    listening on ``home/fork.sock`` (its log in ``home/fork-server.log``); sets
    ``env[FORK_SERVER_ENV]`` to the socket, so that the ``sparseflow run`` commands started with
    ``env`` hand their stage to it. Stopped (SIGTERM) when the block ends.

    The block starts once the server listens, or after ``wait_seconds`` (default 0: at once),
    or when the server ended: a command that comes before the server listens runs in its own
    process, as without a server.
    """
    import time

    env[FORK_SERVER_ENV] = str(home / "fork.sock")
    with open(home / "fork-server.log", "w") as log:
        # Its own session: a terminal's Ctrl-C reaches a stage through the stage's caller.
        proc = subprocess.Popen([sys.executable, "-m", "flows.forkserver", env[FORK_SERVER_ENV]], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + wait_seconds
        while not os.path.exists(env[FORK_SERVER_ENV]) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        yield proc
    finally:
        stop_process(proc, signal.SIGTERM)
