"""Live metrics with dvclive (sparse_core/live.py): every epoch's history row is logged as it is
kept, a resumed run continues the same series (rows a killed process logged past its checkpoint
are dropped), the end-of-run history equals what dvclive shows, ensemble members keep their own
series, and dvc.yaml declares the files for the training stages."""

from __future__ import annotations

import json

import pandas as pd
import torch
import yaml

from sparse_core.config import PruningSection
from sparse_core.engine import fit
from sparse_core.live import LIVE_COLUMNS, LiveHistory, ensure_live, live_target
from sparse_core.methods import create_method
from tests.conftest import REPO, TinyNet, make_split
from tests.test_engine import OPTIM, TRANSFORM


def _fit(run_dir, live_dir, epochs=4, stop_after=None):
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = -(-len(train) // OPTIM.batch_size) * epochs
    method = create_method("gmp", model, steps, PruningSection(sparsity=0.8, update_period=4), epochs=epochs)
    return fit(
        model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=run_dir, seed=7, device=torch.device("cpu"),
        fingerprint="fp", progress=False, stop_after_epoch=stop_after, live=(live_dir, ""),
    ).history  # fmt: skip


def _series(live_dir, name: str, prefix: str = "") -> pd.DataFrame:
    return pd.read_csv(live_dir / "plots" / "metrics" / prefix / f"{name}.tsv", sep="\t")


def test_each_epoch_is_logged_and_equals_the_history(tmp_path):
    live = tmp_path / "live"
    history = _fit(tmp_path / "run", live)
    for name in LIVE_COLUMNS:
        s = _series(live, name)
        assert s["step"].tolist() == history["epoch"].tolist() == [1, 2, 3, 4]
        assert s[name].tolist() == history[name].tolist(), name
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 4 and summary["val_accuracy"] == history["val_accuracy"].iloc[-1]


def test_a_resumed_run_continues_the_same_series_and_drops_rows_past_its_checkpoint(tmp_path):
    full = _fit(tmp_path / "full", tmp_path / "live_full")
    live = tmp_path / "live"
    _fit(tmp_path / "run", live, stop_after=2)
    assert _series(live, "val_accuracy")["step"].tolist() == [1, 2]
    # A process killed after logging epoch 3 but before its checkpoint: a row the resume must drop.
    stray = LiveHistory(live, [])
    stray.log({"epoch": 3, "val_accuracy": 0.123})
    resumed = _fit(tmp_path / "run", live)
    s = _series(live, "val_accuracy")
    assert s["step"].tolist() == [1, 2, 3, 4] and 0.123 not in s["val_accuracy"].tolist()
    assert s["val_accuracy"].tolist() == resumed["val_accuracy"].tolist() == full["val_accuracy"].tolist()
    # The rows kept before the stop keep their measured timings: resumed, not retrained.
    assert _series(live, "seconds")["seconds"].tolist()[:2] == resumed["seconds"].tolist()[:2]


def test_ensemble_members_keep_their_own_series(tmp_path):
    folder, prefix = live_target(tmp_path, "dst_ensemble/member_1")
    assert folder == tmp_path / "live" / "dst_ensemble" and prefix == "member_1/"
    assert live_target(tmp_path, "sweeps/rigl/s0.8000-seed0") is None
    rows = [{"epoch": e, "val_accuracy": e / 10} for e in (1, 2, 3)]
    LiveHistory(folder, rows, "member_0/").close()
    LiveHistory(folder, rows[:2], "member_1/").close()
    LiveHistory(folder, rows[:1], "member_1/").close()  # member 1 restarts: member 0's series stay
    assert _series(folder, "val_accuracy", "member_0")["step"].tolist() == [1, 2, 3]
    assert _series(folder, "val_accuracy", "member_1")["step"].tolist() == [1]
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["member_0"]["val_accuracy"] == 0.3 and summary["member_1"]["val_accuracy"] == 0.1


def test_runs_trained_outside_fit_still_get_their_declared_files(tmp_path):
    ensure_live(tmp_path, "warmup", [])  # zero epochs
    assert json.loads((tmp_path / "live" / "warmup" / "metrics.json").read_text()) == {}
    ensure_live(tmp_path, "local_chunked", [{"epoch": 1, "val_accuracy": 0.5}])
    assert _series(tmp_path / "live" / "local_chunked", "val_accuracy")["val_accuracy"].tolist() == [0.5]


def test_dvc_yaml_declares_live_metrics_and_plots_of_every_training_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("warmup", "train", "retrain"):
        body = stages[name].get("do", stages[name])
        metrics = [next(iter(m)) for m in body["metrics"]]
        plots = [next(iter(p)) for p in body["plots"]]
        assert any(m.endswith("/metrics.json") and "/live/" in m for m in metrics), name
        assert any("/live/" in p and p.endswith("/plots/metrics") for p in plots), name


def test_logging_works_in_a_git_repository_without_commits(tmp_path, monkeypatch):
    """dvclive's own start-up reads git's HEAD and raised SCMError here; sparseflow's logger
    writes its files whatever the repository around it."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    logger = LiveHistory(tmp_path / "live", [{"epoch": 1, "val_accuracy": 0.5}])
    logger.close()
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["val_accuracy"] == 0.5
