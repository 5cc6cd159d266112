"""Shared fixtures: tiny in-memory data and models, the default params, the data mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sparse_core.data.loader import Split

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), give each worker its share of the
    cores: torch's default of one thread per core in every worker (and in every process a test
    starts, through ``OMP_NUM_THREADS``) would oversubscribe the machine. An explicit
    ``OMP_NUM_THREADS`` is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # not on macOS
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_cores_between_workers()


@pytest.fixture
def default_params_dict() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def mirror_path() -> Path:
    """The offline data mirror (``SPARSEFLOW_DATA_MIRROR``, else ``../shared/data``); fails the
    test when it lacks the data."""
    path = Path(os.environ.get("SPARSEFLOW_DATA_MIRROR", REPO.parent / "shared" / "data"))
    if not (path / "FashionMNIST" / "raw").is_dir():
        pytest.fail(f"data mirror {path} lacks FashionMNIST/raw; set SPARSEFLOW_DATA_MIRROR")
    return path


@pytest.fixture
def mirror() -> Path:
    """The offline data mirror (:func:`mirror_path`)."""
    return mirror_path()


class TinyNet(nn.Module):
    """Conv + BN + linear on (B, 1, 8, 8): small enough for exact step-by-step checks."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def make_split(n: int = 96, seed: int = 0, classes: int = 3) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    # Make the label visible in the pixels so training actually learns something.
    images[:, :, :2, :2] = (labels * 100).to(torch.uint8).view(-1, 1, 1, 1)
    return Split(images, labels)


def terminate(proc, timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` (a ``subprocess.Popen``), then SIGKILL after ``timeout`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_fork_server(work: Path, env: dict, timeout: float = 120.0):
    """Start ``python -m flows.forkserver`` (what ``sparseflow with-server`` starts) in project
    ``work`` with ``env`` (its own session, as there); returns ``(process, env)`` where the
    returned env also names its socket, so that ``sparseflow run`` hands stages to it. Waits
    until it listens.

    Raises:
        RuntimeError: it ended or did not listen within ``timeout`` seconds (with its log).
    """
    import subprocess
    import sys
    import time

    from flows import forkserver

    sock = work.parent / f"fork-{work.name}.sock"
    log = work.parent / f"fork-{work.name}.log"
    env = {**env, forkserver.ENV: str(sock)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.forkserver", str(sock)], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            terminate(proc)
            raise RuntimeError(f"fork server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, env


def _free_port() -> int:
    from flows.server import free_port

    return free_port()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free loopback port with its own SQLite home; yields the API URL.

    One server for the session: each flow run then connects in about a second instead of
    starting a temporary server of its own.
    """
    import shutil
    import subprocess
    import sys
    from flows.server import wait_until_healthy

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    sparseflow = shutil.which("sparseflow", path=str(Path(sys.executable).parent)) or "sparseflow"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    # The project's own command: a Prefect server on loopback with embedded SQLite.
    proc = subprocess.Popen([sparseflow, "server", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(url, proc, home / "server.log")
        yield url
    finally:
        terminate(proc)
        log.close()


#: Set by ``.ci/run``: a missing service (PostgreSQL, sshd) fails its tests instead of skipping them.
REQUIRE_SERVICES = os.environ.get("SPARSEFLOW_REQUIRE_SERVICES") == "1"


def need_service(what: str, why: str) -> None:
    """Skip (developer machine) or fail (CI, ``SPARSEFLOW_REQUIRE_SERVICES=1``) a test whose
    service ``what`` cannot run here for reason ``why``."""
    message = f"{what} unavailable: {why}"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_prefect(tmp_path_factory):
    """A real PostgreSQL server (``sparseflow postgres``, a throw-away cluster on a free loopback
    port) and a real Prefect server on it (``sparseflow server --database``); yields
    ``{"api": Prefect API URL, "db": database URL}``. Both are stopped by PID at the end."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    from flows.pgcluster import URL_FILE, PostgresError, bindir
    from flows.server import wait_until_healthy

    try:
        bindir()
    except PostgresError as exc:
        need_service("PostgreSQL", str(exc))
    sparseflow = str(Path(sys.executable).parent / "sparseflow")
    # Not under pytest's root-only temporary folder: the cluster runs as the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="sparseflow-test-pg-"))
    home = tmp_path_factory.mktemp("prefect-pg-home")
    pg_log = open(home / "postgres-cmd.log", "w")
    pg = subprocess.Popen([sparseflow, "postgres", "--dir", str(folder), "--port", str(_free_port())],
                          stdout=pg_log, stderr=subprocess.STDOUT)  # fmt: skip
    server = None
    try:
        deadline = time.monotonic() + 120
        while not (folder / URL_FILE).is_file() or "Start Prefect on it" not in (home / "postgres-cmd.log").read_text():
            assert pg.poll() is None, (home / "postgres-cmd.log").read_text()
            assert time.monotonic() < deadline, "sparseflow postgres did not start"
            time.sleep(0.3)
        db = (folder / URL_FILE).read_text().strip()
        port = _free_port()
        # A flow run queued behind a deployment's concurrency limit retries after this many
        # seconds (Prefect's default 30: the e2e test's second run sat idle 26 s after the first).
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        log = open(home / "server.log", "w")
        server = subprocess.Popen([sparseflow, "server", "--port", str(port), "--database", db], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        url = f"http://127.0.0.1:{port}/api"
        wait_until_healthy(url, server, home / "server.log", 180)
        yield {"api": url, "db": db}
    finally:
        if server is not None:
            terminate(server)
        terminate(pg, 60)
        pg_log.close()
        shutil.rmtree(folder, ignore_errors=True)


#: Test files whose tests take minutes, longest first (measured under ``make test``, 2026-12-01:
#: the e2e test 566 s, the WRN-28-10 profile 250 s, the experiment queue 122 s). tests/test_stop.py
#: is marked ``serial``: ``make test`` runs it alone, after the others.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_profiles_smoke.py", "test_exp_queue.py")


def pytest_collection_modifyitems(config, items):
    """Run the longest test files first. pytest-xdist hands tests out in this order, so a test
    of several minutes starts while the other workers still have short tests to take, instead
    of starting last and running alone. A stable sort: the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
