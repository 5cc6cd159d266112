"""Every shipped profile runs end to end, through the report, at a smoke scale (issue: hardening,
"every shipped profile runs end to end, and profiles never mix").

Each profile of ``profiles/`` is run with only its sizes overridden (:func:`smoke_sizes`: a few
hundred images, the fewest epochs its schedule allows, small batches, tiny evaluation sets, one
seed); its methods, model, recipe and every other setting stay as shipped. The stages run
in-process in the order of ``dvc.yaml`` (prepare, ood, corrupt, warmup, train, retrain, collect,
evaluate, aggregate, report), one profile after another in the same project folder, so that a
profile's report must not show what an earlier profile left in ``plots/``.

The ``cifar10`` profiles (torchvision's CIFAR-10 archive, not on this machine) run on a
CIFAR-10-format archive of random images that the test makes, the others on the offline data.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_hostile_inputs import _fake_cifar

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))


def smoke_sizes(raw: dict) -> dict:
    """``raw`` with its sizes shrunk (and nothing else changed but the precision, below).

    A profile's ``bf16`` runs in ``fp32`` on a CPU without native bf16 (no AVX512-BF16 or AMX):
    torch's bf16 convolutions fall back from oneDNN to its generic kernels there
    (:func:`sparse_core.precision.native_bf16_cpu`), one WRN-28-10 step about 9x slower than fp32 (one profile took
    over 20 minutes on a 2-core AVX2 machine). bf16 training itself is tested on small models in
    tests/test_precision.py, and the warning such a run gives in tests/test_precision.py too.
    """
    from sparse_core.engine import resolve_device
    from sparse_core.precision import native_bf16_cpu

    raw = copy.deepcopy(raw)
    base = raw.setdefault("base", {})
    base["seeds"] = (base.get("seeds") or [base.get("seed", 0)])[:1]
    base["progress"] = False
    on_cpu = resolve_device(base.get("device", "auto")).type == "cpu"
    if base.get("precision") == "bf16" and on_cpu and not native_bf16_cpu():
        base["precision"] = "fp32"
    # 36 training images in batches of 8: 4 full steps an epoch (enough for every update period below).
    raw["data"].update(train_subset=40, test_subset=32)
    for section in (raw.get("warmup", {}), raw.get("train", {}), raw.get("retrain", {})):
        if "optim" in section:
            section["optim"]["batch_size"] = 8
            section["optim"]["milestones"] = [m for m in section["optim"].get("milestones", []) if m < 1]
    raw["warmup"]["epochs"] = min(raw["warmup"].get("epochs", 0), 1)
    train = raw["train"]
    edst = train.setdefault("edst", {})
    tickets = edst["tickets"] = min(edst.get("tickets", 3), 2)
    # One exploration epoch and one per phase: the fewest that EDST's phases allow, and >= 2.
    edst.update(budget=1.0, exploration_share=1 / (1 + tickets))
    train["epochs"] = 1 + tickets
    train.setdefault("pruning", {})["update_period"] = 1
    train.setdefault("dst", {})["update_period"] = 2
    train["dst"].pop("update_period_fraction", None)  # a fraction of 4-step runs would round to one step
    for section in train.values():  # a method's own sections (e.g. train.granet) count steps too
        if isinstance(section, dict) and "update_period" in section and section is not train["pruning"]:
            section["update_period"] = 2
    if "dst_ensemble" in train:
        train["dst_ensemble"]["members"] = min(train["dst_ensemble"].get("members", 3), 2)
    raw.setdefault("retrain", {})["epochs"] = 1
    raw.setdefault("evaluate", {})["batch_size"] = 64
    raw.setdefault("collect", {})["batch_size"] = 64
    raw.setdefault("ood", {})["max_examples"] = 8
    # One image per corruption and severity: every model predicts on 95 of these sets (19
    # corruptions x 5 severities), most of the WRN-28-10 profile's evaluation time.
    raw.setdefault("corrupt", {})["test_subset"] = 1
    return raw


def _prepare(params, cache: dict[str, Path]) -> None:
    """The prepare stage, once per distinct (data section, seed): what DVC's cache does for a
    user who switches between profiles on the same data (the CIFAR-10 JPEG profiles decode
    60,000 images each time otherwise)."""
    import json

    from sparse_core.data import prepared_path
    from sparse_core.jobs import rundirs

    key = json.dumps([params.data.model_dump(mode="json"), params.base.seed], sort_keys=True)
    out = prepared_path(params.base.data_dir, params.data.dataset).parent
    if key in cache:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(cache[key], out)
        return
    rundirs.stage_prepare(params)
    cache[key] = out.parent / f".smoke-cache-{len(cache)}"
    shutil.copytree(out, cache[key])


def _run_profile(params, cache: dict[str, Path]) -> None:
    from sparse_core import aggregate, corrupted_sets, evalsets, report
    from sparse_core.jobs import ensembles, scoring, training

    _prepare(params, cache)
    evalsets.stage_ood(params)
    corrupted_sets.stage_corrupt(params)
    run = params.for_seed(params.base.run_seeds()[0])
    training.stage_warmup(run)
    for method in params.train.methods:
        training.stage_train(run, method)
    for source in params.retrain.runs:
        training.stage_retrain(run, source)
    for name in params.collect.ensembles:
        ensembles.stage_collect(run, name)
        ensembles.stage_evaluate_ensemble(run, name)
    for name in params.evaluate.runs:
        scoring.stage_evaluate(run, name)
    for model, _kind in aggregate.models(params):
        aggregate.stage_aggregate(params, model)
    report.stage_report(params)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One project folder for every profile (its data folder shared, as in a user's checkout)
    and a mirror that adds a CIFAR-10-format archive to the offline data."""
    import os

    mirror = Path(os.environ.get("SPARSEFLOW_DATA_MIRROR", REPO.parent / "shared" / "data"))
    root = tmp_path_factory.mktemp("profiles")
    fake_mirror = root / "mirror"
    fake_mirror.mkdir()
    for entry in mirror.iterdir():
        (fake_mirror / entry.name).symlink_to(entry)
    fake = _fake_cifar(root / "fake", n=200)
    shutil.copy(root / "fake" / "raw" / "cifar-10-python.tar.gz", fake_mirror / "cifar-10-python.tar.gz")
    work = root / "project"
    work.mkdir()
    return work, fake_mirror, fake, {}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_runs_end_to_end_and_reports_only_its_own_runs(project, profile, monkeypatch):
    from sparse_core import artifacts, schemas
    from sparse_core.aggregate import models as models_of
    from sparse_core.config import parse_params
    from sparse_core.report import METRICS_SCHEMA
    from sparse_core.data import sources
    from sparse_core.data.sources import DatasetSpec, _cifar

    work, fake_mirror, fake, cache = project
    monkeypatch.chdir(work)
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(fake_mirror))
    spec = sources.REGISTRY["cifar10"]
    monkeypatch.setitem(sources.REGISTRY, "cifar10", DatasetSpec(
        "cifar10", ".", (sources.RawFile(fake.filename, fake.tgz_md5, "file:///nowhere"),), _cifar(fake), spec.flip))  # fmt: skip
    raw = smoke_sizes(yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text()))
    params = parse_params(raw, f"profiles/{profile}.yaml (smoke sizes)")
    for folder in ("runs", "metrics", "ensembles", "reports"):  # what dvc checkout would swap; plots/ is kept on purpose
        shutil.rmtree(work / folder, ignore_errors=True)

    _run_profile(params, cache)

    models = [m for m, _ in models_of(params)]
    tidy = artifacts.read_parquet(work / "reports" / "metrics.parquet", schema=METRICS_SCHEMA)
    assert set(tidy["model"]) == set(models), profile
    summary = (work / "reports" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + len(models)
    history = Path(params.for_seed(params.base.run_seeds()[0]).base.plots_dir) / "history" / "warmup.csv"
    assert history.is_file()
    warmup = artifacts.read_csv(history, schema=schemas.HISTORY_SCHEMA)  # valid, even with zero warmup epochs
    assert len(warmup) == params.warmup.epochs
