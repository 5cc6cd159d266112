"""A fork server for stage processes: ``sparseflow run`` without paying for its imports.

Every DVC stage is a fresh ``sparseflow run <stage>`` process. Before its work starts, such a
process imports Prefect (about 1.3 s on the 2-core machine) and the stage's library (torch,
pandas, ...: about 2 s), and a default ``make repro`` has about a hundred stages (README,
"Orchestration"). ``sparseflow with-server`` therefore also starts this server: one process
that imports all of that once and then, for each stage, forks a child that runs the stage's
command exactly as the fresh process would (same arguments, working directory, environment,
standard input/output/error, exit status, signals), with the imports already done. This is
the pattern of :mod:`multiprocessing`'s ``forkserver`` start method and of Android's zygote.

The ``sparseflow`` command (:mod:`flows.launch`) hands a ``run`` command to the server when the
environment variable ``SPARSEFLOW_FORK_SERVER`` names its socket, and runs it itself, as
before, whenever the server cannot take it. The server refuses (the command then runs in its
own process, with the same result) when:

- the command's working directory is not the server's project;
- the command's environment differs from the server's in anything but ``DVC_*`` (which DVC
  sets per stage), ``PWD``, ``OLDPWD``, ``SHLVL`` and ``_``: imported modules may have read
  the environment (Prefect's settings, thread counts), so only an identical one is safe;
- a project source file that the server imported changed since (an edit during a run): the
  server then exits, so that no stage runs old code.

Fork safety: the server runs no torch operation (so no OpenMP thread pool exists to be lost in
the child) and starts no Python thread (it checks after its imports and does not serve if one
exists). Loading the libraries starts a few native threads (one by ``import torch``, pyarrow's
jemalloc and OpenBLAS threads, all idle), the same ones a PyTorch ``DataLoader`` worker forks
away from on Linux; those libraries handle fork. A child therefore starts like a fresh process
whose imports happened to be fast. A child has the server's
session, not the caller's, so a terminal's Ctrl-C reaches it through the caller, which passes
SIGINT, SIGTERM and SIGHUP on to it; when the caller dies, the server sends SIGTERM to its child
(the stage stops at a step boundary). What differs from a fresh process: the process creation
time (the fork), and terminal colours, which Prefect's console decides once, in the server.

Protocol (one Unix stream connection per command): the caller sends its standard descriptors
(``SCM_RIGHTS``) with an 8-byte length, then that many bytes of JSON ``{"argv", "cwd", "env",
"fds"}``; the server answers ``pid <n>\\n`` or ``refused <reason>\\n``, and at the end ``exit
<code>\\n`` or ``signal <number>\\n``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from flows.stage_server import FORK_SERVER_ENV as ENV  # the socket's path; set by whoever starts the server

#: Environment variables a command may have that differ from the server's.
FREE_ENV = ("PWD", "OLDPWD", "SHLVL", "_")
FREE_ENV_PREFIX = "DVC_"
_HEADER = struct.Struct("!Q")


# --------------------------------------------------------------------------------- the caller
def _recv_line(sock: socket.socket, buf: bytearray) -> str | None:
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf.extend(chunk)
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def forward(argv: list[str]) -> int | None:
    """Run ``argv`` (the ``sparseflow`` command line, ``argv[0]`` included) in a child of the
    fork server named by ``SPARSEFLOW_FORK_SERVER``; returns its exit status (128 + the signal
    number when a signal ended it), or None when there is no server or it refused the command
    (the caller then runs the command itself). Signals this process receives (SIGINT, SIGTERM,
    SIGHUP) are passed on to the child while it runs.
    """
    path = os.environ.get(ENV)
    if not path or len(argv) < 2 or argv[1] != "run":
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        fds = [fd for fd in (0, 1, 2) if _valid(fd)]
        body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds}).encode()
        try:
            socket.send_fds(sock, [_HEADER.pack(len(body))], fds)
            sock.sendall(body)
        except OSError:
            return None
        buf = bytearray()
        first = _recv_line(sock, buf)
        if first is None or not first.startswith("pid "):
            return None  # refused (or the server went away before forking): run it here
        pid = int(first.split()[1])

        def pass_on(signum: int, _frame: object) -> None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, pass_on)
        last = _recv_line(sock, buf)
    if last is None:
        print(f"sparseflow: the fork server ({path}) ended before its stage process {pid} reported", file=sys.stderr)
        return 1
    kind, value = last.split()
    return int(value) if kind == "exit" else 128 + int(value)


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------- the server
#: What a Prefect flow run imports only once it runs (Prefect 3 imports its run engines, and
#: FastAPI's JSON encoder for the flow's parameters, inside the call): profiled in a stage forked
#: from the server, 0.45 s of its 1.35 s (under cProfile) went to importing these
#: (``tests/test_forkserver.py`` runs a flow after :func:`preload` and fails on anything new).
FLOW_RUN_MODULES = ("prefect.engine", "prefect.flow_engine", "prefect.task_engine", "prefect.utilities.visualization",
                    "prefect.concurrency.v1.context", "prefect.telemetry.run_telemetry", "fastapi.encoders", "pydantic.v1",
                    "encodings.idna", "http.cookies", "flows.signals")  # fmt: skip


def preload() -> None:
    """Import what stage processes import: the CLI, Prefect, the stage flows and tasks, the
    library module of every stage's job (:func:`flows.stage_code.job_modules`, read from the
    source of the imported project, wherever it is installed) and what a flow run imports when it
    starts (:data:`FLOW_RUN_MODULES`)."""
    import importlib

    import flows
    from flows import cli, stage_code, stage_flows  # noqa: F401  (imports Prefect)

    for modules in stage_code.job_modules(Path(flows.__file__).resolve().parent.parent).values():
        for name in sorted(modules):
            importlib.import_module(name)
    for name in FLOW_RUN_MODULES:
        importlib.import_module(name)


PROJECT_PACKAGES = ("sparse_core", "tasks", "flows")


def _sources() -> dict[str, tuple[int, int]]:
    """``{path: (mtime_ns, size)}`` of every imported module file of the project's packages
    (:data:`PROJECT_PACKAGES`, wherever they were imported from)."""
    out = {}
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if name != "__main__" and name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        if isinstance(path, str) and os.path.isabs(path) and os.path.isfile(path):
            st = os.stat(path)
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


def _changed(sources: dict[str, tuple[int, int]]) -> str | None:
    for path, stamp in sources.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if (st.st_mtime_ns, st.st_size) != stamp:
            return path
    return None


def refusal(request: dict, root: Path, env: dict[str, str]) -> str | None:
    """Why the server must not run ``request`` (see the module docstring), or None."""
    try:
        same_dir = os.path.samefile(request["cwd"], root)
    except OSError:
        same_dir = False
    if not same_dir:
        return f"working directory {request['cwd']} is not {root}"
    theirs = request["env"]
    for key in sorted(set(theirs) | set(env)):
        if key in FREE_ENV or key.startswith(FREE_ENV_PREFIX):
            continue
        if theirs.get(key) != env.get(key):
            return f"environment variable {key} differs"
    return None


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    if len(msg) != _HEADER.size:
        raise OSError("short header")
    (size,) = _HEADER.unpack(msg)
    body = bytearray()
    while len(body) < size:
        chunk = conn.recv(min(65536, size - len(body)))
        if not chunk:
            raise OSError("connection closed mid-request")
        body.extend(chunk)
    conn.settimeout(None)
    return json.loads(body), fds


def serve(socket_path: Path, root: Path) -> tuple[dict, list[int]] | None:
    """Preload, listen on ``socket_path`` and fork a child per accepted command. Returns only in
    a child, with the command's request and its descriptors (see :func:`child_main`); in the
    server it returns None when it stops (its parent exited, SIGTERM, or a source changed)."""
    import gc

    env = dict(os.environ)  # what a caller's environment must equal (before imports change it)
    gc.disable()  # the imports create objects, not garbage (see flows.cli._run_stage)
    preload()
    gc.freeze()
    gc.enable()
    # What the imports set (pandera sets PYARROW_IGNORE_TIMEZONE), as they would in a fresh process.
    imported_env = {k: v for k, v in os.environ.items() if env.get(k) != v}
    import threading

    if threading.active_count() != 1:
        print(f"fork server: Python threads after the imports ({threading.enumerate()}); not serving", flush=True)
        return None
    sources = _sources()
    parent = os.getppid()
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, _f: stop.append(s))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the callers pass Ctrl-C to their children
    tmp = socket_path.with_name(socket_path.name + f".{os.getpid()}.tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    listener.listen(16)
    os.replace(tmp, socket_path)  # callers never see a socket that is not listening yet
    print(f"fork server: {len(sources)} project modules loaded; listening on {socket_path}", flush=True)
    clients: dict[int, socket.socket] = {}  # child pid -> its caller's connection
    exits: dict[int, int] = {}  # child pid -> a pidfd, readable once the child has ended (Linux)
    me = os.getpid()
    try:
        while not stop and os.getppid() == parent:
            _reap(clients, exits)
            ready, _, _ = select.select([listener, *clients.values(), *exits.values()], [], [], 0.2)
            for conn in ready:
                if isinstance(conn, int):  # a child ended: reaped at the top of the loop, at once
                    continue
                if conn is not listener:  # a caller went away (or sent more): stop its child
                    if not conn.recv(1):
                        _signal(next(pid for pid, c in clients.items() if c is conn), signal.SIGTERM)
                    continue
                sock, _ = listener.accept()
                try:
                    request, fds = _read_request(sock)
                except (OSError, ValueError) as exc:
                    print(f"fork server: bad request ({exc})", flush=True)
                    sock.close()
                    continue
                changed = _changed(sources)
                reason = f"{changed} changed since the server started" if changed else refusal(request, root, env)
                if reason:
                    print(f"fork server: refused {request.get('argv')}: {reason}", flush=True)
                    _send(sock, f"refused {reason}")
                    sock.close()
                    for fd in fds:
                        os.close(fd)
                    if changed:
                        return None
                    continue
                pid = os.fork()
                if pid == 0:  # the child: leave the server's loop with its command
                    listener.close()
                    for c in clients.values():
                        c.close()
                    for fd in exits.values():
                        os.close(fd)
                    sock.close()
                    request["env"] = {**request["env"], **imported_env}
                    return request, fds
                for fd in fds:
                    os.close(fd)
                clients[pid] = sock
                with contextlib.suppress(AttributeError, OSError):  # no pidfd_open: found by the 0.2 s poll
                    exits[pid] = os.pidfd_open(pid)
                if not _send(sock, f"pid {pid}"):  # the caller is gone already
                    _signal(pid, signal.SIGTERM)
    finally:
        if os.getpid() == me:
            listener.close()
            try:
                socket_path.unlink()
            except FileNotFoundError:
                pass
            if stop:  # asked to stop (by its starter, after its command ended or was signalled)
                _drain(clients, exits, STOP_GRACE_SECONDS)
            for pid in clients:
                _signal(pid, signal.SIGTERM)
    return None


#: How long a stopped server waits for running stages before it sends them SIGTERM (seconds).
STOP_GRACE_SECONDS = 10.0


def _drain(clients: dict[int, socket.socket], exits: dict[int, int], seconds: float) -> None:
    """Wait up to ``seconds`` for the running children to end, reporting each end to its caller.

    A server is stopped while stages run when everything of a flow run is signalled at once
    (``sparseflow worker`` spares the servers; a service manager may not): the stages then
    stop at a step boundary, on the signal their callers pass on, and their callers learn
    their real exit status. A SIGTERM from the server as well would be a second signal, which
    stops a stage at once instead (:mod:`flows.signals`)."""
    deadline = time.monotonic() + seconds
    while clients and time.monotonic() < deadline:
        _reap(clients, exits)
        if clients:
            select.select(list(exits.values()), [], [], 0.1)


def _send(sock: socket.socket, line: str) -> bool:
    try:
        sock.sendall(line.encode() + b"\n")
    except OSError:
        return False
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(clients: dict[int, socket.socket], exits: dict[int, int]) -> None:
    """Report every ended child's status to its caller (``exit N`` or ``signal N``), and close
    its pidfd. The server's loop waits on the pidfds (:func:`os.pidfd_open`, Linux 5.3+), so a
    caller learns of its child's end at once; without them the loop's 0.2 s poll finds it (on
    average 0.1 s later, measured as part of 0.32 s per stage around the fork on the tiny
    profile, 2026-12-01)."""
    while clients:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in exits:
            os.close(exits.pop(pid))
        conn = clients.pop(pid, None)
        if conn is None:
            continue
        _send(conn, f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}")
        conn.close()


def child_main(request: dict, fds: list[int]) -> None:
    """In a forked child: become the caller's command (descriptors, directory, environment,
    arguments, default signal handling), run it as ``sparseflow`` would, and exit.

    The exit does what the interpreter's own exit does that a program can observe (join the
    threads that are not daemons, run the ``atexit`` handlers, among them Prefect's, which send
    the last logs and events, flush standard output and error) and then ends the process with
    :func:`os._exit`, without the interpreter's teardown of every module: in a child that
    shares the server's memory, that teardown writes to every object (reference counts) and so
    copies the whole heap, page by page (measured: 0.7 to 1.45 s per exit, against 0.2 to 0.3 s
    for a fresh process).
    """
    for fd, target in zip(fds, request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    for stream, line in ((sys.stdout, os.isatty(1)), (sys.stderr, True)):
        try:
            stream.reconfigure(line_buffering=line)
        except (AttributeError, OSError, ValueError):
            pass
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = list(request["argv"])
    import atexit
    import threading

    from flows.cli import main

    code = 1
    try:
        code = main()
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # what the interpreter prints for an uncaught exception
        sys.excepthook(*sys.exc_info())
    finally:
        exiting = time.time()
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        if os.environ.get("SPARSEFLOW_TIMINGS"):  # tasks.timing.TIMINGS_ENV (benchmarks/orchestration.py)
            from tasks.timing import record_child_exit

            record_child_exit(exiting)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _exit_code(value: object) -> int:
    """The exit status :class:`SystemExit` ``value`` gives (None: 0; other non-int: printed, 1)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def main() -> None:
    """``python -m flows.forkserver SOCKET``: serve the project in the working directory."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m flows.forkserver SOCKET")
    root = Path.cwd().resolve()
    started = time.perf_counter()
    got = serve(Path(sys.argv[1]), root)
    if got is None:
        print(f"fork server: stopped after {time.perf_counter() - started:.0f} s", flush=True)
        return
    child_main(*got)


if __name__ == "__main__":
    main()
