"""The whole pipeline as one flow: ``dvc repro`` through DVC's Python API.

DVC decides what is stale (its cache is the one cache: unchanged stages are skipped); each
stage's command (``sparseflow run <stage>``) starts its own stage flow run, tagged
``pipeline-run:<id of this flow run>`` so the server links every stage run to the pipeline
run that caused it. At the end this flow publishes the markdown artifact ``pipeline`` (stages
reproduced, stage flow runs with their states).

Only one pipeline run reproduces a workspace at a time (:mod:`flows.workspace`); a second
waits up to ``wait_seconds`` and then fails before touching anything.

Served on a schedule with ``sparseflow serve --cron "0 3 * * *"``, or deployed to a process
work pool with ``sparseflow deploy`` (see README, "Schedule it on a Prefect server").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

# Defined with the stage flows (a stage process reads them without importing this module).
from flows.stage_flows import PIPELINE_RUN_ENV, PIPELINE_TAG_PREFIX  # noqa: F401
from flows.workspace import WorkspaceBusy, workspace_lock


def use_profile(repo: Path, profile: str, dest: str | Path = "params.yaml") -> Path:
    """Copy ``profiles/<profile>.yaml`` over ``dest`` (relative to ``repo``; validated first,
    atomic rename); returns the profile's path.

    ``profile`` is a plain name matched against the files in ``profiles/`` (never joined as
    given; a link to a file outside ``profiles/`` is not a profile).

    Raises:
        UnknownNameError: no such profile (the message lists the available ones).
        ConfigError: the profile's params are invalid.
    """
    from sparse_core.artifacts import atomic_path
    from sparse_core.config import load_params, plain_name

    folder = (repo / "profiles").resolve()
    known = [p.stem for p in folder.glob("*.yaml") if p.is_file() and p.resolve().parent == folder]
    src = repo / "profiles" / f"{plain_name(profile, known, 'profile')}.yaml"
    load_params(src)
    with atomic_path(repo / dest) as tmp:
        shutil.copyfile(src, tmp)
    return src


def project_root(repo_dir: str | Path) -> Path:
    """``repo_dir`` resolved, if it is one of the two folders a pipeline run may reproduce: the
    working directory of this process (``sparseflow pipeline``, ``sparseflow serve``) or the
    checkout this module was loaded from (a deployment's worker loads the flow from the
    checkout it reproduces).

    ``repo_dir`` is a parameter of the pipeline deployment, which anyone with access to the
    Prefect API can override for a run: it must not reach another folder of the machine, or
    another DVC project whose stage commands would then run.

    Raises:
        FileNotFoundError: ``repo_dir`` is neither (the message names both).
    """
    repo = Path(repo_dir).resolve()
    allowed = {Path.cwd().resolve(), Path(__file__).resolve().parents[1]}
    if repo not in allowed:
        raise FileNotFoundError(f"{repo}: not this project's checkout; repo_dir must be the working directory or the checkout "
                                f"the flow was loaded from ({', '.join(sorted(map(str, allowed)))})")  # fmt: skip
    return repo


def _stage_runs_markdown(run_id: str, stages: list[str]) -> str:
    """The ``pipeline`` artifact: stages reproduced and the stage flow runs tagged with this run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[PIPELINE_TAG_PREFIX + run_id])),
            sort=FlowRunSort.START_TIME_ASC, limit=200,
        )
    lines = [f"### Pipeline run `{run_id}`", "", f"Stages reproduced: {', '.join(stages) or 'none (all up to date)'}", ""]
    lines += ["| stage flow run | state | id |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.state_name} | `{r.id}` |" for r in runs]
    return "\n".join(lines) + "\n"


#: How long a pipeline run waits for its fork server to listen before DVC starts (seconds).
FORK_WAIT_SECONDS = 120.0


@contextlib.contextmanager
def _stage_fork_server(wanted: bool) -> Iterator[None]:
    """While the block runs, a fork server for the working directory with this process's
    environment, named in ``os.environ`` so that DVC's stage commands inherit it; only when
    ``wanted`` and ``PREFECT_API_URL`` names a server (without one, each stage process starts
    Prefect's temporary server of its own, as before: a forked stage doing that was not tested)."""
    if not wanted or not os.environ.get("PREFECT_API_URL"):
        yield
        return
    from flows.stage_server import FORK_SERVER_ENV, stage_fork_server

    env, previous = dict(os.environ), os.environ.get(FORK_SERVER_ENV)
    # Waits for the server's imports (FORK_WAIT_SECONDS at most): every stage then starts from it,
    # and the first does not import the same libraries beside it on the same cores.
    with tempfile.TemporaryDirectory(prefix="sparseflow-forks-") as home, stage_fork_server(Path(home), env, FORK_WAIT_SECONDS):
        os.environ[FORK_SERVER_ENV] = env[FORK_SERVER_ENV]
        try:
            yield
        except BaseException:
            # A stop (Prefect raises TerminationSignal on SIGTERM before the handler of
            # flows.signals runs): the running stage first, through its caller, then the server.
            from flows.signals import stop_children

            stop_children()
            raise
        finally:
            if previous is None:
                os.environ.pop(FORK_SERVER_ENV, None)
            else:
                os.environ[FORK_SERVER_ENV] = previous


