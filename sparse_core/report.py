"""The ``report`` and ``aggregate`` stages: per-seed metrics -> mean ± std, paper claims with
confidence intervals and verdicts, one tidy metrics table, a markdown report and its figures.

Reads ``<metrics_dir>/seeds/s<seed>/<model>.json`` of every evaluated run and ensemble
(``evaluate.runs`` + ``collect.ensembles``) for every training seed (``base.seeds``), the plot
data written by the evaluate stages of the first seed (``<plots_dir>/seeds/s<seed>/...``) and
the OOD manifest, and writes (each file atomically; ``reports/`` is ``base.reports_dir``)::

    reports/metrics.parquet   one row per model × seed × dataset × metric (pandera: METRICS_SCHEMA)
    reports/summary.csv       one row per model: the results-table columns, mean and std over
                              seeds, and n (DVC scatter plots)
    reports/claims.json       per paper claim: verdict, n, mean difference and its 95% interval
                              (DVC metrics; :mod:`sparse_core.claims`)
    reports/report.md         results table (mean ± std), Claims, OOD table (with a warning row
                              per skipped set), corruption tables, figures
    reports/figures/*.png     accuracy_vs_sparsity (error bars: std over seeds),
                              nll_vs_training_flops, training_curves, reliability,
                              layer_density, corruption_accuracy (the last four: first seed)

``aggregate@<model>`` writes ``<metrics_dir>/<model>.json``: ``{"n", "seeds", "mean", "std",
"per_seed": {"s<seed>": ...}}`` (:func:`sparse_core.claims.aggregate`), so ``dvc metrics show``
and ``dvc metrics diff`` see every seed and the aggregate.

Tidy ``dataset`` values: ``test``, ``val``, ``corrupted`` (mean over corruptions and
severities), ``corrupted/<corruption>``, ``corrupted/severity_<k>``, ``ood/<set>``,
``ood/mean``, and ``model`` for properties of the model itself (sparsity, parameters, FLOPs).
``metric`` is the rest of the JSON key path joined by ``_`` (``msp_auroc``,
``flops_training_ratio``, ``member_m0_accuracy``...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from sparse_core import artifacts, claims, recipes, schemas
from sparse_core.aggregate import models, per_seed_metrics, seed_metrics_path
from sparse_core.config import Params, curve_points_path

FIGURES = ("accuracy_vs_sparsity", "nll_vs_training_flops", "training_curves", "reliability", "layer_density", "corruption_accuracy")

METRICS_SCHEMA = pa.DataFrameSchema(
    {
        "model": pa.Column(str, pa.Check.str_length(min_value=1)),
        "kind": pa.Column(str, pa.Check.isin(("run", "ensemble"))),
        "seed": pa.Column(int, pa.Check.ge(0)),
        "dataset": pa.Column(str, pa.Check.str_matches(r"^(test|val|model|corrupted(/[a-z0-9_]+)?|ood/[a-z0-9_]+)$")),
        "metric": pa.Column(str, pa.Check.str_length(min_value=1)),
        "value": pa.Column(float, pa.Check(lambda s: s.map(math.isfinite), error="metric values must be finite")),
    },
    checks=pa.Check(lambda df: not df.duplicated(["model", "seed", "dataset", "metric"]).any(),
                    error="duplicate (model, seed, dataset, metric)"),
    strict=True,
    coerce=False,
)

#: Results-table columns: (header, dataset, metric, format).
COLUMNS = (
    ("Accuracy", "test", "accuracy", "{:.4f}"),
    ("NLL", "test", "nll", "{:.4f}"),
    ("ECE", "test", "ece", "{:.4f}"),
    ("cAcc", "corrupted", "accuracy", "{:.4f}"),
    ("cNLL", "corrupted", "nll", "{:.4f}"),
    ("cECE", "corrupted", "ece", "{:.4f}"),
    ("OOD AUROC", "ood/mean", "msp_auroc", "{:.4f}"),
    ("Sparsity", "model", "sparsity", "{:.4f}"),
    ("Params", "model", "params_nonzero", "{:,.0f}"),
    ("Training FLOPs ×", "model", "flops_training_ratio", "{:.3f}"),
    ("Inference FLOPs ×", "model", "flops_inference_ratio", "{:.3f}"),
)


def _rows(model: str, kind: str, metrics: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def walk(prefix: list[str], value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk([*prefix, str(k)], v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            head, rest = prefix[0], prefix[1:]
            if head in ("test", "val"):
                dataset = head
            elif head == "corruption":
                if rest and rest[0] == "type":
                    dataset, rest = f"corrupted/{rest[1]}", rest[2:]
                elif rest and rest[0] == "severity":
                    dataset, rest = f"corrupted/severity_{rest[1].removeprefix('s')}", rest[2:]
                else:
                    dataset = "corrupted"
            elif head == "ood":
                dataset, rest = f"ood/{rest[0]}", rest[1:]
            else:
                dataset, rest = "model", prefix
            rows.append({"model": model, "kind": kind, "seed": seed, "dataset": dataset, "metric": "_".join(rest), "value": float(value)})

    walk([], metrics)
    return rows


def all_per_seed_metrics(params: Params) -> dict[str, dict[int, dict[str, Any]]]:
    """``{model: {seed: metrics}}`` of every evaluated run and ensemble."""
    return {model: per_seed_metrics(params, model) for model, _ in models(params)}


def tidy_metrics(params: Params, per_seed: dict[str, dict[int, dict[str, Any]]] | None = None) -> pd.DataFrame:
    """All models' metrics of every seed as one tidy table (validated by :data:`METRICS_SCHEMA`).

    Raises:
        FileNotFoundError: a model's metrics file is missing (its evaluate stage has not run).
    """
    per_seed = all_per_seed_metrics(params) if per_seed is None else per_seed
    rows = []
    for model, kind in models(params):
        for seed, metrics in per_seed[model].items():
            rows += _rows(model, kind, metrics, seed)
    df = pd.DataFrame(rows, columns=["model", "kind", "seed", "dataset", "metric", "value"]).astype({"seed": "int64"})
    return METRICS_SCHEMA.validate(df)


def summary_table(tidy: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per model with the results-table columns: the mean over seeds under each header,
    the sample std (ddof 1; 0 for one seed) under ``"<header> std"``, and ``n`` (seeds); NaN where
    a model lacks a value."""
    tidy = tidy.assign(key=tidy["dataset"] + ":" + tidy["metric"])
    grouped = tidy.groupby(["model", "key"])["value"]
    mean = grouped.mean().unstack()
    std = grouped.std(ddof=1).fillna(0.0).unstack()
    out = pd.DataFrame(index=order)
    for header, dataset, metric, _ in COLUMNS:
        key = f"{dataset}:{metric}"
        out[header] = mean[key].reindex(order) if key in mean else float("nan")
        out[f"{header} std"] = std[key].reindex(order) if key in std else float("nan")
    out["n"] = tidy.groupby("model")["seed"].nunique().reindex(order)
    out.index.name = "model"
    return out


