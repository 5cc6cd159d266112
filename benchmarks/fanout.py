"""Fan-out speed-up and orchestration overhead, measured in one run.

    .venv/bin/python benchmarks/fanout.py [--train-subset 20000] [--epochs 4] [--rounds 3] [--json PATH]
    .venv/bin/python benchmarks/fanout.py --smoke [--json PATH]   # 1 round, 600 images x 2 epochs

1. Four small independent training tasks (a 2 sparsities × 2 seeds ``rigl`` sweep on
   Fashion-MNIST, LeNet-5, one intra-op thread per task) run by ``sparseflow``'s sweep flow,
   sequentially and then on a local 2-worker Dask cluster (DaskTaskRunner, cluster start-up
   included). Prints both wall times, the ratio (target >= 1.6x on 2 cores) and whether the
   two runs wrote byte-identical weights and masks. For reference it also times the
   sequential sweep with torch's default thread count (faster per task, different bits), and
   the machine's own limit: one point alone against two at once on two warm Dask workers,
   without Prefect or start-up (plain ``Client.submit``). The four measurements (sequential,
   Dask, sequential with default threads, machine limit) run in interleaved rounds, in an
   order rotated every round; each ratio is taken per round and its median and spread
   (min..max) over rounds are printed, so load from other processes during one measurement
   does not decide a ratio. The Dask run's time beyond two warm pairs is printed as its
   overhead (cluster start-up, worker imports and data loading, Prefect task runs). A fifth
   measurement runs the same sweep on a long-lived 2-worker cluster started once (workers in
   the workspace folder, warmed by one untimed sweep), through ``SPARSEFLOW_DASK_ADDRESS``: what
   a user with a standing cluster (README, "Run on a cluster") pays per sweep.
2. The orchestration overhead of one no-op stage flow (a flow with one no-op task, as every
   stage has): in-process against a running server, and as a fresh process the way a DVC
   stage command starts one (target: under 3 s).

Every ratio is also printed as a ``ratio:`` line (median [min..max] over rounds, its target
where it has one) and written to ``--json``: the four sweep speed-ups above, the machine limit
(``2 x one point alone / two at once``), the best a 2-worker fan-out could do (``sequential /
2 warm pairs``) and the no-op stage flow's first in-process run against its 3 s target.

Starts its own Prefect server (``sparseflow server``) on a free loopback port, in a temporary
folder (the workspace is a fresh folder there holding only ``params.yaml``, from
``profiles/tiny.yaml``: nothing is run in the checkout), and needs the data mirror
(``SPARSEFLOW_DATA_MIRROR`` or ``../shared/data``). The checkout is found from this file, so
any working directory will do.

``--smoke`` (about a minute and a half on a busy 2-core machine; proves the script runs, its
numbers mean nothing): one round of the sequential and the Dask sweep, the tiny profile's 600
training images x 2 epochs, 2 points (one sparsity x 2 seeds), then the no-op stage flow. It
skips the sequential sweep with default threads, the standing cluster and the machine limit
(two more sweeps and two more cluster starts, beyond a smoke run's budget): their lines say
``skipped`` and their ratios are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments  # noqa: E402

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


def sweep(work: Path, env: dict, runner: str, points: list[tuple[float, int]], address: str | None = None) -> float:
    """Wall seconds of ``sparseflow sweep`` with ``runner`` (a fresh runs folder each time: a
    finished run left there would be resumed, not retrained)."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    sparsities = sorted({s for s, _ in points})
    seeds = sorted({k for _, k in points})
    cmd = [str(BIN / "sparseflow"), "sweep", "--method", "rigl", "--sparsity", *map(str, sparsities), "--seeds", *map(str, seeds)]
    env = {**env, "SPARSEFLOW_TASK_RUNNER": runner, **({"SPARSEFLOW_DASK_ADDRESS": address} if address else {})}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def files(work: Path) -> dict[str, bytes]:
    """Every safetensors file (weights, masks) of the sweep points (``runs/s<seed>/sweeps/...``)."""
    root = work / "runs"
    found = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("s*/sweeps/**/*.safetensors"))}
    if not found:
        raise RuntimeError(f"no sweep outputs under {root}: the byte-identity check would compare nothing")
    return found


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
    from sparse_core.jobs.sweeps import stage_sweep_point

    t0 = time.perf_counter()
    stage_sweep_point(load_params("params.yaml"), "rigl", 0.8, 100 + seed, 1)
    return time.perf_counter() - t0


