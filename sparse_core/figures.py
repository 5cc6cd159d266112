"""Report figures (matplotlib, PNG, written atomically): every axis labelled, every figure
with more than one series has a legend."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sparse_core import artifacts, schemas  # noqa: E402
from sparse_core.config import Params  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


#: Marker cycle of the per-model figures; colours come from :func:`_colour`.
MARKERS = "osD^vP*Xh<>"


def _colour(i: int) -> tuple[float, float, float, float]:
    """The ``i``-th model's colour: matplotlib's 20-colour ``tab20`` palette in the order dark
    0, 2, …, 18 then light 1, 3, …, so up to 20 models never share a colour (the default cycle
    has 10, and the default profile reports 12 models)."""
    return plt.get_cmap("tab20")((2 * i) % 20 + (i // 10) % 2)


def _scatter(summary: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (model, row) in enumerate(summary.iterrows()):
        if not (pd.isna(row[x]) or pd.isna(row[y])):
            # Error bars: the std over seeds (columns "<header> std" of the summary), when present.
            err = {k: row.get(f"{c} std") for k, c in (("xerr", x), ("yerr", y))}
            err = {k: v for k, v in err.items() if v is not None and not pd.isna(v) and v > 0}
            ax.errorbar(row[x], row[y], **err, fmt=MARKERS[i % len(MARKERS)], color=_colour(i), ms=7, capsize=3, label=model)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def training_curves(params: Params, order: list[str], path: Path) -> None:
    """Validation accuracy per epoch of the warmup run and of each model in ``order`` (this
    profile's models only: a CSV left in ``plots/history/`` by another profile is not drawn)."""
    history = Path(params.base.plots_dir) / "history"
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for csv in [history / f"{name}.csv" for name in ["warmup", *order]]:
        if not csv.is_file():
            continue
        df = artifacts.read_csv(csv, schema=schemas.HISTORY_SCHEMA)
        if df.empty:  # a stage with zero epochs
            continue
        if "member" in df:
            for m, g in df.groupby("member"):
                ax.plot(g["epoch"], g["val_accuracy"], lw=1, alpha=0.7, label=f"{csv.stem} m{m}")
        else:
            ax.plot(df["epoch"], df["val_accuracy"], lw=1.5, label=csv.stem)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    _save(fig, path)


def reliability(params: Params, order: list[str], path: Path) -> None:
    folder = Path(params.base.plots_dir) / "reliability"
    frames = {m: artifacts.read_csv(folder / f"{m}.csv", schema=schemas.RELIABILITY_CSV_SCHEMA)
              for m in order if (folder / f"{m}.csv").is_file()}  # fmt: skip
    cols = min(len(frames), 5) or 1
    rows = math.ceil(max(len(frames), 1) / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.2 * cols, 5.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * rows})  # fmt: skip
    for ax in axes.ravel():
        ax.set_visible(False)
    for i, (model, df) in enumerate(frames.items()):
        r, c = 2 * (i // cols), i % cols
        top, bottom = axes[r, c], axes[r + 1, c]
        top.set_visible(True), bottom.set_visible(True)
        centers, width = (df["lower"] + df["upper"]) / 2, df["upper"] - df["lower"]
        top.bar(centers, df["accuracy"].fillna(0), width=width, edgecolor="black", lw=0.5, label="accuracy")
        top.bar(centers, (df["confidence"] - df["accuracy"]).fillna(0), bottom=df["accuracy"].fillna(0), width=width,
                color="tab:red", alpha=0.3, label="gap")  # fmt: skip
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        top.set_xlim(0, 1), top.set_ylim(0, 1)
        top.set_title(model, fontsize=9)
        top.set_xlabel("confidence")
        top.set_ylabel("accuracy")
        top.legend(fontsize=6, loc="upper left")
        bottom.bar(centers, df["count"] / df["count"].sum(), width=width, color="tab:gray", edgecolor="black", lw=0.5)
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("fraction")
    fig.suptitle("Reliability diagrams (test) and confidence histograms")
    fig.tight_layout()
    _save(fig, path)


def layer_density(params: Params, order: list[str], path: Path) -> None:
    tables = {}
    for model in order:
        f = Path(params.base.plots_dir) / "layers" / f"{model}.csv"
        if f.is_file():
            tables[model] = artifacts.read_csv(f, schema=schemas.LAYERS_CSV_SCHEMA).set_index("name")["density"]
    fig, ax = plt.subplots(figsize=(8, 4.4))
    if tables:
        df = pd.DataFrame(tables)
        x = np.arange(len(df))
        w = 0.8 / len(df.columns)
        for i, model in enumerate(df.columns):
            ax.bar(x + i * w - 0.4 + w / 2, df[model], width=w, label=model)
        ax.set_xticks(x, df.index, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("layer")
    ax.set_ylabel("density (fraction of weights kept)")
    ax.set_title("Per-layer density of the exported masks")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def corruption_accuracy(params: Params, order: list[str], path: Path) -> None:
    folder = Path(params.base.plots_dir) / "corruption"
    frames = [artifacts.read_csv(folder / f"{m}.csv", schema=schemas.CORRUPTION_CSV_SCHEMA)
              for m in order if (folder / f"{m}.csv").is_file()]  # fmt: skip
    frames = [f for f in frames if not f.empty]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    if frames:
        df = pd.concat(frames, ignore_index=True)
        heat = df.pivot_table(index="model", columns="corruption", values="accuracy").reindex([m for m in order if m in set(df["model"])])
        im = left.imshow(heat.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        left.set_xticks(range(heat.shape[1]), heat.columns, rotation=60, ha="right", fontsize=7)
        left.set_yticks(range(heat.shape[0]), heat.index, fontsize=8)
        fig.colorbar(im, ax=left, label="accuracy (mean over severities)")
        sev = df.pivot_table(index="severity", columns="model", values="accuracy")
        for i, model in enumerate(heat.index):
            right.plot(sev.index, sev[model], marker=MARKERS[i % len(MARKERS)], color=_colour(i), label=model)
        right.legend(fontsize=7)
    left.set_xlabel("corruption")
    left.set_ylabel("model")
    left.set_title("Accuracy per corruption")
    right.set_xlabel("severity")
    right.set_ylabel("accuracy (mean over corruptions)")
    right.set_title("Accuracy per severity")
    right.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def draw_all(params: Params, summary: pd.DataFrame, order: list[str], folder: Path) -> None:
    """Every figure of :data:`sparse_core.report.FIGURES` into ``folder``."""
    _scatter(summary, "Sparsity", "Accuracy", "sparsity (fraction of prunable weights = 0)", "test accuracy",
             "Accuracy vs sparsity", folder / "accuracy_vs_sparsity.png")  # fmt: skip
    _scatter(summary, "Training FLOPs ×", "NLL", "training FLOPs (× dense run)", "test NLL (nats)",
             "NLL vs training FLOPs", folder / "nll_vs_training_flops.png")  # fmt: skip
    training_curves(params, order, folder / "training_curves.png")
    reliability(params, order, folder / "reliability.png")
    layer_density(params, order, folder / "layer_density.png")
    corruption_accuracy(params, order, folder / "corruption_accuracy.png")


def accuracy_vs_sparsity_curves(summary: pd.DataFrame, dense: tuple[float, float, int] | None, path: Path) -> None:
    """One line per method (``summary``: method, sparsity, accuracy, accuracy_std), error bars =
    std over seeds, and the dense run's mean ± std as a grey band (the DPF paper's main figure)."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    markers = "osD^vP*X"
    for i, (method, g) in enumerate(summary.groupby("method", sort=False)):
        g = g.sort_values("sparsity")
        ax.errorbar(g["sparsity"], g["accuracy"], yerr=g["accuracy_std"], marker=markers[i % len(markers)], capsize=3,
                    ls="--" if method == "oneshot" else "-", label=method)  # fmt: skip
    if dense is not None:
        mean, std, n = dense
        ax.axhline(mean, color="grey", lw=1, label=f"dense (n = {n})")
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
    ax.set_xlabel("sparsity (fraction of prunable weights = 0)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)
