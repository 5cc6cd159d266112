"""Where a stage's seconds go, for ``benchmarks/orchestration.py``.

When the environment variable ``SPARSEFLOW_TIMINGS`` names a file, two kinds of JSON lines are
appended to it (nothing is written, and nothing is imported, when it is unset: the default):

- one ``{"kind": "work", "task", "import_start", "start", "end", "pid"}`` per call of a stage's
  library work (:func:`stage_work`): ``import_start`` .. ``start`` is the import of the
  :mod:`sparse_core` module that holds the work (0 s when the process had it already),
  ``start`` .. ``end`` the work function itself (training, evaluation, writing its files);
- one ``{"kind": "stage", "stage", "argv", "start", "end", "pid", "status"}`` per
  ``sparseflow run`` process (:func:`record_stage`): ``start`` is the process's creation time
  (from the kernel, so the interpreter's start and every import count), ``end`` the moment
  the command has finished its work, just before the interpreter exits (exit itself is not
  included);
- where the fork server ran the stage (:mod:`flows.forkserver`), one ``{"kind": "child-exit",
  "start", "end", "pid"}`` for the forked child's exit and one ``{"kind": "caller", "start",
  "end", "pid"}`` for the ``sparseflow run`` process that DVC started and that waited for it
  (:func:`record_caller`, :func:`record_child_exit`).

Times are Unix epoch seconds (``time.time()``): the same clock in every process of the machine,
so a benchmark can take the union of intervals written by parallel tasks. Each line is written
with one ``write`` on a file opened with ``O_APPEND`` (lines of concurrent processes do not mix
on a local file system).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from types import ModuleType
from typing import Iterator

#: Environment variable naming the JSON-lines file (unset: no timing is recorded).
TIMINGS_ENV = "SPARSEFLOW_TIMINGS"


def enabled() -> bool:
    """True when ``SPARSEFLOW_TIMINGS`` is set (non-empty)."""
    return bool(os.environ.get(TIMINGS_ENV))


def record(entry: dict) -> None:
    """Append ``entry`` as one JSON line to the ``SPARSEFLOW_TIMINGS`` file; no-op when unset."""
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stage_work(task: str, module: str) -> Iterator[ModuleType]:
    """Import ``module`` (a :mod:`sparse_core` module) and yield it; the ``with`` body is the
    stage's work. With ``SPARSEFLOW_TIMINGS`` set, one ``work`` line records both intervals.

    The library is imported here, inside the task, rather than when :mod:`tasks.stage_tasks` is
    imported: a stage's command line, its validation and its Prefect flow run then start
    without torch, torchvision, pandas or scikit-learn (seconds per process).
    """
    from sparse_core import interrupt

    import_start = time.time()
    mod = sys.modules.get(module) or importlib.import_module(module)
    start = time.time()
    try:
        with interrupt.own_signals():  # SIGTERM stops training at a step boundary (not Prefect's handler)
            yield mod
    finally:
        if enabled():
            record({"kind": "work", "task": task, "import_start": import_start, "start": start,
                    "end": time.time(), "pid": os.getpid()})  # fmt: skip


def process_start_time() -> float:
    """Creation time of this process, Unix epoch seconds, from the kernel (10 ms resolution).

    On Linux: ``starttime`` of ``/proc/self/stat`` (clock ticks after boot) set against
    ``CLOCK_BOOTTIME`` now. Not psutil's ``create_time()``: it adds ``btime`` of ``/proc/stat``,
    the boot time in whole seconds, so its values are off by the same fraction of a second in
    every process against :func:`time.time` (measured here: 0.71 s early, 2026-12-01, which
    made each stage process look 0.71 s longer and consecutive stages overlap). Elsewhere,
    psutil.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) first
        ticks = int(fields[19])  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS), no CLOCK_BOOTTIME
        import psutil

        return psutil.Process().create_time()


def record_caller() -> None:
    """Record a ``sparseflow run`` that handed its command to the fork server, from its creation
    to its child's exit (no-op when unset)."""
    if enabled():
        record({"kind": "caller", "start": process_start_time(), "end": time.time(), "pid": os.getpid()})


def record_child_exit(start: float) -> None:
    """Record a forked stage's exit (threads joined, ``atexit`` handlers such as Prefect's last
    log and event flush) from ``start`` (seconds since the epoch) on (no-op when unset)."""
    if enabled():
        record({"kind": "child-exit", "start": start, "end": time.time(), "pid": os.getpid()})


def record_stage(stage: str, argv: list[str], status: int) -> None:
    """Record one ``sparseflow run`` process (see the module docstring); no-op when unset."""
    if enabled():
        record({"kind": "stage", "stage": stage, "argv": argv, "start": process_start_time(), "end": time.time(),
                "pid": os.getpid(), "status": status})  # fmt: skip