def parallel_capacity(work: Path) -> tuple[float, float]:
    """The machine's own limit, without Prefect or start-up: one point alone, then two points
    at once on two warm Dask worker processes (plain ``Client.submit``)."""
    from distributed import Client, LocalCluster

    cwd = os.getcwd()
    os.chdir(work)
    shutil.rmtree(work / "runs", ignore_errors=True)  # finished points would be resumed, not retrained
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
    ap.add_argument("--rounds", type=int, default=3)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.train_subset, args.epochs, args.rounds = 600, 2, 1  # 600: the tiny profile's own
    results = Results("fanout", args.smoke)
    mirror = os.environ.get("SPARSEFLOW_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    load0 = os.getloadavg()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sparseflow-fanout-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
        raw["data"]["train_subset"] = args.train_subset
        raw["train"]["epochs"] = args.epochs
        raw["train"]["edst"]["budget"] = max(1.0, raw["train"]["edst"]["tickets"] / args.epochs)  # EDST's phases fit
        raw["train"]["edst"]["tickets"] = 1

        def threads(n: int) -> None:
            raw["base"]["num_threads"] = n
            (work / "params.yaml").write_text(yaml.safe_dump(raw))

        threads(1)
        env = {**os.environ, "SPARSEFLOW_DATA_MIRROR": mirror, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "PREFECT_HOME": str(Path(tmp) / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
        with prefect_server(Path(tmp) / "home") as api:
            env["PREFECT_API_URL"] = api
            subprocess.run([str(BIN / "sparseflow"), "run", "prepare"], cwd=work, env=env, check=True, capture_output=True)
            os.environ["SPARSEFLOW_DATA_MIRROR"] = mirror
            points = [(0.8, 0), (0.8, 1)] if args.smoke else [(0.8, 0), (0.8, 1), (0.9, 0), (0.9, 1)]
            t: dict[str, list[float]] = {"seq": [], "dask": [], "dask_warm": [], "seq_default": [], "alone": [], "pair": []}
            setups = ["seq", "dask", "dask_warm", "seq_default", "limit"]
            if args.smoke:  # two more sweeps and two more cluster starts: beyond a smoke run's budget
                setups = ["seq", "dask"]
                print("smoke run: skipping the sequential sweep with default threads, the standing cluster and the "
                      "machine limit", flush=True)  # fmt: skip
            from distributed import LocalCluster

            # The workers' working directory is the workspace and their environment the stages'
            # (as for `dask worker` started in a checkout).
            cwd = os.getcwd()
            os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOGGING_LEVEL", "PATH")})
            standing = None
            if "dask_warm" in setups:
                os.chdir(work)
                standing = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
                os.chdir(cwd)
                threads(1)
                sweep(work, env, "dask", points, standing.scheduler_address)  # warm: worker imports, data
            outputs: dict[str, dict[str, bytes]] = {}

            def run(name: str) -> None:
                if name == "limit":
                    threads(1)
                    alone, pair = parallel_capacity(work)
                    t["alone"].append(alone)
                    t["pair"].append(pair)
                    return
                threads(0 if name == "seq_default" else 1)
                runner = "dask" if name.startswith("dask") else "sequential"
                address = standing.scheduler_address if name == "dask_warm" else None
                t[name].append(sweep(work, env, runner, points, address))
                if name != "seq_default":
                    outputs.setdefault(name, files(work))

            def last(name: str) -> str:
                return f"{t[name][-1]:.1f} s" if t[name] else "skipped"

            for r in range(args.rounds):
                for name in setups[r % len(setups) :] + setups[: r % len(setups)]:
                    run(name)
                print(f"round {r + 1}/{args.rounds}: sequential 1 thread {last('seq')}, Dask {last('dask')}, "
                      f"Dask standing cluster {last('dask_warm')}, "
                      f"sequential default threads {last('seq_default')}, 1 point alone {last('alone')}, "
                      f"2 at once {last('pair')}", flush=True)  # fmt: skip
            threads(1)
            if standing is not None:
                standing.close()

            noop = subprocess.run([sys.executable, "-c", NOOP, "twice"], env=env, capture_output=True, text=True, check=True)
            import_s, first_s, second_s = map(float, noop.stdout.split())
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", NOOP], env=env, capture_output=True, check=True)
            fresh = time.perf_counter() - t0

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):6.1f} s [{min(xs):.1f}..{max(xs):.1f}]" if xs else "  skipped (smoke run)"

    def ratio(a: list[float], b: list[float]) -> tuple[float, str]:
        rs = [x / y for x, y in zip(a, b)]
        if not rs:
            return float("nan"), "skipped"
        return statistics.median(rs), f"{statistics.median(rs):.2f}x [{min(rs):.2f}..{max(rs):.2f}]"

    def verdict(value: float, target: float) -> str:
        if value != value:  # NaN: not measured
            return "skipped"
        return "smoke run, not a measurement" if args.smoke else ("met" if value >= target else "NOT met")

    speed, speed_s = ratio(t["seq"], t["dask"])
    speed_d, speed_d_s = ratio(t["seq_default"], t["dask"])
    speed_w, speed_w_s = ratio(t["seq"], t["dask_warm"])
    speed_wd, speed_wd_s = ratio(t["seq_default"], t["dask_warm"])
    _, limit_s = ratio([2 * a for a in t["alone"]], t["pair"])
    _, ideal_s = ratio(t["seq"], [2 * p for p in t["pair"]])
    overhead = [d - 2 * p for d, p in zip(t["dask"], t["pair"])]
    print()
    print(f"cores: {os.cpu_count()}; load average (1 min) before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} interleaved rounds in {(time.monotonic() - t_start) / 60:.1f} min; median [min..max] over rounds")  # fmt: skip
    print(f"{len(points)} rigl tasks ({args.train_subset} images x {args.epochs} epochs each), Prefect sweep flow:")
    print(f"sequential, 1 thread per task:               {med(t['seq'])}")
    print(f"Dask, 2 workers x 1 thread (incl. start-up): {med(t['dask'])}   speed-up {speed_s} "
          f"(target >= 1.6x: {verdict(speed, 1.6)})")  # fmt: skip
    print(f"sequential, torch default threads:           {med(t['seq_default'])}   Dask speed-up over it {speed_d_s} "
          f"(target >= 1.2x: {verdict(speed_d, 1.2)})")  # fmt: skip
    print(f"Dask, standing 2-worker cluster (warm):      {med(t['dask_warm'])}   speed-up {speed_w_s} over sequential "
          f"1 thread (target >= 1.6x: {verdict(speed_w, 1.6)}), {speed_wd_s} over default threads "
          f"(target >= 1.2x: {verdict(speed_wd, 1.2)})")  # fmt: skip
    print(f"byte-identical weights and masks (Dask vs sequential): {outputs.get('dask') == outputs.get('seq')}; "
          f"(standing cluster vs sequential): "
          f"{outputs.get('dask_warm') == outputs.get('seq') if 'dask_warm' in outputs else 'skipped'}")  # fmt: skip
    print(f"machine limit, no Prefect, warm workers: 1 point alone {med(t['alone'])}; 2 points at once {med(t['pair'])} "
          f"-> 2 processes give {limit_s} the throughput of one")  # fmt: skip
    print(f"best a 2-worker fan-out could do here (sequential / 2 warm pairs): {ideal_s}; the Dask run's excess over "
          f"2 warm pairs (cluster start-up, worker imports and data loading, Prefect task runs): {med(overhead)}")  # fmt: skip
    print(f"no-op stage flow, in-process: first {first_s:.2f} s, next {second_s:.2f} s (target < 3 s)")
    print(f"no-op stage flow as a fresh process, interpreter start to exit (what a DVC stage pays): {fresh:.2f} s, "
          f"of which importing Prefect {import_s:.2f} s")
    print()

    def per_round(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b)]

    for name, a, b, target in (
        ("Dask sweep speed-up over sequential (1 thread)", "seq", "dask", 1.6),
        ("Dask sweep speed-up over sequential (default threads)", "seq_default", "dask", 1.2),
        ("standing-cluster sweep speed-up over sequential (1 thread)", "seq", "dask_warm", 1.6),
        ("standing-cluster sweep speed-up over sequential (default threads)", "seq_default", "dask_warm", 1.2),
    ):  # fmt: skip
        if t[a] and t[b]:
            results.ratio(name, per_round(t[a], t[b]), at_least=target)
    if t["pair"]:
        results.ratio("machine limit: 2 x one point alone / two at once", per_round([2 * a for a in t["alone"]], t["pair"]))
        results.ratio("best 2-worker fan-out: sequential / 2 warm pairs", per_round(t["seq"], [2 * p for p in t["pair"]]))
    results.ratio("no-op stage flow in-process (first run) / 3 s target", [first_s / 3.0], at_most=1.0)
    results.write(args.json)


if __name__ == "__main__":
    main()
