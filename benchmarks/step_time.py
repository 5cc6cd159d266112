"""Per-step training time of dpf, gmp, set and rigl relative to dense, dense relative to a plain
PyTorch loop, and (``--precisions``) dense in fp32 / channels-last / bf16 / bf16 + channels-last:
ResNet-20, 32x32x3, batch 128, all measured in one run.

Measured in one process with the engine's own ``train_one_epoch`` (augmentation, hooks,
non-finite check and optimizer included) on synthetic images, so only the methods' overhead
differs. ``plain`` is the loop every PyTorch tutorial writes (``zero_grad``, forward, loss,
``backward``, ``step``) on the same model and the same augmented batches: the engine's own
overhead (hooks, learning-rate setting, the per-step finite check and ``.item()``) is
``dense / plain``. Rounds interleave the setups, in an order rotated every round, to cancel
drift; each ratio is taken per round against that round's baseline, and the median and the
spread (min..max) over rounds are printed. Each timed block is ``--steps`` steps (32: two mask
updates at ΔT = 16 for dpf and gmp). For set and rigl the steps are timed without topology
updates and the measured cost of one update (grow scores + drop/grow of every layer) is
amortised over ``--dst-period`` steps (ΔT = 100 by default): ``step + update / ΔT``.

    python benchmarks/step_time.py [--device cpu] [--rounds 3] [--steps 32] [--precisions] [--json PATH]
    python benchmarks/step_time.py --smoke     # seconds: batch 8, 2 steps, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import time
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments, interleaved, print_rows, ratio_rows  # noqa: E402

from sparse_core.config import DSTSection, OptimSection, PruningSection  # noqa: E402
from sparse_core.data.loader import BatchTransform, Split, iterate_batches  # noqa: E402
from sparse_core.engine import make_optimizer, train_one_epoch  # noqa: E402
from sparse_core.methods import create_method  # noqa: E402
from sparse_core.models import create_model  # noqa: E402
from sparse_core.precision import Precision  # noqa: E402

METHODS = ("dense", "dpf", "gmp", "set", "rigl")
#: ``--precisions``: dense in each mode, as ratios to fp32 NCHW.
MODES = {"fp32": ("fp32", False), "fp32+cl": ("fp32", True), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dst-period", type=int, default=100)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="of the method comparison")
    ap.add_argument("--channels-last", action="store_true", help="of the method comparison")
    ap.add_argument("--precisions", action="store_true", help="also time dense in fp32, fp32+cl, bf16, bf16+cl")
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.batch_size, args.dst_period = 1, 2, 8, 4
    device = torch.device(args.device)
    precision = Precision(args.precision, args.channels_last, device.type)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
    transform = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=4, flip=True)
    optim = OptimSection(batch_size=args.batch_size, lr=0.1, schedule="constant")
    total = args.steps * (args.rounds + 1)
    pruning = PruningSection(sparsity=0.9, update_period=min(16, max(1, total // 4)), end_fraction=0.5)
    # Updates are timed separately, so no topology update falls inside a timed block.
    dst = DSTSection(sparsity=0.9, update_period=total + 1)

    def model_and_optimizer():
        torch.manual_seed(0)
        model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32).to(device)
        return model, make_optimizer(model, optim)

    blocks, setups, steps = {}, {}, {}

    def engine_block(name: str, method_name: str, prec: Precision):
        model, opt = model_and_optimizer()
        method = create_method(method_name, model, total, pruning, dst)
        method.bind_optimizer(opt)
        setups[name], steps[name] = (model, method, opt), 0

        def run(r: int) -> None:
            _, steps[name] = train_one_epoch(
                model, method, opt, split, transform, optim, epoch=r, epochs=args.rounds + 1, step=steps[name],
                seed=0, device=device, progress=False, precision=prec,
            )  # fmt: skip

        return run

    def plain_block():
        model, opt = model_and_optimizer()
        model.train()

        def run(r: int) -> None:
            for x, y in iterate_batches(split, args.batch_size, transform, train=True, seed=0, epoch=r, device=device):
                opt.zero_grad()
                with precision.autocast():
                    loss = F.cross_entropy(model(precision.inputs(x)), y)
                loss.backward()
                opt.step()

        return run

    blocks["plain"] = plain_block()
    for name in METHODS:
        blocks[name] = engine_block(name, name, precision)
    if args.precisions:
        for mode, (prec, cl) in MODES.items():
            blocks[f"dense@{mode}"] = engine_block(f"dense@{mode}", "dense", Precision(prec, cl, device.type))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved(blocks, args.rounds, sync)
    times = {k: [t / args.steps for t in v] for k, v in times.items()}
    update_cost = {}
    for name in ("set", "rigl"):
        model, method, _ = setups[name]
        costs = []
        for _ in range(5):  # .grad still holds the last minibatch's dense gradient
            t0 = time.perf_counter()
            method.update_topology(0, 0.3, method.grow_scores())
            costs.append(time.perf_counter() - t0)
        update_cost[name] = statistics.median(costs)
        times[name] = [t + update_cost[name] / args.dst_period for t in times[name]]
    print(f"ResNet-20, 32x32x3, batch {args.batch_size}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, methods in "
          f"{precision.name}{' + channels_last' if precision.channels_last else ''}")  # fmt: skip
    for name, cost in update_cost.items():
        print(f"{name}: one topology update {cost:.4f} s, amortised over ΔT = {args.dst_period}")
    results = Results("step_time", args.smoke)
    print("\nMethods, step time as a ratio to dense (target <= 1.05):")
    print_rows(ratio_rows({k: times[k] for k in METHODS}, "dense"), "s/step", "x dense")
    results.compare({k: times[k] for k in METHODS}, "dense", "step time", at_most=1.05)
    print("\nThe engine against a plain PyTorch loop (target: dense within 3%):")
    print_rows(ratio_rows({k: times[k] for k in ("plain", "dense")}, "plain"), "s/step", "x plain")
    results.compare({k: times[k] for k in ("plain", "dense")}, "plain", "step time", at_most=1.03)
    if args.precisions:
        print("\nDense in each precision and memory format, speed-up over fp32 NCHW:")
        print_rows(ratio_rows({k: times[f"dense@{k}"] for k in MODES}, "fp32", invert=True), "s/step", "speed-up")
        results.compare({k: times[f"dense@{k}"] for k in MODES}, "fp32", "speed-up (dense)", invert=True)
    results.write(args.json)


if __name__ == "__main__":
    main()
