"""Kill-and-resume soak: SIGKILL a tiny training run at random points, resume it, compare.

    .venv/bin/python benchmarks/soak.py [--trials 20] [--seed 0] [--method dpf|rigl] [--json PATH]
    .venv/bin/python benchmarks/soak.py --smoke [--json PATH]   # about a minute: 1 trial, 2 epochs
                                                                 # on 600 images, 1 corruption, 2 OOD sets

Set-up (once, in a temporary project folder): the tiny profile adapted so that one run of
``--method`` trains for a few seconds over several epochs (``--epochs``, ``--train-subset``,
one intra-op thread, no progress bars), then ``prepare``, ``warmup``, ``ood`` and ``corrupt``.
The library source is copied into the folder and put first on ``PYTHONPATH``, so edits made to
the working tree while the soak runs cannot change the code under test halfway (the code
fingerprint in every checkpoint would change, and with it the results).

Reference: an uninterrupted child process (``benchmarks/_soak_child.py``: ``stage_train``,
then ``stage_evaluate``; evaluation costs well under a second here); sha256 of ``model.safetensors``, ``masks.safetensors``,
``layers.parquet``, ``mask_updates.parquet`` and ``metrics/<run>.json``. ``history.parquet``
and ``last.pt`` hold wall-clock timings and are not hashed; ``history.parquet`` without its
timing columns is compared separately (column ``hist``). The reference is run twice: if the two
differ, the run itself is not deterministic and the trial results mean nothing; the faster of
the two gives the expected duration and the timeline of writes used below.

Each trial starts from an empty run folder, launches the child and SIGKILLs it; kill kinds
cycle through:

``time``  uniformly random time within the reference's training duration (from the child's
          ``ready`` line, printed after imports, to ``done``; the faster reference run);
``write`` as soon as the k-th hidden temporary file (``.<name>.*.tmp`` from
          ``sparse_core.artifacts.atomic_path``, or another writer's staging file) appears in
          the run folder, k uniform over the writes seen in the reference but the last
          (checkpoints and exports), the folder polled in a tight loop: the kill lands during
          a checkpoint, Parquet or safetensors write. Very short writes can be missed, so a
          launch may end before its k-th (shown as ``ended``);
``step``  random time during the first epoch's training steps (from the reference timeline).

After every kill, every file of the run (run folder, ``metrics/<run>.json``, plots CSVs) is
opened under its final name and loaded completely (``torch.load(weights_only=True)``,
pyarrow, safetensors, json, pandas for CSV); a file that fails is *half-written*. Temporary
files (any hidden name) are counted separately; the notes say which write each kill hit. Half the trials (seeded) are killed a second time at a random
time during the resumed run. The last restart runs to completion; its files are scanned again
(``leftover temp files``: temporary files still in the run folder after the resumed run has
finished) and hashed against the reference.

Prints one row per trial and the summary lines ``identical to reference: N/<trials>``,
``half-written files found: K``, ``leftover temp files: T``, then three ``ratio:`` lines
(median [min..max] over trials; also written to ``--json``):

- ``resumed result identical to reference``: per trial 1 if every hashed file of the resumed
  run equals the reference's, else 0 (target >= 1.00x: every trial identical);
- ``files intact after kills``: per trial, files that loaded completely / files checked after
  its kill(s) and at its end (target >= 1.00x: no half-written file);
- ``killed+resumed / uninterrupted training time``: per trial, the seconds from ``ready`` to
  exit of all its launches (killed ones included) over the reference's (no target: what the
  kills cost, >= 1 when a resume redoes work).

Always exits 0 (a benchmark): the verdict is in the summary and the ``ratio:`` lines.

``--smoke`` (about a minute; proves the soak runs, its numbers mean nothing): one trial,
killed during its first epoch's steps (kind ``step``, so the kill always lands), 2 epochs on
the tiny profile's 600 training images, the set-up's corruption sets cut to one corruption at
one severity and the OOD sets to the synthetic ones; the reference is still run twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "_soak_child.py"
#: Compared byte for byte with the reference (those the run produces).
HASHED = ("model.safetensors", "masks.safetensors", "layers.parquet", "mask_updates.parquet")
#: history.parquet columns that hold wall-clock measurements.
TIMING_COLUMNS = ("seconds", "images_per_s")
KINDS = ("time", "write", "step")


def temp_kind(name: str) -> str:
    """What a hidden file was being written as: ``.<dest>.<random>.tmp`` -> ``<dest>``."""
    if name.endswith(".tmp") and name.count(".") >= 3:
        return name[1:].rsplit(".", 2)[0]
    if name.startswith(".tmp") and len(name) == 10:
        return "safetensors staging file"
    return f"{name} (written, not yet renamed)"


def is_temp(name: str) -> bool:
    """Not a final name: a temporary file of :func:`sparse_core.artifacts.atomic_path`
    (``.<name>.<random>.tmp``) or any other hidden staging file a writer renames into place."""
    return name.startswith(".")


# ----- project set-up ------------------------------------------------------------------------
def make_project(root: Path, method: str, epochs: int, train_subset: int, smoke: bool = False) -> tuple[Path, dict[str, str]]:
    """A project folder with an adapted tiny profile and a frozen copy of the library
    (``smoke``: the evaluation sets cut down to the least the run's evaluation reads)."""
    project = root / "project"
    project.mkdir()
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["base"].update(progress=False, num_threads=1, resume=True)
    raw["data"]["train_subset"] = train_subset
    raw["train"].update(epochs=epochs, methods=[method])
    raw["retrain"]["runs"] = []
    raw["evaluate"]["runs"] = [method]
    raw["collect"]["ensembles"] = []
    # Only the OOD sets the offline mirror holds: a missing one is skipped with a warning anyway.
    raw["ood"]["sets"] = {"fashion_mnist": ["mnist", "gaussian", "uniform"]}
    if smoke:
        raw["ood"]["sets"] = {"fashion_mnist": ["gaussian", "uniform"]}
        raw["ood"]["max_examples"] = 100
        raw["corrupt"].update(corruptions=["gaussian_noise"], severities=[1])
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code = root / "code"
    shutil.copytree(REPO / "sparse_core", code / "sparse_core", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "SPARSEFLOW_DATA_MIRROR": os.environ.get("SPARSEFLOW_DATA_MIRROR", str(REPO.parent / "shared" / "data")),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return project, env


# ----- one child process ---------------------------------------------------------------------
@dataclass
class Launch:
    """One child process: how it ended, and the temporary files seen while it ran."""

    killed: bool
    rc: int | None
    seconds: float  # from the child's "ready" line to its exit (or the kill)
    writes: list[tuple[float, str]] = field(default_factory=list)  # (seconds after ready, temp name)


def launch(project: Path, env: dict[str, str], method: str, log: Path, *, kill_after: float | None = None,
           kill_at_write: int | None = None, watch: bool = False, timeout: float = 600.0) -> Launch:  # fmt: skip
    """Run the child; SIGKILL it ``kill_after`` seconds after ``ready``, or as soon as the
    ``kill_at_write``-th distinct temporary file appears in the run folder. ``watch`` records
    every temporary file seen (the reference timeline). Neither: run to completion."""
    folder = project / "runs" / method
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), "train", method], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        try:
            line = proc.stdout.readline()  # blocks until "ready" (or the child died first)
            t0 = time.perf_counter()
            if line.strip() != "ready":
                proc.wait()
                return Launch(False, proc.returncode, 0.0)
            writes: list[tuple[float, str]] = []
            seen: set[str] = set()
            if kill_at_write is not None or watch:
                # Tight poll: an atomic write of these small files lasts a few milliseconds.
                while proc.poll() is None:
                    try:
                        names = [e.name for e in os.scandir(folder) if is_temp(e.name)]
                    except FileNotFoundError:  # not created yet, or being cleared
                        names = []
                    for name in names:
                        if name not in seen:
                            seen.add(name)
                            writes.append((time.perf_counter() - t0, name))
                    if kill_at_write is not None and len(seen) >= kill_at_write:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return Launch(True, proc.returncode, time.perf_counter() - t0, writes)
                    if time.perf_counter() - t0 > timeout:
                        break
            try:
                proc.wait(timeout=kill_after if kill_after is not None else timeout)
                return Launch(False, proc.returncode, time.perf_counter() - t0, writes)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return Launch(kill_after is not None, proc.returncode, time.perf_counter() - t0, writes)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


