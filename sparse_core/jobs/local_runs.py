"""Training jobs of the ``local`` family (Laskin et al. 2020): the exact simulation and one process per chunk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_core.config import Params
from sparse_core.data import PreparedData
from sparse_core.engine import resolve_device
from sparse_core.methods import registry
from sparse_core.methods.base import Method
from sparse_core.precision import Precision
from sparse_core.jobs.rundirs import (
    WARMUP_RUN, code_fingerprint, export_run, fresh_run_dir, load_exported, local_variant, fastpath_choice, setup, transform_for,
)
from sparse_core.jobs.fitting import train_run


def local_net(params: Params, method: str, net: nn.Module, data: PreparedData):
    from sparse_core.local import LocalNet

    lc = params.local
    return LocalNet(net, local_variant(method), data.shape, data.num_classes, lc.chunks, lc.split_points, lc.head,
                    lc.head_hidden, per_chunk_optimizer=lc.optimizer == "per_chunk")  # fmt: skip


def _local_setup(params: Params, method: str) -> tuple[torch.device, PreparedData, nn.Module, str, str]:
    """Device, data, the network (warmup weights when ``train.from_warmup``), its init name and
    the config fingerprint of a local run."""
    device, data, net = setup(params)
    init = "seed"
    if params.train.from_warmup:
        load_exported(params, WARMUP_RUN, net)
        init = WARMUP_RUN
    fp = params.fingerprint("base", "data", "augment", "model", "warmup", "train", "local") + f"-{method}"
    return device, data, net, init, fp


def stage_train_local(params: Params, method: str) -> Path:
    """``train@local_*``: local training (Laskin et al. 2020; :mod:`sparse_core.local`) from the
    warmup weights (or the seeded init), simulated exactly in one process or, with
    ``local.execution: pipeline``, one process per chunk. The auxiliary heads (seeded by
    ``base.seed``) are training-only: ``model.safetensors`` holds the network alone."""
    device, data, net, init, fp = _local_setup(params, method)
    if params.local.execution == "pipeline":
        return _train_local_pipeline(params, method, net, data, init, fp)
    torch.manual_seed(params.base.seed)
    local = local_net(params, method, net, data)
    return train_run(params, method, params.local.sparse_method, local, data, device, params.train.optim,
                      params.train.epochs, fp, init, recorded_method=method)  # fmt: skip


def _local_pipeline_spec(params: Params, method: str, net: nn.Module, data: PreparedData):
    import functools

    from sparse_core.local import build_local
    from sparse_core.local.chunk_processes import PipelineSpec

    lc = params.local
    build = functools.partial(
        build_local, params.model.name, params.model.kwargs, data.shape, data.num_classes, local_variant(method),
        lc.chunks, lc.split_points, lc.head, lc.head_hidden, params.base.seed,
        {k: v.detach().clone() for k, v in net.state_dict().items()},
    )  # fmt: skip
    backend = lc.backend if lc.backend != "auto" else ("nccl" if resolve_device(params.base.device).type == "cuda" else "gloo")
    choice = fastpath_choice(params, torch.device("cuda" if backend == "nccl" else "cpu"), data)  # fp16 without CUDA: refused here
    return PipelineSpec(build=build, train=data.splits["train"], transform=transform_for(params, data),
                        optim=params.train.optim, epochs=params.train.epochs, seed=params.base.seed, backend=backend,
                        precision=choice.precision, channels_last=choice.channels_last)  # fmt: skip


def _export_local_pipeline(params: Params, method: str, local, info: dict, data: PreparedData, init: str, fingerprint: str,
                           backend: str, launcher: str) -> Path:  # fmt: skip
    from sparse_core.engine import evaluate

    from sparse_core.engine import lr_at

    optim, epochs = params.train.optim, params.train.epochs
    steps_per_epoch = -(-len(data.splits["train"]) // optim.batch_size)
    last = info["losses"][-1]  # the network's own loss (last chunk), per step
    # On the CPU, after the chunks have merged: fp16 (CUDA only) falls back to fp32 here.
    choice = fastpath_choice(params, torch.device("cpu") if backend != "nccl" else torch.device("cuda"), data)
    precision = Precision("fp32" if choice.precision == "fp16" else choice.precision, choice.channels_last)
    val = evaluate(local.net, data.splits["val"], transform_for(params, data), params.evaluate.batch_size, torch.device("cpu"),
                   precision)  # fmt: skip
    seconds = max(info["seconds"]) / epochs  # the slowest chunk's time in its step loop, per epoch
    nan = float("nan")
    # Same columns as every run's history; per-epoch validation happens once, at the end.
    history = pd.DataFrame(
        [{"epoch": e + 1, "step": (e + 1) * steps_per_epoch, "lr": lr_at((e + 1) * steps_per_epoch - 1, steps_per_epoch, epochs, optim),
          "train_loss": float(np.mean(last[e * steps_per_epoch : (e + 1) * steps_per_epoch])), "train_accuracy": nan,
          "val_loss": val["loss"] if e + 1 == epochs else nan, "val_accuracy": val["accuracy"] if e + 1 == epochs else nan,
          "sparsity": 0.0, "seconds": seconds, "images_per_s": len(data.splits["train"]) / seconds if seconds else nan}
         for e in range(epochs)]
    )  # fmt: skip
    extra = {"method": method, "init": init, "seed": params.base.seed, "fingerprint": fingerprint,
             "local": {"variant": local_variant(method), "execution": "pipeline", "launcher": launcher, "backend": backend,
                       "seconds_per_chunk": info["seconds"], "steps": info["steps"],
                       "windows": [[w.start, w.end] for w in local.windows], "blocks": [b.name for b in local.blocks]}}  # fmt: skip
    return export_run(params, method, local.net, Method(local.net, 0), history, extra)


def _train_local_pipeline(params: Params, method: str, net: nn.Module, data: PreparedData, init: str, fp: str) -> Path:
    from sparse_core.local.chunk_processes import run_pipeline

    fingerprint = f"{fp}-{code_fingerprint(method, params.local.sparse_method)}"
    fresh_run_dir(params, method, fingerprint)
    spec = _local_pipeline_spec(params, method, net, data)
    local, info = run_pipeline(spec)
    return _export_local_pipeline(params, method, local, info, data, init, fingerprint, spec.backend, "spawn")


def stage_local_worker(params: Params, method: str) -> Path | None:
    """This process's chunk of ``train@<method>`` under ``torchrun`` (one process per chunk);
    rank 0 merges the chunks and exports ``runs/<method>/`` (returned; None on other ranks)."""
    import os

    from sparse_core.local.chunk_processes import run_pipeline_torchrun

    if method not in registry.names(family="local"):
        raise ValueError(f"local-worker runs local methods {registry.names(family='local')}, not {method!r}")
    _, data, net, init, fp = _local_setup(params, method)
    fingerprint = f"{fp}-{code_fingerprint(method, params.local.sparse_method)}"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        fresh_run_dir(params, method, fingerprint)
    spec = _local_pipeline_spec(params, method, net, data)
    # Outside the run folder: rank 0 may be clearing that folder while another rank starts.
    parts = Path(params.base.runs_dir) / f".{method}.pipeline_parts"
    out = run_pipeline_torchrun(spec, parts)
    if out is None:
        return None
    local, info = out
    shutil.rmtree(parts, ignore_errors=True)
    return _export_local_pipeline(params, method, local, info, data, init, fingerprint, spec.backend, "torchrun")