@flow(name="pipeline")
def pipeline_flow(
    targets: list[str] | None = None,
    force: bool = False,
    profile: str | None = None,
    repo_dir: str = ".",
    wait_seconds: float = 0.0,
    fork_server: bool = True,
) -> list[str]:
    """Reproduce the DVC pipeline of the checkout ``repo_dir``.

    With ``fork_server`` (the default) and a Prefect server named by ``PREFECT_API_URL`` (a
    deployment's run always has one), a fork server (:func:`flows.stage_server.stage_fork_server`)
    runs while DVC reproduces, and the stages start from it with Prefect and their library
    imported, as under ``make repro`` (a fresh stage process spends about 3 s on imports on the
    2-core machine; see README, "Orchestration").

    Args:
        targets: stages to reproduce with their upstream stages (``["evaluate@dpf-0"]``); all
            stages when empty. Each must be a stage address of the project (``dvc stage list``).
        force: re-run the targets even when DVC finds them up to date.
        profile: switch ``params.yaml`` to ``profiles/<profile>.yaml`` first (under the lock).
        repo_dir: the project checkout (absolute, or relative to the working directory).
        wait_seconds: how long to wait for another pipeline run on the same workspace
            (0: refuse at once; negative: wait forever).
        fork_server: start the stages from a fork server (False: each as a fresh process).

    Returns:
        The addresses of the stages that ran.

    Raises:
        flows.workspace.WorkspaceBusy: another run holds the workspace after ``wait_seconds``,
            or another DVC command holds DVC's lock.
        UnknownNameError: ``profile`` or a target is not one of the project's.
        FileNotFoundError: ``repo_dir`` is not this project's checkout (:func:`project_root`).
        ConfigError: ``params.yaml`` is invalid (checked before DVC reads it).
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    from sparse_core.config import load_params, plain_name

    logger = get_run_logger()
    repo = project_root(repo_dir)
    run_id = str(flow_run.id) if flow_run.id else None
    with workspace_lock(repo, wait_seconds, run_id):
        if profile:
            use_profile(repo, profile)
            logger.info("params.yaml <- profiles/%s.yaml", profile)
        if (repo / "params.yaml").is_file():
            load_params(repo / "params.yaml")  # before DVC parses it (no alias-expansion limit there)
        previous = os.environ.get(PIPELINE_RUN_ENV)
        if run_id:
            os.environ[PIPELINE_RUN_ENV] = run_id  # inherited by DVC's stage commands
        cwd = os.getcwd()
        try:
            os.chdir(repo)  # stage commands and relative paths resolve in the checkout
            try:
                with _stage_fork_server(fork_server), Repo(str(repo)) as dvc_repo:
                    # Targets are stage names of this project, matched against its stages (DVC
                    # would also take a path to another project's dvc.yaml).
                    known = [s.addressing for s in dvc_repo.index.stages]
                    targets = [plain_name(t, known, "DVC target stage") for t in targets or []]
                    stages = dvc_repo.reproduce(targets=targets or None, force=force)
            except LockError:
                raise WorkspaceBusy(f"{repo}: DVC's lock (.dvc/tmp/lock) is held by another DVC command (a `dvc repro` "
                                    "in a shell?); nothing was run. Wait for it to finish, then run again") from None  # fmt: skip
        finally:
            os.chdir(cwd)
            if previous is None:
                os.environ.pop(PIPELINE_RUN_ENV, None)
            else:
                os.environ[PIPELINE_RUN_ENV] = previous
    names = [s.addressing for s in stages]
    logger.info("stages reproduced: %s", ", ".join(names) or "none (everything up to date)")
    if run_id:
        create_markdown_artifact(key="pipeline", markdown=_stage_runs_markdown(run_id, names),
                                 description="Stages reproduced by this pipeline run and their flow runs")  # fmt: skip
    return names


@flow(name="sweep-deployment", flow_run_name="sweep-{method}")
def workspace_sweep_flow(
    method: str,
    sparsities: list[float],
    seeds: list[int] | None = None,
    repo_dir: str = ".",
    wait_seconds: float = 0.0,
) -> str:
    """``sparseflow sweep`` of the checkout ``repo_dir``, for a deployment (``sparseflow deploy
    --flow sweep``): under the same workspace lock as :func:`pipeline_flow`, so a sweep and a
    pipeline run never write one workspace at once. The sweep runs as the command does (its own
    ``sweep`` flow run, tagged ``pipeline-run:<this run>``; points fanned out to
    ``params.orchestration``'s task runner).

    Args:
        method, sparsities, seeds: as ``sparseflow sweep --method M --sparsity S… --seeds K…``
            (seeds default to ``[0]``).
        repo_dir, wait_seconds: as for :func:`pipeline_flow`.

    Returns:
        The sweep table, ``<reports_dir>/sweeps/<method>.csv`` in the checkout.

    Raises:
        flows.workspace.WorkspaceBusy: another run holds the workspace after ``wait_seconds``.
        FileNotFoundError: ``repo_dir`` is not this project's checkout (:func:`project_root`).
        RuntimeError: the sweep command failed (the message ends with its error output).
    """
    import subprocess
    import sys

    from sparse_core.config import load_params

    repo = project_root(repo_dir)
    run_id = str(flow_run.id) if flow_run.id else None
    with workspace_lock(repo, wait_seconds, run_id):
        params = load_params(repo / "params.yaml")
        cmd = [str(Path(sys.executable).parent / "sparseflow"), "sweep", "--method", method,
               "--sparsity", *map(str, sparsities), "--seeds", *map(str, seeds or [0])]  # fmt: skip
        env = {**os.environ, **({PIPELINE_RUN_ENV: run_id} if run_id else {})}
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed in {repo} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    out = repo / params.base.reports_dir / "sweeps" / f"{method}.csv"
    get_run_logger().info("sweep of %s: %s", method, out)
    return str(out)
