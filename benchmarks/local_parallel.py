"""Is the local pipeline actually parallel? Throughput of a two-chunk pipeline on 2 processes
against single-process backprop and against the machine's own limit, all in one run.

    .venv/bin/python benchmarks/local_parallel.py [--model resnet20] [--batch-size 128]
        [--rounds 4] [--steps 8] [--warmup 3] [--chunks 2] [--simulate] [--json PATH]
    .venv/bin/python benchmarks/local_parallel.py --smoke     # seconds: batch 8, 1 round of 1 step

Setups (every one in fresh processes, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before torch
is imported, the same synthetic uint8 images through the project's data path,
:func:`sparse_core.data.iterate_batches` with random crop and flip, at ``--batch-size``):

1. ``backprop, 1 thread``: one process, plain SGD step (zero_grad, forward, cross-entropy,
   backward, step) of the whole network;
2. ``backprop, 2 threads``: the same with 2 intra-op threads;
3. ``pipeline, 2 x 1 thread``: :func:`sparse_core.local.chunk_processes.run_pipeline`, ``chunked``
   with ``--chunks`` chunks split at :func:`sparse_core.local.accounting.flops_balanced_split_points`
   (linear auxiliary heads), one process per chunk, 1 thread each;
4. ``2 x backprop, 1 thread each`` (the machine's limit): two independent copies of setup 1
   timed over the same interval; their summed throughput against setup 1 alone is what two
   processes can get out of this machine at all;
5. (``--measured``) the pipeline again, split at
   :func:`sparse_core.local.accounting.measured_balanced_split_points` (block step times
   measured in this process at 1 thread before the rounds);
6. (``--simulate``) ``simulation, 1 thread``: the same chunked local training in one process
   (:meth:`LocalNet.local_losses`), the single-process reference of the pipeline.

Timing: each process trains ``--warmup`` untimed steps, then ``--steps`` timed steps. The
backprop processes wait for a "go" after warm-up, so the two copies of setup 4 start the timed
steps together, and they keep training until both have reported, so neither runs alone while
the other is timed. The pipeline's rate is read from the last chunk's per-step clock stamps
(steps ``warmup .. warmup + steps``, the pipeline full, process start-up and the final drain
excluded); its wall time with start-up is printed too. Rounds run the setups in an order
rotated every round; every ratio is taken per round (paired) and its median and spread
(min..max) over rounds are printed.

The pipeline trains with local losses (one auxiliary head per chunk but the last), so its
work per image is not exactly backprop's: the training FLOPs per image of both
(:func:`sparse_core.local.accounting.step_accounting`, 3 x forward multiply-accumulates) are
printed beside the images/s, and the FLOP-rate ratio as well.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments  # noqa: E402

SHAPES = {"resnet20": (3, 32, 32), "resnet32": (3, 32, 32), "resnet56": (3, 32, 32), "lenet5": (1, 28, 28),
          "lenet_300_100": (1, 28, 28), "vgg16": (3, 32, 32)}  # fmt: skip
SETUPS = {"bp1": "backprop, 1 thread", "bp2": "backprop, 2 threads", "pipe": "pipeline, 2 x 1 thread",
          "pipem": "pipeline (measured split), 2 x 1 thread",
          "pair": "2 x backprop, 1 thread each", "sim1": "simulation, 1 thread"}  # fmt: skip


def _data(model: str, batch_size: int, batches: int = 16):
    import torch

    from sparse_core.data import BatchTransform, Split

    c, h, w = SHAPES[model]
    g = torch.Generator().manual_seed(0)
    n = batch_size * batches
    split = Split(torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g))
    crop = 4 if h == 32 else 0
    return split, BatchTransform([0.5] * c, [0.25] * c, crop_padding=crop, flip=crop > 0)


def _builder(model: str, variant: str, split_points: list[int] | None, chunks: int):
    from sparse_core.local.model import build_local

    return functools.partial(build_local, model, {}, SHAPES[model], 10, variant, chunks, split_points, "linear", 128, 0)


def split_points(model: str, chunks: int, balance: str = "flops", batch_size: int = 128) -> list[int]:
    import torch

    from sparse_core.local.accounting import flops_balanced_split_points, measured_balanced_split_points
    from sparse_core.models import create_model

    torch.manual_seed(0)
    c, h, _ = SHAPES[model]
    net = create_model(model, in_channels=c, num_classes=10, image_size=h)
    if balance == "flops":
        return flops_balanced_split_points(net, SHAPES[model], chunks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every pipeline process
    try:
        return measured_balanced_split_points(net, SHAPES[model], chunks, batch_size)
    finally:
        torch.set_num_threads(threads)


# ----- child: one training process answering "go" / "stop" on stdin ------------------------------
def child(kind: str, model: str, batch_size: int, warmup: int, steps: int, points: list[int], chunks: int) -> None:
    import torch
    import torch.nn.functional as F

    from sparse_core.data import iterate_batches

    split, transform = _data(model, batch_size)
    torch.manual_seed(0)
    local = _builder(model, "chunked" if kind == "simulate" else "backprop", points, chunks)()
    local.train()
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def batches():
        epoch = 0
        while True:
            yield from iterate_batches(split, batch_size, transform, train=True, seed=0, epoch=epoch)
            epoch += 1

    def step(x, y) -> None:
        opt.zero_grad(set_to_none=True)
        if kind == "simulate":
            losses, _ = local.local_losses(x, y)
            torch.stack(losses).sum().backward()
        else:
            F.cross_entropy(local(x), y).backward()
        opt.step()

    it = batches()
    for _ in range(warmup):
        step(*next(it))
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "images": steps * batch_size, "threads": torch.get_num_threads()}), flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:  # keep the machine as busy until "stop"
        step(*next(it))


def _spawn(kind: str, threads: int, args: argparse.Namespace, points: list[int]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--chunks", str(args.chunks),
           "--points", json.dumps(points)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)


def _expect(proc: subprocess.Popen, word: str | None = None) -> str:
    line = proc.stdout.readline()
    if not line or (word is not None and line.strip() != word):
        proc.kill()
        raise RuntimeError(f"benchmark child ended or answered {line!r} (expected {word or 'a result'})")
    return line


def run_processes(kind: str, threads: int, copies: int, args: argparse.Namespace, points: list[int]) -> float:
    """Images per second of ``copies`` processes trained at once (summed)."""
    procs = [_spawn(kind, threads, args, points) for _ in range(copies)]
    try:
        for p in procs:
            _expect(p, "ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(_expect(p)) for p in procs]
        for p in procs:
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(r["threads"] != threads for r in results):
        raise RuntimeError(f"a child ran with {[r['threads'] for r in results]} threads, expected {threads}")
    return sum(r["images"] / r["seconds"] for r in results)


def run_pipe(args: argparse.Namespace, points: list[int]) -> dict:
    from sparse_core.config import OptimSection
    from sparse_core.local.chunk_processes import PipelineSpec, run_pipeline

    split, transform = _data(args.model, args.batch_size)
    tail = 3  # steps after the timed ones: the last chunk's timed steps never run with the others idle
    total = args.warmup + args.steps + tail
    per_epoch = len(split) // args.batch_size
    spec = PipelineSpec(build=_builder(args.model, "chunked", points, args.chunks), train=split, transform=transform,
                        optim=OptimSection(batch_size=args.batch_size, lr=0.05, momentum=0.9, weight_decay=5e-4,
                                           schedule="constant"),
                        epochs=-(-total // per_epoch), seed=0, max_steps=total, threads=1)  # fmt: skip
    t0 = time.monotonic()
    _, info = run_pipeline(spec)
    wall = time.monotonic() - t0
    stamps = info["step_end"][-1]
    w, s = args.warmup, args.steps
    seconds = stamps[w + s - 1] - stamps[w - 1]
    return {"images_per_s": s * args.batch_size / seconds, "wall_s": wall, "steps": total,
            "startup_s": max(info["ready"]) - t0,
            "phases_ms": [{k: 1000 * v / info["steps"] for k, v in ph.items()} for ph in info["phases"]],
            "cpu_ms": [1000 * c / info["steps"] for c in info["cpu_seconds"]]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=sorted(SHAPES))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setup and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--simulate", action="store_true", help="also time the single-process simulation (1 thread)")
    ap.add_argument("--measured", action="store_true",
                    help="also time the pipeline split by measured block times (measured_balanced_split_points, 1 thread)")
    ap.add_argument("--split-points", type=int, nargs="+", help="block indices where chunks 2..K start (default: FLOPs-balanced)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--points", help=argparse.SUPPRESS)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.batch_size, args.rounds, args.steps, args.warmup = 8, 1, 1, 1
    if args.child:
        return child(args.child, args.model, args.batch_size, args.warmup, args.steps, json.loads(args.points), args.chunks)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--rounds, --steps and --warmup must be at least 1")

    import torch

    from sparse_core.local.accounting import step_accounting

    load0 = os.getloadavg()
    # Pipeline setups: name -> (split points, how they were chosen).
    pipelines = {"pipe": (args.split_points or split_points(args.model, args.chunks),
                          "given" if args.split_points else "FLOPs-balanced")}  # fmt: skip
    if args.measured:
        pipelines["pipem"] = (split_points(args.model, args.chunks, "measured", args.batch_size), "measured-time-balanced, 1 thread")
    acc_bp = step_accounting(_builder(args.model, "backprop", None, 1)(), SHAPES[args.model])
    points = pipelines["pipe"][0]  # of the simulation
    setups = ["bp1", "bp2", *pipelines, "pair"] + (["sim1"] if args.simulate else [])
    rates: dict[str, list[float]] = {k: [] for k in setups}
    runs: dict[str, list[dict]] = {k: [] for k in pipelines}
    t_start = time.monotonic()
    for r in range(args.rounds):
        for name in setups[r % len(setups):] + setups[: r % len(setups)]:
            if name in pipelines:
                runs[name].append(run_pipe(args, pipelines[name][0]))
                rates[name].append(runs[name][-1]["images_per_s"])
            else:
                kind = "simulate" if name == "sim1" else "backprop"
                threads = 2 if name == "bp2" else 1
                rates[name].append(run_processes(kind, threads, 2 if name == "pair" else 1, args, points))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), flush=True)
    minutes = (time.monotonic() - t_start) / 60

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b])]

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        rs = per_round(a, b)
        return statistics.median(rs), min(rs), max(rs)

    def fmt(t: tuple[float, float, float]) -> str:
        return f"{t[0]:.2f}x [{t[1]:.2f}..{t[2]:.2f}]"

    print()
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; load average (1 min) before {load0[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}; {args.rounds} rounds in {minutes:.1f} min")  # fmt: skip
    print(f"{args.model}, batch {args.batch_size}, input {'x'.join(map(str, SHAPES[args.model]))}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per setup and round; median [min..max] over rounds")  # fmt: skip
    print(f"training FLOPs per image (3 x forward MACs): backprop {acc_bp['training'] / 1e6:.2f} M")
    for name, (pts, how) in pipelines.items():
        chunked = _builder(args.model, "chunked", pts, args.chunks)()
        acc = step_accounting(chunked, SHAPES[args.model])
        windows = " | ".join(f"{w.start}-{w.end}" for w in chunked.windows)
        print(f"  {SETUPS[name]}: chunked, split points {pts} ({how}), blocks {windows}, linear heads: "
              f"{acc['training'] / 1e6:.2f} M ({acc['training_ratio']:.3f}x backprop), critical path "
              f"{acc['critical_path'] / 1e6:.2f} M (FLOPs-ideal speed-up {1 / acc['critical_path_ratio']:.2f}x)")  # fmt: skip
        pipelines[name] = (pts, how, acc["training"] / acc_bp["training"])
    print()
    print(f"{'setup':40s} {'images/s':>9s} {'spread':>17s}")
    for k in setups:
        v = rates[k]
        print(f"{SETUPS[k]:40s} {statistics.median(v):9.1f} {min(v):8.1f}..{max(v):<8.1f}")
    print()
    for name, (_, _, flop_ratio) in pipelines.items():
        p1, p2 = ratio(name, "bp1"), ratio(name, "bp2")
        print(f"{SETUPS[name]} / backprop 1 thread:  {fmt(p1)}  target >= 1.5x: {'met' if p1[0] >= 1.5 else 'NOT met'}"
              f"  (per training FLOP {p1[0] * flop_ratio:.2f}x)")  # fmt: skip
        print(f"{SETUPS[name]} / backprop 2 threads: {fmt(p2)}  target >= 1.1x: {'met' if p2[0] >= 1.1 else 'NOT met'}"
              f"  (per training FLOP {p2[0] * flop_ratio:.2f}x)")  # fmt: skip
        print(f"{SETUPS[name]} / machine limit:      {fmt(ratio(name, 'pair'))}")
        if args.simulate:
            print(f"{SETUPS[name]} / simulation 1 thread: {fmt(ratio(name, 'sim1'))}")
    print(f"machine limit: 2 independent 1-thread processes / 1 alone: {fmt(ratio('pair', 'bp1'))}")
    print(f"backprop 2 threads / 1 thread: {fmt(ratio('bp2', 'bp1'))}")
    print()
    results = Results("local_parallel", args.smoke)
    for name in pipelines:
        results.ratio(f"{SETUPS[name]} / backprop 1 thread (images/s)", per_round(name, "bp1"), at_least=1.5)
        results.ratio(f"{SETUPS[name]} / backprop 2 threads (images/s)", per_round(name, "bp2"), at_least=1.1)
        results.ratio(f"{SETUPS[name]} / machine limit (images/s)", per_round(name, "pair"))
        if args.simulate:
            results.ratio(f"{SETUPS[name]} / simulation 1 thread (images/s)", per_round(name, "sim1"))
    results.ratio("machine limit: 2 x 1-thread processes / 1 alone (images/s)", per_round("pair", "bp1"))
    results.ratio("backprop 2 threads / 1 thread (images/s)", per_round("bp2", "bp1"))
    for name in pipelines:
        mid = sorted(runs[name], key=lambda p: p["images_per_s"])[len(runs[name]) // 2]
        print()
        print(f"{SETUPS[name]} (median round): {mid['steps']} steps, wall {mid['wall_s']:.1f} s, of which process "
              f"start-up {mid['startup_s']:.1f} s (spawn, imports, process group, model); per step, all steps:")  # fmt: skip
        for k, ph in enumerate(mid["phases_ms"]):
            print(f"  chunk {k} ms: " + ", ".join(f"{n} {v:.1f}" for n, v in ph.items() if v >= 0.05)
                  + f"; CPU {mid['cpu_ms'][k]:.1f}")  # fmt: skip
    results.write(args.json)


if __name__ == "__main__":
    main()
