"""Data-parallel training (DistributedDataParallel) of any training method, masks verified across ranks.

Launch: ``torchrun --standalone --nproc-per-node W --no-python sparseflow ddp-worker --method dpf``
(:func:`sparse_core.jobs.training.stage_train_ddp`). :func:`init_distributed` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and
starts the process group: gloo on CPU, NCCL with one GPU per ``LOCAL_RANK`` on CUDA.

What a step computes. Every rank iterates the *same* seeded global batches
(:func:`~sparse_core.data.loader.iterate_batches` with the same ``seed`` and ``epoch``, hence the
same order and augmentation) and trains on its contiguous slice
``torch.tensor_split(batch, W)[rank]`` of ``n_r`` of the ``N`` examples. DDP averages gradients
over ranks, so the rank's mean loss is weighted by ``n_r · W / N`` before ``backward``::

    (1/W) Σ_r (n_r W / N) ∇ mean_r(loss) = Σ_r (n_r / N) ∇ mean_r(loss) = ∇ mean_N(loss)

which is the gradient of the global-batch mean also when the last batch does not split evenly
(a rank may even get an empty slice). Every rank then holds the same averaged gradient (DDP's
all-reduce returns identical values everywhere), applies the same optimizer step and runs the
method's hooks on identical weights: the hooks act on the *unwrapped* network's parameters, so
masks, DPF's swap-and-restore and RigL's gradient scores are computed on every rank.

Masks: verified, not broadcast. Mask updates are deterministic functions of the weights, the
(all-reduced) gradient and a generator seeded identically on every rank, so all ranks compute
the same masks; broadcasting rank 0's masks would hide a bug (a rank-dependent code path, a
non-deterministic kernel) rather than fix it, and would let the other ranks' weights drift
from their masks. Instead :meth:`DataParallel.verify_masks` gathers a per-layer checksum from
every rank and raises :class:`MaskDivergenceError` naming the step, the layers and the ranks
that differ from rank 0. It runs on a schedule every rank follows without talking to the
others (a collective must be entered by all ranks): every ``ΔT`` steps (the method's update
period: ``dst.update_period`` for set/rigl/edst, ``pruning.update_period`` for gmp/dpf and
other pruning methods), at the end of every epoch (EDST's global exploration falls on an epoch
boundary), and after ``on_train_end`` (gmp/dpf's final update, oneshot's only one). The number
of logged mask updates (``len(method.events)``) is part of the checksum, so an update that one
rank made off-schedule is caught at the next check.

Checksum of a layer: ``(Σ_i m_i, Σ_i m_i · h(i))`` with ``h(i) = (2654435761 · i) mod 2³¹``
(Knuth's multiplicative hash; exact in int64 for layers under 2³¹ weights). A single flipped
element changes the count; a single moved element (drop at ``i``, grow at ``j``) changes the
hash sum because ``h`` is injective below 2³¹ (the multiplier is odd). Cost: two int64 passes
over the masks and one all-gather of ``1 + 2L`` integers per check.

Metrics. Training loss/accuracy sums and the image count are all-reduced at the end of the
epoch, so the history holds the global figures. Validation runs in full on every rank
(identical weights, no collectives): every rank gets the same numbers, which matters because
methods act on them (EDST keeps each phase's best-validation ticket).

Files. Checkpoints and exports are written by rank 0 only; the other ranks wait at a barrier.
A resumed run loads the same ``last.pt`` on every rank.

Batch normalisation. On CUDA the network's BatchNorm layers are converted to
:class:`torch.nn.SyncBatchNorm` (batch statistics over the global batch, as in one process).
On CPU, SyncBatchNorm is unsupported (torch 2.15: "SyncBatchNorm layers only work with GPU
modules"), so BN normalises with *per-rank* batch statistics: training then differs from a
single-process run (the result is still a valid data-parallel run, identical on every rank).
Running statistics follow rank 0 (DDP broadcasts its buffers before every forward, and
:meth:`DataParallel.end_epoch` broadcasts them again before validation and the checkpoint).
Equality with a single-process run, up to floating-point summation order, therefore holds on
CPU only for networks without BN: ``lenet5`` and ``lenet_300_100`` (the ResNets, WRN and VGG
have BN).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (odd)
_HASH_MODULUS = 2**31


class MaskDivergenceError(RuntimeError):
    """The masks of some rank differ from rank 0's; the message names the step, layers and ranks."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or a launcher with the same
    environment contract) as one of several ranks: ``RANK`` set and ``WORLD_SIZE`` > 1."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """True in rank 0 of an initialised process group, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sums(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum each of ``values`` over all ranks (one all-reduce of a float64 vector).

    Args:
        values: per-rank partial sums (e.g. loss·examples, correct predictions, examples).
        device: where the vector lives for the collective (the rank's GPU under NCCL).

    Returns:
        The global sums, in order (identity when no process group is initialised).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-layer checksums of boolean masks (see the module docstring).

    Args:
        masks: ``{name: bool tensor}`` in a fixed (module) order.

    Returns:
        int64 tensor (2L,) on the masks' device: ``[count_0, hash_0, count_1, hash_1, ...]``.

    Raises:
        ValueError: a layer has 2³¹ weights or more (the hash would no longer be exact).
    """
    out = []
    for name, m in masks.items():
        flat = m.reshape(-1).to(torch.int64)
        if flat.numel() >= _HASH_MODULUS:
            raise ValueError(f"mask {name!r} has {flat.numel()} elements; the checksum supports < 2**31")
        h = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device).mul_(_HASH_MULTIPLIER).remainder_(_HASH_MODULUS)
        out += [flat.sum(), (h * flat).sum()]
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.int64)


def mask_check_period(method: Any) -> int | None:
    """``ΔT`` of a method's scheduled mask updates: ``dst.update_period`` (set, rigl, edst),
    else ``pruning.update_period`` (gmp, dpf, oneshot, retrain); None for dense training."""
    if getattr(method, "masks", None) is None:
        return None
    for section in ("dst", "pruning"):
        period = getattr(getattr(method, section, None), "update_period", None)
        if period:
            return int(period)
    return None


class SingleProcess:
    """The engine's view of a one-process run: every hook is the identity or a no-op, so the
    single-process loop executes exactly the operations it always has."""

    rank, world_size, is_main, device = 0, 1, True, None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training loop calls (here: ``model`` itself)."""
        return model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """``(x, y, loss_weight)`` of this rank's part of a global batch; None: no weighting."""
        return x, y, None

    def after_step(self, method: Any, step: int) -> None:
        """After optimizer step number ``step`` (1-based) and the method's ``after_step``."""

    def end_epoch(self, model: nn.Module, method: Any, step: int) -> None:
        """After an epoch's last step, before validation and the checkpoint."""

    def sum_over_ranks(self, *values: float) -> tuple[float, ...]:
        return values

    def verify_masks(self, method: Any, step: int) -> None:
        pass

    def barrier(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Keys added to a run's ``config.json`` (none for a single process)."""
        return {}

    def close(self) -> None:
        pass


SINGLE_PROCESS = SingleProcess()


class DataParallel(SingleProcess):
    """One rank of a DDP run (construct with :func:`init_distributed`).

    Attributes:
        rank, world_size, local_rank: from torchrun's environment.
        device: ``cuda:<local_rank>`` under NCCL, else CPU.
        last_verified_step: the last step at which all ranks' masks were verified equal
            (-1 before the first check).
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.is_main = rank == 0
        self.last_verified_step = -1

    @property
    def backend(self) -> str:
        return dist.get_backend()

    @property
    def sync_batchnorm(self) -> bool:
        """Whether BN layers are converted to SyncBatchNorm (CUDA only; see the module docstring)."""
        return self.device.type == "cuda"

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)``; BN becomes SyncBatchNorm on CUDA. The conversion
        keeps the parameter and buffer tensors, so the optimizer and the method's references
        to ``model``'s parameters stay valid; hooks keep acting on ``model``, never the wrapper."""
        if self.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.last_verified_step = -1  # a new run (dst_ensemble trains its members in one group)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        # DDP's default broadcasts rank 0's buffers before every forward (the keyword for it was
        # renamed in torch 2.15, so it is left at its default).
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous slice of a global batch ``x`` (N, ...), ``y`` (N,) and the weight
        ``n_r · W / N`` of its mean loss (see the module docstring)."""
        n = len(y)
        xs, ys = x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]
        return xs, ys, len(ys) * self.world_size / n

    def after_step(self, method: Any, step: int) -> None:
        period = mask_check_period(method)
        if period is not None and step % period == 0:
            self.verify_masks(method, step)

    def end_epoch(self, model: nn.Module, method: Any, step: int) -> None:
        self.broadcast_buffers(model)
        self.verify_masks(method, step)

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank."""
        for b in model.buffers():
            dist.broadcast(b, src=0)

    def sum_over_ranks(self, *values: float) -> tuple[float, ...]:
        """Each value summed over ranks, with its type kept (counts stay ints)."""
        return tuple(type(v)(s) for v, s in zip(values, all_reduce_sums(values, self.device)))

    def verify_masks(self, method: Any, step: int) -> None:
        """Compare every rank's masks with rank 0's (a collective: all ranks must call it).

        Raises:
            MaskDivergenceError: some rank's masks, or its number of logged mask updates,
                differ from rank 0's; raised on every rank, naming the step, the layers and
                the ranks.
        """
        masks = getattr(method, "masks", None)
        if masks is None:
            return
        local = torch.cat([torch.tensor([len(method.events)], dtype=torch.int64, device=self.device),
                           mask_checksums(masks.masks).to(self.device)])  # fmt: skip
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        ref, names = gathered[0], list(masks.masks)
        problems = []
        for r, other in enumerate(gathered[1:], start=1):
            differs = (other[1:].view(-1, 2) != ref[1:].view(-1, 2)).any(1).tolist()  # per layer
            layers = [n for n, d in zip(names, differs) if d]
            what = f"layer(s) {', '.join(layers)}" if layers else ""
            if other[0] != ref[0]:
                what += f"{'; ' if layers else ''}{int(other[0])} mask updates logged vs {int(ref[0])} on rank 0"
            if what:
                problems.append(f"rank {r}: {what}")
        if problems:
            last = self.last_verified_step
            since = f"last verified equal at step {last}" if last >= 0 else "never verified equal"
            raise MaskDivergenceError(
                f"masks diverged across ranks at step {step} ({since}); differing from rank 0 on {'; '.join(problems)}"
            )
        self.last_verified_step = step

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        bn = "SyncBatchNorm" if self.sync_batchnorm else "per-rank batch statistics"
        return {"distributed": {"world_size": self.world_size, "backend": self.backend, "batch_norm": bn}}

    def close(self) -> None:
        """Destroy the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DataParallel:
    """Start (or join) the process group described by torchrun's environment.

    Args:
        device: ``base.device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``. CUDA uses
            NCCL and GPU ``LOCAL_RANK``; CPU uses gloo.
        timeout_s: collective timeout in seconds (a hung rank fails the run after this).

    Returns:
        This rank's :class:`DataParallel`.

    Raises:
        RuntimeError: ``RANK``/``WORLD_SIZE`` are not set (not started by torchrun), or
            ``device: cuda`` without a visible GPU.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"data-parallel training needs torchrun's environment ({', '.join(missing)} not set); launch with "
            "`torchrun --standalone --nproc-per-node 2 --no-python sparseflow ddp-worker --method <method>`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DataParallel(rank, world, local_rank, dev)


_ACTIVE: contextvars.ContextVar[SingleProcess] = contextvars.ContextVar("sparseflow_parallel", default=SINGLE_PROCESS)


def active_parallel() -> SingleProcess:
    """This rank's :class:`DataParallel` inside :func:`data_parallel`, else :data:`SINGLE_PROCESS`.

    The stage functions read it, so one code path serves single-process and DDP stages (a
    context variable: other threads of the process keep seeing a single process)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(parallel: SingleProcess) -> Iterator[SingleProcess]:
    """Make ``parallel`` the :func:`active_parallel` of the enclosed code (this thread/context)."""
    token = _ACTIVE.set(parallel)
    try:
        yield parallel
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def data_parallel(device: str = "auto", timeout_s: float = 600.0) -> Iterator[DataParallel]:
    """Run the enclosed stage as one rank of a DDP run (:func:`init_distributed`); the process
    group is destroyed on exit. Raises as :func:`init_distributed`."""
    parallel = init_distributed(device, timeout_s)
    try:
        with activate(parallel):
            yield parallel
    finally:
        parallel.close()
