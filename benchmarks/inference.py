"""Inference speed of exported sparse models against their dense network, in one run.

Part 1, structured (``--format compact``): ResNet-20 (32x32x3, 10 classes) at 50% and 75%
filter sparsity, masks made here in two ways:

* ``aligned``: every writer of a stage's residual stream (stem / block ``conv2``) keeps the same
  channels, by the stage's summed filter L2 norm, and each inner ``conv1`` its own largest
  filters: the compact network is a plain narrower ResNet-20 (plus the option-A shortcut's
  carried channels);
* ``per-layer``: each layer keeps its own largest filters (``sparse_core.sparsity.filter_masks``,
  what structured dpf/gmp training produces): only the inner convolutions and the stage union
  shrink (see ``sparse_core/export.py``).

Beside them, the machine's own limit: a plain ResNet-20 of width 8 (4) built directly.
Each is timed at batch 1 (latency) and batch 256 (throughput) in fp32 and bf16
(``torch.autocast("cpu", dtype=torch.bfloat16)``), NCHW and channels_last, as a speed-up over
the dense ResNet-20 in the same precision and memory format, and as a fraction of the
FLOPs-ideal speed-up ``dense FLOPs / model FLOPs`` (``sparse_core.flops.layer_flops``).

Part 2, unstructured (``--format sparse``): LeNet-5 (28x28x1) and ResNet-20 at 90% global
magnitude sparsity: per layer, dense vs CSR time at batch 1 and 256
(``sparse_core.export.time_layers``: interleaved rounds, median) and where CSR wins, then the
whole model with every prunable layer in CSR and with the export's measured choice, against
dense (fp32 NCHW only: torch's CSR kernels are fp32).

Rounds interleave every model of a setting, in an order rotated each round; each ratio is taken
per round against that round's dense time; printed: median and spread (min..max) over rounds.
The whole-model ratios are also printed as ``ratio:`` lines (and recorded with ``--json``): each
speed-up over dense and, in part 1, each fraction of the FLOPs-ideal speed-up, with the target
``compact aligned 50%`` at batch 256: >= 70% of ideal (README, "Inference of exported models").
Part 2's per-layer table (medians of ``time_layers``, no per-round values) is printed only.

``--smoke`` (seconds; its numbers mean nothing): 1 round, 2 ms per timed block, fp32 NCHW only
(``--quick``), batch 8 in place of 256.

    flock /tmp/sparseflow-bench.lock python benchmarks/inference.py [--rounds 5] [--quick] [--part all] [--json PATH]
    python benchmarks/inference.py --smoke [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments  # noqa: E402

from sparse_core.export import choose_csr_layers, compact_model, sparsify_model, time_layers
from sparse_core.flops import layer_flops
from sparse_core.models import create_model
from sparse_core.models.resnet_cifar import CifarResNet
from sparse_core.sparsity import filter_masks, magnitude_masks, prunable_parameters

SHAPE = (3, 32, 32)
#: Part 1's target: this model at the large batch reaches >= 70% of its FLOPs-ideal speed-up.
IDEAL_TARGET = ("compact aligned 50%", 0.70)


def _bn_like_trained(model: nn.Module) -> nn.Module:
    """Nonzero BN shifts and non-unit statistics, so pruned channels carry constants as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def resnet20(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return _bn_like_trained(CifarResNet(20, 3, 10, width))


def _apply(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for n, p in prunable_parameters(model, False, True).items():
            p.mul_(keep[n].view(-1, *[1] * (p.dim() - 1)).to(p.dtype))
    return model


def per_layer_masks(model: nn.Module, sparsity: float) -> nn.Module:
    params = prunable_parameters(model, False, True)
    masks = filter_masks({n: p.detach() for n, p in params.items()}, sparsity)
    return _apply(model, {n: m.flatten(1)[:, 0] for n, m in masks.items()})


def aligned_masks(model: nn.Module, sparsity: float) -> nn.Module:
    """Dependency-aware filter masks: every writer of a stage's residual stream (stem / block
    ``conv2``) keeps the same channels, ranked by their summed filter L2 norms, and a stage
    keeps the channels its first shortcut carries in from the previous stage (option A places
    stage channel i at i + pad); each inner ``conv1`` keeps its own largest filters. The
    compact network then has the widths of a plain ResNet-20 of width (1 - S)·16."""
    blocks = list(model.layers)
    per_stage = len(blocks) // 3
    keep: dict[str, torch.Tensor] = {}
    carried: torch.Tensor | None = None
    for stage in range(3):
        writers = [f"layers.{b}.conv2" for b in range(stage * per_stage, (stage + 1) * per_stage)]
        if stage == 0:
            writers.insert(0, "conv1")
        score = sum(model.get_submodule(w).weight.detach().flatten(1).norm(dim=1) for w in writers)
        k = score.numel() - round(sparsity * score.numel())
        if carried is not None:
            score = score + carried.float() * (score.max() + 1.0)  # carried channels first
        top = torch.zeros_like(score, dtype=torch.bool)
        top[torch.topk(score, k).indices] = True
        keep.update({f"{w}.weight": top for w in writers})
        if stage < 2:
            # The next stage is twice as wide: option A pads C/2 zero channels on each side.
            carried = torch.zeros(2 * score.numel(), dtype=torch.bool)
            carried[torch.nonzero(top).flatten() + score.numel() // 2] = True
    for b, blk in enumerate(blocks):
        norms = blk.conv1.weight.detach().flatten(1).norm(dim=1)
        top = torch.zeros_like(norms, dtype=torch.bool)
        top[torch.topk(norms, norms.numel() - round(sparsity * norms.numel())).indices] = True
        keep[f"layers.{b}.conv1.weight"] = top
    return _apply(model, keep)


def flops(model: nn.Module, shape=SHAPE) -> float:
    return float(sum(layer_flops(model, shape).values()))


# ----- timing -----------------------------------------------------------------------------------
def _mode_ctx(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _prep(model: nn.Module, channels_last: bool) -> nn.Module:
    m = copy.deepcopy(model).eval()
    return m.to(memory_format=torch.channels_last) if channels_last else m


def time_models(models: dict[str, nn.Module], batch: int, bf16: bool, channels_last: bool, rounds: int,
                min_time_s: float, shape=SHAPE) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per forward call of each model, one entry per round (interleaved, rotated order)."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ready = {k: _prep(m, channels_last) for k, m in models.items()}
    reps: dict[str, int] = {}
    with torch.inference_mode(), _mode_ctx(bf16):
        for k, m in ready.items():  # warm-up + repetitions for ~min_time_s per timed block
            m(x)
            t0, r = time.perf_counter(), 0
            while r < 2 or time.perf_counter() - t0 < min_time_s / 3:
                m(x)
                r += 1
            reps[k] = max(1, round(r * min_time_s / (time.perf_counter() - t0)))
        out: dict[str, list[float]] = {k: [] for k in ready}
        names = list(ready)
        for i in range(rounds):
            order = names[i % len(names):] + names[: i % len(names)]
            for k in order:
                t0 = time.perf_counter()
                for _ in range(reps[k]):
                    ready[k](x)
                out[k].append((time.perf_counter() - t0) / reps[k])
    return out


def _ratios(times: dict[str, list[float]], ref: str) -> dict[str, list[float]]:
    return {k: [r / t for r, t in zip(times[ref], v)] for k, v in times.items()}


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):5.2f}x ({min(xs):.2f}..{max(xs):.2f})"


def part_structured(args, results: Results) -> None:
    dense = resnet20()
    f_dense = flops(dense)
    models: dict[str, nn.Module] = {"dense": dense}
    ideal: dict[str, float] = {"dense": 1.0}
    for s, width in ((0.5, 8), (0.75, 4)):
        for kind, fn in (("aligned", aligned_masks), ("per-layer", per_layer_masks)):
            masked = fn(resnet20(), s)
            comp, arch = compact_model(masked, SHAPE)
            x = torch.randn(4, *SHAPE)
            with torch.no_grad():
                diff = float((comp(x) - masked(x)).abs().max())
            name = f"compact {kind} {int(s * 100)}%"
            models[name] = comp
            ideal[name] = f_dense / flops(comp)
            widths = [b["out"] for b in arch["blocks"]][::3], [b["inner"] for b in arch["blocks"]][::3]
            print(f"{name:26s} stream widths/stage {widths[0]}, inner {widths[1]}, "
                  f"FLOPs {flops(comp) / 1e6:.2f}M (dense {f_dense / 1e6:.2f}M), |compact - masked| {diff:.1e}")
        plain = resnet20(width)
        models[f"plain width {width} ({int(s * 100)}%)"] = plain
        ideal[f"plain width {width} ({int(s * 100)}%)"] = f_dense / flops(plain)
    print()
    modes = [("fp32", False, False), ("fp32", False, True), ("bf16", True, False), ("bf16", True, True)]
    if args.quick:
        modes = modes[:1]
    for batch in args.batches:
        for prec, bf16, cl in modes:
            times = time_models(models, batch, bf16, cl, args.rounds, args.min_time * (4 if batch > 1 else 1))
            sp = _ratios(times, "dense")
            label = f"{prec} {'channels_last' if cl else 'NCHW'}"
            ms = statistics.median(times["dense"]) * 1e3
            unit = f"dense {ms:.2f} ms/call" + (f", {batch / (ms / 1e3):.0f} img/s" if batch > 1 else "")
            print(f"-- batch {batch}, {label} ({unit})")
            print(f"   {'model':26s} {'speed-up vs dense':>26s} {'FLOPs-ideal':>11s} {'of ideal':>9s}")
            for k in models:
                if k == "dense":
                    continue
                med = statistics.median(sp[k])
                print(f"   {k:26s} {_fmt(sp[k]):>26s} {ideal[k]:10.2f}x {100 * med / ideal[k]:8.0f}%")
            for k in models:
                if k == "dense":
                    continue
                at_least = IDEAL_TARGET[1] if k == IDEAL_TARGET[0] and batch == args.batches[-1] else None
                results.ratio(f"speed-up of {k} over dense (batch {batch}, {label})", sp[k])
                results.ratio(f"{k} fraction of the FLOPs-ideal speed-up (batch {batch}, {label})",
                              [v / ideal[k] for v in sp[k]], at_least=at_least)  # fmt: skip
        print()


def _unstructured(name: str, shape) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0], num_classes=10, image_size=shape[1])
    model = _bn_like_trained(model)
    params = prunable_parameters(model)
    masks = magnitude_masks({n: p.detach() for n, p in params.items()}, 0.9)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    return model


