"""``sparseflow server``, ``serve`` and ``deploy``: the pipeline on a Prefect server.

- ``server`` starts Prefect's own server app bound to 127.0.0.1 by default, with its default
  embedded SQLite database under ``PREFECT_HOME``, behind a guard that refuses foreign ``Host``
  and ``Origin`` headers (:mod:`flows.server_app`); Prefect's API authentication
  (``PREFECT_SERVER_API_AUTH_STRING``) passes through. PostgreSQL: set
  ``PREFECT_API_DATABASE_CONNECTION_URL`` (README, "Schedule it on a Prefect server").
- ``serve`` runs a long-lived process that serves the ``pipeline`` flow of this checkout as
  a deployment (cron or interval schedule, or triggered by hand / through the API).
- ``deploy`` registers the same flow, from this checkout's folder, as a deployment of a
  *process* work pool (created when missing), so ``sparseflow worker --pool NAME`` on a
  machine that sees this folder picks the runs up.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# The fork server's starter lives in flows.stage_server: the pipeline flow, which this module
# imports, needs it too.
from flows.stage_server import stage_fork_server, stop_process

ENTRYPOINT = "flows/repro_flow.py:pipeline_flow"
SWEEP_ENTRYPOINT = "flows/repro_flow.py:workspace_sweep_flow"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(host: str, port: int) -> list[str]:
    """The command line of a Prefect server on ``host:port``: Prefect's own app (API, UI and
    services, what ``prefect server start`` serves) behind the Host/Origin guard of
    :mod:`flows.server_app`, run by uvicorn. Its environment comes from :func:`server_env`."""
    return [sys.executable, "-m", "uvicorn", "--factory", "flows.server_app:create_app", "--host", host,
            "--port", str(port), "--log-level", "warning", "--no-server-header"]  # fmt: skip


def server_env(host: str, port: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) plus what the guarded server needs: its own
    names as the allowed ``Host`` values and origins (extended, not replaced, by the user's
    ``SPARSEFLOW_SERVER_ALLOWED_HOSTS`` / ``_ORIGINS``: a reverse proxy's name), and Prefect's CORS
    origins set to the same unless the user set them. ``PREFECT_SERVER_API_AUTH_STRING`` passes
    through: Prefect then refuses every API request without the matching credentials."""
    from flows.server_app import HOSTS_ENV, ORIGINS_ENV, allowed_names

    out = dict(os.environ if env is None else env)
    hosts, origins = allowed_names(host, port)
    out[HOSTS_ENV] = ",".join(hosts + [h for h in out.get(HOSTS_ENV, "").split(",") if h])
    out[ORIGINS_ENV] = ",".join(origins + [o for o in out.get(ORIGINS_ENV, "").split(",") if o])
    out.setdefault("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", out[ORIGINS_ENV])
    out.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    out.setdefault("PREFECT_UI_API_URL", f"http://{host}:{port}/api")
    return out


#: Database URL schemes Prefect's server accepts (SQLAlchemy async drivers).
DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")
DATABASE_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"


def check_database(url: str) -> str:
    """``url`` if Prefect's server can use it: ``postgresql+asyncpg://user:password@host:port/db``
    or ``sqlite+aiosqlite:///path``.

    Raises:
        ValueError: another scheme (the message shows the URL without its password).
    """
    from flows.pgcluster import mask

    scheme = url.partition("://")[0]
    if scheme not in DATABASE_SCHEMES:
        raise ValueError(f"--database {mask(url)!r}: expected a URL starting with "
                         f"{' or '.join(s + '://' for s in DATABASE_SCHEMES)} (e.g. postgresql+asyncpg://prefect:<password>@127.0.0.1:5432/prefect)")  # fmt: skip
    return url


