"""The fast path of this machine: which precision and memory format a model trains fastest in
(``base.precision: auto``, ``base.channels_last: auto``), chosen by measurement.

Which of fp32 / bf16 / fp16 and NCHW / channels_last is fastest is a property of the machine,
not of the model alone: bf16 runs on oneDNN's native kernels on a CPU with AVX512-BF16 or AMX
and on torch's generic fallback elsewhere (many times slower than fp32), and channels_last helps
some convolution kernels and not others. So ``auto`` measures: a few training steps (forward,
cross-entropy, backward, SGD step) of the profile's model on a synthetic batch of the training
batch size, in every candidate, in interleaved rounds (:func:`measure`), and :func:`choose`
takes the fastest, preferring the simpler candidate (fp32 over bf16/fp16, NCHW over
channels_last) unless the faster one gains more than :data:`TOLERANCE`.

Candidates: fp32 always; bf16 on a CPU with native bf16 (:func:`~sparse_core.precision.native_bf16_cpu`)
or a CUDA device that supports it; fp16 on CUDA only; each in NCHW and channels_last (4-D inputs).
An explicit ``base.precision`` or ``base.channels_last`` pins that dimension.

The choice is cached per machine (:func:`machine_key`: CPU model and vector flags, torch
version, device name, threads), model, input shape and batch size in a JSON file outside the
project (:func:`cache_path`: ``$SPARSEFLOW_CACHE_DIR`` or ``$XDG_CACHE_HOME/sparseflow`` or
``~/.cache/sparseflow``), so it is measured once per machine and reused by every stage; delete
the file to measure again.

How it meets DVC: the params dependency sees ``auto``, whichever path a machine takes, and bf16
changes the numbers. The pipeline's ``fastpath`` stage (always run, about a second when cached)
writes the resolved choice alone to ``<runs_dir>/fastpath.json``, and every stage that computes
depends on that file: on a machine that chooses the same path the file is unchanged and nothing
re-runs; on one that chooses another, every computing stage re-runs instead of reusing results
of the other precision. The measured times go to ``<metrics_dir>/fastpath.json`` (a metrics file
no stage depends on) and into each run's recorded configuration.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core import precision as _precision
from sparse_core.precision import PRECISIONS, Precision

__all__ = ["Candidate", "Choice", "TOLERANCE", "cache_path", "candidates", "choose", "machine_key", "measure", "resolve"]

#: A candidate that is not the simplest must be faster than the simplest one within this
#: fraction of the fastest time to be chosen (0.05: more than 5% faster).
TOLERANCE = 0.05
#: CPU flags that decide which kernels torch's CPU backend runs.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_fp16")
#: Preference order of precisions when times are within :data:`TOLERANCE`: fp32 first (it is
#: bit-reproducible on one machine), then bf16 (no loss scaling), then fp16.
PRECISION_ORDER = ("fp32", "bf16", "fp16")
#: Steps per candidate and round, and rounds (after one untimed warm-up round), of :func:`measure`.
STEPS, ROUNDS = 2, 3
CACHE_ENV = "SPARSEFLOW_CACHE_DIR"
CACHE_VERSION = 1


@dataclass(frozen=True, order=True)
class Candidate:
    """A precision (:data:`~sparse_core.precision.PRECISIONS`) and an input layout."""

    precision: str
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision}+{'channels_last' if self.channels_last else 'NCHW'}"

    def rank(self) -> tuple[int, bool]:
        """Simplicity: lower is preferred when times tie."""
        return PRECISION_ORDER.index(self.precision), self.channels_last


@dataclass
class Choice:
    """The resolved precision and layout, and the evidence: median seconds per training step of
    every candidate measured (empty when nothing was measured: both values explicit)."""

    precision: str
    channels_last: bool
    seconds_per_step: dict[str, float] = field(default_factory=dict)
    key: dict = field(default_factory=dict)
    source: str = "explicit"  # "explicit", "measured" or "cache"

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.precision, self.channels_last)

    def ratios(self) -> dict[str, float]:
        """Speed of each candidate relative to fp32 NCHW (> 1: faster), where both were measured."""
        base = self.seconds_per_step.get(Candidate("fp32", False).label)
        return {k: base / v for k, v in self.seconds_per_step.items()} if base else {}

    def record(self) -> dict:
        """What a run records: the choice, where it came from, and the measured ratios."""
        return {"precision": self.precision, "channels_last": self.channels_last, "source": self.source,
                "seconds_per_step": self.seconds_per_step, "speed_vs_fp32_nchw": self.ratios(), "key": self.key}  # fmt: skip


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model name and which of :data:`CPU_FLAGS` it has (Linux ``/proc/cpuinfo``; the
    processor string and no flags elsewhere)."""
    name = platform.processor() or platform.machine() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    flags = _precision._cpuinfo_flags()
    return name, [f for f in CPU_FLAGS if f in flags]


