"""One flow per DVC stage. Each validates params first, so a bad value stops the stage before
any task writes a file.

The flows (``prepare_flow``, ``train_flow``, ...) are Prefect flows built on first access
(PEP 562 module ``__getattr__``), not when this module is imported: building one costs
10-20 ms (Prefect derives a parameter schema with pydantic), and a stage process needs one
of fourteen. ``from flows.stage_flows import train_flow`` works as usual.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from sparse_core.config import load_params, seeded
from sparse_core.methods import registry
from flows.runners import fan_out, make_task_runner, task_threads
from tasks import stage_tasks as t

#: Environment variable through which stage commands learn the pipeline run that started them.
PIPELINE_RUN_ENV = "SPARSEFLOW_PIPELINE_RUN_ID"
#: Tag of every stage flow run a pipeline run started: this prefix + the pipeline's flow run id.
PIPELINE_TAG_PREFIX = "pipeline-run:"

#: Flows whose tasks fan out; :func:`with_task_runner` gives them the configured runner.
FANOUT_FLOWS = ("train", "local-analysis", "sweep", "curves")

#: Stage flows not built yet: public name -> (function, options of ``prefect.flow``).
_LAZY_FLOWS: dict[str, tuple[Callable, dict[str, Any]]] = {}


def _lazy_flow(**options: Any) -> Callable[[Callable], Callable]:
    """Register ``_<name>`` as the stage flow ``<name>``, built by ``prefect.flow(**options)``
    on first access (:func:`__getattr__`)."""

    def register(fn: Callable) -> Callable:
        _LAZY_FLOWS[fn.__name__.removeprefix("_")] = (fn, options)
        return fn

    return register


def __getattr__(name: str) -> Any:
    """Build the stage flow ``name`` on first access and keep it as a module attribute."""
    try:
        fn, options = _LAZY_FLOWS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    built = globals()[name] = flow(**options)(fn)
    return built


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_FLOWS})


#: Prefect's setting of flow-run heartbeats; when set in the environment, stages keep them.
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@contextlib.contextmanager
def stage_settings() -> Iterator[None]:
    """Prefect settings of a ``sparseflow run`` stage process: flow-run heartbeats off, unless
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set in the environment.

    Why: since Prefect 3.9 a flow run emits heartbeat events (default every 180 s; earlier
    versions defaulted to none) from a thread that sleeps in 1 s steps and is joined when the
    run ends, which added about 1 s to every stage (measured: a no-op flow run took 1.1 s with
    them, 0.2 s without). They serve zombie-run detection, which needs an automation on the
    server that sparseflow does not create; set the variable (e.g. to 180) to have them,
    at up to 1 s per stage. Everything else of the flow run (states, task runs, logs,
    artifacts, tags) is unchanged.
    """
    if os.environ.get(HEARTBEAT_ENV):
        yield
        return
    from prefect.context import SettingsContext

    ctx = SettingsContext.get()
    # model_copy, not temporary_settings(): the same result without re-validating every
    # setting from the environment (0.1 s).
    settings = ctx.settings.model_copy(update={"flows": ctx.settings.flows.model_copy(update={"heartbeat_frequency": None})})
    with SettingsContext(profile=ctx.profile, settings=settings):
        yield


def with_task_runner(stage_flow, params_path: str = "params.yaml"):
    """``stage_flow`` with the task runner of ``params.orchestration`` (env overrides applied)."""
    if stage_flow.name not in FANOUT_FLOWS:
        return stage_flow
    return stage_flow.with_options(task_runner=make_task_runner(load_params(params_path).orchestration))


@_lazy_flow(name="prepare", flow_run_name="prepare")
def _prepare_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.prepare_dataset(params_path)


@_lazy_flow(name="fastpath", flow_run_name="fastpath")
def _fastpath_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.resolve_fastpath(params_path)


@_lazy_flow(name="ood", flow_run_name="ood")
def _ood_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.prepare_ood(params_path)


@_lazy_flow(name="corrupt", flow_run_name="corrupt")
def _corrupt_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.corrupt_test_set(params_path)


@_lazy_flow(name="report", flow_run_name="report")
def _report_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.build_report(params_path)


@_lazy_flow(name="local-analysis", flow_run_name="local-analysis", task_runner=ThreadPoolTaskRunner(max_workers=1))
def _local_analysis_flow(params_path: str = "params.yaml") -> str:
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


@_lazy_flow(name="warmup", flow_run_name="warmup-s{seed}")
def _warmup_flow(params_path: str = "params.yaml", seed: int | None = None) -> str:
    seed = _seed(params_path, seed)
    out = t.dense_warmup(params_path, seed)
    t.publish_summary(f"warmup-s{seed}", out)
    return out


@_lazy_flow(name="train", flow_run_name="train-{method}-s{seed}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def _train_flow(method: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    """One ``train@<method>-<seed>`` stage; DST Ensemble members are independent tasks fanned out
    to the ``params.orchestration`` task runner (byte-identical to one after another)."""
    params = load_params(params_path)
    seed = seeded(params, seed).base.seed
    if registry.spec(method).ensemble == "members":
        threads = task_threads(params)
        outs = fan_out(t.train_member, [(params_path, method, i, threads, seed) for i in range(params.train.dst_ensemble.members)])
        for i, out in enumerate(outs):
            t.publish_summary(f"{method}-member-{i}-s{seed}", out)
        return t.finish_members(params_path, method, seed)
    out = t.train_run(params_path, method, seed)
    t.publish_summary(f"{method}-s{seed}", out)
    return out


@_lazy_flow(name="collect", flow_run_name="collect-{name}-s{seed}")
def _collect_flow(name: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    return t.collect_ensemble(params_path, name, _seed(params_path, seed))


@_lazy_flow(name="evaluate-ensemble", flow_run_name="evaluate-{name}-s{seed}")
def _evaluate_ensemble_flow(name: str, params_path: str = "params.yaml", seed: int | None = None) -> dict:
    return t.evaluate_ensemble(params_path, name, _seed(params_path, seed))


@_lazy_flow(name="retrain", flow_run_name="retrain-{run}-s{seed}")
def _retrain_flow(run: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    seed = _seed(params_path, seed)
    out = t.retrain_run(params_path, run, seed)
    t.publish_summary(f"{run}_retrain-s{seed}", out)
    return out


@_lazy_flow(name="evaluate", flow_run_name="evaluate-{run}-s{seed}")
def _evaluate_flow(run: str, params_path: str = "params.yaml", seed: int | None = None) -> dict:
    return t.evaluate_run(params_path, run, _seed(params_path, seed))


@_lazy_flow(name="aggregate", flow_run_name="aggregate-{run}")
def _aggregate_flow(run: str, params_path: str = "params.yaml") -> str:
    """``aggregate@<model>``: per-seed metrics of one model -> mean ± std in ``metrics/<model>.json``."""
    load_params(params_path)
    return t.aggregate_model(params_path, run)


@_lazy_flow(name="sweep", flow_run_name="sweep-{method}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def _sweep_flow(method: str, sparsities: list[float], seeds: list[int], params_path: str = "params.yaml") -> str:
    """A sparsity × seed sweep of ``method``: every point is an independent training task
    (``runs/sweeps/<method>/``), fanned out to the ``params.orchestration`` task runner;
    the table goes to ``reports/sweeps/<method>.csv`` and the Prefect artifact ``sweep-<method>``."""
    params = load_params(params_path)
    threads = task_threads(params)
    rows = fan_out(t.sweep_point, [(params_path, method, s, seed, threads) for s in sparsities for seed in seeds])
    return t.write_sweep(params_path, method, rows)


@_lazy_flow(name="curves", flow_run_name="curves-{method}-s{seed}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def _curves_flow(method: str, params_path: str = "params.yaml", seed: int | None = None) -> str:
    """``curves@<method>-<seed>``: ``method`` at every sparsity of ``curves.sparsities`` for one
    training seed, each point an independent task fanned out to the ``params.orchestration``
    task runner; rows to ``reports/curves/points/<method>-s<seed>.csv``."""
    params = load_params(params_path)
    seed = seeded(params, seed).base.seed
    threads = task_threads(params)
    rows = fan_out(t.sweep_point, [(params_path, method, s, seed, threads, "curves") for s in params.curves.sparsities])
    return t.write_curve_points(params_path, method, seed, rows)


@_lazy_flow(name="curves-report", flow_run_name="curves-report")
def _curves_report_flow(params_path: str = "params.yaml") -> str:
    load_params(params_path)
    return t.curves_report(params_path)
