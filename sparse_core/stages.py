"""What each pipeline stage does, as plain functions: params in, files out.

Tasks (``tasks/``) call these; they hold no Prefect or DVC code, so every stage can be run and
tested in-process. Layout of a run folder ``<runs_dir>/<run>/``:

==========================  ===========================================================
``last.pt``                 checkpoint of the last finished epoch (resume)
``model.safetensors``       exported weights (``m ⊙ w``) with buffers, for evaluation
``masks.safetensors``       masks of the prunable set (pruning methods only)
``layers.parquet``          per-layer table (name, shape, target/realised density, nonzeros)
``history.parquet``         one row per epoch
``mask_updates.parquet``    one row per mask update (gmp, dpf, oneshot)
``config.json``             resolved params, method, package/torch/data versions
==========================  ===========================================================
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_core import artifacts, evalsets
from sparse_core.config import ConfigError, Params, retrain_run_name, sweep_methods
from sparse_core.data import BatchTransform, PreparedData, Split, load_prepared, prepare_dataset, prepared_path
from sparse_core.distributed import active_parallel
from sparse_core.checkpoint import CheckpointStore
from sparse_core.engine import evaluate, fit, predict, resolve_device, seed_everything
from sparse_core.evaluation import Evaluation, evaluate_probs, model_probs
from sparse_core.flops import TrainingCost, inference_flops, layer_flops
from sparse_core.methods import registry
from sparse_core.methods.base import MaskedMethod, Method, create_method
from sparse_core.models import create_model
from sparse_core.precision import Precision
from sparse_core.sparsity import MaskSet, prunable_parameters

WARMUP_RUN = "warmup"
_BUILD_LOCK = threading.Lock()


# ----- shared helpers ------------------------------------------------------------------------
def _setup(params: Params, seed: int | None = None, num_threads: int = 0) -> tuple[torch.device, PreparedData, nn.Module]:
    """Seed, pick the device, load the prepared data and build the seeded model.

    ``num_threads`` (else ``base.num_threads``; 0 keeps torch's default) sets torch's intra-op
    threads. CPU results depend on it in the last bits, so a task fanned out to another
    process gets the thread count of the process that would have run it sequentially.
    """
    seed = params.base.seed if seed is None else seed
    seed_everything(seed, params.base.deterministic)
    if num_threads or params.base.num_threads:
        torch.set_num_threads(num_threads or params.base.num_threads)
    device = resolve_device(params.base.device)
    data = load_data(params)
    return device, data, build_model(params, data, seed)


def precision_of(params: Params, device: torch.device) -> Precision:
    """``base.precision`` and ``base.channels_last`` on ``device`` (:mod:`sparse_core.precision`).

    Raises:
        ConfigError: fp16 on a device that is not CUDA (``base.device: auto`` without a GPU).
    """
    try:
        return Precision.of(params.base, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_data(params: Params) -> PreparedData:
    return load_prepared(prepared_path(params.base.data_dir, params.data.dataset))


def build_model(params: Params, data: PreparedData, seed: int | None = None) -> nn.Module:
    """The configured model, initialised from ``seed`` (default ``base.seed``: the same init in
    every stage). Thread-safe: seeding torch's global generator and drawing the init happen
    under one lock, so concurrent tasks of a thread runner get the same init as sequential ones."""
    c, h, _ = data.shape
    with _BUILD_LOCK:
        torch.manual_seed(params.base.seed if seed is None else seed)
        return create_model(params.model.name, in_channels=c, num_classes=data.num_classes, image_size=h, **params.model.kwargs)


def transform_for(params: Params, data: PreparedData) -> BatchTransform:
    aug = params.augment
    flip = {"on": True, "off": False, "auto": data.flip}[aug.horizontal_flip]
    return BatchTransform(data.mean, data.std, aug.crop_padding if aug.random_crop else 0, flip)


def run_dir(params: Params, run: str) -> Path:
    return Path(params.base.runs_dir) / run


def _versions() -> dict[str, str]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("sparseflow", "torch", "torchvision", "prefect", "dvc")},
    }


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_version(params: Params) -> dict[str, str]:
    """The prepared data a run trained on: ``{"dataset", "file", "sha256"}`` (sha256 of the
    prepared Parquet, which fixes the images, labels, split and normalisation)."""
    path = prepared_path(params.base.data_dir, params.data.dataset)
    if not path.is_file():
        return {"dataset": params.data.dataset, "file": str(path), "sha256": "missing"}
    st = path.stat()
    return {"dataset": params.data.dataset, "file": str(path), "sha256": _file_sha256(str(path), st.st_mtime_ns, st.st_size)}


def load_exported(params: Params, run: str, model: nn.Module) -> MaskSet:
    """Load ``model.safetensors`` (and masks when present) of ``run`` into ``model``.

    Returns:
        The run's masks over the configured prunable set (all ones for dense runs).

    Raises:
        FileNotFoundError: the run has no exported model (its stage has not run).
    """
    folder = run_dir(params, run)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; run the stage that produces run {run!r} first")
    model.load_state_dict(artifacts.load_tensors(weights))
    p = params.train.pruning
    masks = MaskSet(prunable_parameters(model, p.keep_first_dense, p.keep_last_dense or p.granularity == "structured"))
    if (folder / "masks.safetensors").is_file():
        masks.load(folder / "masks.safetensors")
    return masks


def _export(params: Params, run: str, model: nn.Module, method: Method, history: pd.DataFrame, extra: dict[str, Any]) -> Path:
    """Write everything but ``last.pt`` for a finished run (each file atomically)."""
    folder = run_dir(params, run)
    with method.eval_weights():
        artifacts.save_tensors(model.state_dict(), folder / "model.safetensors")
        if method.masks is not None:
            method.masks.save(folder / "masks.safetensors")
            method.masks.write_layer_table(folder / "layers.parquet")
    artifacts.write_parquet(history, folder / "history.parquet")
    for m, ticket in enumerate(getattr(method, "tickets", [])):
        # EDST: ticket m is the best-validation checkpoint of refinement phase m.
        artifacts.save_tensors(ticket["state"], folder / "tickets" / f"ticket_{m}.safetensors")
        artifacts.save_tensors({k: v.to(torch.uint8) for k, v in ticket["masks"].items()}, folder / "tickets" / f"ticket_{m}_masks.safetensors")
    if getattr(method, "tickets", None):
        manifest = [{"ticket": m, "epoch": t["epoch"], "val_accuracy": t["val_accuracy"]} for m, t in enumerate(method.tickets)]
        artifacts.write_json(manifest, folder / "tickets" / "tickets.json")
    if method.events:
        artifacts.write_parquet(pd.DataFrame(method.events), folder / "mask_updates.parquet")
    if "/" not in run:  # ensemble members are plotted together by their ensemble's stage
        artifacts.write_csv(history, Path(params.base.plots_dir) / "history" / f"{run}.csv")
    artifacts.write_json(
        {"run": run, "params": params.model_dump(mode="json"), "versions": _versions(), "data": data_version(params), **extra},
        folder / "config.json",
    )
    return folder


def code_fingerprint() -> str:
    """sha256 (first 16 hex chars) of the library's source: a checkpoint written by other code
    is never resumed, so a fixed bug cannot survive in a resumed run."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _fresh_run_dir(params: Params, run: str, fingerprint: str) -> Path:
    """Keep the folder when it holds a checkpoint to resume (``last.pt``, else ``prev.pt``, of
    this configuration), less the temporary files of writes a killed process left behind;
    otherwise start from an empty folder."""
    folder = run_dir(params, run)
    keep = params.base.resume and CheckpointStore(folder).resumable(fingerprint)
    if not keep and folder.exists():
        shutil.rmtree(folder)
    elif keep:
        # A process killed during an atomic write leaves its temporary file behind, and nothing
        # would ever rename or remove it: ``.<name>.*.tmp`` (artifacts.atomic_path) and
        # ``.tmp`` + 6 characters (safetensors' save_file stages its own file beside the target).
        leftovers = [*folder.rglob(".*.tmp"), *folder.rglob(".tmp??????")]
        for tmp in leftovers:  # listed first: removing a folder mid-walk
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----- stages --------------------------------------------------------------------------------
def stage_prepare(params: Params) -> Path:
    """``prepare``: the dataset's Parquet file (see :mod:`sparse_core.data.prepare`)."""
    return prepare_dataset(params.data, params.base.data_dir, params.base.seed)


def _train_run(
    params: Params, run: str, method_name: str, model: nn.Module, data: PreparedData, device: torch.device,
    optim, epochs: int, fingerprint: str, init: str, prepare_method=None, seed: int | None = None,
    recorded_method: str | None = None,
) -> Path:  # fmt: skip
    """Train ``model`` (a registry network, or a LocalNet wrapping one: the sparse method then
    acts on the network, and only the network is exported) and export the run.

    Inside :func:`stage_train_ddp` (a DDP rank, :func:`~sparse_core.distributed.active_parallel`)
    every rank trains on its own device; rank 0 alone prepares the folder and exports, and every
    rank returns once the export is complete."""
    fingerprint = f"{fingerprint}-{code_fingerprint()}"
    parallel = active_parallel()
    steps = -(-len(data.splits["train"]) // optim.batch_size) * epochs
    t = params.train
    seed = params.base.seed if seed is None else seed
    net = getattr(model, "net", model)
    # Built before the run folder is touched: a schedule that cannot work (ConfigError) must not
    # cost the previous run's files.
    method = create_method(method_name, net, steps, t.pruning, t.dst, seed, t.edst, epochs, t.model_extra, data.shape)
    precision = precision_of(params, parallel.device or device)
    if parallel.is_main:
        _fresh_run_dir(params, run, fingerprint)
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
        precision=precision,
    )  # fmt: skip
    method.on_train_end()
    parallel.verify_masks(method, steps)  # DDP: gmp/dpf's final update, oneshot's only one
    extra = {"method": recorded_method or method_name, "init": init, "seed": seed, "fingerprint": fingerprint}
    if recorded_method and _local_variant(recorded_method):
        extra["local"] = {"variant": _local_variant(recorded_method), "sparse_method": method_name,
                          "windows": [[w.start, w.end] for w in model.windows], "blocks": [b.name for b in model.blocks]}  # fmt: skip
    extra.update(parallel.describe())
    out = _export(params, run, net, method, result.history, extra) if parallel.is_main else run_dir(params, run)
    parallel.barrier()  # DDP: every rank returns after rank 0's export
    return out


def stage_warmup(params: Params) -> Path:
    """``warmup``: dense training for ``warmup.epochs`` (0: only the seeded initial weights)."""
    device, data, model = _setup(params)
    fp = params.fingerprint("base", "data", "augment", "model", "warmup")
    if params.warmup.epochs == 0:
        _fresh_run_dir(params, WARMUP_RUN, fp)
        return _export(params, WARMUP_RUN, model, Method(model, 0), pd.DataFrame(), {"method": "init", "fingerprint": fp})
    return _train_run(params, WARMUP_RUN, "dense", model, data, device, params.warmup.optim, params.warmup.epochs, fp, "seed")


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
    return _train_single(params, method, method)


def _local_variant(method: str) -> str | None:
    """The window variant of a ``local``-family method (None for any other)."""
    return registry.spec(method).local_variant


def _train_single(params: Params, method: str, run: str, num_threads: int = 0) -> Path:
    """One run of a single-model method (from the warmup unless it is a DST method)."""
    device, data, model = _setup(params, num_threads=num_threads)
    init = "seed"
    if params.train.from_warmup and registry.spec(method).start == "warmup":
        load_exported(params, WARMUP_RUN, model)
        init = WARMUP_RUN
    fp = params.fingerprint("base", "data", "augment", "model", "warmup", "train") + f"-{method}"
    return _train_run(params, run, method, model, data, device, params.train.optim, params.train.epochs, fp, init)


def sweep_run(method: str, sparsity: float, seed: int, group: str = "sweeps") -> str:
    """Run name of one sweep point: ``<group>/<method>/s<sparsity>-seed<seed>`` (inside the
    seed's runs folder, ``<runs_dir>/s<seed>/``); ``group`` is ``sweeps`` (``sparseflow sweep``)
    or ``curves`` (the ``curves`` stages)."""
    return f"{group}/{method}/s{sparsity:.4f}-seed{seed}"


def _test_row(params: Params, run: str, data: PreparedData) -> dict[str, Any]:
    """Realised sparsity, last validation accuracy, test accuracy and NLL of an exported run."""
    model = build_model(params, data)
    masks = load_exported(params, run, model)
    device = resolve_device(params.base.device)
    model.to(device)
    val = artifacts.read_parquet(run_dir(params, run) / "history.parquet")["val_accuracy"]
    test = evaluate(model, data.splits["test"], transform_for(params, data), params.evaluate.batch_size, device,
                    precision_of(params, device))  # fmt: skip
    return {"realised_sparsity": masks.sparsity(), "val_accuracy": float(val.iloc[-1]) if len(val) else float("nan"),
            "test_accuracy": test["accuracy"], "test_nll": test["loss"]}  # fmt: skip


def stage_sweep_point(params: Params, method: str, sparsity: float, seed: int, num_threads: int = 0,
                      group: str = "sweeps") -> dict[str, Any]:  # fmt: skip
    """One point of a sparsity × seed sweep: ``method`` trained with its target sparsity set to
    ``sparsity`` on training seed ``seed`` (:meth:`Params.for_seed`: init, masks, data order and
    the seed's own warmup), in ``<runs_dir>/s<seed>/sweeps/<method>/s<sparsity>-seed<seed>/``;
    points are independent tasks. ``<method>_retrain`` (e.g. ``oneshot_retrain``) trains
    ``<method>`` (in ``…-pruned/``) and fine-tunes it with its mask frozen for ``retrain.epochs``.

    Returns:
        ``{"method", "sparsity" (target), "seed", "realised_sparsity", "val_accuracy",
        "test_accuracy", "test_nll", "run_dir"}`` (fractions; NLL in nats); ``<method>_retrain``
        adds ``pruned_test_accuracy`` and ``pruned_test_nll`` (before fine-tuning).

    Raises:
        ValueError: ``method`` is not a sweep method (:func:`sparse_core.config.sweep_methods`).
        FileNotFoundError: the seed's warmup is missing (``train.from_warmup`` and not a DST method).
    """
    if method not in sweep_methods():
        raise ValueError(f"sweep: method {method!r} has no target sparsity; use one of {sorted(sweep_methods())}")
    trained = method.removesuffix("_retrain") if method not in registry.specs() else method
    raw = params.for_seed(seed).model_dump(mode="json")
    raw["train"][registry.spec(trained).sparsity]["sparsity"] = sparsity
    point = Params.model_validate(raw)
    run = sweep_run(method, sparsity, seed, group)
    row: dict[str, Any] = {"method": method, "sparsity": sparsity, "seed": seed}
    if trained != method:
        pruned = f"{run}-pruned"
        _train_single(point, trained, pruned, num_threads)
        data = load_data(point)
        before = _test_row(point, pruned, data)
        out = _retrain(point, pruned, run, num_threads)
        row.update(_test_row(point, run, data), pruned_test_accuracy=before["test_accuracy"], pruned_test_nll=before["test_nll"])
    else:
        out = _train_single(point, method, run, num_threads)
        row.update(_test_row(point, run, load_data(point)))
    row["run_dir"] = str(out)
    return row


def curve_points_path(method: str, seed: int) -> Path:
    """``reports/curves/points/<method>-s<seed>.csv``: one ``curves@<method>-<seed>`` stage's rows."""
    return Path("reports") / "curves" / "points" / f"{method}-s{seed}.csv"


def write_curve_points(params: Params, method: str, rows: list[dict[str, Any]]) -> Path:
    """The rows of one ``curves@<method>-<seed>`` stage (``params`` of that seed), sorted by
    sparsity, without the run folder (a machine-specific detail)."""
    table = pd.DataFrame(rows).drop(columns=["run_dir"]).sort_values("sparsity", ignore_index=True)
    out = curve_points_path(method, params.base.seed)
    artifacts.write_csv(table, out)
    return out


def write_sweep(params: Params, method: str, rows: list[dict[str, Any]]) -> Path:
    """The sweep table ``reports/sweeps/<method>.csv`` (one row per point, sorted)."""
    table = pd.DataFrame(rows).sort_values(["sparsity", "seed"], ignore_index=True)
    out = Path("reports") / "sweeps" / f"{method}.csv"
    artifacts.write_csv(table, out)
    return out


def _local_net(params: Params, method: str, net: nn.Module, data: PreparedData):
    from sparse_core.local import LocalNet

    lc = params.local
    return LocalNet(net, _local_variant(method), data.shape, data.num_classes, lc.chunks, lc.split_points, lc.head,
                    lc.head_hidden, per_chunk_optimizer=lc.optimizer == "per_chunk")  # fmt: skip


def _local_setup(params: Params, method: str) -> tuple[torch.device, PreparedData, nn.Module, str, str]:
    """Device, data, the network (warmup weights when ``train.from_warmup``), its init name and
    the config fingerprint of a local run."""
    device, data, net = _setup(params)
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
    local = _local_net(params, method, net, data)
    return _train_run(params, method, params.local.sparse_method, local, data, device, params.train.optim,
                      params.train.epochs, fp, init, recorded_method=method)  # fmt: skip


def _local_pipeline_spec(params: Params, method: str, net: nn.Module, data: PreparedData):
    import functools

    from sparse_core.local import build_local
    from sparse_core.local.pipeline import PipelineSpec

    lc = params.local
    build = functools.partial(
        build_local, params.model.name, params.model.kwargs, data.shape, data.num_classes, _local_variant(method),
        lc.chunks, lc.split_points, lc.head, lc.head_hidden, params.base.seed,
        {k: v.detach().clone() for k, v in net.state_dict().items()},
    )  # fmt: skip
    backend = lc.backend if lc.backend != "auto" else ("nccl" if resolve_device(params.base.device).type == "cuda" else "gloo")
    precision_of(params, torch.device("cuda" if backend == "nccl" else "cpu"))  # fp16 without CUDA: refused here
    return PipelineSpec(build=build, train=data.splits["train"], transform=transform_for(params, data),
                        optim=params.train.optim, epochs=params.train.epochs, seed=params.base.seed, backend=backend,
                        precision=params.base.precision, channels_last=params.base.channels_last)  # fmt: skip


def _export_local_pipeline(params: Params, method: str, local, info: dict, data: PreparedData, init: str, fingerprint: str,
                           backend: str, launcher: str) -> Path:  # fmt: skip
    from sparse_core.engine import evaluate

    from sparse_core.engine import lr_at

    optim, epochs = params.train.optim, params.train.epochs
    steps_per_epoch = -(-len(data.splits["train"]) // optim.batch_size)
    last = info["losses"][-1]  # the network's own loss (last chunk), per step
    # On the CPU, after the chunks have merged: fp16 (CUDA only) falls back to fp32 here.
    base = params.base
    precision = Precision("fp32" if base.precision == "fp16" else base.precision, base.channels_last)
    val = evaluate(local.net, data.splits["val"], transform_for(params, data), 1000, torch.device("cpu"), precision)
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
             "local": {"variant": _local_variant(method), "execution": "pipeline", "launcher": launcher, "backend": backend,
                       "seconds_per_chunk": info["seconds"], "steps": info["steps"],
                       "windows": [[w.start, w.end] for w in local.windows], "blocks": [b.name for b in local.blocks]}}  # fmt: skip
    return _export(params, method, local.net, Method(local.net, 0), history, extra)


def _train_local_pipeline(params: Params, method: str, net: nn.Module, data: PreparedData, init: str, fp: str) -> Path:
    from sparse_core.local.pipeline import run_pipeline

    fingerprint = f"{fp}-{code_fingerprint()}"
    _fresh_run_dir(params, method, fingerprint)
    spec = _local_pipeline_spec(params, method, net, data)
    local, info = run_pipeline(spec)
    return _export_local_pipeline(params, method, local, info, data, init, fingerprint, spec.backend, "spawn")


def stage_local_worker(params: Params, method: str) -> Path | None:
    """This process's chunk of ``train@<method>`` under ``torchrun`` (one process per chunk);
    rank 0 merges the chunks and exports ``runs/<method>/`` (returned; None on other ranks)."""
    import os

    from sparse_core.local.pipeline import run_pipeline_torchrun

    if method not in registry.names(family="local"):
        raise ValueError(f"local-worker runs local methods {registry.names(family='local')}, not {method!r}")
    _, data, net, init, fp = _local_setup(params, method)
    fingerprint = f"{fp}-{code_fingerprint()}"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _fresh_run_dir(params, method, fingerprint)
    spec = _local_pipeline_spec(params, method, net, data)
    # Outside the run folder: rank 0 may be clearing that folder while another rank starts.
    parts = Path(params.base.runs_dir) / f".{method}.pipeline_parts"
    out = run_pipeline_torchrun(spec, parts)
    if out is None:
        return None
    local, info = out
    shutil.rmtree(parts, ignore_errors=True)
    return _export_local_pipeline(params, method, local, info, data, init, fingerprint, spec.backend, "torchrun")


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
        hist = artifacts.read_parquet(run_dir(params, member_run(name, i)) / "history.parquet")
        frames.append(hist.assign(member=i))
    artifacts.write_csv(pd.concat(frames, ignore_index=True), Path(params.base.plots_dir) / "history" / f"{name}.csv")
    return run_dir(params, name)


def member_run(name: str, i: int) -> str:
    """Run name of member ``i`` of the members ensemble ``name``: ``<name>/member_<i>``."""
    return f"{name}/member_{i}"


def member_seed(seed: int, i: int) -> int:
    """Seed of DST Ensemble member ``i`` of the ensemble trained with seed ``seed``: a 31-bit
    draw of numpy's ``SeedSequence([seed, i])``, so the members of different ensemble seeds
    never share a seed (``seed + i`` would: member 1 of seed 0 = member 0 of seed 1), and no
    member repeats a single run of a small seed."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0] >> 1)


def stage_train_member(params: Params, name: str, i: int, num_threads: int = 0) -> Path:
    """Member ``i`` of the members ensemble ``name`` (the DST Ensemble): a full
    ``train.dst_ensemble.method`` run with seed :func:`member_seed` ``(base.seed, i)`` (init,
    masks and data order), in ``runs/s<seed>/<name>/member_<i>/``. Members are independent: any
    task runner may train them concurrently (``num_threads``: see :func:`_setup`)."""
    seed = member_seed(params.base.seed, i)
    device, data, model = _setup(params, seed, num_threads)
    fp = params.fingerprint("base", "data", "augment", "model", "train") + f"-{name}-{i}"
    method = params.train.dst_ensemble.method
    return _train_run(
        params, member_run(name, i), method, model, data, device, params.train.optim, params.train.epochs, fp, "seed", seed=seed
    )


def stage_retrain(params: Params, run: str) -> Path:
    """``retrain@<run>``: fine-tune ``run``'s exported model with its mask frozen (masked gradients)."""
    if run not in params.retrain.runs:
        raise ValueError(f"run {run!r} is not listed in retrain.runs {list(params.retrain.runs)}")
    return _retrain(params, run, retrain_run_name(run))


def _retrain(params: Params, source: str, out: str, num_threads: int = 0) -> Path:
    """Fine-tune run ``source`` with its mask frozen for ``retrain.epochs`` into run ``out``."""
    device, data, model = _setup(params, num_threads=num_threads)
    masks = load_exported(params, source, model)
    fp = params.fingerprint("base", "data", "augment", "model", "warmup", "train", "retrain") + f"-{source}"

    def freeze(method: Method) -> None:
        assert isinstance(method, MaskedMethod)
        method.masks.load_state_dict(masks.state_dict())
        method.masks.apply_()

    return _train_run(params, out, "retrain", model, data, device, params.retrain.optim, params.retrain.epochs, fp, source, freeze)


def target_sparsity(params: Params, run: str) -> float:
    """The sparsity a run was asked for (0 for dense runs)."""
    spec = registry.spec(run if run in registry.specs() else run.removesuffix("_retrain"))
    if spec.family == "local":
        spec = registry.spec(params.local.sparse_method)
    return getattr(params.train, spec.sparsity).sparsity if spec.sparsity else 0.0


# ----- evaluation sets and evaluation --------------------------------------------------------
def _run_cost(params: Params, run: str, model: nn.Module, shape: tuple[int, int, int], n_train: int) -> float:
    """Training FLOPs per training example of ``run`` and of what it was started from."""
    cfg = json.loads((run_dir(params, run) / "config.json").read_text())
    method, init = cfg["method"], cfg.get("init", "seed")
    per_layer = layer_flops(model, shape)
    weights = _prunable_weights(params, model)
    dens = {n: int(torch.count_nonzero(w)) / w.numel() for n, w in weights.items()}
    f_d = float(sum(per_layer.values()))
    spec = registry.spec(method)
    # The internal family is the retrain stage: its own epochs and optimizer.
    optim, epochs = (params.retrain.optim, params.retrain.epochs) if spec.family == "internal" else (params.train.optim, params.train.epochs)
    if spec.family == "local":
        from sparse_core.local.accounting import step_accounting

        # Dense accounting of trunk + heads (a composed sparse method's savings are not counted).
        per_example = step_accounting(_local_net(params, method, model, load_data(params)), shape)["training"]
    else:
        log = run_dir(params, run) / "mask_updates.parquet"
        events = artifacts.read_parquet(log).to_dict("records") if log.is_file() else []
        cost_of = TrainingCost(per_layer, dens, -(-n_train // optim.batch_size) * epochs, params.train.dst.update_period,
                               events, params.train)  # fmt: skip
        per_example = registry.method_class(method).training_flops_per_example(cost_of)
    cost = per_example * epochs
    if init == WARMUP_RUN:
        cost += 3 * f_d * params.warmup.epochs
    elif spec.family == "internal":  # fine-tuning pays for the run it started from
        parent = build_model(params, load_data(params))
        load_exported(params, init, parent)
        cost += _run_cost(params, init, parent, shape, n_train)
    return cost


def dense_reference_cost(params: Params, model: nn.Module, shape: tuple[int, int, int]) -> float:
    """Training FLOPs per example of the profile's dense baseline: ``train.epochs`` dense
    epochs, plus the warmup when ``train.from_warmup`` (the dense run starts from it)."""
    f_d = float(sum(layer_flops(model, shape).values()))
    return 3 * f_d * (params.train.epochs + (params.warmup.epochs if params.train.from_warmup else 0))


def _evaluation_inputs(params: Params, data: PreparedData) -> tuple[dict[str, Split], evalsets.EvalSets, dict[str, np.ndarray]]:
    sets = evalsets.load_eval_sets(params)
    splits = {s: data.splits[s] for s in ("val", "test")}
    labels = {s: data.splits[s].labels.numpy() for s in splits}
    if sets.corrupted_labels is not None:
        labels["corrupted"] = sets.corrupted_labels.numpy()
    return splits, sets, labels


def _write_evaluation(params: Params, name: str, ev: Evaluation, out: dict[str, Any], sets: evalsets.EvalSets) -> dict[str, Any]:
    """metrics JSON, reliability and corruption plot data of model ``name``."""
    out.update({k: v for k, v in ev.metrics.items() if k not in out})
    for split in ("test", "val"):
        out[split] = {**ev.metrics[split], **out.get(split, {})}
    plots = Path(params.base.plots_dir)
    artifacts.write_csv(ev.reliability.assign(model=name), plots / "reliability" / f"{name}.csv")
    artifacts.write_csv(ev.corruption.assign(model=name), plots / "corruption" / f"{name}.csv")
    if sets.ood_missing:
        out["ood_missing"] = len(sets.ood_missing)
    artifacts.write_json(out, Path(params.base.metrics_dir) / f"{name}.json")
    return out


def stage_evaluate(params: Params, run: str) -> dict[str, Any]:
    """``evaluate@<run>``: every metric of one run (layout: :mod:`sparse_core.evaluation`).

    Writes ``<metrics_dir>/<run>.json`` with, besides the evaluation layout::

        {"run", "method", "sparsity", "target_sparsity", "params": {"total", "nonzero"},
         "flops": {"inference", "inference_dense", "inference_ratio", "training_ratio"},
         "exploration_rate" (set, rigl), "ood_missing" (count of skipped OOD sets, if any)}

    and ``<plots_dir>/reliability/<run>.csv``, ``<plots_dir>/corruption/<run>.csv``.
    ``sparsity`` is the fraction of exact zeros in the exported prunable weights (measured
    from the weights, independently of the stored masks); FLOPs are per example;
    ``training_ratio`` is relative to the profile's dense run (:func:`dense_reference_cost`).
    """
    device, data, model = _setup(params)
    masks = load_exported(params, run, model)
    model.to(device)
    transform = transform_for(params, data)
    splits, sets, labels = _evaluation_inputs(params, data)
    probs = model_probs(model, splits, sets, transform, params.evaluate.batch_size, device, precision_of(params, device))
    ev = evaluate_probs({k: v[None] for k, v in probs.items()}, labels, params.evaluate.calibration_bins)
    cfg = json.loads((run_dir(params, run) / "config.json").read_text())
    out: dict[str, Any] = {"run": run, "method": cfg["method"]}
    weights = {n: p.detach().cpu() for n, p in masks.params.items()}
    nonzero = {n: int(torch.count_nonzero(w)) for n, w in weights.items()}
    prunable = sum(w.numel() for w in weights.values())
    out["sparsity"] = 1.0 - sum(nonzero.values()) / prunable
    out["target_sparsity"] = target_sparsity(params, run)
    layers = pd.DataFrame(
        {"name": list(weights), "numel": [w.numel() for w in weights.values()],
         "density": [nonzero[n] / weights[n].numel() for n in weights], "model": run}
    )  # fmt: skip
    artifacts.write_csv(layers, Path(params.base.plots_dir) / "layers" / f"{run}.csv")
    out["params"] = {
        "total": sum(p.numel() for p in model.parameters()),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
    }
    model.cpu()
    fl = inference_flops(model, data.shape, {n: nonzero[n] / weights[n].numel() for n in weights})
    cost = _run_cost(params, run, model, data.shape, len(data.splits["train"]))
    out["flops"] = {
        "inference": fl["sparse"], "inference_dense": fl["dense"], "inference_ratio": fl["ratio"],
        "training_ratio": cost / dense_reference_cost(params, model, data.shape),
    }  # fmt: skip
    updates = run_dir(params, run) / "mask_updates.parquet"
    if updates.is_file():
        events = artifacts.read_parquet(updates)
        if "exploration_rate" in events:
            # In-time over-parameterization (Liu et al. 2021): fraction of weights ever active.
            out["exploration_rate"] = float(events["exploration_rate"].iloc[-1])
    return _write_evaluation(params, run, ev, out, sets)


# ----- ensembles -----------------------------------------------------------------------------
def ensemble_members(params: Params, name: str) -> list[dict[str, Any]]:
    """Members of ensemble ``name``: ``[{"run", "ticket", "seed", "weights" (path)}]``.

    A ``members`` ensemble (``dst_ensemble``): the exported model of every member run; a
    ``tickets`` ensemble (``edst_ensemble``): the tickets of the one run
    (:class:`~sparse_core.methods.registry.MethodSpec`).

    Raises:
        FileNotFoundError: a member's weights are missing (the train stage has not run).
        ValueError: ``name`` is not an ensemble method.
    """
    kind = registry.spec(name).ensemble
    if kind == "members":
        members = []
        for i in range(params.train.dst_ensemble.members):
            run = member_run(name, i)
            members.append({"run": run, "ticket": None, "seed": member_seed(params.base.seed, i), "weights": run_dir(params, run) / "model.safetensors"})
    elif kind == "tickets":
        folder = run_dir(params, name) / "tickets"
        members = [
            {"run": name, "ticket": m, "seed": params.base.seed, "weights": folder / f"ticket_{m}.safetensors"}
            for m in range(params.train.edst.tickets)
        ]
    else:
        raise ValueError(f"{name!r} is not an ensemble method")
    for m in members:
        if not m["weights"].is_file():
            raise FileNotFoundError(f"{m['weights']}: missing member of ensemble {name!r}; run train@{name} first")
    return members


def ensemble_dir(params: Params, name: str) -> Path:
    return Path(params.base.ensembles_dir) / name


def stage_collect(params: Params, name: str) -> Path:
    """``collect@<name>``: cache every member's softmax probabilities on val and test.

    Writes ``ensembles/<name>/members.json`` (run, ticket, seed, density of the prunable set,
    sha256 of the source weights), ``probs.parquet`` (val and test, float64; see
    :func:`sparse_core.ensemble.probs_schema`) and ``eval_probs.safetensors`` (float32
    ``(M, N, C)`` per OOD and corrupted set, keys as in :mod:`sparse_core.evaluation`), built
    in a temporary folder and swapped in whole.
    """
    import hashlib

    from sparse_core.ensemble import probs_schema

    device, data, model = _setup(params)
    precision = precision_of(params, device)
    model.to(device)
    transform = transform_for(params, data)
    sets = evalsets.load_eval_sets(params)
    manifest, frames, extra = [], [], []
    for i, member in enumerate(ensemble_members(params, name)):
        model.load_state_dict(artifacts.load_tensors(member["weights"]))
        weights = _prunable_weights(params, model).values()
        density = sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)
        digest = hashlib.sha256(member["weights"].read_bytes()).hexdigest()
        manifest.append({**{k: v for k, v in member.items() if k != "weights"}, "member": i, "density": density,
                         "source": str(member["weights"]), "source_sha256": digest})  # fmt: skip
        extra.append(model_probs(model, {}, sets, transform, params.collect.batch_size, device, precision))
        for split in ("val", "test"):
            logits = predict(model, data.splits[split], transform, params.collect.batch_size, device, precision)
            probs = torch.softmax(logits.double(), 1)
            frames.append(
                pd.DataFrame(
                    {
                        "member": i,
                        "split": split,
                        "index": range(len(probs)),
                        "label": data.splits[split].labels.numpy(),
                        "probs": list(probs.numpy()),
                    }
                )
            )
    df = pd.concat(frames, ignore_index=True).astype({"member": "int64", "index": "int64", "label": "int64"})
    probs_schema(data.num_classes).validate(df)
    out = ensemble_dir(params, name)
    with artifacts.atomic_dir(out) as tmp:
        artifacts.write_json(manifest, tmp / "members.json")
        artifacts.write_parquet(df, tmp / "probs.parquet")
        stacked = {k: torch.from_numpy(np.stack([member[k] for member in extra])) for k in extra[0]} if extra else {}
        artifacts.save_tensors(stacked, tmp / "eval_probs.safetensors")
    return out


def _prunable_weights(params: Params, model: nn.Module) -> dict[str, torch.Tensor]:
    p = params.train.pruning
    return {n: w.detach() for n, w in prunable_parameters(model, p.keep_first_dense, p.keep_last_dense).items()}


def stage_evaluate_ensemble(params: Params, name: str) -> dict[str, Any]:
    """``evaluate_ensemble@<name>``: metrics of an ensemble from its cached probabilities only.

    Writes ``<metrics_dir>/<name>.json`` with the layout of :mod:`sparse_core.evaluation`
    (OOD scores include mutual information) plus::

        {"run", "method", "members", "test"/"val": {member_accuracy_mean/std,
         member_nll_mean/std, disagreement, kl, member: {m<i>: {accuracy, nll}}},
         "sparsity" (mean over members), "params": {"nonzero" (sum over members)},
         "flops": {"inference", "inference_ratio", "training_ratio"}}

    FLOPs ratios are relative to one dense model (inference) and to the profile's dense run
    (training; :func:`dense_reference_cost`, RigL convention, see
    each method's ``training_flops_per_example``).
    """
    from sparse_core.ensemble import ensemble_metrics, stack_probs

    folder = ensemble_dir(params, name)
    df = artifacts.read_parquet(folder / "probs.parquet")
    manifest = json.loads((folder / "members.json").read_text())
    out: dict[str, Any] = {"run": name, "method": name, "members": len(manifest)}
    _, data, model = _setup(params)
    sets = evalsets.load_eval_sets(params)
    probs = {k: v.numpy() for k, v in artifacts.load_tensors(folder / "eval_probs.safetensors").items()}
    labels = {"corrupted": sets.corrupted_labels.numpy()} if sets.corrupted_labels is not None else {}
    for split in ("test", "val"):
        probs[split], labels[split] = stack_probs(df, split)
        out[split] = ensemble_metrics(probs[split], labels[split])
    ev = evaluate_probs(probs, labels, params.evaluate.calibration_bins)
    per_layer = layer_flops(model, data.shape)
    dense_infer = float(sum(per_layer.values()))
    kind = registry.spec(name).ensemble
    method = registry.method_class(params.train.dst_ensemble.method if kind == "members" else name)
    steps = -(-len(data.splits["train"]) // params.train.optim.batch_size) * params.train.epochs
    infer, train_flops, nonzero, sparsities = 0.0, 0.0, 0, []
    for member in manifest:
        model.load_state_dict(artifacts.load_tensors(member["source"]))
        weights = _prunable_weights(params, model)
        dens = {n: int(torch.count_nonzero(w)) / w.numel() for n, w in weights.items()}
        infer += inference_flops(model, data.shape, dens)["sparse"]
        # A tickets ensemble comes from one run: its training cost is counted once.
        if kind == "members" or member["member"] == 0:
            cost_of = TrainingCost(per_layer, dens, steps, params.train.dst.update_period, [], params.train)
            train_flops += method.training_flops_per_example(cost_of)
        nonzero += sum(int(torch.count_nonzero(p)) for p in model.parameters())
        sparsities.append(1.0 - member["density"])
    out["sparsity"] = float(sum(sparsities) / len(sparsities))
    out["target_sparsity"] = params.train.dst.sparsity
    if kind == "tickets":
        events = artifacts.read_parquet(run_dir(params, name) / "mask_updates.parquet")
        out["exploration_rate"] = float(events["exploration_rate"].iloc[-1])
    out["params"] = {"nonzero": nonzero, "total_per_member": sum(p.numel() for p in model.parameters())}
    out["flops"] = {
        "inference": infer,
        "inference_ratio": infer / dense_infer,
        "training_ratio": train_flops * params.train.epochs / dense_reference_cost(params, model, data.shape),
    }
    return _write_evaluation(params, name, ev, out, sets)
