"""Data-parallel training (DDP, 2 ranks, gloo on CPU): masks agree across ranks at every update,
the result equals one process training on the same global batches, a diverged mask stops the
run with a message naming step, layer and rank, and the real ``sparseflow ddp-worker`` command
trains ``dpf`` on the tiny profile with rank 0 alone writing the run folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sparse_core.config import DSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform
from sparse_core.distributed import (
    SINGLE_PROCESS, DataParallel, SingleProcess, activate, all_reduce_sums, init_distributed, is_main,
    launched_by_torchrun, mask_checksums,
)  # fmt: skip
from sparse_core.engine import fit
from sparse_core.methods import create_method
from tests.conftest import REPO, TinyNet, make_split

OPTIM = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
TRANSFORM = BatchTransform([0.5], [0.25], crop_padding=1, flip=True)
EPOCHS = 3
WORLD = 2

#: ``n_train`` is chosen so the last global batch does not split evenly over 2 ranks.
SCENARIOS: dict[str, dict[str, Any]] = {
    "dpf": {"method": "dpf", "n_train": 81, "bn": False},  # last batch of 1: rank 1's slice is empty
    "dpf_resumed": {"method": "dpf", "n_train": 81, "bn": False, "killed_after": 1},  # resumed from epoch 1
    "rigl": {"method": "rigl", "n_train": 83, "bn": False},  # last batch of 3: slices of 2 and 1
    "rigl_bn": {"method": "rigl", "n_train": 83, "bn": True},  # BN: per-rank batch statistics on CPU
    "diverge": {"method": "rigl", "n_train": 83, "bn": False, "corrupt": {"rank": 1, "step": 3, "layer": "fc.weight"}},
}


def train(name: str, run_dir: Path, parallel: SingleProcess = SINGLE_PROCESS) -> dict[str, Any]:
    """Train scenario ``name`` through the engine (one process, or one DDP rank); returns the
    masks after every mask update, the final state, events, history and examples trained on."""
    spec = SCENARIOS[name]
    if "killed_after" in spec:  # a run that stopped after that epoch, then the restarted one
        _train(spec, run_dir, parallel, stop_after_epoch=spec["killed_after"])
    return _train(spec, run_dir, parallel)


def _train(spec: dict[str, Any], run_dir: Path, parallel: SingleProcess, stop_after_epoch: int | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyNet()
    if not spec["bn"]:
        model.bn = nn.Identity()  # without BN, DDP must equal one process up to summation order
    train_split, val = make_split(spec["n_train"], seed=1), make_split(32, seed=2)
    steps = math.ceil(spec["n_train"] / OPTIM.batch_size) * EPOCHS
    pruning = PruningSection(sparsity=0.8, update_period=3, end_fraction=0.8)
    method = create_method(spec["method"], model, steps, pruning, DSTSection(sparsity=0.8, update_period=3), seed=3, epochs=EPOCHS)
    updates: list[tuple[int, dict[str, torch.Tensor]]] = []
    hook, corrupt = method.after_step, spec.get("corrupt")

    def after_step(step: int) -> None:
        before = len(method.events)
        hook(step)
        if len(method.events) == before:
            return
        if corrupt and corrupt["rank"] == parallel.rank and corrupt["step"] == step:
            flat = method.masks.masks[corrupt["layer"]].view(-1)
            flat[0] = ~flat[0]  # one element of one layer on one rank
        updates.append((step, {k: m.clone() for k, m in method.masks.masks.items()}))

    method.after_step = after_step
    examples: list[int] = []
    model.register_forward_pre_hook(lambda m, args: examples.append(len(args[0])) if m.training else None)
    result = fit(model, method, train_split, val, TRANSFORM, OPTIM, epochs=EPOCHS, run_dir=run_dir, seed=7,
                 device=torch.device("cpu"), fingerprint="fp", progress=False, parallel=parallel,
                 stop_after_epoch=stop_after_epoch)  # fmt: skip
    if stop_after_epoch is None:  # a run killed mid-way never reaches its end
        method.on_train_end()
    parallel.verify_masks(method, steps)
    return {
        "updates": updates,
        "masks": {k: m.clone() for k, m in method.masks.masks.items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "events": [e["step"] for e in method.events],
        "history": {k: result.history[k].tolist() for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
        "examples": sum(examples),
        "resumed_from": result.resumed_from_epoch,
    }


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[tuple[str, int], dict[str, Any]]:
    """One torchrun launch training the dpf, dpf_resumed, rigl and rigl_bn scenarios on 2 ranks."""
    out = tmp_path_factory.mktemp("ddp")
    names = ["dpf", "dpf_resumed", "rigl", "rigl_bn"]
    proc = _torchrun([str(REPO / "tests" / "_ddp_worker.py"), str(out), *names])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(n, r): torch.load(out / f"{n}_rank{r}.pt", weights_only=True) for n in names for r in range(WORLD)}


def _assert_same_updates(a: list, b: list, what: str) -> None:
    assert [s for s, _ in a] == [s for s, _ in b], what
    for (step, ma), (_, mb) in zip(a, b):
        for k in ma:
            assert torch.equal(ma[k], mb[k]), f"{what}: mask {k} differs after the update at step {step}"


@pytest.mark.parametrize("name", ["dpf", "rigl"])
def test_ddp_masks_agree_on_every_rank_and_equal_one_process(ddp_runs, name, tmp_path):
    r0, r1 = ddp_runs[(name, 0)], ddp_runs[(name, 1)]
    single = train(name, tmp_path)
    assert len(single["updates"]) >= 3, "the run must contain several mask updates"
    _assert_same_updates(r0["updates"], r1["updates"], "rank 0 vs rank 1")
    _assert_same_updates(r0["updates"], single["updates"], "DDP vs one process")
    assert r0["events"] == r1["events"] == single["events"]
    for k in single["masks"]:
        assert torch.equal(r0["masks"][k], single["masks"][k]) and torch.equal(r1["masks"][k], single["masks"][k]), k
    # Each rank trained on its own slice; together they saw every example once per epoch.
    n = SCENARIOS[name]["n_train"]
    assert 0 < r1["examples"] <= r0["examples"] < n * EPOCHS and r0["examples"] + r1["examples"] == n * EPOCHS
    for k, v in single["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k}: ranks hold different weights"
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # The history holds the global figures: summed over ranks, equal to one process's.
    assert r0["history"] == r1["history"]
    for key, values in single["history"].items():
        assert r0["history"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


def test_ddp_resumed_from_rank0_checkpoint_equals_uninterrupted(ddp_runs):
    """Rank 0 wrote the epoch-1 checkpoint; every rank resumed from it and ended bit for bit
    where the uninterrupted DDP run ended."""
    for r in range(WORLD):
        full, resumed = ddp_runs[("dpf", r)], ddp_runs[("dpf_resumed", r)]
        assert resumed["resumed_from"] == 1 and full["resumed_from"] == 0
        assert resumed["updates"][0][0] > math.ceil(SCENARIOS["dpf"]["n_train"] / OPTIM.batch_size)  # after epoch 1
        for k, v in full["state"].items():
            assert torch.equal(resumed["state"][k], v), (r, k)
        assert all(torch.equal(resumed["masks"][k], m) for k, m in full["masks"].items())
        assert resumed["events"] == full["events"] and resumed["history"] == full["history"]


def test_ddp_with_batchnorm_keeps_ranks_identical(ddp_runs):
    """On CPU BN normalises per rank (no SyncBatchNorm with gloo), but weights, running
    statistics (rank 0's, broadcast at every epoch end), masks and history agree on every rank."""
    r0, r1 = ddp_runs[("rigl_bn", 0)], ddp_runs[("rigl_bn", 1)]
    assert len(r0["updates"]) >= 3
    _assert_same_updates(r0["updates"], r1["updates"], "rank 0 vs rank 1")
    assert any(k.startswith("bn.running") for k in r0["state"])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert r0["history"] == r1["history"]


def test_a_diverged_mask_stops_the_run_naming_step_layer_and_rank(tmp_path):
    proc = _torchrun([str(REPO / "tests" / "_ddp_worker.py"), str(tmp_path), "diverge"])
    assert proc.returncode != 0
    assert "MaskDivergenceError: masks diverged across ranks at step 3 (never verified equal)" in proc.stderr, proc.stderr[-3000:]
    assert "differing from rank 0 on rank 1: layer(s) fc.weight" in proc.stderr
    assert "conv.weight" not in proc.stderr.split("MaskDivergenceError")[-1].splitlines()[0]
    assert not (tmp_path / "diverge" / "last.pt").exists(), "the run must stop before the first epoch ends (step 6)"
    assert not (tmp_path / "diverge_rank0.pt").exists()


def test_mask_checksums_change_with_one_flip_or_one_moved_weight():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(6, 5, generator=g) < 0.3, "b": torch.rand(40, generator=g) < 0.5}
    ref = mask_checksums(masks)
    assert torch.equal(mask_checksums({k: m.clone() for k, m in masks.items()}), ref)
    flipped = {k: m.clone() for k, m in masks.items()}
    flipped["b"][3] = ~flipped["b"][3]
    assert not torch.equal(mask_checksums(flipped)[2:], ref[2:]) and torch.equal(mask_checksums(flipped)[:2], ref[:2])
    moved = {k: m.clone() for k, m in masks.items()}
    on, off = moved["a"].flatten().nonzero()[0, 0], (~moved["a"].flatten()).nonzero()[-1, 0]
    moved["a"].view(-1)[on], moved["a"].view(-1)[off] = False, True  # same count, another position
    got = mask_checksums(moved)
    assert got[0] == ref[0] and got[1] != ref[1]