def machine_key(device: torch.device) -> dict:
    """What the fastest path depends on besides the model: CPU model and vector flags, torch
    version, intra-op threads, and the GPU's name on CUDA."""
    cpu, flags = cpu_description()
    key = {"cpu": cpu, "cpu_flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": device.type}  # fmt: skip
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def candidates(device: torch.device, precision: str = "auto", channels_last: bool | str = "auto",
               image_input: bool = True) -> list[Candidate]:  # fmt: skip
    """The candidates on ``device``, with an explicit ``precision`` / ``channels_last`` pinned.

    Raises:
        ValueError: an unknown precision, or fp16 on a device that is not CUDA.
    """
    if precision != "auto":
        Precision(precision, False, device.type)  # validates (fp16 needs CUDA)
        precisions = [precision]
    else:
        precisions = ["fp32"]
        if device.type == "cpu" and _precision.native_bf16_cpu():
            precisions.append("bf16")
        if device.type == "cuda":
            precisions += (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    layouts = [False, True] if channels_last == "auto" and image_input else [channels_last is True]
    return [Candidate(p, cl) for p in precisions for cl in layouts]


def choose(seconds: dict[Candidate, float], tolerance: float = TOLERANCE) -> Candidate:
    """The candidate to use, from median seconds per step: the simplest candidate (by
    :meth:`Candidate.rank`) whose time is within ``tolerance`` of the fastest, i.e. a faster but
    less simple candidate wins only when it gains more than ``tolerance``.

    Raises:
        ValueError: no candidates, or a time that is not finite and positive.
    """
    if not seconds:
        raise ValueError("no candidate was measured")
    bad = {c.label: s for c, s in seconds.items() if not (s > 0 and s < float("inf"))}
    if bad:
        raise ValueError(f"seconds per step must be finite and positive, got {bad}")
    fastest = min(seconds.values())
    return min((c for c, s in seconds.items() if s <= fastest * (1 + tolerance)), key=Candidate.rank)


def measure(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device, cands: Iterable[Candidate],
            num_classes: int = 10, steps: int = STEPS, rounds: int = ROUNDS) -> dict[Candidate, float]:  # fmt: skip
    """Median seconds per training step of a copy of ``model`` in each candidate.

    Each candidate trains its own copy (SGD, momentum 0.9) on one synthetic batch
    (``batch_size``, ``shape`` = (C, H, W), ``num_classes`` classes): forward under the
    candidate's autocast, cross-entropy, backward, step. One untimed warm-up round, then
    ``rounds`` rounds of ``steps`` steps per candidate, in an order rotated every round so that
    drift favours none; the median over rounds is returned. ``model`` itself is not changed.
    """
    cands = list(cands)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runners: dict[Candidate, Callable[[], None]] = {}
    for c in cands:
        prec = Precision(c.precision, c.channels_last, device.type)
        net = copy.deepcopy(model).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        scaler = prec.grad_scaler()
        xin = prec.inputs(x)

        def run(net=net, opt=opt, prec=prec, scaler=scaler, xin=xin) -> None:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                with prec.autocast():
                    loss = F.cross_entropy(net(xin), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

        runners[c] = run
    times: dict[Candidate, list[float]] = {c: [] for c in cands}
    for r in range(rounds + 1):
        for c in cands[r % len(cands):] + cands[: r % len(cands)]:
            sync()
            t0 = time.perf_counter()
            runners[c]()
            sync()
            if r:
                times[c].append((time.perf_counter() - t0) / steps)
    return {c: statistics.median(ts) for c, ts in times.items()}


def cache_path() -> Path:
    """The machine's cache of measured choices (outside any project and DVC)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "fastpath.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sparseflow" / "fastpath.json"


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict:
    """The cache's entries; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def _valid_entry(entry: object, cands: list[Candidate]) -> bool:
    labels = {c.label for c in cands}
    return (isinstance(entry, dict) and entry.get("precision") in PRECISIONS and isinstance(entry.get("channels_last"), bool)
            and Candidate(entry["precision"], entry["channels_last"]).label in labels
            and isinstance(entry.get("seconds_per_step"), dict))  # fmt: skip


def resolve(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device, precision: str = "auto",
            channels_last: bool | str = "auto", model_spec: dict | None = None, num_classes: int = 10,
            measure_fn: Callable[..., dict[Candidate, float]] | None = None) -> Choice:  # fmt: skip
    """The precision and layout to train ``model`` in on this machine.

    Explicit values are returned as they are (``source`` "explicit") when nothing is left to
    choose; otherwise the cached choice for this machine, model (``model_spec``, e.g. name and
    keyword arguments), ``shape`` and ``batch_size`` (``source`` "cache"), or a fresh
    :func:`measure` (``source`` "measured"), stored in the cache. ``measure_fn`` replaces
    :func:`measure` (tests).

    Raises:
        ValueError: an invalid explicit value (e.g. fp16 on CPU).
    """
    cands = candidates(device, precision, channels_last, image_input=len(shape) == 3)
    if len(cands) == 1:
        return Choice(cands[0].precision, cands[0].channels_last)
    key = machine_key(device) | {"model": model_spec or {"class": type(model).__name__}, "shape": list(shape),
                                 "batch_size": batch_size, "candidates": [c.label for c in cands]}  # fmt: skip
    digest, path = _digest(key), cache_path()
    with _locked(path):
        entry = _read_cache(path).get(digest)
        if _valid_entry(entry, cands):
            return Choice(entry["precision"], entry["channels_last"], dict(entry["seconds_per_step"]), key, "cache")
        seconds = (measure_fn or measure)(model, shape, batch_size, device, cands, num_classes=num_classes)
        best = choose(seconds)
        choice = Choice(best.precision, best.channels_last, {c.label: s for c, s in seconds.items()}, key, "measured")
        entries = _read_cache(path)
        entries[digest] = {"precision": choice.precision, "channels_last": choice.channels_last,
                           "seconds_per_step": choice.seconds_per_step, "key": key}  # fmt: skip
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1), encoding="utf-8")
        tmp.replace(path)
    return choice


def slowdown_of_bf16(model: nn.Module, shape: tuple[int, ...], batch_size: int, channels_last: bool,
                     num_classes: int = 10, measure_fn: Callable[..., dict[Candidate, float]] | None = None) -> float:  # fmt: skip
    """How many times slower a bf16 training step of ``model`` is than fp32 on this CPU (one
    warm-up and one timed round of one step each: enough to tell 1.5x from 10x)."""
    fp32, bf16 = Candidate("fp32", channels_last), Candidate("bf16", channels_last)
    seconds = (measure_fn or measure)(model, shape, batch_size, torch.device("cpu"), [fp32, bf16], num_classes=num_classes,
                                      steps=1, rounds=1)  # fmt: skip
    return seconds[bf16] / seconds[fp32]
