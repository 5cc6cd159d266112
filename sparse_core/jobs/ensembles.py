"""The ``collect`` and ``evaluate_ensemble`` jobs: member probabilities cached, ensemble metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparse_core import artifacts, evalsets, schemas
from sparse_core.config import Params, resolve_dst, run_epochs
from sparse_core.engine import predict
from sparse_core.evaluation import evaluate_probs, model_probs
from sparse_core.flops import TrainingCost, inference_flops, layer_flops
from sparse_core.methods import registry
from sparse_core.jobs.rundirs import member_run, member_seed, precision_of, run_dir, setup, transform_for
from sparse_core.jobs.scoring import dense_reference_cost, prunable_weights, write_evaluation


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


#: What an ensemble's ``collect`` folder holds (see :func:`stage_collect`).
ENSEMBLE_FILES = ("members.json", "probs.parquet", "eval_probs.safetensors")


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

    device, data, model = setup(params)
    precision = precision_of(params, device)
    model.to(device)
    transform = transform_for(params, data)
    sets = evalsets.load_eval_sets(params)
    manifest, frames, extra = [], [], []
    for i, member in enumerate(ensemble_members(params, name)):
        artifacts.load_weights(model, member["weights"])
        weights = prunable_weights(params, model).values()
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
    with artifacts.atomic_dir(out, holds=ENSEMBLE_FILES, owner=f"collect@{name}") as tmp:
        artifacts.write_json(manifest, tmp / "members.json")
        artifacts.write_parquet(df, tmp / "probs.parquet")
        stacked = {k: torch.from_numpy(np.stack([member[k] for member in extra])) for k in extra[0]} if extra else {}
        artifacts.save_tensors(stacked, tmp / "eval_probs.safetensors")
    return out


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
    manifest = artifacts.read_json(folder / "members.json")
    out: dict[str, Any] = {"run": name, "method": name, "members": len(manifest)}
    _, data, model = setup(params)
    df = artifacts.read_parquet(folder / "probs.parquet", schema=schemas.probs_schema(data.num_classes))
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
    steps_per_epoch = -(-len(data.splits["train"]) // params.train.optim.batch_size)
    epochs = run_epochs(params.train, name if kind == "tickets" else params.train.dst_ensemble.method)
    steps = steps_per_epoch * epochs
    update_period = resolve_dst(params.train.dst, steps_per_epoch * params.train.epochs).update_period
    infer, train_flops, nonzero, sparsities = 0.0, 0.0, 0, []
    for member in manifest:
        artifacts.load_weights(model, member["source"])
        weights = prunable_weights(params, model)
        dens = {n: int(torch.count_nonzero(w)) / w.numel() for n, w in weights.items()}
        infer += inference_flops(model, data.shape, dens)["sparse"]
        # A tickets ensemble comes from one run: its training cost is counted once.
        if kind == "members" or member["member"] == 0:
            cost_of = TrainingCost(per_layer, dens, steps, update_period, [], params.train)
            train_flops += method.training_flops_per_example(cost_of)
        nonzero += sum(int(torch.count_nonzero(p)) for p in model.parameters())
        sparsities.append(1.0 - member["density"])
    out["sparsity"] = float(sum(sparsities) / len(sparsities))
    out["target_sparsity"] = params.train.dst.sparsity
    if kind == "tickets":
        events = artifacts.read_parquet(run_dir(params, name) / "mask_updates.parquet", schema=schemas.MASK_UPDATES_SCHEMA)
        out["exploration_rate"] = float(events["exploration_rate"].iloc[-1])
    out["params"] = {"nonzero": nonzero, "total_per_member": sum(p.numel() for p in model.parameters())}
    out["flops"] = {
        "inference": infer,
        "inference_ratio": infer / dense_infer,
        "training_ratio": train_flops * epochs / dense_reference_cost(params, model, data.shape),
    }
    return write_evaluation(params, name, ev, out, sets)
