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

Transport and threads. Sends are non-blocking (``isend``, up to ``send_depth`` in flight, each
on its own copy of the activation) and every chunk after the first posts the receive of the
next step's input before it computes the current step. Gloo's TCP transport delivers a message
only once the receiver has posted the matching ``recv`` (measured: a 10-element blocking
``send`` returned only when the receiver called ``recv`` 1 s later), so a blocking ``send``
would hold chunk ``k`` until chunk ``k + 1`` had finished its previous step: the chunks would
run in lock step and any jitter in one would stall both. Chunks after the first read only the labels of each
batch (the images are never gathered, augmented or normalised there). Each process runs with
``threads`` intra-op threads (1 by default; ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set
before the spawned process imports torch), and the losses stay tensors until the end (no
``.item()`` per step). Every process reports where its step loop's time went (``phases``) and
per-step clock stamps, so a steady-state rate can be read without process start-up.

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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sparse_core.artifacts import load_checkpoint, save_checkpoint
from sparse_core.config import OptimSection
from sparse_core.data import BatchTransform, Split, iterate_batches
from sparse_core.engine import lr_at
from sparse_core.local.model import LocalNet, frozen_bn_stats
from sparse_core.precision import Precision


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
    #: Intra-op threads per process (``torch.set_num_threads``; also ``OMP_NUM_THREADS`` and
    #: ``MKL_NUM_THREADS`` of the spawned processes): the chunks are the parallelism.
    threads: int = 1
    #: Activations a chunk may have sent ahead of the next chunk's progress (non-blocking sends).
    send_depth: int = 2
    #: ``base.precision`` and ``base.channels_last`` (:mod:`sparse_core.precision`): each chunk's
    #: forward pass and loss run under autocast; activations travel between chunks in float32.
    precision: str = "fp32"
    channels_last: bool = False
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


class _Phases:
    """Wall seconds per phase of a worker's step loop (``lap(name)`` charges the time since the
    previous lap to ``name``)."""

    NAMES = ("data", "recv_wait", "forward", "send", "backward", "optimizer", "grad_wait")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] += now - self._t
        self._t = now


class _Sends:
    """Non-blocking point-to-point sends to one peer, at most ``depth`` in flight.

    Each tensor is kept alive until its send completed (``isend`` reads it asynchronously).
    Gloo's TCP transport sends a message once the receiver has posted the matching ``recv``;
    a blocking ``send`` would therefore hold the sender until the next chunk had finished its
    previous step. With ``depth`` sends in flight a chunk runs up to ``depth`` batches ahead.
    """

    def __init__(self, dst: int, depth: int = 2):
        self.dst, self.depth, self.pending = dst, depth, deque()

    def send(self, tensor: torch.Tensor) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft()[0].wait()
        self.pending.append((dist.isend(tensor, dst=self.dst), tensor))

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft()[0].wait()


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of one epoch's batches (:func:`sparse_core.data.iterate_batches` keeps the last partial batch)."""
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def _label_batches(spec: "PipelineSpec", epoch: int, device: torch.device) -> Iterator[tuple[None, torch.Tensor]]:
    """``(None, y)`` per batch of ``epoch``, in the order and sizes of :func:`iterate_batches`,
    without touching the images: chunks after the first receive their input and need the
    labels only. The images are replaced by a 1×1-pixel stand-in of the same length, so the
    loader's own order and generator are used (its augmentation draws after the permutation
    and the labels do not depend on them; ``tests/test_local.py`` checks the equality)."""
    labels = spec.train.labels
    stand_in = Split(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8, device=labels.device), labels)
    for _, y in iterate_batches(stand_in, spec.optim.batch_size, spec.transform, train=True, seed=spec.seed, epoch=epoch,
                                device=device):  # fmt: skip
        yield None, y


