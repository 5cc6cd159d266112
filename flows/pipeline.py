"""The whole pipeline as one flow: ``dvc repro`` through DVC's Python API.

DVC decides what is stale (its cache is the one cache); each stage's command starts its own
stage flow. Servable on a schedule: ``sparseflow serve --cron "0 3 * * *"``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger


@flow(name="pipeline")
def pipeline_flow(targets: list[str] | None = None, force: bool = False, repo_dir: str = ".") -> list[str]:
    """Reproduce ``targets`` (all stages when empty); returns the names of stages that ran."""
    from dvc.repo import Repo

    logger = get_run_logger()
    with Repo(repo_dir) as repo:
        stages = repo.reproduce(targets=targets or None, force=force)
    names = [s.addressing for s in stages]
    logger.info("stages reproduced: %s", ", ".join(names) or "none (everything up to date)")
    return names
