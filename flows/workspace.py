"""One ``dvc repro`` per workspace at a time.

Two pipeline runs in one checkout would race on ``params.yaml``, on the stage outputs and on
DVC's own lock. :func:`workspace_lock` takes an exclusive OS file lock (``filelock``, fcntl on
Unix: released by the kernel when the holder dies, so a killed run never leaves a stale lock)
on ``.dvc/tmp/sparseflow-pipeline.lock`` for the whole run: the profile switch, the reproduce
and the artifacts. A second run waits up to ``timeout`` seconds and then fails with
:class:`WorkspaceBusy`, naming the holder (pid, host, flow run, start time), before it has
touched any file. DVC's own repo lock stays in force underneath, so a ``dvc repro`` typed in a
shell while a pipeline run holds the workspace is refused by DVC itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

LOCK_NAME = "sparseflow-pipeline.lock"
OWNER_NAME = "sparseflow-pipeline.owner.json"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace lock."""


def _lock_dir(repo_dir: str | Path) -> Path:
    repo = Path(repo_dir).resolve()
    if not (repo / ".dvc").is_dir():
        raise FileNotFoundError(f"{repo}: not a DVC project (no .dvc folder); pass the checkout to run in")
    path = repo / ".dvc" / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def holder(repo_dir: str | Path) -> dict | None:
    """Who holds (or last held) the lock of ``repo_dir``: ``{"pid", "host", "flow_run_id",
    "since"}``, or ``None`` when nobody ever did."""
    try:
        return json.loads((_lock_dir(repo_dir) / OWNER_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def workspace_lock(repo_dir: str | Path, timeout: float = 0.0, flow_run_id: str | None = None) -> Iterator[None]:
    """Hold the workspace lock of ``repo_dir`` for the ``with`` block.

    Args:
        timeout: seconds to wait for a running pipeline to finish; 0 fails at once, a negative
            value waits forever.
        flow_run_id: recorded for the error message of a run that has to wait.

    Raises:
        WorkspaceBusy: the lock is still held after ``timeout`` seconds.
        FileNotFoundError: ``repo_dir`` is not a DVC project.
    """
    folder = _lock_dir(repo_dir)
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=timeout, poll_interval=0.5)
    except Timeout:
        who = holder(repo_dir) or {}
        raise WorkspaceBusy(
            f"{Path(repo_dir).resolve()}: another pipeline run is reproducing this workspace "
            f"(pid {who.get('pid', '?')} on {who.get('host', '?')}, flow run {who.get('flow_run_id') or '-'}, "
            f"since {who.get('since', '?')}); waited {timeout:g} s. Nothing was changed. "
            "Retry when it has finished, or pass a longer wait (sparseflow pipeline --wait SECONDS)."
        ) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "flow_run_id": flow_run_id,
                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        tmp = folder / f".{OWNER_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, folder / OWNER_NAME)
        yield
    finally:
        lock.release()