def _worker(rank: int, spec: PipelineSpec, port: int | None, out_dir: str) -> None:
    """Process ``rank`` = window ``rank``. ``port`` None: the process group comes from the
    environment (``torchrun`` sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``)."""
    world = spec.extra["world"]
    timeout = timedelta(seconds=spec.timeout_s)
    # Before any kernel runs: one intra-op thread per process (the chunks are the parallelism).
    torch.set_num_threads(spec.threads)
    if port is None:
        dist.init_process_group(spec.backend, timeout=timeout)
    else:
        dist.init_process_group(spec.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    # NCCL sends CUDA tensors: one GPU per process (untested here: no GPU on the development machine).
    device = torch.device(f"cuda:{rank % max(torch.cuda.device_count(), 1)}") if spec.backend == "nccl" else torch.device("cpu")
    try:
        prec = Precision(spec.precision, spec.channels_last, device.type)
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
        sizes = _batch_sizes(len(spec.train), spec.optim.batch_size)
        steps_per_epoch = len(sizes)
        last = steps_per_epoch * spec.epochs if spec.max_steps is None else min(spec.max_steps, steps_per_epoch * spec.epochs)
        shapes = spec.extra["shapes"]  # output shape of every block (without batch)
        in_shape = shapes[owned_blocks[0] - 1] if rank > 0 else None  # the activation we receive
        overlapping = local.variant == "overlapping"
        pending_input: torch.Tensor | None = None  # overlapping: input of our last block for batch t-1
        sends = _Sends(rank + 1, spec.send_depth) if rank < world - 1 else None
        grad_sends = _Sends(rank - 1, spec.send_depth) if shared_first else None

        def post_recv(s: int) -> tuple[torch.Tensor, Any] | None:
            """Post the receive of step ``s``'s input now, so it arrives while we compute."""
            if rank == 0 or s >= last:
                return None
            buf = torch.empty(sizes[s % steps_per_epoch], *in_shape, device=device)
            return buf, dist.irecv(buf, src=rank - 1)

        incoming = post_recv(0)
        phases = _Phases()
        step, losses, step_end, seconds = 0, [], [], 0.0
        ready, cpu0 = time.monotonic(), time.process_time()
        for epoch in range(spec.epochs):
            if step >= last:
                break
            batches = iter(
                iterate_batches(spec.train, spec.optim.batch_size, spec.transform, train=True, seed=spec.seed, epoch=epoch,
                                device=device) if rank == 0 else _label_batches(spec, epoch, device)
            )  # fmt: skip
            while step < last:
                t0 = time.perf_counter()
                phases.start()
                batch = next(batches, None)
                if batch is None:
                    break
                x, y = batch
                phases.lap("data")
                if spec.fault and spec.fault["rank"] == rank and spec.fault["step"] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                lr = lr_at(step, steps_per_epoch, spec.epochs, spec.optim)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                # Overlapping: the next window's gradient for our last block, batch t-1 (one step late).
                if overlapping and rank < world - 1 and step > 0:
                    grad = torch.empty(len(pending_label), *shapes[owned_blocks[-1]], device=device)
                    dist.recv(grad, src=rank + 1)
                    phases.lap("grad_wait")
                    with frozen_bn_stats(local.blocks[owned_blocks[-1]]), prec.autocast():
                        out = local.blocks[owned_blocks[-1]](pending_input)
                    out.backward(grad.to(out.dtype))
                    phases.lap("backward")
                if rank == 0:
                    h = prec.inputs(x)
                else:
                    h, work = incoming
                    work.wait()
                    h = prec.inputs(h)
                    phases.lap("recv_wait")
                    incoming = post_recv(step + 1)
                if shared_first:
                    h.requires_grad_(True)
                received = h
                with prec.autocast():
                    for b in owned_blocks:
                        if overlapping and b == owned_blocks[-1] and rank < world - 1:
                            pending_input, pending_label = h.detach(), y
                        h = local.blocks[b](h)
                phases.lap("forward")
                if sends is not None:
                    # A float32 copy in the standard layout: the send reads it while we go on computing.
                    sends.send(h.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True))
                    phases.lap("send")
                head = local.heads[str(rank)] if str(rank) in local.heads else None
                with prec.autocast():
                    loss = F.cross_entropy(head(h) if head is not None else h, y)
                phases.lap("forward")
                loss.backward()
                phases.lap("backward")
                if shared_first and step < last - 1:
                    grad_sends.send(received.grad.clone(memory_format=torch.contiguous_format))
                    phases.lap("send")
                opt.step()
                phases.lap("optimizer")
                losses.append(loss.detach())  # no .item() per step: no host sync on GPUs
                step_end.append(time.monotonic())
                seconds += time.perf_counter() - t0
                step += 1
        for q in (sends, grad_sends):
            if q is not None:
                q.flush()
        state = {k: v.detach().cpu().clone() for k, v in local.state_dict().items() if k in _owned_keys(local, rank)}
        save_checkpoint({"state": state, "losses": torch.stack(losses).tolist() if losses else [], "seconds": seconds,
                         "steps": step, "phases": phases.seconds, "ready": ready, "step_end": step_end,
                         "threads": torch.get_num_threads(), "cpu_seconds": time.process_time() - cpu0},
                        Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
        dist.barrier()  # every rank's file is written before rank 0 merges (torchrun mode)
    finally:
        dist.destroy_process_group()


def run_pipeline(spec: PipelineSpec) -> tuple[LocalNet, dict[str, Any]]:
    """Train ``spec.build()`` with one process per window; returns the trained network (all
    ranks' owned parameters and buffers merged) and, per window (= process), lists of:

    - ``losses``: the window's loss per step (nats);
    - ``seconds``: wall seconds of its step loop (data, waits, compute, sends; process start-up,
      model construction and the final save excluded);
    - ``phases``: those seconds split into ``data`` (next batch: images on chunk 0, labels
      only on the others), ``recv_wait`` (waiting for the previous chunk's activation),
      ``forward`` (blocks and head), ``send`` (copying the output and posting its send; waiting
      only when ``send_depth`` sends are in flight), ``backward``, ``optimizer`` and
      ``grad_wait`` (overlapping: waiting for the next window's late gradient);
    - ``ready``: ``time.monotonic()`` when its step loop began (after start-up);
    - ``step_end``: ``time.monotonic()`` at the end of every step (one clock for all processes
      of a machine: the steady-state rate is read from the last chunk's stamps);
    - ``threads``: its intra-op thread count;
    - ``cpu_seconds``: CPU time of the process (all its threads) over the step loop: well
      below ``seconds`` means it waited or was preempted, above means threads competed;

    and ``steps`` (steps trained).

    Raises:
        PipelineError: a process died (message names the chunk and how it ended).
        ValueError: the variant is ``backprop`` (one window: nothing to parallelise).
    """
    local = prepare_spec(spec)
    world = spec.extra["world"]
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="sparseflow-pipeline-") as out_dir:
        with _thread_env(spec.threads):
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


@contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = ``threads`` while the processes are spawned
    (a spawned process inherits the environment and reads them when it imports torch)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, str(threads)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _merge(local: LocalNet, out_dir: str | Path, world: int) -> tuple[LocalNet, dict[str, Any]]:
    merged = {}
    info: dict[str, Any] = {"losses": [], "seconds": [], "steps": 0, "phases": [], "ready": [], "step_end": [], "threads": [], "cpu_seconds": []}
    for r in range(world):
        part = load_checkpoint(Path(out_dir) / f"rank{r}.pt")
        merged.update(part["state"])
        for key in ("losses", "seconds", "phases", "ready", "step_end", "threads", "cpu_seconds"):
            info[key].append(part[key])
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
