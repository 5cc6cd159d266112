"""Live training metrics with dvclive: the per-epoch history, visible while a run trains.

Every training run (:func:`sparse_core.engine.fit`) logs each epoch's history row through
`dvclive <https://dvc.org/doc/dvclive>`_ into ``<plots_dir>/live/<run>/`` (``metrics.json``: the
latest values and the step, read by ``dvc metrics show`` / ``dvc exp show``; and
``plots/metrics/<name>.tsv``: one series per metric, read by ``dvc plots show``). ``dvc.yaml``
declares both for the warmup, train and retrain stages, so a run in progress shows in
``dvc exp show`` before its stage ends.

One source, not two writers: the rows are the history rows that :func:`fit` keeps in its
checkpoint and exports as ``history.parquet`` / ``history/<run>.csv``. When a run starts or
resumes, its dvclive series are rebuilt from the rows of the checkpoint it resumes from, so a
resumed run continues the same series, and rows logged after the last checkpoint by a killed
process are dropped, as the epochs themselves are. The step of a row is its epoch.

DST Ensemble members (run ``<ensemble>/member_<i>``) log into their ensemble's folder with the
prefix ``member_<i>/`` on every metric name (members may train at the same time in separate
processes: each one rewrites only its own series files; ``metrics.json`` is shared and shows
the latest values each member wrote).

Files are written in place by dvclive (not atomically): they are a live view, rebuilt from the
checkpoint on every start, never an input of a stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

#: History columns logged as metrics (``epoch`` is the step).
LIVE_COLUMNS = ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "sparsity", "seconds", "images_per_s")


#: Run groups not logged live: the points of ``sparseflow sweep`` and of the ``curves`` stages
#: (many short runs each, fanned out; their tables are their record).
UNLOGGED_GROUPS = ("sweeps", "curves")


def live_target(plots_dir: str | Path, run: str) -> tuple[Path, str] | None:
    """``(dvclive folder, metric-name prefix)`` of ``run``: ``<plots_dir>/live/<run>`` and ``""``,
    or for an ensemble member ``<ensemble>/member_<i>`` the ensemble's folder and ``member_<i>/``;
    None for the runs of :data:`UNLOGGED_GROUPS`."""
    head, sep, tail = run.partition("/")
    if head in UNLOGGED_GROUPS:
        return None
    return Path(plots_dir) / "live" / head, (tail + "/" if sep else "")


def _files_only() -> type:
    """dvclive's ``Live`` writing its files and nothing else.

    ``Live.__init__`` (dvclive 3.x) also opens the DVC repository around the working directory
    and reads git's HEAD to name an experiment (it raises ``SCMError: Empty git repo`` in a
    repository without commits, found by ``tests/test_stop.py``), and reports to DVC Studio
    when a token is configured. sparseflow declares the files in ``dvc.yaml`` itself and keeps
    runs offline, so both hooks are replaced by no-ops (pinned to dvclive < 4 in pyproject)."""
    from dvclive import Live

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

    return FilesOnlyLive


class LiveHistory:
    """dvclive logger of one run's history rows (module docstring).

    Args:
        folder: the dvclive folder (created if missing).
        rows: the history rows already kept (a resumed run's checkpoint); logged again first.
        prefix: prefix of every metric name (``member_<i>/`` for ensemble members).
    """

    def __init__(self, folder: str | Path, rows: list[dict[str, Any]], prefix: str = ""):
        self.folder, self.prefix = Path(folder), prefix
        series = self.folder / "plots" / "metrics"
        # Drop this run's own series (a killed process may have logged past its checkpoint) and
        # its summary keys; other members' files stay.
        if prefix:
            shutil.rmtree(series / prefix.rstrip("/"), ignore_errors=True)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._drop_summary_keys()
        self.live = _files_only()(dir=str(self.folder), resume=bool(prefix), save_dvc_exp=False, dvcyaml=None, report=None)
        for row in rows:
            self.log(row)

    def _drop_summary_keys(self) -> None:
        summary = self.folder / "metrics.json"
        if not self.prefix or not summary.is_file():
            return
        try:
            data = json.loads(summary.read_text())
        except (OSError, ValueError):
            summary.unlink(missing_ok=True)
            return
        data.pop(self.prefix.rstrip("/"), None)
        summary.write_text(json.dumps(data))

    def log(self, row: dict[str, Any]) -> None:
        """Log one history row (its ``epoch`` is the step) and write the summary."""
        self.live.step = int(row["epoch"])
        for name in LIVE_COLUMNS:
            value = row.get(name)
            if value is not None:
                self.live.log_metric(self.prefix + name, float(value), plot=True)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


def ensure_live(plots_dir: str | Path, run: str, history: list[dict[str, Any]]) -> None:
    """Write the dvclive files of a finished top-level ``run`` from its ``history`` rows unless
    its training logged them (a run trained outside :func:`~sparse_core.engine.fit`: one
    process per local chunk, zero epochs), so the files ``dvc.yaml`` declares always exist
    (``metrics.json`` is ``{}`` for a run of zero epochs)."""
    target = live_target(plots_dir, run)
    if target is None or "/" in run or (target[0] / "metrics.json").is_file():
        return
    LiveHistory(target[0], history).close()
    summary = target[0] / "metrics.json"
    if not summary.is_file():
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("{}\n")
