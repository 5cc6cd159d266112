"""One flow per DVC stage. Each validates params first, so a bad value stops the stage before
any task writes a file."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from sparse_core.config import load_params, seeded
from flows.runners import fan_out, make_task_runner, task_threads
from tasks import stages as t

#: Flows whose tasks fan out; :func:`with_task_runner` gives them the configured runner.
FANOUT_FLOWS = ("train", "local-analysis", "sweep", "curves")


def with_task_runner(stage_flow, params_path: str = "params.yaml"):
    """``stage_flow`` with the task runner of ``params.orchestration`` (env overrides applied)."""
    if stage_flow.name not in FANOUT_FLOWS:
        return stage_flow
    return stage_flow.with_options(task_runner=make_task_runner(load_params(params_path).orchestration))


@flow(name="prepare", flow_run_name="prepare")
def prepare_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.prepare_dataset(params_path)


@flow(name="ood", flow_run_name="ood")
def ood_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.prepare_ood(params_path)


@flow(name="corrupt", flow_run_name="corrupt")
def corrupt_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.corrupt_test_set(params_path)


@flow(name="report", flow_run_name="report")
def report_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.build_report(params_path)


@flow(name="local-analysis", flow_run_name="local-analysis", task_runner=ThreadPoolTaskRunner(max_workers=1))
def local_analysis_flow(params_path: str = "params.yaml") -> str:
    """The local-parallelism analyses; every (variant, batch size) sweep point is its own task,
    fanned out to the ``params.orchestration`` task runner. Model construction is serialised
    (``sparse_core.local.analysis.BUILD_LOCK``), so the results equal a sequential run."""
    params = load_params(params_path)
    a = params.local.analysis
    rows = fan_out(t.local_sweep_point, [(params_path, v, b) for v in a.variants for b in a.batch_sizes])
    side = t.local_side_analyses(params_path)  # after the sweep: its step timings run alone
    return t.local_write_analysis(params_path, rows, side)


def _seed(params_path: str, seed: int | None) -> int:
    """The training seed a stage runs (None: the first of ``base.seeds``), after validation."""
    return seeded(load_params(params_path), seed).base.seed


@flow(name="warmup", flow_run_name="warmup-s{seed}")
def warmup_flow(params_path: str = "params.yaml", seed: int | None = None) -> str:
    seed = _seed(params_path, seed)
    out = t.dense_warmup(params_path, seed)
    t.publish_summary(f"warmup-s{seed}", out)
    return out


@flow(name="train", flow_run_name="train-{method}-s{seed}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def train_flow(method: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    """One ``train@<method>-<seed>`` stage; DST Ensemble members are independent tasks fanned out
    to the ``params.orchestration`` task runner (byte-identical to one after another)."""
    params = load_params(params_path)
    seed = seeded(params, seed).base.seed
    if method == "dst_ensemble":
        threads = task_threads(params)
        outs = fan_out(t.train_member, [(params_path, i, threads, seed) for i in range(params.train.dst_ensemble.members)])
        for i, out in enumerate(outs):
            t.publish_summary(f"dst_ensemble-member-{i}-s{seed}", out)
        return t.finish_dst_ensemble(params_path, seed)
    out = t.train_run(params_path, method, seed)
    t.publish_summary(f"{method}-s{seed}", out)
    return out


@flow(name="collect", flow_run_name="collect-{name}-s{seed}")
def collect_flow(name: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    return t.collect_ensemble(params_path, name, _seed(params_path, seed))


@flow(name="evaluate-ensemble", flow_run_name="evaluate-{name}-s{seed}")
def evaluate_ensemble_flow(name: str, params_path: str = "params.yaml", seed: int | None = None) -> dict:
    return t.evaluate_ensemble(params_path, name, _seed(params_path, seed))


@flow(name="retrain", flow_run_name="retrain-{run}-s{seed}")
def retrain_flow(run: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    seed = _seed(params_path, seed)
    out = t.retrain_run(params_path, run, seed)
    t.publish_summary(f"{run}_retrain-s{seed}", out)
    return out


@flow(name="evaluate", flow_run_name="evaluate-{run}-s{seed}")
def evaluate_flow(run: str, params_path: str = "params.yaml", seed: int | None = None) -> dict:
    return t.evaluate_run(params_path, run, _seed(params_path, seed))


@flow(name="aggregate", flow_run_name="aggregate-{run}")
def aggregate_flow(run: str, params_path: str = "params.yaml") -> str:
    """``aggregate@<model>``: per-seed metrics of one model -> mean ± std in ``metrics/<model>.json``."""
    load_params(params_path)
    return t.aggregate_model(params_path, run)


@flow(name="sweep", flow_run_name="sweep-{method}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def sweep_flow(method: str, sparsities: list[float], seeds: list[int], params_path: str = "params.yaml") -> str:
    """A sparsity × seed sweep of ``method``: every point is an independent training task
    (``runs/sweeps/<method>/``), fanned out to the ``params.orchestration`` task runner;
    the table goes to ``reports/sweeps/<method>.csv`` and the Prefect artifact ``sweep-<method>``."""
    params = load_params(params_path)
    threads = task_threads(params)
    rows = fan_out(t.sweep_point, [(params_path, method, s, seed, threads) for s in sparsities for seed in seeds])
    return t.write_sweep(params_path, method, rows)


@flow(name="curves", flow_run_name="curves-{method}-s{seed}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def curves_flow(method: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    """``curves@<method>-<seed>``: ``method`` at every sparsity of ``curves.sparsities`` for one
    training seed, each point an independent task fanned out to the ``params.orchestration``
    task runner; rows to ``reports/curves/points/<method>-s<seed>.csv``."""
    params = load_params(params_path)
    seed = seeded(params, seed).base.seed
    threads = task_threads(params)
    rows = fan_out(t.sweep_point, [(params_path, method, s, seed, threads, "curves") for s in params.curves.sparsities])
    return t.write_curve_points(params_path, method, seed, rows)


@flow(name="curves-report", flow_run_name="curves-report")
def curves_report_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.curves_report(params_path)
