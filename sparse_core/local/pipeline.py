"""True parallel execution of local training: one process per window, activations sent forward.

Process ``k`` holds the blocks window ``k`` owns (see :func:`sparse_core.local.windows.owners`)
and its auxiliary head. Per step ``t`` it receives the activation of batch ``t`` from process
``k − 1`` (point-to-point ``send``/``recv`` over ``torch.distributed``: gloo on CPU, NCCL on
GPUs), runs its blocks, sends its output on to ``k + 1`` at once, then computes its local loss,
backpropagates and steps its own optimizer. Nobody waits for a backward signal from later
chunks, so after ``K − 1`` steps every process is busy (the pipeline is full) and there is no
flush between steps (Laskin et al. 2020, Sec. 3 and Fig. 2).

Equivalence. Process ``k`` receives batch ``t``'s activation computed by process ``k − 1``
*before* its step-``t`` update, which is what the simulation uses, so for ``greedy`` and
``chunked`` the trained parameters equal the single-process simulation (up to floating-point
reduction order).

Staleness (``overlapping``). Window ``k`` contains block ``k``, owned by process ``k − 1``.
Process ``k`` treats the received activation as a leaf, backpropagates its loss into it and
sends that gradient back; process ``k − 1`` receives batch ``t``'s gradient during step
``t + 1`` and applies it through a recomputation of block ``k`` on batch ``t``'s stored input
at its *current* weights (batch-norm running statistics frozen), added to its own step-``t + 1``
gradient. The gradient from the next window is therefore one step late, evaluated at weights
one update newer; the last batch's gradient is dropped. The simulation has no delay, so the
two differ for ``overlapping``.

Launch. :func:`run_pipeline` spawns the processes itself (``sparseflow run train --method
local_chunked`` with ``local.execution: pipeline``); under ``torchrun`` each process calls
:func:`run_pipeline_torchrun` (``torchrun --nproc-per-node K --no-python sparseflow
local-worker --method local_chunked``), and rank 0 merges and exports the run.

Faults. The processes are started by :func:`torch.multiprocessing.start_processes` and joined
in a polling loop; if one exits (an exception, a signal, an OOM kill), the others are
terminated and :class:`PipelineError` names the chunk. The process group has a timeout
(default 120 s) as a second guard against a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sparse_core.artifacts import load_checkpoint, save_checkpoint
from sparse_core.config import OptimSection
from sparse_core.data import BatchTransform, Split, iterate_batches
from sparse_core.engine import lr_at
from sparse_core.local.model import LocalNet, frozen_bn_stats


class PipelineError(RuntimeError):
    """A pipeline process died; the message names its chunk."""


@dataclass
class PipelineSpec:
    """Everything a worker needs to rebuild the same network and data order (picklable)."""

    build: Any  # callable () -> LocalNet, deterministic (seeded inside); module-level for pickling
    train: Split
    transform: BatchTransform
    optim: OptimSection
    epochs: int
    seed: int
    max_steps: int | None = None
    backend: str = "gloo"
    timeout_s: float = 120.0
    #: Fault injection for tests: ``{"rank": k, "step": t}`` kills process k (SIGKILL) at step t.
    fault: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _owned_keys(local: LocalNet, rank: int) -> set[str]:
    """State-dict keys (of ``local``) of the blocks and head owned by window ``rank``."""
    ids = set()
    for b, block in enumerate(local.blocks):
        if local.owner[b] == rank:
            ids |= {id(t) for t in block.parameters()} | {id(t) for t in block.buffers()}
    keys = {k for k, v in local.state_dict(keep_vars=True).items() if id(v) in ids}
    return keys | {k for k in local.state_dict() if k.startswith(f"heads.{rank}.")}


def _worker(rank: int, spec: PipelineSpec, port: int | None, out_dir: str) -> None:
    """Process ``rank`` = window ``rank``. ``port`` None: the process group comes from the
    environment (``torchrun`` sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``)."""
    world = spec.extra["world"]
    timeout = timedelta(seconds=spec.timeout_s)
    if port is None:
        dist.init_process_group(spec.backend, timeout=timeout)
    else:
        dist.init_process_group(spec.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    # NCCL sends CUDA tensors: one GPU per process (untested here: no GPU on the development machine).
    device = torch.device(f"cuda:{rank % max(torch.cuda.device_count(), 1)}") if spec.backend == "nccl" else torch.device("cpu")
    try:
        torch.set_num_threads(1)
        local: LocalNet = spec.build().to(device)
        local.train()
        win = local.windows[rank]
        owned_blocks = [b for b in range(win.start, win.end + 1) if local.owner[b] == rank]
        shared_first = win.start not in owned_blocks  # overlapping: first block belongs to rank-1
        params = [p for b in owned_blocks for p in local.blocks[b].parameters()]
        if str(rank) in local.heads:
            params += list(local.heads[str(rank)].parameters())
        opt = torch.optim.SGD(params, lr=spec.optim.lr, momentum=spec.optim.momentum, nesterov=spec.optim.nesterov,
                              weight_decay=spec.optim.weight_decay)  # fmt: skip
        steps_per_epoch = -(-len(spec.train) // spec.optim.batch_size)
        last = steps_per_epoch * spec.epochs if spec.max_steps is None else min(spec.max_steps, steps_per_epoch * spec.epochs)
        shapes = spec.extra["shapes"]  # output shape of every block (without batch)
        in_block = (owned_blocks[0] - 1) if owned_blocks else None  # block whose output we receive
        overlapping = local.variant == "overlapping"
        pending_input: torch.Tensor | None = None  # overlapping: input of our last block for batch t-1
        step, losses, seconds = 0, [], 0.0
        for epoch in range(spec.epochs):
            for x, y in iterate_batches(spec.train, spec.optim.batch_size, spec.transform, train=True, seed=spec.seed,
                                        epoch=epoch, device=device):  # fmt: skip
                if step >= last:
                    break
                if spec.fault and spec.fault["rank"] == rank and spec.fault["step"] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                t0 = time.perf_counter()
                lr = lr_at(step, steps_per_epoch, spec.epochs, spec.optim)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                # Overlapping: the next window's gradient for our last block, batch t-1 (one step late).
                if overlapping and rank < world - 1 and step > 0:
                    grad = torch.empty(len(pending_label), *shapes[owned_blocks[-1]], device=device)
                    dist.recv(grad, src=rank + 1)
                    with frozen_bn_stats(local.blocks[owned_blocks[-1]]):
                        local.blocks[owned_blocks[-1]](pending_input).backward(grad)
                if rank == 0:
                    h = x
                else:
                    h = torch.empty(len(y), *shapes[in_block] if not shared_first else shapes[win.start], device=device)
                    dist.recv(h, src=rank - 1)
                if shared_first:
                    h.requires_grad_(True)
                received = h
                outs = []
                for b in owned_blocks:
                    if overlapping and b == owned_blocks[-1] and rank < world - 1:
                        pending_input, pending_label = h.detach(), y
                    h = local.blocks[b](h)
                    outs.append(h)
                if rank < world - 1:
                    dist.send(h.detach().contiguous(), dst=rank + 1)
                head = local.heads[str(rank)] if str(rank) in local.heads else None
                loss = F.cross_entropy(head(h) if head is not None else h, y)
                loss.backward()
                if shared_first and step < last - 1:
                    dist.send(received.grad.contiguous(), dst=rank - 1)
                opt.step()
                seconds += time.perf_counter() - t0
                losses.append(loss.item())
                step += 1
        state = {k: v.detach().cpu().clone() for k, v in local.state_dict().items() if k in _owned_keys(local, rank)}
        save_checkpoint({"state": state, "losses": losses, "seconds": seconds, "steps": step}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # every rank's file is written before rank 0 merges (torchrun mode)
    finally:
        dist.destroy_process_group()


def run_pipeline(spec: PipelineSpec) -> tuple[LocalNet, dict[str, Any]]:
    """Train ``spec.build()`` with one process per window; returns the trained network (all
    ranks' owned parameters and buffers merged) and ``{"losses": [[per step] per window],
    "seconds": [per window], "steps"}``.

    Raises:
        PipelineError: a process died (message names the chunk and how it ended).
        ValueError: the variant is ``backprop`` (one window: nothing to parallelise).
    """
    local = prepare_spec(spec)
    world = spec.extra["world"]
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="sparseflow-pipeline-") as out_dir:
        ctx = mp.start_processes(_worker, args=(spec, port, out_dir), nprocs=world, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=0.2):
                pass
        except mp.ProcessExitedException as exc:
            how = f"was killed by {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
            raise PipelineError(
                f"local pipeline: chunk {exc.error_index} (blocks {_describe(local, exc.error_index)}) {how}; "
                "the other chunks were stopped"
            ) from None
        except mp.ProcessRaisedException as exc:
            raise PipelineError(
                f"local pipeline: chunk {exc.error_index} (blocks {_describe(local, exc.error_index)}) raised:\n{exc}"
            ) from None
        return _merge(local, out_dir, world)


def _merge(local: LocalNet, out_dir: str | Path, world: int) -> tuple[LocalNet, dict[str, Any]]:
    merged, info = {}, {"losses": [], "seconds": [], "steps": 0}
    for r in range(world):
        part = load_checkpoint(Path(out_dir) / f"rank{r}.pt")
        merged.update(part["state"])
        info["losses"].append(part["losses"])
        info["seconds"].append(part["seconds"])
        info["steps"] = part["steps"]
    missing = set(local.state_dict()) - set(merged)
    if missing:
        raise PipelineError(f"local pipeline: no process owned {sorted(missing)[:5]}")
    local.load_state_dict(merged)
    return local, info


def prepare_spec(spec: PipelineSpec) -> LocalNet:
    """Fill in the world size and block shapes; returns a fresh network (for merging)."""
    local = spec.build()
    if local.variant == "backprop":
        raise ValueError("execution 'pipeline' needs a local variant (greedy, overlapping, chunked), not backprop")
    spec.extra = {**spec.extra, "world": len(local.windows), "shapes": local._feature_shapes(tuple(spec.train.images.shape[1:]))}
    return local


def run_pipeline_torchrun(spec: PipelineSpec, out_dir: str | Path) -> tuple[LocalNet, dict[str, Any]] | None:
    """This process's part of a pipeline started by ``torchrun --nproc-per-node K`` (one
    process per window; ``out_dir`` on a filesystem every rank sees). Returns the merged
    network and info on rank 0, None on the other ranks.

    Raises:
        PipelineError: ``WORLD_SIZE`` differs from the number of windows.
    """
    local = prepare_spec(spec)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world != spec.extra["world"]:
        raise PipelineError(
            f"torchrun started {world} processes but the {local.variant} windows need {spec.extra['world']} (one per chunk)"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _worker(rank, spec, None, str(out_dir))
    return _merge(local, out_dir, world) if rank == 0 else None


def _describe(local: LocalNet, rank: int) -> str:
    names = [local.blocks[b].name for b in range(len(local.blocks)) if local.owner[b] == rank]
    return ", ".join(names) or "none"
