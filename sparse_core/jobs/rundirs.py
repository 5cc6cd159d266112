"""Run folders, seeds, data and model set-up, export and fingerprints: what every job shares.

Layout of a run folder ``<runs_dir>/s<seed>/<run>/``:

==========================  ===========================================================
``last.pt``                 checkpoint of the last finished epoch (resume)
``model.safetensors``       exported weights (``m ⊙ w``) with buffers, for evaluation
``masks.safetensors``       masks of the prunable set (pruning methods only)
``layers.parquet``          per-layer table (name, shape, target/realised density, nonzeros)
``history.parquet``         one row per epoch
``mask_updates.parquet``    one row per mask update (gmp, dpf, oneshot, dst)
``config.json``             resolved params, method, package/torch/data versions
==========================  ===========================================================
"""

from __future__ import annotations

import functools
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

from sparse_core import artifacts, fastpath
from sparse_core.config import ConfigError, Params
from sparse_core.data import BatchTransform, PreparedData, load_prepared, prepare_dataset, prepared_path
from sparse_core.checkpoint import CheckpointStore
from sparse_core.engine import resolve_device, seed_everything
from sparse_core.live import ensure_live
from sparse_core.methods import registry
from sparse_core.methods.base import Method
from sparse_core.models import create_model
from sparse_core import precision as precision_module
from sparse_core.precision import PRECISIONS, Precision
from sparse_core.resources import check_memory
from sparse_core.schemas import empty_history
from sparse_core.sparsity import MaskSet, prunable_parameters


WARMUP_RUN = "warmup"


_BUILD_LOCK = threading.Lock()


