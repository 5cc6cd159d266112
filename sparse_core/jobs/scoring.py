"""The ``evaluate`` job and the cost accounting: test metrics, calibration, OOD, corruptions, FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_core import artifacts, evalsets, schemas
from sparse_core.config import Params, resolve_dst, run_epochs
from sparse_core.data import PreparedData, Split
from sparse_core.evaluation import Evaluation, evaluate_probs, model_probs
from sparse_core.flops import TrainingCost, inference_flops, layer_flops
from sparse_core.methods import registry
from sparse_core.sparsity import prunable_parameters
from sparse_core.jobs.rundirs import WARMUP_RUN, build_model, load_data, load_exported, precision_of, run_dir, setup, transform_for
from sparse_core.jobs.local_runs import local_net


def target_sparsity(params: Params, run: str) -> float:
    """The sparsity a run was asked for (0 for dense runs)."""
    spec = registry.spec(run if run in registry.specs() else run.removesuffix("_retrain"))
    if spec.family == "local":
        spec = registry.spec(params.local.sparse_method)
    return getattr(params.train, spec.sparsity).sparsity if spec.sparsity else 0.0


def run_cost(params: Params, run: str, model: nn.Module, shape: tuple[int, int, int], n_train: int) -> float:
    """Training FLOPs per training example of ``run`` and of what it was started from."""
    cfg = artifacts.read_json(run_dir(params, run) / "config.json")
    method, init = cfg["method"], cfg.get("init", "seed")
    per_layer = layer_flops(model, shape)
    weights = prunable_weights(params, model)
    dens = {n: int(torch.count_nonzero(w)) / w.numel() for n, w in weights.items()}
    f_d = float(sum(per_layer.values()))
    spec = registry.spec(method)
    # The internal family is the retrain stage: its own epochs and optimizer.
    optim, epochs = (params.retrain.optim, params.retrain.epochs) if spec.family == "internal" else (params.train.optim, run_epochs(params.train, method))
    if spec.family == "local":
        from sparse_core.local.accounting import step_accounting

        # Dense accounting of trunk + heads (a composed sparse method's savings are not counted).
        per_example = step_accounting(local_net(params, method, model, load_data(params)), shape)["training"]
    else:
        log = run_dir(params, run) / "mask_updates.parquet"
        events = artifacts.read_parquet(log, schema=schemas.MASK_UPDATES_SCHEMA).to_dict("records") if log.is_file() else []
        dst = resolve_dst(params.train.dst, -(-n_train // params.train.optim.batch_size) * params.train.epochs)
        cost_of = TrainingCost(per_layer, dens, -(-n_train // optim.batch_size) * epochs, dst.update_period,
                               events, params.train)  # fmt: skip
        per_example = registry.method_class(method).training_flops_per_example(cost_of)
    cost = per_example * epochs
    if init == WARMUP_RUN:
        cost += 3 * f_d * params.warmup.epochs
    elif spec.family == "internal":  # fine-tuning pays for the run it started from
        parent = build_model(params, load_data(params))
        load_exported(params, init, parent)
        cost += run_cost(params, init, parent, shape, n_train)
    return cost


def dense_reference_cost(params: Params, model: nn.Module, shape: tuple[int, int, int]) -> float:
    """Training FLOPs per example of the profile's dense baseline: ``train.epochs`` dense
    epochs, plus the warmup when ``train.from_warmup`` (the dense run starts from it)."""
    f_d = float(sum(layer_flops(model, shape).values()))
    return 3 * f_d * (params.train.epochs + (params.warmup.epochs if params.train.from_warmup else 0))


def evaluation_inputs(params: Params, data: PreparedData) -> tuple[dict[str, Split], evalsets.EvalSets, dict[str, np.ndarray]]:
    sets = evalsets.load_eval_sets(params)
    splits = {s: data.splits[s] for s in ("val", "test")}
    labels = {s: data.splits[s].labels.numpy() for s in splits}
    if sets.corrupted_labels is not None:
        labels["corrupted"] = sets.corrupted_labels.numpy()
    return splits, sets, labels


def write_evaluation(params: Params, name: str, ev: Evaluation, out: dict[str, Any], sets: evalsets.EvalSets) -> dict[str, Any]:
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
    device, data, model = setup(params)
    masks = load_exported(params, run, model)
    model.to(device)
    transform = transform_for(params, data)
    splits, sets, labels = evaluation_inputs(params, data)
    probs = model_probs(model, splits, sets, transform, params.evaluate.batch_size, device, precision_of(params, device))
    ev = evaluate_probs({k: v[None] for k, v in probs.items()}, labels, params.evaluate.calibration_bins)
    cfg = artifacts.read_json(run_dir(params, run) / "config.json")
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
    cost = run_cost(params, run, model, data.shape, len(data.splits["train"]))
    out["flops"] = {
        "inference": fl["sparse"], "inference_dense": fl["dense"], "inference_ratio": fl["ratio"],
        "training_ratio": cost / dense_reference_cost(params, model, data.shape),
    }  # fmt: skip
    updates = run_dir(params, run) / "mask_updates.parquet"
    if updates.is_file():
        events = artifacts.read_parquet(updates, schema=schemas.MASK_UPDATES_SCHEMA)
        if "exploration_rate" in events:
            # In-time over-parameterization (Liu et al. 2021): fraction of weights ever active.
            out["exploration_rate"] = float(events["exploration_rate"].iloc[-1])
    return write_evaluation(params, run, ev, out, sets)


def prunable_weights(params: Params, model: nn.Module) -> dict[str, torch.Tensor]:
    p = params.train.pruning
    return {n: w.detach() for n, w in prunable_parameters(model, p.keep_first_dense, p.keep_last_dense).items()}