def markdown_table(summary: pd.DataFrame) -> str:
    """The results table in markdown: ``mean ± std`` over seeds (the mean alone for one seed),
    ``—`` for a missing value, and the number of seeds n."""
    head = "| Model | n | " + " | ".join(h for h, *_ in COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(COLUMNS)]
    for model, row in summary.iterrows():
        n = int(row["n"]) if "n" in row and not pd.isna(row["n"]) else 1
        cells = []
        for h, _, _, fmt in COLUMNS:
            if pd.isna(row[h]):
                cells.append("—")
            elif n > 1 and f"{h} std" in row and not pd.isna(row[f"{h} std"]):
                cells.append(f"{fmt.format(row[h])} ± {fmt.format(row[f'{h} std'])}")
            else:
                cells.append(fmt.format(row[h]))
        lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_section(table: pd.DataFrame) -> str:
    """The Claims section of the report: what is compared, how, and the verdict table."""
    return "\n".join([
        "## Claims",
        "",
        "Each claim of the three papers that this profile can test, paired by seed: the difference is oriented so that "
        "a positive value favours the claim (for NLL, ECE and FLOPs lower is better), with a two-sided 95% Student-t "
        "interval over the per-seed differences (not a bootstrap). Verdicts: `>` holds when the interval is above 0 and "
        "is contradicted when it is below 0; `>=` (at least as good, within a margin δ) holds when the lower bound is "
        "above −δ and is contradicted when the upper bound is below −δ; `≈` holds when the interval lies within ±δ. "
        "δ = 0.005 of accuracy. Anything else, and any claim with one seed, is inconclusive; a claim whose models this "
        "profile does not train is not tested. Definitions: `sparse_core/claims.py`.",
        "",
        "\"± (decidable)\" is the interval's half-width, the smallest difference these seeds can tell from zero; an "
        "inconclusive verdict says about how many seeds the observed difference would need at the observed spread. "
        "\"Design vs paper\" lists every design ratio of this profile that differs from the paper's experiment "
        "(budgets, cadence, growth, drop settings; values and sources in `sparse_core/recipes.py`, per claim in "
        "`claims.json`); the verdict of such a claim carries \"(off-paper design)\": it is evidence about this "
        "design, not about the paper's.",
        "",
        claims.claims_markdown(table),
    ])  # fmt: skip