# ----- checks --------------------------------------------------------------------------------
def run_files(project: Path, method: str) -> list[Path]:
    """Every file the run writes: its folder, its metrics JSON and its plot CSVs."""
    files = [p for p in (project / "runs" / method).rglob("*") if p.is_file()]
    for folder, name in ((project / "metrics", f"{method}.json"), (project / "plots", f"{method}.csv")):
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and (p.name == name or p.name.startswith(f".{name}."))]
    return sorted(files)


def load_fully(path: Path) -> None:
    """Read ``path`` completely with the reader of its type; raises if it is damaged."""
    import pandas as pd
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    suffix = path.suffix
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"checkpoint holds a {type(obj).__name__}")
    elif suffix == ".parquet":
        pq.read_table(path).to_pandas()
    elif suffix == ".safetensors":
        load_file(str(path))
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".csv":
        pd.read_csv(path)  # weak: a CSV cut at a line end still parses
    else:
        raise ValueError(f"unexpected file type {suffix!r}")


#: File types :func:`load_fully` reads; a final name with another suffix is listed as "other".
KNOWN = (".pt", ".parquet", ".safetensors", ".json", ".csv")


@dataclass
class Scan:
    checked: int = 0
    half_written: list[str] = field(default_factory=list)  # "path: reason"
    temp: list[str] = field(default_factory=list)  # hidden (not final) names
    other: list[str] = field(default_factory=list)  # final names of unknown type (e.g. a quarantined *.bad)
    epoch: int | None = None  # newest epoch among the readable checkpoints (None: none)


