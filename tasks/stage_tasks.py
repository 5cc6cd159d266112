"""Tasks wrapping the stage functions of the modules of :mod:`sparse_core.jobs`.

Every task retries transient I/O failures (:func:`transient_io`: a flaky network file system,
a busy file, a timeout) twice, 5 s apart; a stage function resumes from its last checkpoint,
so a retried training task continues instead of starting over. Deterministic failures (bad
params, missing or corrupt data, a diverged run) are never retried: a retry would fail the
same way.

The library (the modules of :mod:`sparse_core.jobs` and the modules it pulls in: torch, torchvision,
pandas, scikit-learn) is imported inside each task, by :func:`tasks.timing.stage_work`, not
when this module is imported: a stage process validates its params and starts its Prefect
flow run first, and a stage that fails validation never pays for those imports.
"""

from __future__ import annotations

import errno
import sys

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sparse_core.config import ConfigError, load_params, seeded
from tasks.timing import stage_work

#: errno values of failures that can pass by themselves.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR})


def _data_error() -> tuple[type[BaseException], ...]:
    """``(DataError,)`` once :mod:`sparse_core.data.fetch` is loaded, else ``()``: no DataError
    can have been raised before its module was imported, and importing it here would load
    torch and torchvision in every stage process."""
    fetch = sys.modules.get("sparse_core.data.fetch")
    return (fetch.DataError,) if fetch is not None else ()