def start(host: str, port: int, database: str | None = None) -> int:
    """Run a Prefect server on ``host:port`` until Ctrl-C or SIGTERM; returns its exit status.

    ``database``: the server's database URL (default: ``$PREFECT_API_DATABASE_CONNECTION_URL``,
    else Prefect's embedded SQLite under ``PREFECT_HOME``). SIGTERM (a service manager's stop)
    is passed on as SIGINT, which Prefect's server handles as a graceful shutdown (exit status
    0) instead of dying mid-write.

    Raises:
        ValueError: ``database`` is not a URL Prefect's server can use (:func:`check_database`)."""
    if not _is_loopback(host):
        print(
            f"sparseflow server: WARNING: binding {host}, not a loopback address. Set PREFECT_SERVER_API_AUTH_STRING "
            "(and PREFECT_API_AUTH_STRING on clients) and put it behind TLS (README, 'Exposing the server').",
            file=sys.stderr,
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    database = database or os.environ.get(DATABASE_ENV)
    if database:
        from flows.pgcluster import mask

        os.environ[DATABASE_ENV] = check_database(database)
    print(f"sparseflow server: Prefect API at http://{host}:{port}/api (UI at http://{host}:{port}), database "
          f"{mask(database) if database else 'SQLite (PREFECT_HOME)'}; in other shells:\n"
          f"  export PREFECT_API_URL=http://{host}:{port}/api", flush=True)  # fmt: skip
    proc = subprocess.Popen(server_command(host, port), env=server_env(host, port))
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGINT))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server itself (same process group)
    while True:
        try:
            return proc.wait()
        except InterruptedError:  # pragma: no cover - wait() is restarted by Python (PEP 475)
            continue


def _parameters(args: argparse.Namespace, repo: Path) -> dict:
    if getattr(args, "flow", "pipeline") == "sweep":
        return {"method": args.method, "sparsities": args.sparsity, "seeds": args.seeds, "repo_dir": str(repo),
                "wait_seconds": args.wait}  # fmt: skip
    return {"targets": args.target or None, "profile": args.profile, "repo_dir": str(repo), "wait_seconds": args.wait}


def _schedule(args: argparse.Namespace) -> dict:
    if args.cron:
        return {"cron": args.cron}
    if args.interval:
        return {"interval": args.interval}
    return {}


def ensure_process_pool(name: str) -> None:
    """Create the process work pool ``name`` unless it exists.

    Raises:
        ValueError: a pool of that name exists with another type.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
    if pool.type != "process":
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; sparseflow deploy needs a 'process' pool")


def serve_or_deploy(args: argparse.Namespace) -> None:
    """``sparseflow serve`` (blocks, serving runs) or ``sparseflow deploy`` (registers and returns)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.repro_flow import pipeline_flow, workspace_sweep_flow

    repo = Path.cwd().resolve()
    if not (repo / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{repo}: no dvc.yaml here; run this in the project checkout")
    sweep = getattr(args, "flow", "pipeline") == "sweep"
    if sweep and (not args.method or not args.sparsity):
        raise SystemExit(f"sparseflow {args.command} --flow sweep: --method and --sparsity are required")
    if sweep:  # refused now, not when the scheduled run starts
        from sparse_core.config import plain_name, sweep_methods

        args.method = plain_name(args.method, sweep_methods(), f"{args.command} --method")
    params = _parameters(args, repo)
    chosen, entrypoint = (workspace_sweep_flow, SWEEP_ENTRYPOINT) if sweep else (pipeline_flow, ENTRYPOINT)
    # One run at a time per workspace: a second scheduled or triggered run waits in Prefect's
    # AwaitingConcurrencySlot state (ENQUEUE) instead of starting and colliding on the workspace lock.
    limit = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    if args.command == "serve":
        chosen.serve(name=args.name, parameters=params, limit=1, **_schedule(args))
        return
    ensure_process_pool(args.pool)
    # to_deployment().apply() rather than Flow.deploy(): deploy() also lists the pool's online
    # workers, a request Prefect 3.8's own server rejects with FastAPI < 0.155 (limit=null).
    deployment = chosen.from_source(source=str(repo), entrypoint=entrypoint).to_deployment(
        name=args.name, work_pool_name=args.pool, parameters=params, concurrency_limit=limit, **_schedule(args)
    )
    deployment_id = deployment.apply()
    flow_name = chosen.name
    print(f"sparseflow deploy: deployment {flow_name}/{args.name} ({deployment_id}) on process pool {args.pool!r}.\n"
          f"Start a worker where this folder ({repo}) is visible:\n  sparseflow worker --pool {args.pool}\n"
          f"Trigger a run:\n  prefect deployment run {flow_name}/{args.name}")  # fmt: skip


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released: free now, not reserved)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90.0) -> None:
    """Poll ``<url>/health`` of the Prefect server started as ``proc`` until it answers 200.

    Raises:
        RuntimeError: the process ended or ``seconds`` passed first; the message ends with the
            last 3000 characters of ``log``.
    """
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start on {url}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def validate_before_dvc(cmd: list[str], params: str | Path = "params.yaml") -> None:
    """Validate ``params`` before ``cmd`` runs when ``cmd`` is a ``dvc repro`` or ``dvc exp``:
    DVC parses ``params.yaml`` itself before any stage runs, with no limit on what YAML aliases
    expand to (a small hostile file took 3.9 GB there), so sparseflow's validator, which refuses
    such a file, must read it first.

    Raises:
        ConfigError: the params file is invalid (or expands beyond the limit).
    """
    from sparse_core.config import load_params

    if cmd and Path(cmd[0]).name == "dvc" and any(word in ("repro", "exp") for word in cmd[1:2]) and Path(params).is_file():
        load_params(params)


