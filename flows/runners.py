"""Task runners for the fan-out inside a stage (``params.orchestration``).

Independent units of work (DST Ensemble members, sparsity × seed sweep points, local-parallelism
sweep points) are Prefect tasks; the runner decides where they execute:

- ``sequential``: one after another in the flow's process (Prefect's ThreadPoolTaskRunner
  with one worker);
- ``thread`` / ``process``: Prefect's ThreadPoolTaskRunner / ProcessPoolTaskRunner with
  ``max_workers``;
- ``dask``: prefect-dask's DaskTaskRunner, on the scheduler at ``dask_address`` when given,
  otherwise on a local cluster of ``dask_workers`` worker processes with one thread each. The
  dashboard address is printed when the cluster starts.

``SPARSEFLOW_TASK_RUNNER`` and ``SPARSEFLOW_DASK_ADDRESS`` override the params file, so one
checkout can be pointed at a cluster without editing (or invalidating) anything.

Results do not depend on the runner: every task seeds itself, model construction is
serialised inside a process, and every task runs with the intra-op thread count of the process
that submitted it (:func:`task_threads`), because CPU kernels round differently with a
different thread count.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from sparse_core.config import ConfigError, OrchestrationSection, Params

RUNNERS = ("sequential", "thread", "process", "dask")


def resolve(orch: OrchestrationSection) -> OrchestrationSection:
    """``orch`` with the environment overrides applied.

    Raises:
        ConfigError: ``SPARSEFLOW_TASK_RUNNER`` names an unknown runner.
    """
    update: dict[str, Any] = {}
    runner = os.environ.get("SPARSEFLOW_TASK_RUNNER")
    if runner:
        if runner not in RUNNERS:
            raise ConfigError(f"SPARSEFLOW_TASK_RUNNER={runner!r}: expected one of {', '.join(RUNNERS)}")
        update["task_runner"] = runner
    address = os.environ.get("SPARSEFLOW_DASK_ADDRESS")
    if address:
        update["dask_address"] = address
        update.setdefault("task_runner", "dask")
    return orch.model_copy(update=update)


def make_task_runner(orch: OrchestrationSection) -> TaskRunner:
    """The Prefect task runner for ``orch`` (environment overrides applied)."""
    orch = resolve(orch)
    if orch.task_runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if orch.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=orch.max_workers)
    if orch.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=orch.max_workers)
    # One line per worker event is noise in a stage log; warnings and the dashboard line stay.
    # (Read by dask when it is first imported, here and in every worker process.)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from prefect_dask import DaskTaskRunner

    if orch.dask_address:
        return DaskTaskRunner(address=orch.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"},
    )  # fmt: skip


def task_threads(params: Params) -> int:
    """Intra-op threads every fanned-out task uses: ``base.num_threads``, else the submitting
    process's own count, so a task gives the same bits wherever it runs."""
    import torch

    return params.base.num_threads or torch.get_num_threads()


def fan_out(task: Any, calls: Sequence[tuple]) -> list[Any]:
    """Submit ``task(*args)`` for every ``args`` in ``calls`` to the flow's task runner and
    return the results in submission order (the first failure is raised)."""
    futures = [task.submit(*args) for args in calls]
    return [f.result() for f in futures]
