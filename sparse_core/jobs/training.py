"""The ``warmup``, ``train`` and ``retrain`` jobs, members of ``members`` ensembles, and data-parallel training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_core import artifacts, schemas
from sparse_core.config import Params, retrain_run_name, run_epochs
from sparse_core.distributed import active_parallel
from sparse_core.methods import registry
from sparse_core.methods.base import MaskedMethod, Method
from sparse_core.jobs.rundirs import WARMUP_RUN, export_run, fresh_run_dir, load_exported, member_run, member_seed, run_dir, setup
from sparse_core.jobs.fitting import train_run
from sparse_core.jobs.local_runs import stage_train_local


def stage_warmup(params: Params) -> Path:
    """``warmup``: dense training for ``warmup.epochs`` (0: only the seeded initial weights)."""
    device, data, model = setup(params)
    fp = params.fingerprint("base", "data", "augment", "model", "warmup")
    if params.warmup.epochs == 0:
        fresh_run_dir(params, WARMUP_RUN, fp)
        return export_run(params, WARMUP_RUN, model, Method(model, 0), schemas.empty_history(), {"method": "init", "fingerprint": fp})
    return train_run(params, WARMUP_RUN, "dense", model, data, device, params.warmup.optim, params.warmup.epochs, fp, "seed")


def stage_train(params: Params, method: str) -> Path:
    """``train@<method>``: one run of ``method`` from the warmup weights (or the seeded init).

    Methods of the DST family start from their own seeded init (sparse from scratch);
    ``dst_ensemble`` trains all its members (see :func:`stage_train_member`).
    """
    if method not in params.train.methods:
        raise ValueError(f"method {method!r} is not listed in train.methods {list(params.train.methods)}")
    spec = registry.spec(method)
    if spec.ensemble == "members":
        for i in range(params.train.dst_ensemble.members):
            stage_train_member(params, method, i)
        return finish_members(params, method)
    if spec.family == "local":
        return stage_train_local(params, method)
    return train_single(params, method, method)


def train_single(params: Params, method: str, run: str, num_threads: int = 0) -> Path:
    """One run of a single-model method (from the warmup unless it is a DST method)."""
    device, data, model = setup(params, num_threads=num_threads)
    init = "seed"
    if params.train.from_warmup and registry.spec(method).start == "warmup":
        load_exported(params, WARMUP_RUN, model)
        init = WARMUP_RUN
    fp = params.fingerprint("base", "data", "augment", "model", "warmup", "train") + f"-{method}"
    return train_run(params, run, method, model, data, device, params.train.optim, run_epochs(params.train, method), fp, init)


def stage_train_ddp(params: Params, method: str) -> Path | None:
    """This rank of ``train@<method>`` trained data-parallel (DDP) under ``torchrun``: any
    non-local method (``dst_ensemble`` trains its members one after another), with the same
    ``runs/<method>/`` files as :func:`stage_train`, written by rank 0 (``config.json`` adds
    ``distributed``). Global-batch semantics, mask verification and BN: :mod:`sparse_core.distributed`.

    Returns:
        The run folder on rank 0, None on the other ranks.

    Raises:
        ValueError: ``method`` is local (its chunks run with ``sparseflow local-worker``) or not
            in ``train.methods``.
        RuntimeError: not launched by torchrun.
        sparse_core.distributed.MaskDivergenceError: the ranks' masks differ at a check.
    """
    from sparse_core.distributed import data_parallel

    if registry.spec(method).family == "local":
        raise ValueError(f"{method} is not data-parallel; its chunks run one per process with `sparseflow local-worker`")
    if method not in params.train.methods:
        raise ValueError(f"method {method!r} is not listed in train.methods {list(params.train.methods)}")
    with data_parallel(params.base.device) as parallel:
        out = stage_train(params, method)
    return out if parallel.is_main else None


def finish_members(params: Params, name: str) -> Path:
    """After all members of ensemble ``name``: one training-curve file with a ``member`` column
    (rank 0 under DDP)."""
    if not active_parallel().is_main:
        return run_dir(params, name)
    frames = []
    for i in range(params.train.dst_ensemble.members):
        hist = artifacts.read_parquet(run_dir(params, member_run(name, i)) / "history.parquet", schema=schemas.HISTORY_SCHEMA)
        frames.append(hist.assign(member=i))
    artifacts.write_csv(pd.concat(frames, ignore_index=True), Path(params.base.plots_dir) / "history" / f"{name}.csv")
    return run_dir(params, name)


def stage_train_member(params: Params, name: str, i: int, num_threads: int = 0) -> Path:
    """Member ``i`` of the members ensemble ``name`` (the DST Ensemble): a full
    ``train.dst_ensemble.method`` run with seed :func:`member_seed` ``(base.seed, i)`` (init,
    masks and data order), in ``runs/s<seed>/<name>/member_<i>/``. Members are independent: any
    task runner may train them concurrently (``num_threads``: see :func:`setup`)."""
    seed = member_seed(params.base.seed, i)
    device, data, model = setup(params, seed, num_threads)
    fp = params.fingerprint("base", "data", "augment", "model", "train") + f"-{name}-{i}"
    method = params.train.dst_ensemble.method
    return train_run(
        params, member_run(name, i), method, model, data, device, params.train.optim, params.train.epochs, fp, "seed", seed=seed
    )


def stage_retrain(params: Params, run: str) -> Path:
    """``retrain@<run>``: fine-tune ``run``'s exported model with its mask frozen (masked gradients)."""
    if run not in params.retrain.runs:
        raise ValueError(f"run {run!r} is not listed in retrain.runs {list(params.retrain.runs)}")
    return retrain_run(params, run, retrain_run_name(run))


def retrain_run(params: Params, source: str, out: str, num_threads: int = 0) -> Path:
    """Fine-tune run ``source`` with its mask frozen for ``retrain.epochs`` into run ``out``."""
    device, data, model = setup(params, num_threads=num_threads)
    masks = load_exported(params, source, model)
    fp = params.fingerprint("base", "data", "augment", "model", "warmup", "train", "retrain") + f"-{source}"

    def freeze(method: Method) -> None:
        assert isinstance(method, MaskedMethod)
        method.masks.load_state_dict(masks.state_dict())
        method.masks.apply_()

    return train_run(params, out, "retrain", model, data, device, params.retrain.optim, params.retrain.epochs, fp, source, freeze)