def _ood_section(params: Params, tidy: pd.DataFrame) -> str:
    manifest_path = Path(params.base.data_dir) / "ood" / params.data.dataset / "manifest.json"
    manifest = artifacts.read_json(manifest_path) if manifest_path.is_file() else []
    sets = [m["set"] for m in manifest if m["status"] == "ok"]
    lines = [
        "## Out-of-distribution detection",
        "",
        f"In-distribution: {params.data.dataset} test split. Higher score = in-distribution; AUROC / "
        "AUPR-in / AUPR-out / FPR at 95% TPR from scikit-learn. MSP: maximum softmax probability; "
        "entropy: predictive entropy; MI: mutual information (ensembles). Means over seeds.",
        "",
        "| Model | OOD set | score | AUROC | AUPR-in | AUPR-out | FPR@95 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    ood = tidy[tidy["dataset"].str.startswith("ood/") & (tidy["dataset"] != "ood/mean")]
    for (model, dataset), g in ood.groupby(["model", "dataset"], sort=False):
        values = dict(zip(g["metric"], g["value"]))
        for score in ("msp", "entropy", "mi"):
            if f"{score}_auroc" in values:
                cells = [f"{values[f'{score}_{m}']:.4f}" for m in ("auroc", "aupr_in", "aupr_out", "fpr95")]
                lines.append(f"| {model} | {dataset.removeprefix('ood/')} | {score} | " + " | ".join(cells) + " |")
    for m in manifest:
        if m["status"] != "ok":
            lines.append(f"| ⚠ all models | {m['set']} | — | skipped: set not available | — | — | {m['reason'][:120]} |")
    if not manifest:
        lines.append(f"| ⚠ all models | — | — | no OOD manifest at {manifest_path} | — | — | — |")
    lines += ["", f"Sets evaluated: {', '.join(sets) or 'none'}."]
    return "\n".join(lines)


def _corruption_section(params: Params, order: list[str]) -> str:
    frames = [_read_csv(Path(params.for_seed(seed).base.plots_dir) / "corruption" / f"{m}.csv")
              for seed in params.base.run_seeds() for m in order]  # fmt: skip
    df = pd.concat([f for f in frames if f is not None and not f.empty], ignore_index=True) if any(
        f is not None and not f.empty for f in frames
    ) else pd.DataFrame()
    if df.empty:
        return "## Corruption robustness\n\nNo corrupted sets were evaluated."
    manifest = Path(params.base.data_dir) / "corrupted" / params.data.dataset / "manifest.json"
    source = artifacts.read_json(manifest)["source"] if manifest.is_file() else "unknown"
    by_type = df.pivot_table(index="corruption", columns="model", values="accuracy").reindex(columns=order)
    by_sev = df.pivot_table(index="severity", columns="model", values="accuracy").reindex(columns=order)

    def table(t: pd.DataFrame, first: str) -> list[str]:
        out = [f"| {first} | " + " | ".join(t.columns) + " |", "|---|" + "---:|" * len(t.columns)]
        out += [f"| {i} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for i, row in t.iterrows()]
        return out

    return "\n".join(
        ["## Corruption robustness", "", f"Accuracy on the corrupted test subset ({source}), mean over seeds.", "", "### Per corruption (mean over severities)", ""]
        + table(by_type, "corruption")
        + ["", "### Per severity (mean over corruptions)", ""]
        + table(by_sev, "severity")
    )


def _read_csv(path: Path) -> pd.DataFrame | None:
    return artifacts.read_csv(path, schema=schemas.CORRUPTION_CSV_SCHEMA) if path.is_file() else None


def prepared_train_images(params: Params) -> int | None:
    """Images in the prepared training split, from its Parquet metadata (``split_sizes``); None
    when the prepared file or the entry is missing."""
    import json

    import pyarrow.parquet as pq

    from sparse_core.data.prepare import prepared_path

    path = prepared_path(params.base.data_dir, params.data.dataset)
    try:
        meta = pq.read_schema(path).metadata or {}
        return int(json.loads(meta[b"split_sizes"])["train"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def stage_report(params: Params) -> Path:
    """``report``: write the files listed in the module docstring; returns ``reports/report.md``."""
    from sparse_core.figures import draw_all

    order = [m for m, _ in models(params)]
    per_seed = all_per_seed_metrics(params)
    tidy = tidy_metrics(params, per_seed)
    summary = summary_table(tidy, order)
    design = recipes.profile_design(params, prepared_train_images(params))
    table = claims.evaluate_claims(claims.DEFAULT_CLAIMS, per_seed, design=design)
    seeds = params.base.run_seeds()
    first = params.for_seed(seeds[0])  # per-seed plot data: the figures show the first seed
    folder = Path(params.base.reports_dir)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_parquet(tidy, folder / "metrics.parquet")
    artifacts.write_csv(summary.reset_index(), folder / "summary.csv")
    artifacts.write_json(claims.claims_json(table), folder / "claims.json")
    draw_all(first, summary, order, folder / "figures")
    md = [
        f"# sparseflow report: {params.data.dataset}, {params.model.name}",
        "",
        f"Training seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); every value is the mean ± sample std over "
        "seeds. Test split unless noted. Accuracy, ECE (15 equal-width bins) in 0-1; NLL in nats; c* = mean over "
        "corruptions × severities; OOD AUROC = MSP score, mean over the OOD sets present; Params = nonzero "
        "parameters (sum over members for ensembles); Training FLOPs × relative to the profile's dense run; "
        "Inference FLOPs × relative to one dense model.",
        "",
        "## Results",
        "",
        markdown_table(summary),
        "",
        claims_section(table),
        "",
        _ood_section(params, tidy.groupby(["model", "dataset", "metric"], sort=False, as_index=False)["value"].mean()),
        "",
        _corruption_section(params, order),
        "",
        "## Figures",
        "",
        f"Accuracy vs sparsity and NLL vs training FLOPs: means with std error bars over the seeds; the other figures "
        f"show seed {seeds[0]}.",
        "",
    ]
    md += [f"![{name}](figures/{name}.png)\n" for name in FIGURES]
    out = folder / "report.md"
    with artifacts.atomic_path(out) as tmp:
        tmp.write_text("\n".join(md))
    return out


# ----- accuracy vs sparsity (the curves stages) ------------------------------------------------
#: Per-sparsity claims of the curves report: (id, statement, lhs line, rhs line, relation, margin).
CURVE_CLAIMS = (
    ("dpf_ge_gmp", "DPF ≥ GMP", "dpf", "gmp", ">=", 0.005),
    ("dpf_gt_oneshot", "DPF > one-shot (no fine-tuning)", "dpf", "oneshot", ">", 0.0),
    ("dpf_ge_oneshot_retrain", "DPF ≥ one-shot + fine-tuning", "dpf", "oneshot_retrain", ">=", 0.005),
    ("dpf_ge_rigl", "DPF ≥ RigL", "dpf", "rigl", ">=", 0.005),
)


def curve_points(params: Params) -> pd.DataFrame:
    """Every point of the curves stages: one row per method × sparsity × seed with
    ``test_accuracy``, ``test_nll``, ``realised_sparsity``; a ``<method>_retrain`` point (e.g.
    ``oneshot_retrain``) also yields the ``<method>`` row of its model before fine-tuning.

    Raises:
        FileNotFoundError: a ``curves@<method>-<seed>`` stage has not written its points.
    """
    frames = []
    for method in params.curves.methods:
        for seed in params.base.run_seeds():
            path = curve_points_path(params, method, seed)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run curves@{method}-{seed} first")
            df = artifacts.read_csv(path, schema=schemas.CURVE_POINTS_SCHEMA)
            frames.append(df[["method", "sparsity", "seed", "realised_sparsity", "test_accuracy", "test_nll"]])
            if "pruned_test_accuracy" in df:  # a <method>_retrain point: also its model before fine-tuning
                frames.append(df.assign(method=method.removesuffix("_retrain"), test_accuracy=df["pruned_test_accuracy"],
                                        test_nll=df["pruned_test_nll"])[frames[-1].columns])  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def _dense_level(params: Params) -> tuple[float, float, int] | None:
    """Mean, std and n of the dense run's test accuracy over the seeds that have it (None if none)."""
    values = []
    for seed in params.base.run_seeds():
        path = seed_metrics_path(params, "dense", seed)
        if path.is_file():
            values.append(float(artifacts.read_json(path)["test"]["accuracy"]))
    if not values:
        return None
    return float(pd.Series(values).mean()), float(pd.Series(values).std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def curve_claims(points: pd.DataFrame) -> pd.DataFrame:
    """:data:`CURVE_CLAIMS` at every sparsity where both lines exist: paired-by-seed difference
    of test accuracy with its 95% Student-t interval and verdict (:mod:`sparse_core.claims`)."""
    rows = []
    wide = points.pivot_table(index=["sparsity", "seed"], columns="method", values="test_accuracy")
    for cid, statement, a, b, relation, margin in CURVE_CLAIMS:
        if a not in wide or b not in wide:
            continue
        for sparsity, g in wide[[a, b]].dropna().groupby(level="sparsity"):
            d = (g[a] - g[b]).round(12).tolist()
            mean, std, lo, hi = claims.paired_t_interval(d)
            rows.append({"id": cid, "statement": statement, "sparsity": sparsity, "n": len(d), "lhs_mean": float(g[a].mean()),
                         "rhs_mean": float(g[b].mean()), "diff_mean": mean, "ci_low": lo, "ci_high": hi,
                         "verdict": claims.verdict(lo, hi, relation, margin)})  # fmt: skip
    return pd.DataFrame(rows)


def stage_curves_report(params: Params) -> Path:
    """``curves_report``: ``reports/curves/`` = ``points.csv`` (every point), ``summary.csv``
    (mean, std, n of test accuracy and NLL per method × sparsity), ``claims.csv`` and
    ``claims.json`` (per-sparsity DPF claims), ``accuracy_vs_sparsity.png`` (error bars: std
    over seeds; the dense run's level as a band) and ``report.md``; returns the report."""
    from sparse_core.figures import accuracy_vs_sparsity_curves

    points = curve_points(params)
    summary = (points.groupby(["method", "sparsity"])
               .agg(accuracy=("test_accuracy", "mean"), accuracy_std=("test_accuracy", "std"), nll=("test_nll", "mean"),
                    nll_std=("test_nll", "std"), realised_sparsity=("realised_sparsity", "mean"), n=("seed", "nunique"))
               .fillna({"accuracy_std": 0.0, "nll_std": 0.0}).reset_index())  # fmt: skip
    table = curve_claims(points)
    dense = _dense_level(params)
    folder = Path(params.base.reports_dir) / "curves"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_csv(points, folder / "points.csv")
    artifacts.write_csv(summary, folder / "summary.csv")
    artifacts.write_csv(table, folder / "claims.csv")
    artifacts.write_json({f"{r.id}@{r.sparsity:g}": {"verdict": r.verdict, "n": int(r.n), "diff_mean": r.diff_mean,
                                                       "ci_low": claims._finite_or_none(r.ci_low),
                                                       "ci_high": claims._finite_or_none(r.ci_high)}
                          for r in table.itertuples()}, folder / "claims.json")  # fmt: skip
    accuracy_vs_sparsity_curves(summary, dense, folder / "accuracy_vs_sparsity.png")
    seeds = params.base.run_seeds()
    acc = summary.pivot(index="sparsity", columns="method", values="accuracy")
    std = summary.pivot(index="sparsity", columns="method", values="accuracy_std")
    lines = [f"| sparsity | " + " | ".join(acc.columns) + " |", "|---:|" + "---:|" * len(acc.columns)]
    for s, row in acc.iterrows():
        lines.append(f"| {s:g} | " + " | ".join(f"{v:.4f} ± {std.loc[s, m]:.4f}" if not pd.isna(v) else "—" for m, v in row.items()) + " |")
    claim_lines = ["| claim | sparsity | n | lhs | rhs | Δ [95% CI] | verdict |", "|---|---:|---:|---:|---:|---|---|"]
    for r in table.itertuples():
        ci = f"[{r.ci_low:.4f}, {r.ci_high:.4f}]" if math.isfinite(r.ci_low) else "[−∞, ∞]"
        claim_lines.append(f"| {r.statement} | {r.sparsity:g} | {r.n} | {r.lhs_mean:.4f} | {r.rhs_mean:.4f} | {r.diff_mean:+.4f} {ci} | {r.verdict} |")
    dense_text = f"dense: {dense[0]:.4f} ± {dense[1]:.4f} (n = {dense[2]})" if dense else "dense: not evaluated"
    md = [
        f"# Accuracy vs sparsity: {params.data.dataset}, {params.model.name}",
        "",
        f"Test accuracy, mean ± sample std over training seeds {', '.join(map(str, seeds))} (n = {len(seeds)}), each "
        f"method trained as in the profile's `train` section at every sparsity (unstructured, "
        f"{params.train.pruning.scope} for dpf/gmp/oneshot; ERK for rigl); `oneshot` is the dense run pruned once at the "
        f"end, `oneshot_retrain` that model fine-tuned for {params.retrain.epochs} epoch(s) with its mask frozen. {dense_text}.",
        "",
        *lines,
        "",
        "## DPF claims per sparsity",
        "",
        "Paired by seed, two-sided 95% Student-t interval of the accuracy difference; `>=` holds when the lower bound is "
        "above −0.005 and is contradicted when the upper bound is below −0.005; `>` holds above 0 and is contradicted below 0.",
        "",
        *claim_lines,
        "",
        "![accuracy vs sparsity](accuracy_vs_sparsity.png)",
        "",
    ]
    out = folder / "report.md"
    with artifacts.atomic_path(out) as tmp:
        tmp.write_text("\n".join(md))
    return out
