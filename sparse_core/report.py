"""The ``report`` stage: one tidy metrics table, a markdown report and its figures.

Reads ``<metrics_dir>/<model>.json`` of every evaluated run and ensemble
(``evaluate.runs`` + ``collect.ensembles``), the plot data written by the evaluate stages
(``<plots_dir>/reliability|corruption|layers|history/``) and the OOD
manifest, and writes (each file atomically)::

    reports/metrics.parquet   one row per model × dataset × metric (pandera: METRICS_SCHEMA)
    reports/summary.csv       one row per model: the results-table columns (DVC scatter plots)
    reports/report.md         results table, OOD table (with a warning row per skipped set),
                              corruption tables, figures
    reports/figures/*.png     accuracy_vs_sparsity, nll_vs_training_flops, training_curves,
                              reliability, layer_density, corruption_accuracy

Tidy ``dataset`` values: ``test``, ``val``, ``corrupted`` (mean over corruptions and
severities), ``corrupted/<corruption>``, ``corrupted/severity_<k>``, ``ood/<set>``,
``ood/mean``, and ``model`` for properties of the model itself (sparsity, parameters, FLOPs).
``metric`` is the rest of the JSON key path joined by ``_`` (``msp_auroc``,
``flops_training_ratio``, ``member_m0_accuracy``...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from sparse_core import artifacts
from sparse_core.config import Params

REPORT_DIR = Path("reports")
FIGURES = ("accuracy_vs_sparsity", "nll_vs_training_flops", "training_curves", "reliability", "layer_density", "corruption_accuracy")

METRICS_SCHEMA = pa.DataFrameSchema(
    {
        "model": pa.Column(str, pa.Check.str_length(min_value=1)),
        "kind": pa.Column(str, pa.Check.isin(("run", "ensemble"))),
        "dataset": pa.Column(str, pa.Check.str_matches(r"^(test|val|model|corrupted(/[a-z0-9_]+)?|ood/[a-z0-9_]+)$")),
        "metric": pa.Column(str, pa.Check.str_length(min_value=1)),
        "value": pa.Column(float, pa.Check(lambda s: s.map(math.isfinite), error="metric values must be finite")),
    },
    checks=pa.Check(lambda df: not df.duplicated(["model", "dataset", "metric"]).any(), error="duplicate (model, dataset, metric)"),
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


def _rows(model: str, kind: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
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
            rows.append({"model": model, "kind": kind, "dataset": dataset, "metric": "_".join(rest), "value": float(value)})

    walk([], metrics)
    return rows


def tidy_metrics(params: Params) -> pd.DataFrame:
    """All models' metrics as one tidy table (validated by :data:`METRICS_SCHEMA`).

    Raises:
        FileNotFoundError: a model's metrics file is missing (its evaluate stage has not run).
    """
    rows = []
    for model, kind in models(params):
        path = Path(params.base.metrics_dir) / f"{model}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run evaluate for {model!r} first")
        rows += _rows(model, kind, json.loads(path.read_text()))
    df = pd.DataFrame(rows, columns=["model", "kind", "dataset", "metric", "value"])
    return METRICS_SCHEMA.validate(df)


def models(params: Params) -> list[tuple[str, str]]:
    return [(r, "run") for r in params.evaluate.runs] + [(e, "ensemble") for e in params.collect.ensembles]


def summary_table(tidy: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per model with the results-table columns (NaN where a model lacks a value)."""
    wide = tidy.assign(key=tidy["dataset"] + ":" + tidy["metric"]).pivot(index="model", columns="key", values="value")
    out = pd.DataFrame(index=order)
    for header, dataset, metric, _ in COLUMNS:
        key = f"{dataset}:{metric}"
        out[header] = wide[key].reindex(order) if key in wide else float("nan")
    out.index.name = "model"
    return out


def markdown_table(summary: pd.DataFrame) -> str:
    """The results table in markdown (``—`` for a missing value)."""
    head = "| Model | " + " | ".join(h for h, *_ in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for model, row in summary.iterrows():
        cells = ["—" if pd.isna(row[h]) else fmt.format(row[h]) for h, _, _, fmt in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ood_section(params: Params, tidy: pd.DataFrame) -> str:
    manifest_path = Path(params.base.data_dir) / "ood" / params.data.dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else []
    sets = [m["set"] for m in manifest if m["status"] == "ok"]
    lines = [
        "## Out-of-distribution detection",
        "",
        f"In-distribution: {params.data.dataset} test split. Higher score = in-distribution; AUROC / "
        "AUPR-in / AUPR-out / FPR at 95% TPR from scikit-learn. MSP: maximum softmax probability; "
        "entropy: predictive entropy; MI: mutual information (ensembles).",
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
    frames = [_read_csv(Path(params.base.plots_dir) / "corruption" / f"{m}.csv") for m in order]
    df = pd.concat([f for f in frames if f is not None and not f.empty], ignore_index=True) if any(
        f is not None and not f.empty for f in frames
    ) else pd.DataFrame()
    if df.empty:
        return "## Corruption robustness\n\nNo corrupted sets were evaluated."
    manifest = Path(params.base.data_dir) / "corrupted" / params.data.dataset / "manifest.json"
    source = json.loads(manifest.read_text())["source"] if manifest.is_file() else "unknown"
    by_type = df.pivot_table(index="corruption", columns="model", values="accuracy").reindex(columns=order)
    by_sev = df.pivot_table(index="severity", columns="model", values="accuracy").reindex(columns=order)

    def table(t: pd.DataFrame, first: str) -> list[str]:
        out = [f"| {first} | " + " | ".join(t.columns) + " |", "|---|" + "---:|" * len(t.columns)]
        out += [f"| {i} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for i, row in t.iterrows()]
        return out

    return "\n".join(
        ["## Corruption robustness", "", f"Accuracy on the corrupted test subset ({source}).", "", "### Per corruption (mean over severities)", ""]
        + table(by_type, "corruption")
        + ["", "### Per severity (mean over corruptions)", ""]
        + table(by_sev, "severity")
    )


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def stage_report(params: Params) -> Path:
    """``report``: write the files listed in the module docstring; returns ``reports/report.md``."""
    from sparse_core.figures import draw_all

    order = [m for m, _ in models(params)]
    tidy = tidy_metrics(params)
    summary = summary_table(tidy, order)
    REPORT_DIR.mkdir(exist_ok=True)
    artifacts.write_parquet(tidy, REPORT_DIR / "metrics.parquet")
    artifacts.write_csv(summary.reset_index(), REPORT_DIR / "summary.csv")
    draw_all(params, summary, order, REPORT_DIR / "figures")
    md = [
        f"# sparseflow report: {params.data.dataset}, {params.model.name}",
        "",
        "Test split unless noted. Accuracy, ECE (15 equal-width bins) in 0-1; NLL in nats; c* = mean over "
        "corruptions × severities; OOD AUROC = MSP score, mean over the OOD sets present; Params = nonzero "
        "parameters (sum over members for ensembles); Training FLOPs × relative to the profile's dense run; "
        "Inference FLOPs × relative to one dense model.",
        "",
        "## Results",
        "",
        markdown_table(summary),
        "",
        _ood_section(params, tidy),
        "",
        _corruption_section(params, order),
        "",
        "## Figures",
        "",
    ]
    md += [f"![{name}](figures/{name}.png)\n" for name in FIGURES]
    out = REPORT_DIR / "report.md"
    with artifacts.atomic_path(out) as tmp:
        tmp.write_text("\n".join(md))
    return out
