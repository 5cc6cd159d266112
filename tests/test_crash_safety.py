"""Checkpoint fallback and numerical faults (sparse_core.checkpoint, sparse_core.engine).

A checkpoint that cannot be used is reported by path and reason, moved aside, and the run falls
back to ``prev.pt``; a non-finite loss or gradient stops the run naming epoch, step and method,
keeps the last good checkpoint, and (when configured) retries from it at a lower learning rate.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sparse_core.artifacts import load_checkpoint, save_checkpoint
from sparse_core.checkpoint import CheckpointStore
from sparse_core.config import DSTSection, OptimSection, PruningSection
from sparse_core.engine import NonFiniteError, fit
from sparse_core.methods import create_method
from tests.conftest import TinyNet, make_split
from tests.test_engine import OPTIM, TRANSFORM, _run

EPOCHS = 4


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_keeps_the_previous_checkpoint(tmp_path):
    _run(tmp_path / "r", "dpf", stop_after=3, epochs=EPOCHS)
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 3
    assert load_checkpoint(tmp_path / "r" / "prev.pt")["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["last.pt", "prev.pt"]  # no temporary left


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "CheckpointError"),
        ("version", "schema version 99"),
        ("other_model", "size mismatch"),
    ],
)
def test_an_unusable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
    reference, _ = _run(tmp_path / "full", "dpf", epochs=EPOCHS)
    _run(tmp_path / "r", "dpf", stop_after=3, epochs=EPOCHS)
    last = tmp_path / "r" / "last.pt"
    good_prev = (tmp_path / "r" / "prev.pt").read_bytes()
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "version":
        ckpt = load_checkpoint(last)
        save_checkpoint({**ckpt, "version": 99}, last)
    else:  # a checkpoint of another model: wider conv layer
        ckpt = load_checkpoint(last)
        ckpt["model"] = {k: torch.zeros(8, *v.shape[1:]) if k == "conv.weight" else v for k, v in ckpt["model"].items()}
        save_checkpoint(ckpt, last)
    with caplog.at_level(logging.WARNING, logger="sparse_core.checkpoint"):
        resumed, _ = _run(tmp_path / "r", "dpf", epochs=EPOCHS)
    assert any(str(last) in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    assert (tmp_path / "r" / "last.pt.bad").is_file()  # moved aside, never rotated over prev.pt
    assert _same_weights(resumed, reference)  # resumed from epoch 2, same result
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == EPOCHS
    assert good_prev  # the good checkpoint was read, not lost: the run could continue from it


def test_no_usable_checkpoint_starts_over_from_the_initial_state(tmp_path):
    reference, _ = _run(tmp_path / "full", "rigl", epochs=EPOCHS)
    _run(tmp_path / "r", "rigl", stop_after=1, epochs=EPOCHS)  # only last.pt exists
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    # Loads half-way (conv first) then fails on fc: the model must not stay half-loaded.
    ckpt["model"]["fc.weight"] = torch.zeros(1)
    save_checkpoint(ckpt, tmp_path / "r" / "last.pt")
    again, _ = _run(tmp_path / "r", "rigl", epochs=EPOCHS)
    assert _same_weights(again, reference)


def _faulty_run(run_dir, fault_step: int, kind: str, retries: int = 0, epochs: int = EPOCHS):
    """A dpf run whose loss (or one gradient) is made non-finite once, at ``fault_step``."""
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = -(-len(train) // OPTIM.batch_size) * epochs
    method = create_method("dpf", model, steps, PruningSection(sparsity=0.8, update_period=4), DSTSection(), seed=3, epochs=epochs)
    state = {"step": 0, "fired": False}
    original = method.before_forward

    def before_forward(step):
        state["step"] = step
        original(step)

    method.before_forward = before_forward

    def poison_output(module, inputs, out):
        if state["step"] == fault_step and kind == "loss" and not state["fired"]:
            state["fired"] = True
            return out * float("nan")
        return out

    def poison_grad(grad):
        if state["step"] == fault_step and kind == "gradient" and not state["fired"]:
            state["fired"] = True
            return grad * float("inf")
        return grad

    model.fc.register_forward_hook(poison_output)
    model.conv.weight.register_hook(poison_grad)
    fit(
        model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=run_dir, seed=7,
        device=torch.device("cpu"), fingerprint="fp", progress=False, nonfinite_retries=retries,
    )  # fmt: skip
    return model


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_value_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, kind):
    # 6 steps per epoch: step index 14 is step 15, in epoch 3.
    with pytest.raises(NonFiniteError, match=rf"non-finite {kind} .* at epoch 3, step 15 of method dpf; the last good checkpoint .*last.pt is kept"):
        _faulty_run(tmp_path / "r", fault_step=14, kind=kind)
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_configured_retry_resumes_from_the_last_good_checkpoint_at_a_lower_rate(tmp_path):
    model = _faulty_run(tmp_path / "r", fault_step=14, kind="loss", retries=1)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    history = load_checkpoint(tmp_path / "r" / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    clean = CheckpointStore(tmp_path / "r").read(tmp_path / "r" / "last.pt", "fp")
    assert clean["lr_scale"] == 0.5
    # Epochs 1-2 come from before the fault at the full rate; 3-4 were retrained at half of it.
    ref = OPTIM.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 11 / 24)).item())
    assert history[1]["lr"] == pytest.approx(ref)
    assert history[2]["lr"] == pytest.approx(0.5 * OPTIM.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 17 / 24)).item()))


def test_retries_exhausted_still_raise(tmp_path):
    with pytest.raises(NonFiniteError, match="no checkpoint had been written"):
        _faulty_run(tmp_path / "r", fault_step=2, kind="loss", retries=0)