def lock_reusing(cmd: list[str]) -> list[str]:
    """``cmd`` with this environment's ``dvc`` run as ``python -m flows.dvc_main`` (DVC's command
    line, reusing the ``dvc.lock`` it wrote instead of parsing it after every stage); any other
    command, or a ``dvc`` from elsewhere on ``PATH``, as given."""
    if not cmd or Path(cmd[0]).name != "dvc":
        return cmd
    found, ours = shutil.which(cmd[0]), Path(sys.executable).parent / "dvc"
    if found is None or not ours.is_file() or Path(found).resolve() != ours.resolve():
        return cmd
    return [sys.executable, "-m", "flows.dvc_main", *cmd[1:]]


@contextlib.contextmanager
def temporary_prefect_server(home: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A Prefect server started on a free 127.0.0.1 port with ``home`` as its ``PREFECT_HOME``
    (its own SQLite database, its log in ``home/server.log``); sets ``env["PREFECT_API_URL"]`` to
    it. Stopped (SIGINT, then SIGKILL after 20 s) when the block ends.

    The block starts at once (start the fork server meanwhile); call :func:`wait_until_healthy`
    before the first command that reports to it.
    """
    port = free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    own = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(server_command("127.0.0.1", port), env=server_env("127.0.0.1", port, own), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc, signal.SIGINT)


def with_server(cmd: list[str], startup_seconds: float = 90.0, fork_server: bool = True, reuse_lock: bool = True) -> int:
    """Run ``cmd`` with every Prefect flow it starts reporting to one Prefect server; returns
    ``cmd``'s exit status.

    When ``PREFECT_API_URL`` is set, that server is used and no Prefect server is started.
    Otherwise a :func:`temporary_prefect_server` runs while ``cmd`` runs, with ``PREFECT_API_URL``
    pointing at it. Without this, each ``sparseflow run`` that a bare ``dvc repro`` starts
    brings up a temporary server of its own (measured: a warmup stage with a 4.6 s epoch took
    19.7 s that way on the 2-core machine), and a default ``dvc repro`` has over a hundred
    stages.

    With ``fork_server`` (the default), a :func:`stage_fork_server` runs beside it for the same time,
    and ``cmd``'s ``sparseflow run`` processes hand their stage to it: each stage then starts
    with Prefect and its library already imported.

    A ``dvc repro`` (or ``dvc exp``) command runs only after ``params.yaml`` validates
    (:func:`validate_before_dvc`). With ``reuse_lock`` (the default), this environment's ``dvc``
    runs through :mod:`flows.dvc_main` (:func:`lock_reusing`).

    SIGTERM / Ctrl-C are passed on to the command's processes (the stages stop at a step
    boundary and report to the server); the servers are stopped last (:mod:`flows.signals`
    leaves Prefect servers and fork servers to the process that started them).

    Raises:
        ConfigError: ``cmd`` is a DVC command and ``params.yaml`` is invalid.
        RuntimeError: the server did not answer ``/api/health`` within ``startup_seconds``
            (the message ends with its log).
    """
    import tempfile

    from flows import signals

    validate_before_dvc(cmd)
    home = Path(tempfile.mkdtemp(prefix="sparseflow-prefect-"))
    env = {**os.environ}
    try:
        with contextlib.ExitStack() as servers:
            prefect = None if env.get("PREFECT_API_URL") else servers.enter_context(temporary_prefect_server(home, env))
            if fork_server:  # started before the wait: its imports overlap the server's start
                servers.enter_context(stage_fork_server(home, env))
            if prefect is not None:
                wait_until_healthy(env["PREFECT_API_URL"], prefect, home / "server.log", startup_seconds)
                print(f"sparseflow with-server: Prefect API at {env['PREFECT_API_URL']} for: {' '.join(cmd)}", flush=True)
            signals.install(forward_to_children=True)
            return subprocess.call(lock_reusing(cmd) if reuse_lock else cmd, env=env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
