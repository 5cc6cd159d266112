"""The ``local_analysis`` stage (optional: ``dvc repro analysis/dvc.yaml``): the analyses of
Laskin et al. 2020 (Sec. 5, Figs. 3-6) on the configured dataset and model, small.

Outputs (atomic writes)::

    reports/local/sweep.csv          variant, batch_size, lr, steps (to target; empty if not reached),
                                     examples, training_flops, critical_path, pareto
    reports/local/accounting.csv     variant, inference, training, critical_path (+ ratios), per example;
                                     measured ms per step (simulation; pipeline: steady state) and
                                     the pipeline's wall time with process start-up
    reports/local/cosine.csv         variant, layer, block, window, cosine
    reports/local/random_labels.csv  variant, train_accuracy
    reports/local/*.png              steps_to_target, pareto, gradient_cosine, random_labels
    reports/local_analysis.json      the same numbers, nested by variant (a DVC metrics file; kept out
                                     of metrics/, which the main pipeline's report stage reads)

Every sweep point is independent and seeded (one Prefect task each in ``local_analysis_flow``).
The learning rate at batch size ``B`` is ``min(lr · B / 128, max_lr)`` (linear scaling,
Goyal et al. 2017). Training uses normalisation only (no augmentation).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sparse_core import artifacts  # noqa: E402
from sparse_core.config import Params  # noqa: E402
from sparse_core.data import BatchTransform, Split, load_prepared, prepared_path  # noqa: E402
from sparse_core.local.accounting import step_accounting  # noqa: E402
from sparse_core.local.analysis import (  # noqa: E402
    build_seeded,
    gradient_cosine,
    pareto_front,
    random_label_accuracy,
    steps_to_target,
)
from sparse_core.local.model import build_local  # noqa: E402



def _inputs(params: Params) -> tuple[Split, BatchTransform, tuple[int, int, int], int]:
    data = load_prepared(prepared_path(params.base.data_dir, params.data.dataset))
    train = data.splits["train"]
    n = min(params.local.analysis.train_subset, len(train))
    return Split(train.images[:n], train.labels[:n]), BatchTransform(data.mean, data.std), data.shape, data.num_classes


def _builder(params: Params, variant: str, shape: tuple[int, int, int], classes: int):
    lc = params.local
    return functools.partial(build_local, params.model.name, params.model.kwargs, shape, classes, variant, lc.chunks,
                             lc.split_points, lc.head, lc.head_hidden, params.base.seed)  # fmt: skip


def lr_for(params: Params, batch_size: int) -> float:
    a = params.local.analysis
    return min(a.lr * batch_size / 128, a.max_lr)


def sweep_point(params: Params, variant: str, batch_size: int) -> dict[str, Any]:
    """One point of the batch-size sweep (see :func:`sparse_core.local.analysis.steps_to_target`)."""
    train, tf, shape, classes = _inputs(params)
    a = params.local.analysis
    out = steps_to_target(_builder(params, variant, shape, classes), train, tf, batch_size, lr_for(params, batch_size),
                          a.target_loss, a.max_steps, params.base.seed)  # fmt: skip
    return {"variant": variant, "batch_size": batch_size, "lr": lr_for(params, batch_size), **out}


def measured_step_time(params: Params, variant: str, build, train: Split, tf: BatchTransform, steps: int = 20) -> dict[str, float]:
    """Measured wall-clock per step at batch 128 (3 warm-up steps first): the single-process
    simulation (median of ``steps`` steps, the process's own thread count) and, for local
    variants, the pipeline (one process per chunk, 1 thread each): its steady-state time per
    step, read from the last chunk's per-step clock stamps over the same ``steps`` steps
    (pipeline full; start-up, warm-up and the final drain excluded), and the whole run's wall
    time with process start-up."""
    import statistics
    import time

    from sparse_core.config import OptimSection
    from sparse_core.data import iterate_batches
    from sparse_core.local.analysis import _sgd, local_step
    from sparse_core.local.chunk_processes import PipelineSpec, run_pipeline

    warmup, drain = 3, 3
    local = build_seeded(build, params.base.seed)
    local.train()
    opt = _sgd(local, lr_for(params, 128))
    times, i, epoch = [], 0, 0
    while len(times) < steps:
        for x, y in iterate_batches(train, 128, tf, train=True, seed=params.base.seed, epoch=epoch):
            t0 = time.perf_counter()
            local_step(local, opt, x, y)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            i += 1
            if len(times) >= steps:
                break
        epoch += 1
    out = {"simulate_ms_per_step": 1000 * statistics.median(times)}
    if variant != "backprop":
        total = warmup + steps + drain
        spec = PipelineSpec(build=build, train=train, transform=tf, optim=OptimSection(batch_size=128, lr=lr_for(params, 128)),
                            epochs=-(-total * 128 // len(train)), seed=params.base.seed, max_steps=total)  # fmt: skip
        t0 = time.perf_counter()
        _, info = run_pipeline(spec)
        stamps = info["step_end"][-1]
        out["pipeline_ms_per_step"] = 1000 * (stamps[warmup + steps - 1] - stamps[warmup - 1]) / steps
        out["pipeline_wall_s"] = time.perf_counter() - t0
    return out


def side_analyses(params: Params) -> dict[str, pd.DataFrame]:
    """Accounting with measured step times, gradient cosine similarity (one batch of 256 at
    the seeded init) and random-label capacity for every variant."""
    train, tf, shape, classes = _inputs(params)
    a = params.local.analysis
    x = tf.normalize(train.images[:256])
    y = train.labels[:256]
    acc_rows, cos, rand = [], [], []
    m = min(a.random_label_examples, len(train))
    small = Split(train.images[:m], train.labels[:m])
    for variant in a.variants:
        build = _builder(params, variant, shape, classes)
        local = build_seeded(build, params.base.seed)
        acc = step_accounting(local, shape)
        acc_rows.append({"variant": variant, **{k: v for k, v in acc.items() if k != "per_window"},
                         **measured_step_time(params, variant, build, train, tf)})  # fmt: skip
        cos.append(gradient_cosine(local, x, y).assign(variant=variant))
        rand.append({"variant": variant, "train_accuracy": random_label_accuracy(
            build, small, tf, 64, lr_for(params, 64), a.random_label_epochs, params.base.seed)})  # fmt: skip
    return {"accounting": pd.DataFrame(acc_rows), "cosine": pd.concat(cos, ignore_index=True), "random_labels": pd.DataFrame(rand)}


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_analysis(params: Params, sweep_rows: list[dict[str, Any]], side: dict[str, pd.DataFrame]) -> Path:
    """Tables, figures and ``reports/local_analysis.json`` (module docstring; ``reports/`` is
    ``base.reports_dir``)."""
    out = Path(params.base.reports_dir) / "local"
    sweep = pd.DataFrame(sweep_rows).sort_values(["variant", "batch_size"]).reset_index(drop=True)
    reached = sweep["steps"].notna()
    sweep["pareto"] = False
    if reached.any():
        sweep.loc[reached, "pareto"] = pareto_front(sweep[reached], "training_flops", "critical_path").to_numpy(dtype=bool)
    artifacts.write_csv(sweep, out / "sweep.csv")
    for name, df in side.items():
        artifacts.write_csv(df, out / f"{name}.csv")
    a = params.local.analysis
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v, g in sweep.groupby("variant"):
        ax.plot(g["batch_size"], g["steps"], marker="o", label=v)
    ax.set_xscale("log", base=2)
    if reached.any():
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"steps to training loss {a.target_loss}")
    ax.set_title("Steps to target loss vs batch size")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out / "steps_to_target.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v, g in sweep[reached].groupby("variant"):
        ax.plot(g["training_flops"], g["critical_path"], marker="o", label=v)
    front = sweep[sweep["pareto"]].sort_values("training_flops")
    ax.plot(front["training_flops"], front["critical_path"], "k--", lw=1, label="Pareto frontier")
    if reached.any():
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("compute to target (training FLOPs)")
    ax.set_ylabel("idealised time to target (critical-path FLOPs)")
    ax.set_title("Compute vs time to reach the target loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out / "pareto.png")
    fig, ax = plt.subplots(figsize=(7, 4.4))
    cos = side["cosine"]
    layers = list(dict.fromkeys(cos["layer"]))
    width = 0.8 / max(cos["variant"].nunique(), 1)
    for i, (v, g) in enumerate(cos.groupby("variant", sort=False)):
        ax.bar([layers.index(layer) + i * width - 0.4 + width / 2 for layer in g["layer"]], g["cosine"], width=width, label=v)
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(local gradient, backprop gradient)")
    ax.set_title("Local vs true gradients at initialisation")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, out / "gradient_cosine.png")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rl = side["random_labels"]
    ax.bar(rl["variant"], rl["train_accuracy"], color="tab:purple")
    ax.set_xlabel("variant")
    ax.set_ylabel("training accuracy on random labels")
    ax.set_title(f"Capacity: {a.random_label_examples} randomly relabelled images, {a.random_label_epochs} epochs")
    ax.set_ylim(0, 1)
    _save(fig, out / "random_labels.png")
    metrics: dict[str, Any] = {}
    for v in a.variants:
        acc = side["accounting"].set_index("variant").loc[v]
        metrics[v] = {
            "training_ratio": float(acc["training_ratio"]),
            "critical_path_ratio": float(acc["critical_path_ratio"]),
            "random_label_accuracy": float(rl.set_index("variant").loc[v, "train_accuracy"]),
            "cosine_mean": float(cos[cos["variant"] == v]["cosine"].mean()),
            "steps_to_target": {f"b{int(r.batch_size)}": (int(r.steps) if pd.notna(r.steps) else -1)
                                for r in sweep[sweep["variant"] == v].itertuples()},  # fmt: skip
        }
    artifacts.write_json(metrics, Path(params.base.reports_dir) / "local_analysis.json")
    return out
