"""Fan-out speed-up and orchestration overhead, measured in one run.

    .venv/bin/python benchmarks/fanout.py [--train-subset 20000] [--epochs 4]

1. Four small independent training tasks (a 2 sparsities × 2 seeds ``rigl`` sweep on
   Fashion-MNIST, LeNet-5, one intra-op thread per task) run by ``sparseflow``'s sweep flow,
   sequentially and then on a local 2-worker Dask cluster (DaskTaskRunner, cluster start-up
   included). Prints both wall times, the ratio (target >= 1.6x on 2 cores) and whether the
   two runs wrote byte-identical weights and masks. For reference it also times the
   sequential sweep with torch's default thread count (faster per task, different bits), and
   the machine's own limit: one point alone against two at once on two warm Dask workers,
   without Prefect or start-up (plain ``Client.submit``).
2. The orchestration overhead of one no-op stage flow (a flow with one no-op task, as every
   stage has): in-process against a running server, and as a fresh process the way a DVC
   stage command starts one (target: under 3 s).

Starts its own Prefect server (``sparseflow server``) on a free loopback port, in a temporary
folder, and needs the data mirror (``SPARSEFLOW_DATA_MIRROR`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def prefect_server(home: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "sparseflow"), "server", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("Prefect server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def sweep(work: Path, env: dict, runner: str, points: list[tuple[float, int]]) -> float:
    """Wall seconds of ``sparseflow sweep`` with ``runner`` (a fresh runs/sweeps each time)."""
    shutil.rmtree(work / "runs" / "sweeps", ignore_errors=True)
    sparsities = sorted({s for s, _ in points})
    seeds = sorted({k for _, k in points})
    cmd = [str(BIN / "sparseflow"), "sweep", "--method", "rigl", "--sparsity", *map(str, sparsities), "--seeds", *map(str, seeds)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, env={**env, "SPARSEFLOW_TASK_RUNNER": runner}, check=True, capture_output=True)
    return time.perf_counter() - t0


def files(work: Path) -> dict[str, bytes]:
    root = work / "runs" / "sweeps"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


NOOP = """
import sys
import time
t0 = time.perf_counter()
from prefect import flow, task
@task
def noop_task():
    return None
@flow(name="noop-stage")
def noop_stage():
    noop_task()
t1 = time.perf_counter()
noop_stage()
t2 = time.perf_counter()
if len(sys.argv) > 1:  # a second run in the same process
    noop_stage()
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""


def _point(seed: int) -> float:
    """One sweep point trained in this process (1 thread); its wall seconds."""
    from sparse_core.config import load_params
    from sparse_core.stages import stage_sweep_point

    t0 = time.perf_counter()
    stage_sweep_point(load_params("params.yaml"), "rigl", 0.8, 100 + seed, 1)
    return time.perf_counter() - t0


def parallel_capacity(work: Path) -> tuple[float, float]:
    """The machine's own limit, without Prefect or start-up: one point alone, then two points
    at once on two warm Dask worker processes (plain ``Client.submit``)."""
    from distributed import Client, LocalCluster

    cwd = os.getcwd()
    os.chdir(work)
    try:
        alone = _point(0)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
            client.gather([client.submit(_point, s, pure=False) for s in (1, 2)])  # warm: imports, data cache
            t0 = time.perf_counter()
            client.gather([client.submit(_point, s, pure=False) for s in (3, 4)])
            pair = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    return alone, pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4, help="at least 2")
    args = ap.parse_args()
    mirror = os.environ.get("SPARSEFLOW_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory(prefix="sparseflow-fanout-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
        raw["data"]["train_subset"] = args.train_subset
        raw["train"]["epochs"] = args.epochs
        raw["train"]["edst"]["exploration_epochs"] = args.epochs - 1  # keeps the tiny profile's EDST check valid
        raw["train"]["edst"]["tickets"] = 1
        raw["base"]["num_threads"] = 1
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        env = {**os.environ, "SPARSEFLOW_DATA_MIRROR": mirror, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "PREFECT_HOME": str(Path(tmp) / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
        with prefect_server(Path(tmp) / "home") as api:
            env["PREFECT_API_URL"] = api
            subprocess.run([str(BIN / "sparseflow"), "run", "prepare"], cwd=work, env=env, check=True, capture_output=True)
            points = [(0.8, 0), (0.8, 1), (0.9, 0), (0.9, 1)]
            seq = sweep(work, env, "sequential", points)
            seq_files = files(work)
            dask = sweep(work, env, "dask", points)
            same = files(work) == seq_files
            raw["base"]["num_threads"] = 0
            (work / "params.yaml").write_text(yaml.safe_dump(raw))
            seq_default = sweep(work, env, "sequential", points)

            raw["base"]["num_threads"] = 1
            (work / "params.yaml").write_text(yaml.safe_dump(raw))
            os.environ["SPARSEFLOW_DATA_MIRROR"] = mirror
            alone, pair = parallel_capacity(work)

            noop = subprocess.run([sys.executable, "-c", NOOP, "twice"], env=env, capture_output=True, text=True, check=True)
            import_s, first_s, second_s = map(float, noop.stdout.split())
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", NOOP], env=env, capture_output=True, check=True)
            fresh = time.perf_counter() - t0

    print(f"cores: {os.cpu_count()}; {len(points)} rigl tasks ({args.train_subset} images x {args.epochs} epochs each)")
    print(f"sequential, 1 thread per task:         {seq:7.1f} s")
    print(f"Dask, 2 workers x 1 thread (incl. start-up): {dask:7.1f} s   speed-up {seq / dask:.2f}x (target >= 1.6x)")
    print(f"byte-identical weights and masks:       {same}")
    print(f"sequential, torch default threads:     {seq_default:7.1f} s   (Dask speed-up over it {seq_default / dask:.2f}x)")
    print(f"machine limit, no Prefect: 1 point alone {alone:.1f} s; 2 points at once on 2 warm workers {pair:.1f} s "
          f"-> at most {2 * alone / pair:.2f}x from 2 processes here")
    print(f"no-op stage flow, in-process: first {first_s:.2f} s, next {second_s:.2f} s (target < 3 s)")
    print(f"no-op stage flow as a fresh process, interpreter start to exit (what a DVC stage pays): {fresh:.2f} s, "
          f"of which importing Prefect {import_s:.2f} s")


if __name__ == "__main__":
    main()