def part_unstructured(args, results: Results) -> None:
    for name, shape in (("lenet5", (1, 28, 28)), ("resnet20", SHAPE)):
        model = _unstructured(name, shape)
        layers = [n.removesuffix(".weight") for n in prunable_parameters(model)]
        batches = args.batches
        timings = time_layers(model, shape, layers, batches, rounds=1 if args.smoke else 3, min_time_s=args.min_time / 4)
        print(f"-- {name}, 90% unstructured (global magnitude): per layer dense / CSR time (> 1: CSR faster)")
        for lay in layers:
            row = [t for t in timings if t.layer == lay]
            cells = "  ".join(f"b{t.batch}: {t.speedup:5.2f}x ({t.dense_s * 1e6:8.1f} / {t.csr_s * 1e6:9.1f} us)" for t in row)
            print(f"   {lay:18s} density {row[0].density:.3f}  {cells}")
        chosen = choose_csr_layers(timings)
        print(f"   CSR wins (>= 1.1x at batch {batches[0]} and {batches[-1]}) in: {', '.join(chosen) or 'no layer'}")
        all_csr = sparsify_model(copy.deepcopy(model), layers)
        measured = sparsify_model(copy.deepcopy(model), chosen)
        models = {"dense": model, "sparse (all CSR)": all_csr, "sparse (measured)": measured}
        for batch in batches:
            if name == "resnet20" and batch > 1:
                del models["sparse (all CSR)"]  # seconds per call: its layers are timed above
            mt = args.min_time * (4 if batch > 1 else 1)
            rounds = args.rounds if batch == 1 or args.smoke else max(3, args.rounds // 2)
            times = time_models(models, batch, False, False, rounds, mt, shape)
            sp = _ratios(times, "dense")
            ms = statistics.median(times["dense"]) * 1e3
            print(f"   batch {batch:3d} fp32 NCHW (dense {ms:.2f} ms/call): "
                  + "; ".join(f"{k} {_fmt(sp[k])}" for k in models if k != "dense"))  # fmt: skip
            for k in models:
                if k != "dense":
                    results.ratio(f"speed-up of {name} 90% {k} over dense (batch {batch}, fp32 NCHW)", sp[k])
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timed block at batch 1 (x4 at 256)")
    ap.add_argument("--quick", action="store_true", help="fp32 NCHW only")
    ap.add_argument("--part", choices=["all", "structured", "unstructured"], default="all")
    add_common_arguments(ap)
    args = ap.parse_args()
    args.batches = (1, 256)
    if args.smoke:
        args.rounds, args.min_time, args.quick, args.batches = 1, 0.002, True, (1, 8)
    flags = ""
    with contextlib.suppress(OSError):
        cpu = open("/proc/cpuinfo").read()
        flags = " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in cpu)
        model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "?")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs: "
          f"{model_name if flags is not None else platform.processor()} [{flags}]; rounds {args.rounds}\n")  # fmt: skip
    t0 = time.time()
    results = Results("inference", args.smoke)
    if args.part in ("all", "structured"):
        part_structured(args, results)
    if args.part in ("all", "unstructured"):
        part_unstructured(args, results)
    print(f"total {time.time() - t0:.0f} s")
    results.write(args.json)


if __name__ == "__main__":
    main()
