"""The ``aggregate`` stage: one model's metrics over the training seeds (mean, std, every
seed; :func:`sparse_core.claims.aggregate`), ``<metrics_dir>/<model>.json``.

Kept apart from :mod:`sparse_core.report` so that a change to the report (a table, a figure)
re-runs the ``report`` stage only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_core import artifacts, claims
from sparse_core.config import Params


def models(params: Params) -> list[tuple[str, str]]:
    return [(r, "run") for r in params.evaluate.runs] + [(e, "ensemble") for e in params.collect.ensembles]


def seed_metrics_path(params: Params, model: str, seed: int) -> Path:
    """``<metrics_dir>/seeds/s<seed>/<model>.json``: the evaluate stage's output for one seed."""
    return Path(params.for_seed(seed).base.metrics_dir) / f"{model}.json"


def per_seed_metrics(params: Params, model: str) -> dict[int, dict[str, Any]]:
    """``{seed: metrics}`` of ``model`` for every training seed of ``base.seeds``.

    Raises:
        FileNotFoundError: a seed's metrics file is missing (names the file and the stage to run).
    """
    out = {}
    for seed in params.base.run_seeds():
        path = seed_metrics_path(params, model, seed)
        if not path.is_file():
            kind = "evaluate_ensemble" if model in params.collect.ensembles else "evaluate"
            raise FileNotFoundError(f"{path}: missing; run {kind}@{model}-{seed} first")
        out[seed] = artifacts.read_json(path)
    return out


def stage_aggregate(params: Params, model: str) -> Path:
    """``aggregate@<model>``: ``<metrics_dir>/<model>.json`` = mean, std and per-seed values of
    the model's metrics over ``base.seeds`` (layout: :func:`sparse_core.claims.aggregate`).

    Raises:
        ValueError: ``model`` is neither in ``evaluate.runs`` nor in ``collect.ensembles``.
        FileNotFoundError: a seed's metrics are missing.
    """
    if model not in dict(models(params)):
        raise ValueError(f"aggregate: {model!r} is not in evaluate.runs or collect.ensembles")
    out = Path(params.base.metrics_dir) / f"{model}.json"
    artifacts.write_json(claims.aggregate(per_seed_metrics(params, model)), out)
    return out
