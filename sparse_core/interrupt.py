"""Stopping a run promptly on SIGTERM or Ctrl-C: a process-wide stop request that training loops
check at every step boundary.

The ``sparseflow`` command installs the signal handlers (:func:`flows.cli.main`); a training loop
calls :func:`check` after each optimizer step. When a stop was requested, :func:`check` raises
:class:`Stopped` whose message says what was kept: the run's last checkpoint (written at the end
of each epoch, atomically), from which the next run resumes with identical results
(:func:`sparse_core.engine.fit`, ``base.resume``). The work since that checkpoint, at most one
epoch, is redone. Training usually runs in a Prefect task thread while the signal arrives in the
main thread, so the request is a flag both can see (a ``threading.Event``), not an exception.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

_REQUEST = threading.Event()
_REASON: list[str] = []
_ACTIVE = [0]  # training loops running in this process
_LOCK = threading.Lock()
_HANDLER: list[Callable[..., Any]] = []  # the command's SIGTERM/SIGINT handler (flows.signals)


class Stopped(Exception):
    """A run stopped at a step boundary because a stop was requested (SIGTERM, Ctrl-C); the
    message names the run, where it stopped and the checkpoint that was kept."""


def request_stop(reason: str = "a stop request") -> None:
    """Ask every training loop of this process to stop at its next step boundary."""
    if not _REQUEST.is_set():
        _REASON[:] = [reason]
    _REQUEST.set()


def stop_requested() -> bool:
    return _REQUEST.is_set()


def reason() -> str:
    return _REASON[0] if _REASON else "a stop request"


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Mark a training loop as running (it checks for stop requests at every step)."""
    with _LOCK:
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1


def training_active() -> bool:
    """Whether a training loop that checks for stop requests is running in this process."""
    return _ACTIVE[0] > 0


def clear() -> None:
    """Forget a stop request (tests; a long-lived process that handled it)."""
    _REQUEST.clear()
    _REASON.clear()


def check(where: str, kept: str) -> None:
    """Raise :class:`Stopped` if a stop was requested.

    Args:
        where: the run and position, for the message (``"dense: epoch 3/12, step 1234"``).
        kept: what survives the stop (``"runs/s0/dense/last.pt (epoch 2); the next run resumes from it"``).

    Raises:
        Stopped: a stop was requested.
    """
    if _REQUEST.is_set():
        raise Stopped(f"stopped by {reason()} at {where}; kept {kept}")


def set_handler(handler: Callable[..., Any]) -> None:
    """Install ``handler`` for SIGTERM and SIGINT (main thread) and remember it for
    :func:`own_signals`."""
    _HANDLER[:] = [handler]
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def own_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT go to the handler of :func:`set_handler` again.

    Prefect's flow engine replaces the SIGTERM handler while a flow runs (it raises at once,
    wherever the main thread is, and marks the run Crashed); a stage's work (``tasks.timing
    .stage_work``) runs in this block instead, so that a signal stops training at a step boundary
    with a message saying what was kept. Outside the main thread, or when no handler was set
    (the library used from Python), nothing changes.
    """
    if not _HANDLER or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, _HANDLER[0])
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
