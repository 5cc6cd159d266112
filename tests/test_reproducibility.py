"""Deterministic mode: two runs of the same profile on the CPU, in two fresh project folders and
two separate processes (no state shared), export byte-identical files.

One subprocess per folder runs the stages in order (prepare, warmup, ood, corrupt, then
train + evaluate of ``dpf`` and ``rigl``) on the tiny profile with one intra-op thread; CPU
results are reproducible for a fixed thread count (see ``sparse_core.jobs.rundirs.setup``). The two
processes run concurrently to halve the wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sparse_core.config import load_params

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dpf", "rigl")
#: Compared byte for byte between the two runs.
RUN_FILES = ("model.safetensors", "masks.safetensors", "layers.parquet", "mask_updates.parquet", "config.json")
#: history.parquet columns holding wall-clock measurements (everything else must match).
TIMING_COLUMNS = ["seconds", "images_per_s"]

SCRIPT = """
import warnings
from sparse_core import evalsets
from sparse_core import corrupted_sets
from sparse_core.jobs import rundirs, scoring, training
from sparse_core.config import load_params

warnings.filterwarnings("ignore", message="OOD set")
params = load_params("params.yaml")
rundirs.stage_prepare(params)
training.stage_warmup(params)
evalsets.stage_ood(params)
corrupted_sets.stage_corrupt(params)
for method in {methods!r}:
    training.stage_train(params, method)
    scoring.stage_evaluate(params, method)
"""


def _write_project(folder: Path, seed: int) -> Path:
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["base"].update(seed=seed, num_threads=1, progress=False, deterministic=True, device="cpu")
    raw["train"]["methods"] = list(METHODS)
    raw["retrain"]["runs"] = []
    raw["evaluate"]["runs"] = list(METHODS)
    raw["collect"]["ensembles"] = []
    raw["ood"]["sets"] = {"fashion_mnist": ["mnist", "gaussian"]}
    raw["corrupt"].update(corruptions=["gaussian_noise", "contrast"], severities=[1, 5])
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def _run_twins(root: Path, mirror: Path, seeds: tuple[int, int] = (0, 0)) -> tuple[Path, Path]:
    """Two project folders, each filled by its own fresh Python process, run concurrently."""
    env = {**os.environ, "SPARSEFLOW_DATA_MIRROR": str(mirror), "PYTHONDONTWRITEBYTECODE": "1"}
    folders = [_write_project(root / f"project_{i}", seed) for i, seed in enumerate(seeds)]
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT.format(methods=METHODS)], cwd=f, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for f in folders
    ]
    for f, proc in zip(folders, procs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"stages failed in {f}:\n{out[-4000:]}"
    return folders[0], folders[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_TWINS: dict[Path, tuple[Path, Path]] = {}


@pytest.fixture
def twins(mirror, tmp_path_factory) -> tuple[Path, Path]:
    """The two project folders, produced once per session (the tests below only read them)."""
    if mirror not in _TWINS:
        _TWINS[mirror] = _run_twins(tmp_path_factory.mktemp("reproducibility"), mirror)
    return _TWINS[mirror]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_export_byte_identical_files(twins, method):
    a, b = twins
    for name in RUN_FILES:
        fa, fb = a / "runs" / method / name, b / "runs" / method / name
        assert fa.is_file() and fb.is_file(), f"{method}: {name} not exported"
        assert _sha256(fa) == _sha256(fb), f"{method}: {name} differs between two identical runs"
    metrics = Path("metrics") / f"{method}.json"
    assert _sha256(a / metrics) == _sha256(b / metrics), f"{metrics} differs between two identical runs"
    # The history matches too, apart from its wall-clock columns.
    ha, hb = (pd.read_parquet(f / "runs" / method / "history.parquet").drop(columns=TIMING_COLUMNS) for f in twins)
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    # The comparison covers real training: every epoch logged, the masks were updated.
    assert len(ha) == load_params(a / "params.yaml").train.epochs
    assert len(pd.read_parquet(a / "runs" / method / "mask_updates.parquet")) > 0


@pytest.mark.parametrize("method", METHODS)
def test_config_json_records_resolved_params_and_versions(twins, method):
    folder = twins[0]
    cfg = json.loads((folder / "runs" / method / "config.json").read_text())
    resolved = load_params(folder / "params.yaml").model_dump(mode="json")  # defaults filled in
    assert cfg["params"] == resolved
    assert cfg["method"] == method
    versions = cfg["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["sparseflow"] == metadata.version("sparseflow")
    assert versions["torch"] == metadata.version("torch")
