"""``sparseflow postgres``: a PostgreSQL cluster on loopback for a Prefect server.

Prefect's server keeps its state (flow runs, task runs, deployments, work pools, logs) in SQLite
by default; teams run it on PostgreSQL. This module starts a real PostgreSQL server from
Debian's ``postgresql`` package binaries (``initdb``, ``postgres``) in a folder of its own,
listening on ``127.0.0.1:<port>`` only, with password authentication (SCRAM-SHA-256) for the
role ``prefect`` and a database ``prefect``, and prints the connection URL for
``sparseflow server --database`` (or ``PREFECT_API_DATABASE_CONNECTION_URL``). The folder
persists: started again on the same folder, the cluster keeps its data and its password.

PostgreSQL refuses to run as root; run as root, the server runs as the ``postgres`` user (the
one Debian's package creates) and its folder belongs to that user, so it must be somewhere that
user can reach (the default, a new folder in the system's temporary directory, is).

For a PostgreSQL server you already run, skip this: create a role and a database there and pass
its URL (README, "Prefect on PostgreSQL").
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROLE = "prefect"
DATABASE = "prefect"
URL_FILE = "sparseflow-url"  # inside the cluster folder, mode 600: the URL with its password
BINDIR_ENV = "SPARSEFLOW_PG_BINDIR"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised or started (the message says which and why)."""


def bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: ``$SPARSEFLOW_PG_BINDIR``, then ``PATH``, then the
    newest ``/usr/lib/postgresql/<version>/bin`` (Debian's layout).

    Raises:
        PostgresError: none has both programs.
    """
    candidates = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    where = f"${BINDIR_ENV}, PATH and /usr/lib/postgresql/*/bin"
    raise PostgresError(f"PostgreSQL server programs (initdb, postgres) not found in {where}: install Debian's "
                        f"postgresql package (apt-get install postgresql) or set {BINDIR_ENV}")  # fmt: skip


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for printing)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, at, host = rest.rpartition("@")
    user, colon, _ = cred.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def _run_as() -> dict:
    """``Popen`` keywords that drop root to the ``postgres`` user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError("running as root, and there is no 'postgres' user to run PostgreSQL as (PostgreSQL "
                            "refuses root): install Debian's postgresql package, which creates it") from None  # fmt: skip
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _chown(path: Path, kw: dict) -> None:
    if kw:
        os.chown(path, kw["user"], kw["group"])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """A PostgreSQL cluster in ``folder`` on ``127.0.0.1:port``.

    ``start()`` initialises the folder if it holds no cluster (role ``prefect`` with a random
    password, database ``prefect``), starts the server and waits until it accepts connections;
    ``stop()`` shuts it down (SIGINT: PostgreSQL's fast shutdown; SIGKILL after ``grace`` s).
    Use as a context manager. ``url`` is the SQLAlchemy/asyncpg URL Prefect takes.

    Raises (``start``):
        PostgresError: programs missing, the port taken, ``initdb`` failed, or the server did not
            accept connections within ``timeout`` seconds (the message ends with its log).
    """

    def __init__(self, folder: str | Path | None = None, port: int = 5433, timeout: float = 60.0):
        self.folder = Path(folder) if folder else None
        self.port = port
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.password = ""

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _init(self, bins: Path, kw: dict) -> str:
        password = secrets.token_urlsafe(24)
        pwfile = self.folder / ".pw"
        pwfile.write_text(password + "\n")
        _chown(pwfile, kw)
        os.chmod(pwfile, 0o600)
        try:
            done = subprocess.run([str(bins / "initdb"), "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}",
                                   "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
                                  capture_output=True, text=True, **kw)  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PostgresError(f"initdb {self.data} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return password

    def start(self) -> "Cluster":
        bins = bindir()
        kw = _run_as()
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="sparseflow-postgres-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder = self.folder.resolve()
        if kw:
            for parent in self.folder.parents:
                st = parent.stat()
                if not (st.st_mode & 0o001 or (st.st_uid == kw["user"] and st.st_mode & 0o100)
                        or (st.st_gid == kw["group"] and st.st_mode & 0o010)):  # fmt: skip
                    raise PostgresError(f"{parent} cannot be entered by the postgres user, whom PostgreSQL runs as "
                                        f"here (it refuses root): put --dir {self.folder.name} somewhere it can reach, "
                                        f"e.g. under {tempfile.gettempdir()}")  # fmt: skip
        _chown(self.folder, kw)
        os.chmod(self.folder, 0o700)
        url_file = self.folder / URL_FILE
        if (self.data / "PG_VERSION").is_file():
            if not url_file.is_file():
                raise PostgresError(f"{self.data} holds a cluster that sparseflow did not create ({url_file} is missing)")
            password = urlsplit(url_file.read_text().strip()).password or ""
        else:
            password = self._init(bins, kw)
        self.password = password
        self.url = f"postgresql+asyncpg://{ROLE}:{password}@127.0.0.1:{self.port}/{DATABASE}"
        if not _port_free(self.port):
            raise PostgresError(f"port {self.port} on 127.0.0.1 is taken: choose another with --port")
        log = open(self.folder / "postgres.log", "a")
        self.proc = subprocess.Popen([str(bins / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                      "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)  # fmt: skip
        log.close()
        env = {**os.environ, "PGPASSWORD": password}
        psql = [str(bins / "psql") if (bins / "psql").is_file() else "psql", "-h", "127.0.0.1", "-p",
                str(self.port), "-U", ROLE, "-v", "ON_ERROR_STOP=1", "-qAt"]  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while True:
            ready = subprocess.run([*psql, "-d", "postgres", "-c", "select 1"], env=env, capture_output=True, text=True)
            if ready.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.folder / "postgres.log").read_text()[-2000:]
                raise PostgresError(f"PostgreSQL in {self.data} did not accept connections on 127.0.0.1:{self.port}; log:\n{tail}")
            time.sleep(0.3)
        exists = subprocess.run([*psql, "-d", "postgres", "-c", f"select 1 from pg_database where datname = '{DATABASE}'"],
                                env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        if exists != "1":
            subprocess.run([*psql, "-d", "postgres", "-c", f"create database {DATABASE}"], env=env, capture_output=True, check=True)
        url_file.write_text(self.url + "\n")
        os.chmod(url_file, 0o600)
        return self

    def psql(self, sql: str) -> str:
        """Run ``sql`` in the ``prefect`` database (:func:`psql`)."""
        return psql(self.url, sql)

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # fast shutdown: abort transactions, checkpoint, exit
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def psql(url: str, sql: str) -> str:
    """Run ``sql`` with ``psql`` against the database of ``url`` (``postgresql+asyncpg://…``);
    its unaligned, tuples-only output.

    Raises:
        subprocess.CalledProcessError: psql failed (its stderr is on the exception).
    """
    u = urlsplit(url)
    exe = bindir() / "psql"
    cmd = [str(exe) if exe.is_file() else "psql", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 5432),
           "-U", u.username or ROLE, "-d", u.path.lstrip("/") or DATABASE, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]  # fmt: skip
    return subprocess.run(cmd, env={**os.environ, "PGPASSWORD": u.password or ""}, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def main(folder: str | None, port: int) -> int:
    """``sparseflow postgres``: start the cluster, print its URL, run until SIGTERM / Ctrl-C."""
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    cluster = Cluster(folder, port)
    try:
        cluster.start()
    except PostgresError as exc:
        print(f"sparseflow postgres: {exc}", file=sys.stderr)
        return 1
    print(f"sparseflow postgres: PostgreSQL on 127.0.0.1:{port}, data in {cluster.data}; URL (with its password) in "
          f"{cluster.folder / URL_FILE}:\n  {mask(cluster.url)}\nStart Prefect on it:\n"
          f"  sparseflow server --database \"$(cat {cluster.folder / URL_FILE})\"", flush=True)  # fmt: skip
    try:
        while not stop["now"] and cluster.proc.poll() is None:
            time.sleep(0.2)
    finally:
        cluster.stop()
    print("sparseflow postgres: stopped", flush=True)
    return 0