def scan(project: Path, method: str) -> Scan:
    import torch

    out = Scan()
    epochs = []
    for path in run_files(project, method):
        rel = str(path.relative_to(project))
        if is_temp(path.name):
            out.temp.append(rel)
            continue
        if path.suffix not in KNOWN:
            out.other.append(rel)
            continue
        out.checked += 1
        try:
            load_fully(path)
        except Exception as exc:  # any failure to load under the final name counts
            out.half_written.append(f"{rel}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            continue
        if path.suffix == ".pt":
            epochs.append(int(torch.load(path, map_location="cpu", weights_only=True).get("epoch", 0)))
    out.epoch = max(epochs, default=None)
    return out


def fingerprints(project: Path, method: str) -> dict[str, str]:
    """sha256 of the hashed run files and the metrics JSON, plus history without timings."""
    import pandas as pd

    folder = project / "runs" / method
    out = {}
    for name in HASHED:
        if (folder / name).is_file():
            out[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    metrics = project / "metrics" / f"{method}.json"
    if metrics.is_file():
        out[f"metrics/{method}.json"] = hashlib.sha256(metrics.read_bytes()).hexdigest()
    if (folder / "history.parquet").is_file():
        hist = pd.read_parquet(folder / "history.parquet").drop(columns=list(TIMING_COLUMNS), errors="ignore")
        out["history (no timings)"] = hashlib.sha256(hist.to_json().encode()).hexdigest()
    return out


def clear_run(project: Path, method: str) -> None:
    shutil.rmtree(project / "runs" / method, ignore_errors=True)
    for path in run_files(project, method):
        path.unlink(missing_ok=True)


# ----- main ----------------------------------------------------------------------------------
def _when(launched: Launch | None) -> str:
    if launched is None:
        return "-"
    return f"{launched.seconds:.2f}" if launched.killed else "ended"


def _epoch(s: Scan) -> str:
    return "-" if s.epoch is None else str(s.epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="dpf", choices=["dpf", "rigl"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--second-kill", type=float, default=0.5, help="fraction of trials killed a second time")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.train_subset = 1, 2, 600  # 600: the tiny profile's own
    import pandas as pd

    results = Results("soak", args.smoke)

    rng = random.Random(args.seed)
    wall0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="sparseflow-soak-"))
    try:
        project, env = make_project(root, args.method, args.epochs, args.train_subset, args.smoke)
        log = root / "child.log"
        with open(log, "a") as err:
            setup = subprocess.run([sys.executable, str(CHILD), "setup"], cwd=project, env=env, stdout=err, stderr=err)
        if setup.returncode != 0:
            raise RuntimeError(f"set-up failed (rc {setup.returncode}); log {log}:\n{log.read_text()[-3000:]}")

        # Reference: uninterrupted, twice (the second also proves the run is deterministic). The
        # faster of the two gives the timeline (other load on the machine only slows a run).
        refs = []
        for _ in range(2):
            clear_run(project, args.method)
            ref = launch(project, env, args.method, log, watch=True)
            if ref.rc != 0:
                print(f"reference run failed (rc {ref.rc}); log {log}:\n{log.read_text()[-3000:]}")
                results.write(args.json)  # no ratio lines: the soak did not run
                return
            hist = pd.read_parquet(project / "runs" / args.method / "history.parquet")
            refs.append((ref, fingerprints(project, args.method), hist))
        ref_hash = refs[0][1]
        deterministic = refs[1][1] == ref_hash
        ref, _, hist = min(refs, key=lambda r: r[0].seconds)
        duration = ref.seconds
        writes = ref.writes
        ckpt_writes = [t for t, name in writes if ".pt." in name]
        first_ckpt = ckpt_writes[0] if ckpt_writes else duration / args.epochs
        # First epoch's steps: they end about one validation pass before the first checkpoint.
        step_window = (max(0.0, first_ckpt - float(hist["seconds"].iloc[0])), first_ckpt)
        print(f"project: {project} (code snapshot in {root / 'code'})")
        print(f"method {args.method}, {args.epochs} epochs, train_subset {args.train_subset}; reference: "
              f"{refs[0][0].seconds:.2f} s and {refs[1][0].seconds:.2f} s from ready to done, "
              f"{len(writes)} atomic writes seen in the run folder ({len(ckpt_writes)} checkpoints), "
              f"first epoch's steps {step_window[0]:.2f}-{step_window[1]:.2f} s")  # fmt: skip
        print(f"reference hashed: {', '.join(ref_hash)}")
        print(f"reference deterministic (two uninterrupted runs identical): {deterministic}")
        print()

        header = f"{'#':>2} {'kind':5} {'kill_s':>6} {'epoch':>5} {'2nd_s':>6} {'ep2':>3} {'half':>4} {'tmp@kill':>8} {'tmp_left':>8} {'hist':>4}  identical"
        print(header)
        print("-" * len(header))
        n_identical = n_half = n_temp_killed = n_temp_left = n_checked = n_not_killed = 0
        per_trial: dict[str, list[float]] = {"identical": [], "intact": [], "cost": []}
        kinds = ("step",) if args.smoke else KINDS  # smoke: one kill that lands within the run
        problems: list[str] = []
        notes: list[str] = []
        for trial in range(args.trials):
            kind = kinds[trial % len(kinds)]
            clear_run(project, args.method)
            if kind == "time":
                first = launch(project, env, args.method, log, kill_after=rng.uniform(0.0, duration))
            elif kind == "write":  # k-th write; the last one seen in the reference is left out
                first = launch(project, env, args.method, log, kill_at_write=rng.randint(1, max(len(writes) - 1, 1)))
            else:
                first = launch(project, env, args.method, log, kill_after=rng.uniform(*step_window))
            scans = [scan(project, args.method)]
            second = None
            if rng.random() < args.second_kill:
                second = launch(project, env, args.method, log, kill_after=rng.uniform(0.0, duration))
                scans.append(scan(project, args.method))
            final = launch(project, env, args.method, log, timeout=max(120.0, 20 * duration))
            end = scan(project, args.method)
            got = fingerprints(project, args.method) if final.rc == 0 else {}
            same = final.rc == 0 and all(got.get(k) == v for k, v in ref_hash.items() if k != "history (no timings)")
            hist_same = got.get("history (no timings)") == ref_hash.get("history (no timings)")
            half = sum(len(s.half_written) for s in scans) + len(end.half_written)
            temp_killed = len({t for s in scans for t in s.temp})  # a temp file seen twice counts once
            n_identical += same
            n_half += half
            n_temp_killed += temp_killed
            n_temp_left += len(end.temp)
            n_checked += sum(s.checked for s in scans) + end.checked
            n_not_killed += (not first.killed) + (second is not None and not second.killed)
            checked = sum(s.checked for s in scans) + end.checked
            per_trial["identical"].append(float(same))
            per_trial["intact"].append((checked - half) / checked if checked else 0.0)
            per_trial["cost"].append(sum(x.seconds for x in (first, second, final) if x is not None) / duration)
            for s in [*scans, end]:
                problems += [f"trial {trial}: half-written {h}" for h in s.half_written]
            problems += [f"trial {trial}: unexpected file {o}" for o in sorted({o for s in [*scans, end] for o in s.other})]
            problems += [f"trial {trial}: temp file left after the resumed run finished: {t}" for t in end.temp]
            if temp_killed:
                hit = sorted({temp_kind(Path(t).name) for s in scans for t in s.temp})
                notes.append(f"trial {trial}: killed during the write of {', '.join(hit)}")
            if final.rc != 0:
                problems.append(f"trial {trial}: resumed run failed (rc {final.rc}); see {log}")
            elif not same:
                diff = [k for k, v in ref_hash.items() if got.get(k) != v]
                problems.append(f"trial {trial}: differs from reference in {diff}")

            print(f"{trial:>2} {kind:5} {_when(first):>6} {_epoch(scans[0]):>5} {_when(second):>6} "
                  f"{_epoch(scans[1]) if second else '-':>3} {half:>4} {temp_killed:>8} {len(end.temp):>8} "
                  f"{'yes' if hist_same else 'NO':>4}  {'yes' if same else 'NO'}")  # fmt: skip
        print()
        print("kill_s / 2nd_s: seconds after the child's 'ready' line ('ended': it finished before the kill);")
        print("epoch / ep2: newest checkpoint epoch after the kill ('-': none); tmp@kill: hidden temp files after the kill(s);")
        print("tmp_left: temp files in the run folder after the resumed run finished; hist: history equal without timings")
        for line in notes + problems:
            print(f"  {line}")
        print()
        print(f"files checked (after kills and at the end): {n_checked}; launches that ended before their kill: {n_not_killed}")
        print(f"reference deterministic: {deterministic}")
        print(f"temp files right after kills: {n_temp_killed}")
        print(f"identical to reference: {n_identical}/{args.trials}")
        print(f"half-written files found: {n_half}")
        print(f"leftover temp files: {n_temp_left}")
        print(f"wall time: {time.perf_counter() - wall0:.1f} s")
        if args.smoke:
            print("smoke run: 1 trial on tiny sizes; the lines below prove the soak runs, they measure nothing")
        if args.trials:  # a ratio needs at least one trial
            results.ratio("resumed result identical to reference", per_trial["identical"], at_least=1.0)
            results.ratio("files intact after kills (loaded / checked)", per_trial["intact"], at_least=1.0)
            results.ratio("killed+resumed / uninterrupted training time", per_trial["cost"])
        results.write(args.json)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
