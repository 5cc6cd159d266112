"""Interleaved timing rounds and ratio tables shared by the benchmarks.

Every benchmark times several setups; drift (thermal, other load, allocator warm-up) must
not favour one of them. :func:`interleaved` runs one block of each setup per round, in an
order rotated every round, after one untimed warm-up round; :func:`ratio_rows` turns the
per-round times into per-round ratios to a baseline (paired, so a slow round slows both) and
reports their median and spread (min..max over rounds).
"""

from __future__ import annotations

import statistics
import time
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
