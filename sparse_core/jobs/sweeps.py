"""Sparsity × seed sweeps (``sparseflow sweep``) and the points of the accuracy-vs-sparsity curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sparse_core import artifacts, schemas
from sparse_core.config import curve_points_path, Params, sweep_methods
from sparse_core.data import PreparedData
from sparse_core.engine import evaluate, resolve_device
from sparse_core.methods import registry
from sparse_core.jobs.rundirs import build_model, load_data, load_exported, precision_of, run_dir, transform_for
from sparse_core.jobs.training import retrain_run, train_single


def sweep_run(method: str, sparsity: float, seed: int, group: str = "sweeps") -> str:
    """Run name of one sweep point: ``<group>/<method>/s<sparsity>-seed<seed>`` (inside the
    seed's runs folder, ``<runs_dir>/s<seed>/``); ``group`` is ``sweeps`` (``sparseflow sweep``)
    or ``curves`` (the ``curves`` stages)."""
    return f"{group}/{method}/s{sparsity:.4f}-seed{seed}"


def test_row(params: Params, run: str, data: PreparedData) -> dict[str, Any]:
    """Realised sparsity, last validation accuracy, test accuracy and NLL of an exported run."""
    model = build_model(params, data)
    masks = load_exported(params, run, model)
    device = resolve_device(params.base.device)
    model.to(device)
    val = artifacts.read_parquet(run_dir(params, run) / "history.parquet", schema=schemas.HISTORY_SCHEMA)["val_accuracy"]
    test = evaluate(model, data.splits["test"], transform_for(params, data), params.evaluate.batch_size, device,
                    precision_of(params, device))  # fmt: skip
    return {"realised_sparsity": masks.sparsity(), "val_accuracy": float(val.iloc[-1]) if len(val) else float("nan"),
            "test_accuracy": test["accuracy"], "test_nll": test["loss"]}  # fmt: skip


def stage_sweep_point(params: Params, method: str, sparsity: float, seed: int, num_threads: int = 0,
                      group: str = "sweeps") -> dict[str, Any]:  # fmt: skip
    """One point of a sparsity × seed sweep: ``method`` trained with its target sparsity set to
    ``sparsity`` on training seed ``seed`` (:meth:`Params.for_seed`: init, masks, data order and
    the seed's own warmup), in ``<runs_dir>/s<seed>/sweeps/<method>/s<sparsity>-seed<seed>/``;
    points are independent tasks. ``<method>_retrain`` (e.g. ``oneshot_retrain``) trains
    ``<method>`` (in ``…-pruned/``) and fine-tunes it with its mask frozen for ``retrain.epochs``.

    Returns:
        ``{"method", "sparsity" (target), "seed", "realised_sparsity", "val_accuracy",
        "test_accuracy", "test_nll", "run_dir"}`` (fractions; NLL in nats); ``<method>_retrain``
        adds ``pruned_test_accuracy`` and ``pruned_test_nll`` (before fine-tuning).

    Raises:
        ValueError: ``method`` is not a sweep method (:func:`sparse_core.config.sweep_methods`).
        FileNotFoundError: the seed's warmup is missing (``train.from_warmup`` and not a DST method).
    """
    if method not in sweep_methods():
        raise ValueError(f"sweep: method {method!r} has no target sparsity; use one of {sorted(sweep_methods())}")
    trained = method.removesuffix("_retrain") if method not in registry.specs() else method
    raw = params.for_seed(seed).model_dump(mode="json")
    raw["train"][registry.spec(trained).sparsity]["sparsity"] = sparsity
    point = Params.model_validate(raw)
    run = sweep_run(method, sparsity, seed, group)
    row: dict[str, Any] = {"method": method, "sparsity": sparsity, "seed": seed}
    if trained != method:
        pruned = f"{run}-pruned"
        train_single(point, trained, pruned, num_threads)
        data = load_data(point)
        before = test_row(point, pruned, data)
        out = retrain_run(point, pruned, run, num_threads)
        row.update(test_row(point, run, data), pruned_test_accuracy=before["test_accuracy"], pruned_test_nll=before["test_nll"])
    else:
        out = train_single(point, method, run, num_threads)
        row.update(test_row(point, run, load_data(point)))
    row["run_dir"] = str(out)
    return row


def write_curve_points(params: Params, method: str, rows: list[dict[str, Any]]) -> Path:
    """The rows of one ``curves@<method>-<seed>`` stage (``params`` of that seed), sorted by
    sparsity, without the run folder (a machine-specific detail)."""
    table = pd.DataFrame(rows).drop(columns=["run_dir"]).sort_values("sparsity", ignore_index=True)
    out = curve_points_path(params, method, params.base.seed)
    artifacts.write_csv(table, out)
    return out


def write_sweep(params: Params, method: str, rows: list[dict[str, Any]]) -> Path:
    """The sweep table ``<reports_dir>/sweeps/<method>.csv`` (one row per point, sorted)."""
    table = pd.DataFrame(rows).sort_values(["sparsity", "seed"], ignore_index=True)
    out = Path(params.base.reports_dir) / "sweeps" / f"{method}.csv"
    artifacts.write_csv(table, out)
    return out
