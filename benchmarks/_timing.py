"""Interleaved timing rounds and ratio tables shared by the benchmarks.

Every benchmark times several setups; drift (thermal, other load, allocator warm-up) must
not favour one of them. :func:`interleaved` runs one block of each setup per round, in an
order rotated every round, after one untimed warm-up round; :func:`ratio_rows` turns the
per-round times into per-round ratios to a baseline (paired, so a slow round slows both) and
reports their median and spread (min..max over rounds).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


def interleaved(blocks: dict[str, Callable[[int], object]], rounds: int, sync: Callable[[], None] = lambda: None,
                warmup: int = 1) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of ``blocks[name](round)`` per timed round, ``rounds`` rounds after ``warmup``
    untimed ones; the order of the setups is rotated every round. ``sync`` waits for the
    device (e.g. ``torch.cuda.synchronize``) before each clock read."""
    names = list(blocks)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            blocks[name](r)
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio_rows(times: dict[str, list[float]], baseline: str, scale: float = 1.0, invert: bool = False) -> list[tuple[str, float, float, float, float]]:
    """``(name, median seconds x scale, median ratio, min ratio, max ratio)`` per setup; ratios
    are per round, ``time / baseline time`` (``invert``: ``baseline / time``, a speed-up)."""
    rows = []
    for name, ts in times.items():
        ratios = [(b / t if invert else t / b) for t, b in zip(ts, times[baseline])]
        rows.append((name, statistics.median(ts) * scale, statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def print_rows(rows, unit: str, ratio_label: str) -> None:
    """A fixed-width table of :func:`ratio_rows`."""
    width = max(len(r[0]) for r in rows)
    print(f"{'setup':{width}s} {unit:>10s} {ratio_label:>14s} {'spread (min..max)':>20s}")
    for name, t, med, lo, hi in rows:
        print(f"{name:{width}s} {t:10.4f} {med:14.3f} {lo:9.3f}..{hi:<9.3f}")


# ----- ratio lines and their JSON record ------------------------------------------------------

#: Every benchmark's result lines start with this, so a reader (and the suite's smoke test) can
#: find them among the tables: ``ratio: <name>: <median>x [<min>..<max>] (target ...)``.
RATIO_PREFIX = "ratio:"


def add_common_arguments(ap) -> None:
    """``--smoke`` (seconds, tiny sizes: proves the script runs, measures nothing worth quoting)
    and ``--json PATH`` (the ratio lines as JSON, plus a Markdown table beside it)."""
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes: checks the script runs (its numbers mean nothing)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the ratio lines to PATH (JSON) and PATH with suffix .md (a Markdown table)")  # fmt: skip


def machine() -> dict:
    """What the numbers were measured on: CPU model and its vector flags, cores, torch, threads."""
    import os
    import platform

    import torch

    model, flags = platform.processor() or "?", []
    with contextlib.suppress(OSError):
        cpu = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), model)
        have = set(next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("flags")), []))
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    info = {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass(frozen=True)
class Ratio:
    """One measured ratio: median and spread (min..max) of its per-round values, and its target
    (``at_least`` or ``at_most``) where it has one."""

    name: str
    median: float
    lo: float
    hi: float
    rounds: int
    at_least: float | None = None
    at_most: float | None = None

    @property
    def met(self) -> bool | None:
        if self.at_least is not None:
            return self.median >= self.at_least
        if self.at_most is not None:
            return self.median <= self.at_most
        return None

    def line(self, smoke: bool = False) -> str:
        target = ""
        if smoke:
            target = "  (smoke run: tiny sizes, not a measurement)"
        elif self.met is not None:
            op, value = (">=", self.at_least) if self.at_least is not None else ("<=", self.at_most)
            target = f"  (target {op} {value:.2f}x: {'met' if self.met else 'NOT met'})"
        return f"{RATIO_PREFIX} {self.name}: {self.median:.3f}x [{self.lo:.3f}..{self.hi:.3f}]{target}"


class Results:
    """The ratio lines of one benchmark run: :meth:`ratio` prints each as it is measured,
    :meth:`write` records them all (``--json``) with the machine and the command line."""

    def __init__(self, benchmark: str, smoke: bool = False) -> None:
        self.benchmark, self.smoke, self.ratios = benchmark, smoke, []

    def ratio(self, name: str, per_round: list[float], at_least: float | None = None, at_most: float | None = None) -> Ratio:
        """Record and print the ratio ``name`` from its per-round values (at least one, finite)."""
        values = [float(v) for v in per_round]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"ratio {name!r}: expected finite per-round values, got {values}")
        r = Ratio(name, statistics.median(values), min(values), max(values), len(values), at_least, at_most)
        self.ratios.append(r)
        print(r.line(self.smoke), flush=True)
        return r

    def compare(self, times: dict[str, list[float]], baseline: str, what: str = "time", invert: bool = False,
                at_least: float | None = None, at_most: float | None = None) -> list[Ratio]:
        """Record ``<setup> / <baseline> <what>`` for every setup of ``times`` (per-round seconds,
        as from :func:`interleaved`) but the baseline: per-round ratios ``time / baseline time``
        (``invert``: ``baseline / time``, a speed-up), paired so a slow round slows both."""
        out = []
        for name, ts in times.items():
            if name != baseline:
                ratios = [(b / t if invert else t / b) for t, b in zip(ts, times[baseline])]
                out.append(self.ratio(f"{name} / {baseline} {what}".strip(), ratios, at_least, at_most))
        return out

    def write(self, path: Path | None) -> None:
        """The JSON record at ``path`` and a Markdown table at ``path.with_suffix('.md')``
        (nothing when ``path`` is None); both are written whole or not at all."""
        if path is None:
            return
        import json
        import sys

        doc = {"benchmark": self.benchmark, "command": " ".join(["python", *sys.argv]), "smoke": self.smoke,
               "machine": machine(),
               "ratios": [asdict(r) | {"met": None if self.smoke else r.met} for r in self.ratios]}  # fmt: skip
        from sparse_core.summary import ratio_table

        md = [ratio_table(self.benchmark, doc["ratios"])]
        path.parent.mkdir(parents=True, exist_ok=True)
        for p, text in ((path, json.dumps(doc, indent=1) + "\n"), (path.with_suffix(".md"), "\n".join(md) + "\n")):
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(p)
