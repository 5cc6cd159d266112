"""One training run of any registered method: build the method, fit, export (every training job ends here)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparse_core.config import Params, resolve_dst
from sparse_core.data import PreparedData
from sparse_core.distributed import active_parallel
from sparse_core.engine import fit
from sparse_core.live import live_target
from sparse_core.methods.base import create_method
from sparse_core.jobs.rundirs import code_fingerprint, export_run, fastpath_choice, fresh_run_dir, local_variant, run_dir, transform_for
from sparse_core.precision import Precision


def train_run(
    params: Params, run: str, method_name: str, model: nn.Module, data: PreparedData, device: torch.device,
    optim, epochs: int, fingerprint: str, init: str, prepare_method=None, seed: int | None = None,
    recorded_method: str | None = None,
) -> Path:  # fmt: skip
    """Train ``model`` (a registry network, or a LocalNet wrapping one: the sparse method then
    acts on the network, and only the network is exported) and export the run.

    Inside :func:`stage_train_ddp` (a DDP rank, :func:`~sparse_core.distributed.active_parallel`)
    every rank trains on its own device; rank 0 alone prepares the folder and exports, and every
    rank returns once the export is complete."""
    fingerprint = f"{fingerprint}-{code_fingerprint(*filter(None, (method_name, recorded_method)))}"
    parallel = active_parallel()
    steps_per_epoch = -(-len(data.splits["train"]) // optim.batch_size)
    steps = steps_per_epoch * epochs
    t = params.train
    # ΔT given as a fraction of a run counts one single run's steps (train.epochs), for EDST too.
    dst = resolve_dst(t.dst, steps_per_epoch * t.epochs)
    seed = params.base.seed if seed is None else seed
    net = getattr(model, "net", model)
    # Built before the run folder is touched: a schedule that cannot work (ConfigError) must not
    # cost the previous run's files.
    method = create_method(method_name, net, steps, t.pruning, dst, seed, t.edst, epochs, t.model_extra, data.shape)
    choice = fastpath_choice(params, parallel.device or device, data)
    precision = Precision(choice.precision, choice.channels_last, (parallel.device or device).type)
    # A checkpoint of another precision or layout (base.precision: auto on another machine) is not resumed.
    fingerprint = f"{fingerprint}-{choice.candidate.label}"
    if parallel.is_main:
        fresh_run_dir(params, run, fingerprint)
    parallel.barrier()  # no rank looks for a checkpoint while rank 0 may be clearing the folder
    device = parallel.device or device
    if prepare_method is not None:
        prepare_method(method)
    model.to(device)
    result = fit(
        model, method, data.splits["train"], data.splits["val"], transform_for(params, data), optim,
        epochs=epochs, run_dir=run_dir(params, run), seed=seed, device=device,
        fingerprint=fingerprint, resume=params.base.resume, progress=params.base.progress and parallel.is_main,
        parallel=parallel, nonfinite_retries=params.base.nonfinite_retries, nonfinite_lr_factor=params.base.nonfinite_lr_factor,
        precision=precision, eval_batch_size=params.evaluate.batch_size, live=live_target(params.base.plots_dir, run),
    )  # fmt: skip
    method.on_train_end()
    parallel.verify_masks(method, steps)  # DDP: gmp/dpf's final update, oneshot's only one
    extra = {"method": recorded_method or method_name, "init": init, "seed": seed, "fingerprint": fingerprint,
             "fastpath": choice.record()}  # fmt: skip
    if recorded_method and local_variant(recorded_method):
        extra["local"] = {"variant": local_variant(recorded_method), "sparse_method": method_name,
                          "windows": [[w.start, w.end] for w in model.windows], "blocks": [b.name for b in model.blocks]}  # fmt: skip
    extra.update(parallel.describe())
    out = export_run(params, run, net, method, result.history, extra) if parallel.is_main else run_dir(params, run)
    parallel.barrier()  # DDP: every rank returns after rank 0's export
    return out