def is_transient(exc: BaseException) -> bool:
    """True for I/O failures worth retrying; false for everything deterministic."""
    if isinstance(exc, (ConfigError, *_data_error(), FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the task failed with :func:`is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified, not swallowed
        return is_transient(exc)
    return False


#: Options shared by every task of this module.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": transient_io}


@task(name="prepare-dataset", **IO_RETRIES)
def prepare_dataset(params_path: str) -> str:
    """Raw archives -> ``data/prepared/<dataset>/data.parquet``."""
    params = load_params(params_path)
    with stage_work("prepare-dataset", "sparse_core.data.prepare") as prepare:
        return str(prepare.prepare_dataset(params.data, params.base.data_dir, params.base.seed))


@task(name="resolve-fastpath", **IO_RETRIES)
def resolve_fastpath(params_path: str) -> str:
    """``base.precision`` / ``base.channels_last`` ``auto`` resolved on this machine ->
    ``runs/fastpath.json`` (the choice) and ``metrics/fastpath.json`` (with the measured times)."""
    params = load_params(params_path)
    with stage_work("resolve-fastpath", "sparse_core.jobs.rundirs") as rundirs:
        return str(rundirs.stage_fastpath(params))


@task(name="prepare-ood-sets", **IO_RETRIES)
def prepare_ood(params_path: str) -> str:
    """OOD sets of the dataset -> ``data/ood/<dataset>/`` (missing optional sets are warned)."""
    params = load_params(params_path)
    with stage_work("prepare-ood-sets", "sparse_core.evalsets") as evalsets:
        return str(evalsets.stage_ood(params))


@task(name="corrupt-test-set", **IO_RETRIES)
def corrupt_test_set(params_path: str) -> str:
    """Corrupted test subset -> ``data/corrupted/<dataset>/``."""
    params = load_params(params_path)
    with stage_work("corrupt-test-set", "sparse_core.corrupted_sets") as corrupted_sets:
        return str(corrupted_sets.stage_corrupt(params))


@task(name="build-report", **IO_RETRIES)
def build_report(params_path: str) -> str:
    """``reports/report.md``, ``reports/metrics.parquet`` and figures; publishes the results
    table as the Prefect markdown artifact ``report``."""
    params = load_params(params_path)
    with stage_work("build-report", "sparse_core.report") as report:
        out = report.stage_report(params)
    summary = report.summary_table(report.tidy_metrics(params), [m for m, _ in report.models(params)])
    create_markdown_artifact(
        key="report",
        markdown=f"## sparseflow results: {params.data.dataset}, {params.model.name}\n\n" + report.markdown_table(summary),
        description="Results table of reports/report.md",
    )
    return str(out)


@task(name="local-sweep-point", **IO_RETRIES, task_run_name="sweep-{variant}-b{batch_size}")
def local_sweep_point(params_path: str, variant: str, batch_size: int) -> dict:
    """One batch-size sweep point of the local-parallelism analysis."""
    params = load_params(params_path)
    with stage_work("local-sweep-point", "sparse_core.local.study") as study:
        return study.sweep_point(params, variant, batch_size)


@task(name="local-side-analyses", **IO_RETRIES)
def local_side_analyses(params_path: str) -> dict:
    """Accounting, gradient cosine similarity and random-label capacity of every variant."""
    params = load_params(params_path)
    with stage_work("local-side-analyses", "sparse_core.local.study") as study:
        return study.side_analyses(params)


@task(name="local-write-analysis", **IO_RETRIES)
def local_write_analysis(params_path: str, sweep_rows: list, side: dict) -> str:
    """``reports/local/`` tables and figures, ``reports/local_analysis.json``."""
    params = load_params(params_path)
    with stage_work("local-write-analysis", "sparse_core.local.study") as study:
        return str(study.write_analysis(params, sweep_rows, side))


def run_params(params_path: str, seed: int | None):
    """Validated params of training seed ``seed`` (None: the first of ``base.seeds``)."""
    return seeded(load_params(params_path), seed)


@task(name="dense-warmup", **IO_RETRIES, task_run_name="warmup-s{seed}")
def dense_warmup(params_path: str, seed: int | None = None) -> str:
    """Dense warmup run -> ``runs/s<seed>/warmup/``."""
    params = run_params(params_path, seed)
    with stage_work("dense-warmup", "sparse_core.jobs.training") as jobs:
        return str(jobs.stage_warmup(params))


@task(name="train-run", **IO_RETRIES, task_run_name="train-{method}-s{seed}")
def train_run(params_path: str, method: str, seed: int | None = None) -> str:
    """One training run of ``method`` -> ``runs/s<seed>/<method>/``."""
    params = run_params(params_path, seed)
    with stage_work("train-run", "sparse_core.jobs.training") as jobs:
        return str(jobs.stage_train(params, method))


@task(name="train-member", **IO_RETRIES, task_run_name="train-{name}-member-{member}-s{seed}")
def train_member(params_path: str, name: str, member: int, num_threads: int = 0, seed: int | None = None) -> str:
    """Member ``member`` of the members ensemble ``name`` (the DST Ensemble) -> ``runs/s<seed>/<name>/member_<i>/``."""
    params = run_params(params_path, seed)
    with stage_work("train-member", "sparse_core.jobs.training") as jobs:
        return str(jobs.stage_train_member(params, name, member, num_threads))


@task(name="sweep-point", **IO_RETRIES, task_run_name="{group}-{method}-s{sparsity}-seed{seed}")
def sweep_point(params_path: str, method: str, sparsity: float, seed: int, num_threads: int = 0, group: str = "sweeps") -> dict:
    """One sparsity × seed point -> ``runs/s<k>/<group>/<method>/s<S>-seed<k>/``; returns its row."""
    params = load_params(params_path)
    with stage_work("sweep-point", "sparse_core.jobs.sweeps") as jobs:
        return jobs.stage_sweep_point(params, method, sparsity, seed, num_threads, group)


@task(name="write-curve-points", **IO_RETRIES, task_run_name="write-curve-points-{method}-s{seed}")
def write_curve_points(params_path: str, method: str, seed: int, rows: list) -> str:
    """``reports/curves/points/<method>-s<seed>.csv``."""
    params = run_params(params_path, seed)
    with stage_work("write-curve-points", "sparse_core.jobs.sweeps") as jobs:
        return str(jobs.write_curve_points(params, method, rows))


@task(name="curves-report", **IO_RETRIES)
def curves_report(params_path: str) -> str:
    """``reports/curves/``: accuracy vs sparsity over seeds, the figure and its report."""
    params = load_params(params_path)
    with stage_work("curves-report", "sparse_core.report") as report:
        return str(report.stage_curves_report(params))


@task(name="write-sweep", **IO_RETRIES, task_run_name="write-sweep-{method}")
def write_sweep(params_path: str, method: str, rows: list) -> str:
    """``reports/sweeps/<method>.csv``; also the table artifact ``sweep-<method>``."""
    params = load_params(params_path)
    with stage_work("write-sweep", "sparse_core.jobs.sweeps") as jobs:
        out = jobs.write_sweep(params, method, rows)
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "run_dir"} for r in rows]
    create_table_artifact(key=f"sweep-{method.replace('_', '-')}", table=table, description=f"Sparsity × seed sweep of {method}")
    return str(out)


@task(name="finish-members", **IO_RETRIES, task_run_name="finish-{name}-s{seed}")
def finish_members(params_path: str, name: str, seed: int | None = None) -> str:
    """Combined training curves of the members of ensemble ``name`` -> ``plots/seeds/s<seed>/history/<name>.csv``."""
    params = run_params(params_path, seed)
    with stage_work("finish-members", "sparse_core.jobs.training") as jobs:
        return str(jobs.finish_members(params, name))


@task(name="collect-ensemble", **IO_RETRIES, task_run_name="collect-{name}-s{seed}")
def collect_ensemble(params_path: str, name: str, seed: int | None = None) -> str:
    """Member probabilities of ensemble ``name`` -> ``ensembles/s<seed>/<name>/``."""
    params = run_params(params_path, seed)
    with stage_work("collect-ensemble", "sparse_core.jobs.ensembles") as jobs:
        return str(jobs.stage_collect(params, name))


@task(name="evaluate-ensemble", **IO_RETRIES, task_run_name="evaluate-{name}-s{seed}")
def evaluate_ensemble(params_path: str, name: str, seed: int | None = None) -> dict:
    """Ensemble metrics from the cached probabilities -> ``metrics/seeds/s<seed>/<name>.json``."""
    params = run_params(params_path, seed)
    with stage_work("evaluate-ensemble", "sparse_core.jobs.ensembles") as jobs:
        metrics = jobs.stage_evaluate_ensemble(params, name)
    row = {k: round(metrics["test"][k], 4) for k in ("accuracy", "nll", "ece", "member_accuracy_mean", "disagreement", "kl")}
    row["training_flops_ratio"] = round(metrics["flops"]["training_ratio"], 4)
    key = f"metrics-{name.replace('_', '-')}-s{params.base.seed}"
    create_table_artifact(key=key, table=[{"ensemble": name, "seed": params.base.seed, **row}])
    return metrics


@task(name="retrain-run", **IO_RETRIES, task_run_name="retrain-{run}-s{seed}")
def retrain_run(params_path: str, run: str, seed: int | None = None) -> str:
    """Fine-tune ``run`` with its mask frozen -> ``runs/s<seed>/<run>_retrain/``."""
    params = run_params(params_path, seed)
    with stage_work("retrain-run", "sparse_core.jobs.training") as jobs:
        return str(jobs.stage_retrain(params, run))


@task(name="aggregate-model", **IO_RETRIES, task_run_name="aggregate-{model}")
def aggregate_model(params_path: str, model: str) -> str:
    """Mean ± std over ``base.seeds`` of one model's metrics -> ``metrics/<model>.json``."""
    params = load_params(params_path)
    with stage_work("aggregate-model", "sparse_core.aggregate") as aggregate:
        return str(aggregate.stage_aggregate(params, model))


@task(name="evaluate-run", **IO_RETRIES, task_run_name="evaluate-{run}-s{seed}")
def evaluate_run(params_path: str, run: str, seed: int | None = None) -> dict:
    """Metrics of ``run`` -> ``metrics/seeds/s<seed>/<run>.json``; also published as a Prefect table artifact."""
    params = run_params(params_path, seed)
    with stage_work("evaluate-run", "sparse_core.jobs.scoring") as jobs:
        metrics = jobs.stage_evaluate(params, run)
    from sparse_core.artifacts import read_csv  # loaded by the stage already
    from sparse_core.schemas import LAYERS_CSV_SCHEMA

    row = {
        "run": run,
        "test_accuracy": round(metrics["test"]["accuracy"], 4),
        "test_nll": round(metrics["test"]["nll"], 4),
        "test_ece": round(metrics["test"]["ece"], 4),
        "sparsity": round(metrics["sparsity"], 4),
        "inference_flops_ratio": round(metrics["flops"]["inference_ratio"], 4),
    }
    key = f"{run.replace('_', '-')}-s{params.base.seed}"
    create_table_artifact(key=f"metrics-{key}", table=[row], description=f"Metrics of run {run}, seed {params.base.seed}")
    layers = read_csv(f"{params.base.plots_dir}/layers/{run}.csv", schema=LAYERS_CSV_SCHEMA)
    create_table_artifact(
        key=f"sparsity-{key}",
        table=[{"layer": r.name, "numel": int(r.numel), "density": round(float(r.density), 4)} for r in layers.itertuples()],
        description=f"Per-layer density of run {run}, seed {params.base.seed} (fraction of nonzero weights)",
    )
    return metrics


@task(name="publish-run-summary", **IO_RETRIES)
def publish_summary(run: str, run_dir: str) -> None:
    """Markdown artifact with the run's last history row (for the Prefect UI); ``run`` names the
    run and its seed (``dpf-s0``)."""
    from sparse_core.artifacts import read_parquet  # loaded by the stage already
    from sparse_core.schemas import HISTORY_SCHEMA

    hist = read_parquet(f"{run_dir}/history.parquet", schema=HISTORY_SCHEMA)
    if hist.empty:
        return
    last = hist.iloc[-1]
    create_markdown_artifact(
        key=f"run-{run.replace('_', '-')}",
        markdown=(
            f"### Run `{run}`\n\n| epoch | val accuracy | val loss | sparsity | img/s |\n|---|---|---|---|---|\n"
            f"| {int(last.epoch)} | {last.val_accuracy:.4f} | {last.val_loss:.4f} | {last.sparsity:.4f} | {last.images_per_s:.0f} |\n"
        ),
    )