def test_torchrun_detection_and_single_process_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_torchrun()
    with pytest.raises(RuntimeError, match="needs torchrun's environment"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun()  # one rank: nothing to parallelise
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_torchrun()
    assert is_main() and all_reduce_sums([1.5, 3]) == [1.5, 3.0]  # no process group: identities


def test_loss_weights_make_the_rank_average_the_global_mean():
    """(1/W) Σ_r w_r · mean_r(loss) = mean over the global batch, also for uneven and empty slices."""
    g = torch.Generator().manual_seed(0)
    for n in (8, 3, 1):
        logits, y = torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
        total = 0.0
        for rank in range(WORLD):
            xs, ys, w = DataParallel(rank, WORLD, rank, torch.device("cpu")).shard(logits, y)
            if len(ys):
                total += w * float(F.cross_entropy(xs, ys)) / WORLD
            else:
                assert w == 0.0
        assert total == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_ddp_worker_cli_trains_dpf_on_the_tiny_profile(tmp_path, mirror, monkeypatch):
    from sparse_core.config import load_params
    from sparse_core.jobs.rundirs import stage_prepare
    from sparse_core.jobs.training import stage_train

    monkeypatch.chdir(tmp_path)  # the project folder: the profile's relative data/runs/plots paths land here
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    # As small as the profile allows: no warmup stage, 2 epochs (10 steps), mask updates every 4 steps.
    raw["train"].update(from_warmup=False, epochs=2, methods=["dpf"])
    raw["train"]["pruning"]["update_period"] = 4
    raw["evaluate"]["runs"], raw["collect"]["ensembles"] = ["dpf"], []
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    stage_prepare(load_params("params.yaml"))

    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bindir / "torchrun"), "--standalone", "--nproc-per-node", str(WORLD), "--no-python",
           str(bindir / "sparseflow"), "ddp-worker", "--method", "dpf", "--params", "params.yaml"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = tmp_path / "runs" / "s0" / "dpf"  # the first training seed's folder (base.seeds)
    assert proc.stdout.count("sparseflow ddp-worker: dpf exported to") == 1  # rank 0 only
    files = {"last.pt", "prev.pt", "model.safetensors", "masks.safetensors", "layers.parquet", "history.parquet", "mask_updates.parquet", "config.json"}
    assert {p.name for p in folder.iterdir()} == files  # no temporary leftovers
    assert (tmp_path / "plots" / "seeds" / "s0" / "history" / "dpf.csv").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["method"] == "dpf" and cfg["distributed"] == {"world_size": 2, "backend": "gloo", "batch_norm": "per-rank batch statistics"}
    hist = pd.read_parquet(folder / "history.parquet")
    assert len(hist) == 2 and hist["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1e-4)
    assert pd.read_parquet(folder / "mask_updates.parquet")["step"].tolist() == [4, 8]  # on target at 4: the last update before end_fraction x T = 7.5

    # The same stage in one process (lenet5 has no BN): same masks, same weights up to rounding.
    from sparse_core.artifacts import load_tensors

    raw["base"].update(runs_dir="single/runs", plots_dir="single/plots")
    Path("single.yaml").write_text(yaml.safe_dump(raw))
    single = stage_train(load_params("single.yaml"), "dpf")
    ddp_masks, one_masks = load_tensors(folder / "masks.safetensors"), load_tensors(single / "masks.safetensors")
    flips = sum(int((ddp_masks[k] != one_masks[k]).sum()) for k in one_masks)
    assert flips == 0
    one = load_tensors(single / "model.safetensors")
    for k, v in load_tensors(folder / "model.safetensors").items():
        torch.testing.assert_close(v, one[k], rtol=1e-4, atol=1e-5)

    # What a non-main rank does in the stage, without collectives: train, but write nothing.
    class Rank1(SingleProcess):
        rank, world_size, is_main = 1, 2, False

    raw["base"].update(runs_dir="rank1/runs", plots_dir="rank1/plots")
    Path("rank1.yaml").write_text(yaml.safe_dump(raw))
    with activate(Rank1()):
        stage_train(load_params("rank1.yaml"), "dpf")
    assert not (tmp_path / "rank1").exists()
