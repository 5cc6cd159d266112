"""What orchestration costs: one stage as a fresh process, and the share of a whole ``dvc repro``
spent outside stage work.

    .venv/bin/python benchmarks/orchestration.py [--rounds 5] [--profile NAME] [--json PATH]
    .venv/bin/python benchmarks/orchestration.py --repro [--profile tiny] [--workspace DIR] [--in-place [--force]] [--json PATH]
    .venv/bin/python benchmarks/orchestration.py --smoke [--json PATH]            # (a): 1 round, no warm-up, tiny profile
    .venv/bin/python benchmarks/orchestration.py --repro --smoke [--json PATH]    # (b): a cut-down tiny pipeline, in a copy

(a) Default: starts its own Prefect server (``sparseflow server``, free loopback port,
    temporary ``PREFECT_HOME``) and times fresh processes against it, interleaved over
    ``--rounds`` rounds after one discarded warm-up round; prints the median and the range:

    - the floors: ``python -c pass``, importing Prefect's flow and task (``from prefect import
      flow, task``), importing the CLI (``import flows.cli``);
    - the no-op stage: ``sparseflow run aggregate --run <model>`` with the library module that
      holds the work (``sparse_core.aggregate``) replaced by a stub whose ``stage_aggregate`` does
      nothing; everything else is the real command (argument parsing, params validation, the
      ``aggregate`` Prefect flow run with its task run, reporting to the server). Target <= 1.5 s;
    - the same with Prefect's flow-run heartbeats on (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=180``,
      Prefect 3.9's default, which stage processes turn off: ``flows.stage_flows.stage_settings``);
    - the real ``aggregate`` stage (``sparseflow run aggregate``) on per-seed metrics files this
      script writes: its work (from ``SPARSEFLOW_TIMINGS``) and the import of its library.

    Params: the workspace's ``params.yaml``, or ``profiles/NAME.yaml`` with ``--profile``.
    At the end it checks that the server holds one completed flow run per stage process run.

    ``ratio:`` lines (per round, median [min..max]): the no-op stage over its 1.5 s target
    (target <= 1.00x), the no-op stage with heartbeats on over off, and the real stage through
    the fork server over the real stage as a fresh process.

(b) ``--repro``: ``sparseflow with-server -- dvc repro --force`` (what ``make repro`` runs, every
    stage forced) in a temporary copy of the workspace (code, ``dvc.yaml``, ``.dvc``, profiles,
    ``params.yaml``, a fresh git repository; ``--profile NAME`` switches the copy's params
    first), so the real workspace is untouched. ``--in-place`` times ``make repro`` in the
    workspace itself instead (only stale stages run; ``--force`` runs the same commands with
    ``dvc repro --force``), which rewrites its outputs.

    Accounting is exact, from ``SPARSEFLOW_TIMINGS`` (:mod:`tasks.timing`): every stage task
    records the interval of its ``sparse_core`` work function and of the import of that
    library; every ``sparseflow run`` process records its own interval from its creation time
    (kernel) to the end of its command. Intervals are merged (union), so work that runs in
    parallel (fanned-out tasks) is not counted twice. Printed: wall time, stage work, and the
    rest ("orchestration", target <= 10% of wall) split into the library imports inside stage
    processes, the rest of the stage processes (interpreter, CLI, validation, Prefect flow and
    task runs), and the time outside any stage process (DVC's hashing, lock and cache writes,
    process start and exit, the Prefect server's start and stop); under the fork server that
    time is split further into the forked child's exit, the ``sparseflow run`` caller around
    the fork and the rest (DVC, the server). Also printed: the rest of a stage process per
    stage command (median) and the gaps between consecutive stage processes. ``ratio:`` line:
    the orchestration share, (wall - stage work) / wall (target <= 0.10x).

``--json PATH`` writes the ``ratio:`` lines to PATH (and a Markdown table beside it).
``--smoke`` (proves the script runs; its numbers mean nothing) never touches the checkout: the
params are ``profiles/tiny.yaml`` unless ``--profile`` names another. (a) runs one timed round
and no warm-up round (about a minute on a busy 2-core machine). (b) refuses ``--in-place`` and
reproduces a temporary copy whose tiny params are cut to one training run (``dpf``), no
retrain and no ensembles, one corruption at one severity and two OOD sets: nine stages, about
a minute and a quarter on a busy 2-core machine.

Needs the data mirror for ``--repro`` (``SPARSEFLOW_DATA_MIRROR`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from fanout import BIN, REPO, prefect_server  # noqa: E402  (one Prefect-server helper for the benchmarks)
from flows import forkserver  # noqa: E402

STUB_REPORT = """
import sys, types
stub = types.ModuleType("sparse_core.aggregate")  # the no-op work: nothing imported, nothing done
stub.stage_aggregate = lambda params, model: "noop"
sys.modules["sparse_core.aggregate"] = stub
from flows.cli import main
sys.exit(main())
"""

#: What a temporary copy of the workspace holds (as tests/test_pipeline_e2e.py copies it).
WORKSPACE_ITEMS = ("sparse_core", "tasks", "flows", "dvc.yaml", ".dvc", "analysis", "curves", "profiles", "params.yaml")


def read_params(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    """Wall seconds of ``cmd`` (a fresh process), start to exit.

    Raises:
        RuntimeError: the command failed (message ends with its output).
    """
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``[start, end]`` intervals (seconds)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def read_timings(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s  [{min(values):.2f} .. {max(values):.2f}]"


def _api_count(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ----- (a) one stage as a fresh process ---------------------------------------------------------
FORKED = "real stage through the fork server (with-server)"


NOOP = "no-op stage (target <= 1.5 s)"
NOOP_HEARTBEATS = "no-op stage, Prefect heartbeats on"


def stage_costs(rounds: int, profile: str | None, results: Results, warmup: int = 1) -> None:
    """(a), ``rounds`` timed rounds after ``warmup`` discarded ones (the first warms the
    server's database and the file cache)."""
    raw = read_params(REPO / "profiles" / f"{profile}.yaml" if profile else REPO / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="sparseflow-orch-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        model = raw["evaluate"]["runs"][0]
        seeds = raw["base"].get("seeds") or [raw["base"]["seed"]]
        for seed in seeds:  # what aggregate@<model> reads (sparse_core.aggregate.seed_metrics_path)
            path = work / raw["base"]["metrics_dir"] / "seeds" / f"s{seed}" / f"{model}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"test": {"accuracy": 0.9 + 0.01 * seed, "nll": 0.3}, "sparsity": 0.9}))
        timings, forked_timings = Path(tmp) / "timings.jsonl", Path(tmp) / "forked-timings.jsonl"
        sock = Path(tmp) / "fork.sock"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(Path(tmp) / "home"),
               "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
        env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
        env.pop("SPARSEFLOW_TIMINGS", None)
        py = sys.executable
        stage = ["run", "aggregate", "--run", model]
        real = f"real stage: sparseflow run aggregate --run {model}"
        variants = {
            "python -c pass (interpreter floor)": ([py, "-c", "pass"], {}),
            "from prefect import flow, task (Prefect floor)": ([py, "-c", "from prefect import flow, task"], {}),
            "import flows.cli (the CLI)": ([py, "-c", "import flows.cli"], {}),
            NOOP: ([py, "-c", STUB_REPORT, *stage], {}),
            NOOP_HEARTBEATS: ([py, "-c", STUB_REPORT, *stage], {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "180"}),
            real: ([str(BIN / "sparseflow"), *stage], {"SPARSEFLOW_TIMINGS": str(timings)}),
            FORKED: ([str(BIN / "sparseflow"), *stage], {"SPARSEFLOW_TIMINGS": str(forked_timings), forkserver.ENV: str(sock)}),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        stage_runs = 0
        with prefect_server(Path(tmp) / "home") as api:
            env["PREFECT_API_URL"] = api
            # The fork server that `sparseflow with-server` starts, with the environment of the
            # stage commands it serves (the same, or it refuses them).
            forks = subprocess.Popen([py, "-m", "flows.forkserver", str(sock)], cwd=work, env={**env, **variants[FORKED][1]},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            while not sock.exists():
                if forks.poll() is not None:
                    raise RuntimeError("the fork server did not start")
                time.sleep(0.2)
            for r in range(rounds + warmup):  # the warm-up rounds warm the server's database and the file cache
                names = list(variants)
                names = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
                for name in names:
                    cmd, extra = variants[name]
                    seconds = timed(cmd, work, {**env, **extra})
                    stage_runs += "run" in cmd
                    if r >= warmup:
                        times[name].append(seconds)
                if r == warmup - 1:
                    timings.unlink(missing_ok=True)
                    forked_timings.unlink(missing_ok=True)
            forks.terminate()
            forks.wait()
            flow_runs = _api_count(api, "flow_runs/filter", {"flow_runs": {"name": {"any_": [f"aggregate-{model}"]}}, "limit": 200})
            time.sleep(2)  # task runs arrive as events
            task_runs = _api_count(api, "task_runs/filter", {"limit": 200})
        records = read_timings(timings)
        work_s = [w["end"] - w["start"] for w in records if w["kind"] == "work"]
        import_s = [w["start"] - w["import_start"] for w in records if w["kind"] == "work"]
        forked = read_timings(forked_timings)
        forked_import_s = [w["start"] - w["import_start"] for w in forked if w["kind"] == "work"]
        forked_pids = {s["pid"] for s in forked if s["kind"] == "stage"}
    print(f"(a) one stage as a fresh process against a running Prefect server; {rounds} rounds (+{warmup} warm-up), "
          f"median [min .. max]; params: {profile or 'params.yaml'}; {os.cpu_count()} cores")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:55s} {spread(values)}")
    print(f"  real stage: its work {spread(work_s)}; importing its library (sparse_core.aggregate: pandas, ...) {spread(import_s)}")
    print(f"  through the fork server: importing its library {spread(forked_import_s)} (0: imported by the server) "
          f"in {len(forked_pids)} stage processes")  # fmt: skip
    completed = sum(r["state_type"] == "COMPLETED" for r in flow_runs)
    print(f"  server: {completed}/{len(flow_runs)} completed flow runs aggregate-{model} for {stage_runs} stage processes; "
          f"{sum(t['state_type'] == 'COMPLETED' for t in task_runs)} completed task runs")  # fmt: skip
    results.ratio("no-op stage / 1.5 s target", [t / 1.5 for t in times[NOOP]], at_most=1.0)
    results.ratio("no-op stage: heartbeats on / off wall time", [a / b for a, b in zip(times[NOOP_HEARTBEATS], times[NOOP])])
    results.ratio("real stage: fork server / fresh process wall time", [a / b for a, b in zip(times[FORKED], times[real])])


# ----- (b) a whole dvc repro ------------------------------------------------------------------------
def copy_workspace(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for item in WORKSPACE_ITEMS:
        path = src / item
        if path.is_dir():
            shutil.copytree(path, dest / item, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
        elif path.is_file():
            shutil.copy(path, dest / item)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


#: ``--repro --smoke``: the tiny profile cut to nine stages (one training run, no retrain, no
#: ensembles, one corruption at one severity, two OOD sets).
SMOKE_PARAMS = {
    ("train", "methods"): ["dpf"], ("retrain", "runs"): [], ("evaluate", "runs"): ["dpf"],
    ("collect", "ensembles"): [], ("corrupt", "corruptions"): ["gaussian_noise"], ("corrupt", "severities"): [1],
    ("ood", "sets"): {"fashion_mnist": ["mnist", "gaussian"]},
}  # fmt: skip


def repro(workspace: Path, profile: str | None, in_place: bool, force: bool, results: Results, smoke: bool = False) -> None:
    mirror = os.environ.get("SPARSEFLOW_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory(prefix="sparseflow-repro-") as tmp:
        timings, forked_timings = Path(tmp) / "timings.jsonl", Path(tmp) / "forked-timings.jsonl"
        sock = Path(tmp) / "fork.sock"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SPARSEFLOW_DATA_MIRROR": mirror,
               "SPARSEFLOW_TIMINGS": str(timings), "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        env.pop("PREFECT_API_URL", None)  # with-server starts its own, as make repro does
        sparseflow = str(BIN / "sparseflow")
        if in_place:
            work = workspace
            if profile:
                subprocess.run([sparseflow, "profile", profile], cwd=work, env=env, check=True)
            cmds = [[sparseflow, "validate"], [sparseflow, "with-server", "--", str(BIN / "dvc"), "repro", "--force"],
                    [str(BIN / "dvc"), "metrics", "show"]] if force else [["make", "repro"]]  # fmt: skip
        else:
            work = Path(tmp) / "work"
            copy_workspace(workspace, work)
            env["PREFECT_HOME"] = str(Path(tmp) / "home")
            if profile:
                subprocess.run([sparseflow, "profile", profile], cwd=work, env=env, check=True, capture_output=True)
            if smoke:
                raw = read_params(work / "params.yaml")
                for (section, key), value in SMOKE_PARAMS.items():
                    raw[section][key] = value
                (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
                subprocess.run([sparseflow, "validate"], cwd=work, env=env, check=True, capture_output=True)
            cmds = [[sparseflow, "with-server", "--", str(BIN / "dvc"), "repro", "--force"]]
        t0, wall = time.time(), 0.0
        for cmd in cmds:
            print(f"$ {' '.join(cmd)}   (in {work})", flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            wall += time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        t1 = time.time()
        records = read_timings(timings)
    report(records, wall, (t0, t1), profile, in_place, results)


def report(records: list[dict], wall: float, window: tuple[float, float], profile: str | None, in_place: bool,
           results: Results) -> None:  # fmt: skip
    def clip(a: float, b: float) -> tuple[float, float]:
        return max(a, window[0]), min(b, window[1])

    works = [w for w in records if w["kind"] == "work"]
    stages = [s for s in records if s["kind"] == "stage"]
    work = union([clip(w["start"], w["end"]) for w in works])
    work_and_imports = union([clip(w["import_start"], w["end"]) for w in works])
    in_stages = union([clip(s["start"], s["end"]) for s in stages])
    imports = work_and_imports - work
    other = wall - work
    n = len(stages)
    print(f"(b) {'make repro (in place)' if in_place else 'sparseflow with-server -- dvc repro --force (temporary copy)'}, "
          f"params: {profile or 'params.yaml'}; {n} stage processes ({sum(s['status'] != 0 for s in stages)} failed), "
          f"{len(works)} work calls; {os.cpu_count()} cores")  # fmt: skip
    print(f"  wall time                                   {wall:8.1f} s")
    print(f"  stage work (sparse_core functions, union)   {work:8.1f} s  {work / wall:6.1%}")
    print(f"  orchestration (wall - stage work)           {other:8.1f} s  {other / wall:6.1%}   (target <= 10%)")
    print(f"    library imports inside stages (torch...)  {imports:8.1f} s  {imports / wall:6.1%}   {imports / max(n, 1):.2f} s/stage")
    rest = in_stages - work_and_imports
    print(f"    rest of the stage processes               {rest:8.1f} s  {rest / wall:6.1%}   {rest / max(n, 1):.2f} s/stage"
          "   (interpreter, CLI, validation, Prefect flow/task runs)")  # fmt: skip
    outside = wall - in_stages
    print(f"    outside stage processes                   {outside:8.1f} s  {outside / wall:6.1%}   {outside / max(n, 1):.2f} s/stage"
          "   (DVC, process exit, server start/stop)")  # fmt: skip
    exits = [clip(r["start"], r["end"]) for r in records if r["kind"] == "child-exit"]
    callers = [clip(r["start"], r["end"]) for r in records if r["kind"] == "caller"]
    if callers:  # the fork server ran the stages: split the time outside them further
        stage_spans = [clip(s["start"], s["end"]) for s in stages]
        exiting = union(stage_spans + exits) - in_stages
        caller_only = union(stage_spans + exits + callers) - union(stage_spans + exits)
        dvc = outside - exiting - caller_only
        for label, value, what in (("forked stage's exit", exiting, "threads joined, atexit: Prefect's last logs and events"),
                                   ("caller around the fork", caller_only, "`sparseflow run` start, hand-over, wait"),
                                   ("neither (DVC, server)", dvc, "DVC between stages, server start/stop")):  # fmt: skip
            print(f"      {label:<38}  {value:8.1f} s  {value / wall:6.1%}   {value / max(n, 1):.2f} s/stage   ({what})")
    print_stage_breakdown(stages, works, clip)
    by_task: dict[str, list[tuple[float, float]]] = {}
    for w in works:
        by_task.setdefault(w["task"], []).append(clip(w["start"], w["end"]))
    parts = sorted(((union(v), k, len(v)) for k, v in by_task.items()), reverse=True)
    print("  stage work by task: " + ", ".join(f"{k} {s:.1f} s ({c})" for s, k, c in parts))
    results.ratio("orchestration share of wall time: (wall - stage work) / wall", [other / wall], at_most=0.10)


def print_stage_breakdown(stages: list[dict], works: list[dict], clip) -> None:  # noqa: ANN001 - clip: (a, b) -> (a, b)
    """Per stage command (``train``, ``evaluate``, ...): the median seconds of a stage process
    outside its library work and imports, and the median gap from the end of one stage process
    to the start of the next (DVC's work between stages, the previous child's exit)."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for w in works:
        by_pid.setdefault(w["pid"], []).append((w["import_start"], w["end"]))
    rest: dict[str, list[float]] = {}
    for s in stages:
        a, b = clip(s["start"], s["end"])
        inside = union([(max(x, a), min(y, b)) for x, y in by_pid.get(s["pid"], []) if min(y, b) > max(x, a)])
        rest.setdefault(s["stage"], []).append(b - a - inside)
    ordered = sorted(stages, key=lambda s: s["start"])
    gaps = [nxt["start"] - cur["end"] for cur, nxt in zip(ordered, ordered[1:]) if nxt["start"] > cur["end"]]
    print("  rest of a stage process by stage, median s (stages): "
          + ", ".join(f"{k} {statistics.median(v):.2f} ({len(v)})" for k, v in sorted(rest.items(), key=lambda kv: -sum(kv[1]))))
    if gaps:
        print(f"  gap between consecutive stage processes: median {statistics.median(gaps):.2f} s "
              f"[{min(gaps):.2f} .. {max(gaps):.2f}], {len(gaps)} gaps, {sum(gaps):.1f} s in all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="(a) timed rounds after the warm-up round")
    ap.add_argument("--profile", help="profiles/NAME.yaml instead of the workspace's params.yaml")
    ap.add_argument("--repro", action="store_true", help="(b) time a whole dvc repro instead of one stage")
    ap.add_argument("--workspace", type=Path, default=REPO, help="(b) the checkout to copy or run in (default: this one)")
    ap.add_argument("--in-place", action="store_true", help="(b) run make repro in the workspace itself (rewrites its outputs)")
    ap.add_argument("--force", action="store_true", help="(b) with --in-place: dvc repro --force instead of make repro")
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        if args.in_place:
            ap.error("--smoke runs in a temporary copy only: drop --in-place")
        args.rounds, args.profile = 1, args.profile or "tiny"
    results = Results("orchestration", args.smoke)
    if args.repro:
        repro(args.workspace.resolve(), args.profile, args.in_place, args.force, results, args.smoke)
    else:
        stage_costs(args.rounds, args.profile, results, warmup=0 if args.smoke else 1)
    results.write(args.json)


if __name__ == "__main__":
    main()