def setup(params: Params, seed: int | None = None, num_threads: int = 0) -> tuple[torch.device, PreparedData, nn.Module]:
    """Seed, pick the device, load the prepared data and build the seeded model.

    Before anything is trained, the memory the stage will need is checked against what the
    machine has (:func:`sparse_core.resources.check_memory`; ``ResourceError`` when it does not fit).

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
    model = build_model(params, data, seed)
    batches = {"warmup.optim.batch_size": params.warmup.optim.batch_size, "train.optim.batch_size": params.train.optim.batch_size,
               "retrain.optim.batch_size": params.retrain.optim.batch_size, "evaluate.batch_size": params.evaluate.batch_size,
               "collect.batch_size": params.collect.batch_size}  # fmt: skip
    check_memory(f"{params.model.name} on {params.data.dataset}", model, data.shape, batches, device)
    return device, data, model


#: The resolved fast path of a pipeline (``fastpath`` stage): ``<runs_dir>/fastpath.json``.
FASTPATH_FILE = "fastpath.json"


def fastpath_file(params: Params) -> Path:
    return Path(params.base.runs_dir) / FASTPATH_FILE


def fastpath_choice(params: Params, device: torch.device, data: PreparedData | None = None,
                    stage_file: bool = True) -> fastpath.Choice:  # fmt: skip
    """``base.precision`` and ``base.channels_last`` on ``device``, ``auto`` resolved
    (:mod:`sparse_core.fastpath`).

    Explicit values are used as they are. Otherwise the ``fastpath`` stage's resolution
    (:func:`fastpath_file`) when it exists and was made for this device type and these pins
    (``stage_file``), else :func:`sparse_core.fastpath.resolve` on the configured model and the
    prepared data's shape (``data``, loaded when not given) at the training batch size.

    Raises:
        ConfigError: fp16 on a device that is not CUDA; explicit bf16 on a CPU without native
            bf16 (its measured slow-down against fp32 in the message) unless
            ``base.allow_slow_bf16``.
    """
    base = params.base
    try:
        fastpath.candidates(device, base.precision, base.channels_last)
    except ValueError as err:
        raise ConfigError(f"base.precision: {err}") from None
    if base.precision != "auto" and base.channels_last != "auto":
        choice = fastpath.Choice(base.precision, base.channels_last)
    elif stage_file and (recorded := _recorded_choice(params, device)) is not None:
        return recorded
    else:
        data = data or load_data(params)
        choice = fastpath.resolve(build_model(params, data), data.shape, params.train.optim.batch_size, device, base.precision,
                                  base.channels_last, {"name": params.model.name, "kwargs": params.model.kwargs},
                                  data.num_classes)  # fmt: skip
    if choice.precision == "bf16" and device.type == "cpu" and not base.allow_slow_bf16 and not precision_module.native_bf16_cpu():
        data = data or load_data(params)
        slow = fastpath.slowdown_of_bf16(build_model(params, data), data.shape, params.train.optim.batch_size,
                                         choice.channels_last, data.num_classes)  # fmt: skip
        cpu, flags = fastpath.cpu_description()
        raise ConfigError(f"base.precision: bf16 on a CPU without native bf16 ({cpu}; vector flags: {', '.join(flags) or 'none'}): "
                          f"a training step of {params.model.name} measured {slow:.1f}x the time of fp32; set "
                          "base.precision: auto (or fp32), or base.allow_slow_bf16: true to accept it")  # fmt: skip
    return choice


def _recorded_choice(params: Params, device: torch.device) -> fastpath.Choice | None:
    """The ``fastpath`` stage's resolution, if it exists, is readable and fits ``device`` and the
    explicit values of ``params`` (else None: the caller resolves afresh)."""
    path = fastpath_file(params)
    if not path.is_file():
        return None
    doc = artifacts.read_json(path)
    base = params.base
    ok = (isinstance(doc, dict) and doc.get("device") == device.type and doc.get("precision") in PRECISIONS
          and isinstance(doc.get("channels_last"), bool)
          and base.precision in ("auto", doc["precision"]) and base.channels_last in ("auto", doc["channels_last"]))  # fmt: skip
    return fastpath.Choice(doc["precision"], doc["channels_last"], source="stage") if ok else None


def precision_of(params: Params, device: torch.device, data: PreparedData | None = None) -> Precision:
    """The :class:`~sparse_core.precision.Precision` of :func:`fastpath_choice` on ``device``.

    Raises:
        ConfigError: as :func:`fastpath_choice`.
    """
    choice = fastpath_choice(params, device, data)
    return Precision(choice.precision, choice.channels_last, device.type)


def stage_fastpath(params: Params) -> Path:
    """``fastpath``: resolve ``auto`` on this machine afresh (the machine's cache, else a
    measurement) and write the choice alone to :func:`fastpath_file`, the dependency of every
    stage that computes, and the choice with its measured times to
    ``<metrics_dir>/fastpath.json``."""
    device = resolve_device(params.base.device)
    seed_everything(params.base.seed, params.base.deterministic)
    if params.base.num_threads:
        torch.set_num_threads(params.base.num_threads)
    choice = fastpath_choice(params, device, stage_file=False)
    artifacts.write_json(choice.record(), Path(params.base.metrics_dir) / "fastpath.json")
    out = fastpath_file(params)
    artifacts.write_json({"precision": choice.precision, "channels_last": choice.channels_last, "device": device.type}, out)
    return out


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
    artifacts.load_weights(model, weights)
    p = params.train.pruning
    masks = MaskSet(prunable_parameters(model, p.keep_first_dense, p.keep_last_dense or p.granularity == "structured"))
    if (folder / "masks.safetensors").is_file():
        masks.load(folder / "masks.safetensors")
    return masks


def export_run(params: Params, run: str, model: nn.Module, method: Method, history: pd.DataFrame, extra: dict[str, Any]) -> Path:
    """Write everything but ``last.pt`` for a finished run (each file atomically)."""
    folder = run_dir(params, run)
    if history.empty and history.columns.empty:  # zero epochs: a valid table with no rows
        history = empty_history()
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
        ensure_live(params.base.plots_dir, run, history.to_dict("records"))
    artifacts.write_json(
        {"run": run, "params": params.model_dump(mode="json"), "versions": _versions(), "data": data_version(params), **extra},
        folder / "config.json",
    )
    return folder


@functools.lru_cache(maxsize=16)
def code_fingerprint(*methods: str) -> str:
    """sha256 (first 16 hex chars) of the library code a training run of ``methods`` (the
    method it builds, and the local method it is trained under, if any) executes: the import
    closure of :mod:`sparse_core.jobs.training` with every model module and those methods'
    modules (:func:`sparse_core.imports.library_code`), the library part of the code manifest of
    the training stage that runs them (:mod:`flows.stage_code`). A checkpoint written by other
    code is never resumed, so a fixed bug cannot survive in a resumed run; a change to code the
    run never executes (the report, the corruptions, another method's file) leaves the
    fingerprint alone.

    Raises:
        sparse_core.methods.registry.RegistryError: an unknown method.
    """
    import hashlib

    from sparse_core.imports import import_graph, library_code, project_modules

    root = Path(__file__).resolve().parents[2]
    paths = project_modules(root)
    built = sorted({registry.spec(m).module for m in methods})
    modules = library_code(import_graph(root), "sparse_core.jobs.training", root, built)
    h = hashlib.sha256()
    for name in sorted(m for m in modules if m.split(".")[0] == "sparse_core"):
        h.update(paths[name].relative_to(root).as_posix().encode())
        h.update(paths[name].read_bytes())
    return h.hexdigest()[:16]


#: What a run folder holds (:func:`export_run`, the checkpoint store, ``export`` and an
#: ensemble's member folders); anything else means the folder is not this run's.
RUN_FOLDER_ENTRIES = ("config.json", "last.pt", "prev.pt", ".last.pt.next", "*.pt.bad", "model.safetensors",
                      "masks.safetensors", "layers.parquet", "history.parquet", "mask_updates.parquet", "tickets", "export",
                      "member_*")  # fmt: skip


def check_run_folder(folder: Path, run: str) -> None:
    """Refuse to clear ``folder`` for run ``run`` unless it is that run's folder: it holds only
    what a run writes (:data:`RUN_FOLDER_ENTRIES`) and its ``config.json``, if any, names ``run``.

    Raises:
        artifacts.ForeignFolderError: the folder holds other files, or another run's config.
        artifacts.ArtifactError: its ``config.json`` is not valid JSON.
    """
    owner = f"run {run!r}"
    artifacts.check_replaceable(folder, RUN_FOLDER_ENTRIES, owner)
    config = folder / "config.json"
    if config.is_file():
        recorded = artifacts.read_json(config)
        name = recorded.get("run") if isinstance(recorded, dict) else None
        if name != run:
            raise artifacts.ForeignFolderError(f"{config}: names run {name!r}, not {run!r}; {owner} would replace its "
                                               "folder, so nothing was changed. Is base.runs_dir shared with another "
                                               "setting or profile?")  # fmt: skip


def fresh_run_dir(params: Params, run: str, fingerprint: str) -> Path:
    """Keep the folder when it holds a checkpoint to resume (``last.pt``, else ``prev.pt``, of
    this configuration), less the temporary files of writes a killed process left behind;
    otherwise start from an empty folder."""
    folder = run_dir(params, run)
    check_run_folder(folder, run)
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


def stage_prepare(params: Params) -> Path:
    """``prepare``: the dataset's Parquet file (see :mod:`sparse_core.data.prepare`)."""
    return prepare_dataset(params.data, params.base.data_dir, params.base.seed)


def local_variant(method: str) -> str | None:
    """The window variant of a ``local``-family method (None for any other)."""
    return registry.spec(method).local_variant


def member_run(name: str, i: int) -> str:
    """Run name of member ``i`` of the members ensemble ``name``: ``<name>/member_<i>``."""
    return f"{name}/member_{i}"


def member_seed(seed: int, i: int) -> int:
    """Seed of DST Ensemble member ``i`` of the ensemble trained with seed ``seed``: a 31-bit
    draw of numpy's ``SeedSequence([seed, i])``, so the members of different ensemble seeds
    never share a seed (``seed + i`` would: member 1 of seed 0 = member 0 of seed 1), and no
    member repeats a single run of a small seed."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0] >> 1)
