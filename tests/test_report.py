"""The report stage: tidy metrics table (pandera), results table, warning rows, figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pandera.errors
import pytest

from sparse_core import artifacts
from sparse_core.config import parse_params
from sparse_core.aggregate import stage_aggregate
from sparse_core.report import METRICS_SCHEMA, markdown_table, stage_report, summary_table, tidy_metrics

RUN = {
    "run": "dpf", "method": "dpf",
    "test": {"accuracy": 0.9, "nll": 0.3, "ece": 0.02, "mce": 0.1, "brier": 0.15},
    "val": {"accuracy": 0.91, "nll": 0.29},
    "corruption": {"accuracy": 0.6, "nll": 1.2, "ece": 0.1,
                   "type": {"fog": {"accuracy": 0.5, "nll": 1.5, "ece": 0.2}},
                   "severity": {"s1": {"accuracy": 0.8, "nll": 0.7, "ece": 0.05}}},
    "ood": {"mnist": {"msp": {"auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.75, "fpr95": 0.6}},
            "mean": {"msp": {"auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.75, "fpr95": 0.6}}},
    "sparsity": 0.9, "target_sparsity": 0.9, "params": {"total": 1000, "nonzero": 100},
    "flops": {"inference_ratio": 0.12, "training_ratio": 0.5},
}  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch, default_params_dict):
    monkeypatch.chdir(tmp_path)
    raw = dict(default_params_dict)
    raw["evaluate"] = {**raw["evaluate"], "runs": ["dense", "dpf"]}
    raw["retrain"] = {**raw["retrain"], "runs": []}
    raw["collect"] = {**raw["collect"], "ensembles": ["edst_ensemble"]}
    params = parse_params(raw)
    dense = json.loads(json.dumps(RUN)) | {"run": "dense", "method": "dense", "sparsity": 0.0}
    ens = json.loads(json.dumps(RUN)) | {"run": "edst_ensemble", "method": "edst_ensemble"}
    ens["ood"]["mnist"]["mi"] = {"auroc": 0.7, "aupr_in": 0.6, "aupr_out": 0.65, "fpr95": 0.7}
    ens["test"] |= {"member": {"m0": {"accuracy": 0.88, "nll": 0.4}}, "member_accuracy_mean": 0.88, "member_nll_mean": 0.4}
    raw["base"] = {**raw["base"], "seeds": [0, 1, 2]}
    params = parse_params(raw)
    # Seed k adds 0.01·k to every test accuracy: means 0.01 above seed 0's, sample std 0.01.
    for name, m in (("dense", dense), ("dpf", RUN), ("edst_ensemble", ens)):
        for k in (0, 1, 2):
            seeded = json.loads(json.dumps(m))
            seeded["test"]["accuracy"] += 0.01 * k
            artifacts.write_json(seeded, Path("metrics") / "seeds" / f"s{k}" / f"{name}.json")
    return params


def test_tidy_table_layout_and_schema(workdir):
    tidy = tidy_metrics(workdir)
    row = lambda model, dataset, metric: tidy.query("model == @model and dataset == @dataset and metric == @metric")["value"]  # noqa: E731
    assert sorted(row("dpf", "test", "accuracy").tolist()) == pytest.approx([0.9, 0.91, 0.92])
    row = lambda model, dataset, metric: tidy.query("model == @model and dataset == @dataset and metric == @metric and seed == 1")["value"]  # noqa: E731
    assert row("dpf", "test", "ece").item() == 0.02
    assert row("dpf", "corrupted", "accuracy").item() == 0.6
    assert row("dpf", "corrupted/fog", "nll").item() == 1.5
    assert row("dpf", "corrupted/severity_1", "accuracy").item() == 0.8
    assert row("dpf", "ood/mnist", "msp_fpr95").item() == 0.6
    assert row("edst_ensemble", "ood/mnist", "mi_auroc").item() == 0.7
    assert row("edst_ensemble", "test", "member_m0_accuracy").item() == 0.88
    assert row("dpf", "model", "flops_training_ratio").item() == 0.5
    assert set(tidy["kind"]) == {"run", "ensemble"}
    bad = pd.concat([tidy, tidy.iloc[:1]])
    with pytest.raises(pandera.errors.SchemaError):
        METRICS_SCHEMA.validate(bad)  # duplicate (model, seed, dataset, metric)
    assert set(tidy["seed"]) == {0, 1, 2}


def test_missing_metrics_file_is_named(workdir):
    Path("metrics/seeds/s2/dpf.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics/seeds/s2/dpf.json: missing; run evaluate@dpf-2"):
        tidy_metrics(workdir)


def test_aggregate_keeps_every_seed_and_the_mean_and_std(workdir):
    out = stage_aggregate(workdir, "dpf")
    agg = json.loads(out.read_text())
    assert out == Path("metrics/dpf.json")
    assert agg["n"] == 3 and agg["seeds"] == [0, 1, 2]
    assert agg["mean"]["test"]["accuracy"] == pytest.approx(0.91)
    assert agg["std"]["test"]["accuracy"] == pytest.approx(0.01)
    assert agg["mean"]["test"]["ece"] == pytest.approx(0.02) and agg["std"]["test"]["ece"] == 0.0
    assert agg["per_seed"]["s2"]["test"]["accuracy"] == pytest.approx(0.92)
    with pytest.raises(ValueError, match="not in evaluate.runs"):
        stage_aggregate(workdir, "gmp")


def test_report_renders_every_column_and_the_warning_row(workdir):
    manifest = [
        {"set": "mnist", "status": "ok", "examples": 10, "source": "mnist test split", "reason": ""},
        {"set": "svhn", "status": "missing", "examples": 0, "source": "", "reason": "test_32x32.mat: not found"},
    ]
    artifacts.write_json(manifest, Path("data/ood/fashion_mnist/manifest.json"))
    out = stage_report(workdir)
    text = out.read_text()
    assert "| ⚠ all models | svhn |" in text and "test_32x32.mat" in text
    summary = summary_table(tidy_metrics(workdir), ["dense", "dpf", "edst_ensemble"])
    assert not summary.isna().any().any()
    # (0.90, 0.91, 0.92) vs tickets' 0.88: t-interval of the differences above 0.
    table = markdown_table(summary)
    assert ("| dpf | 3 | 0.9100 ± 0.0100 | 0.3000 ± 0.0000 | 0.0200 ± 0.0000 | 0.6000 ± 0.0000 | 1.2000 ± 0.0000 | "
            "0.1000 ± 0.0000 | 0.8000 ± 0.0000 | 0.9000 ± 0.0000 | 100 ± 0 | 0.500 ± 0.000 | 0.120 ± 0.000 |") in table
    assert summary.loc["dpf", "Accuracy std"] == pytest.approx(0.01) and summary.loc["dpf", "n"] == 3
    # The Claims section and its metrics file: claims whose models this profile lacks are not tested.
    assert "## Claims" in text and "not tested" in text
    claims = json.loads(Path("reports/claims.json").read_text())
    assert claims["edst_gt_tickets_acc"]["n"] == 3 and claims["edst_gt_tickets_acc"]["verdict"] == "holds"
    assert claims["edst_gt_tickets_acc"]["diff_mean"] == pytest.approx(0.03)
    assert claims["dpf_ge_gmp"]["verdict"] == "not tested"
    assert table in text
    assert pd.read_parquet("reports/metrics.parquet").shape[0] == len(tidy_metrics(workdir))
    for name in ("accuracy_vs_sparsity", "nll_vs_training_flops", "training_curves", "reliability", "layer_density", "corruption_accuracy"):
        assert Path(f"reports/figures/{name}.png").stat().st_size > 1000


def test_up_to_twenty_models_get_distinct_colours():
    """The default profile reports 12 models; matplotlib's default cycle has 10 colours."""
    from sparse_core.figures import _colour

    assert len({_colour(i) for i in range(20)}) == 20
