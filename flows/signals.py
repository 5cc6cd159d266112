"""SIGTERM and Ctrl-C for the ``sparseflow`` command: stop within seconds, at a step boundary,
with one line saying what was kept.

- In a stage process (``sparseflow run``), the first signal asks the training loop to stop after
  its current step (:mod:`sparse_core.interrupt`); the last epoch's checkpoint is what is kept,
  and the next run resumes from it. When no training loop is running (data preparation,
  evaluation), or at a second signal, the command stops at once (``KeyboardInterrupt``): every
  artifact is written atomically, so nothing half-written is left under its final name.
- In ``sparseflow pipeline``, which runs DVC in-process and DVC runs each stage as a child
  process, the signal is passed on to the children first, and the pipeline waits for them (up to
  :data:`CHILD_GRACE_SECONDS`) so that they stop, and report their state to the Prefect server,
  before the pipeline ends and with it any temporary server.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

from sparse_core import interrupt

#: How long ``sparseflow pipeline`` waits for its stage processes after passing a signal on.
CHILD_GRACE_SECONDS = 8.0


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


#: The modules that servers run as (``python -m MODULE``): see :func:`servers`.
SERVER_MODULES = frozenset({b"uvicorn", b"flows.forkserver"})


def _main_module(argv: list[bytes]) -> bytes | None:
    """The module of a ``python [-flags] -m MODULE ...`` command line, else None."""
    for i, arg in enumerate(argv[1:-1], start=1):
        if arg == b"-m":
            return argv[i + 1]
        if arg == b"-c" or not arg.startswith(b"-"):
            return None
    return None


def servers(pids: list[int]) -> set[int]:
    """The servers among ``pids`` and their descendants: Prefect servers (``python -m uvicorn``:
    one that ``with-server`` started, or a temporary one that Prefect started for this
    command or for one of its stages) and fork servers (``python -m flows.forkserver``, whose
    forked stages get the signal from their callers, which are among ``pids``). They are left to
    the processes that started them, which stop them after the stages reported their final state.
    A server is known by the module its command line runs (:data:`SERVER_MODULES`), not by a text
    anywhere in it."""
    out: set[int] = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _main_module(argv) in SERVER_MODULES:
            out |= {pid, *descendants(pid)}
    return out


def _forward(signum: int, grace: float) -> None:
    """Send ``signum`` to every descendant but the servers (:func:`servers`), then wait up to
    ``grace`` seconds for them to exit."""
    family = descendants(os.getpid())
    skip = servers(family)
    pids = [p for p in family if p not in skip]
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (Linux ``/proc``): a zombie, exited and
    not yet reaped by its parent, has ended."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not text[text.rfind(")") + 2 :].startswith("Z")


def stop_children(signum: int = signal.SIGTERM, grace: float = CHILD_GRACE_SECONDS) -> None:
    """Pass ``signum`` on to every descendant process but the servers (:func:`servers`) and wait
    up to ``grace`` seconds for them to end: what the handler of :func:`install` does with
    ``forward_to_children``, for code that learns of a stop by an exception instead (Prefect's
    flow engine raises ``TerminationSignal`` from its own SIGTERM handler, and calls the
    previous handler, ours, only once the exception has left the flow)."""
    _forward(signum, grace)


def install(forward_to_children: bool = False) -> None:
    """Install the SIGTERM and SIGINT handlers of the module docstring in this (main) thread.

    Args:
        forward_to_children: pass the signal on to every descendant process first and wait for
            them (``pipeline``, ``with-server``).
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        again = interrupt.stop_requested()
        interrupt.request_stop(name)
        if forward_to_children:
            _forward(signum, CHILD_GRACE_SECONDS)
        if again or not interrupt.training_active():
            raise KeyboardInterrupt(name)

    interrupt.set_handler(handler)
