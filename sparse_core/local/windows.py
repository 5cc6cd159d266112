"""Windows of blocks for local training (Laskin et al. 2020, Sec. 3, Fig. 1).

A window is a contiguous range of blocks ``[start, end]`` trained by one loss: the
cross-entropy of an auxiliary head on the output of block ``end`` (the network's own
classifier for the window that ends at the last block). The input of a window is the output
of block ``start − 1`` with a stop-gradient, so no gradient crosses a window's first edge.

==============  ==================================================================================
variant         windows over blocks ``0 .. n−1``
==============  ==================================================================================
``backprop``    ``[0, n−1]``: one window, ordinary backpropagation (the reference)
``greedy``      ``[i, i]`` for every block: each block trained by its own head
``overlapping`` ``[i, i+1]`` for ``i = 0 .. n−2``: consecutive windows share one block, which gets
                gradient from two losses
``chunked``     ``K`` contiguous chunks, boundaries at ``split_points`` (block indices or names
                where a chunk starts) or else ``round(j·n/K)``
==============  ==================================================================================

Each parameter's gradient is the sum of the gradients of the losses whose windows contain it.
Every block has one **owner** window (the one a pipeline process holds): the first window that
ends at it, else the first that contains it.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("backprop", "greedy", "overlapping", "chunked")


@dataclass(frozen=True)
class Window:
    start: int
    end: int  # inclusive

    def __contains__(self, block: int) -> bool:
        return self.start <= block <= self.end


def make_windows(n_blocks: int, variant: str, chunks: int = 2, split_points: list[int | str] | None = None,
                 block_names: list[str] | None = None) -> list[Window]:  # fmt: skip
    """Windows of ``variant`` over ``n_blocks`` blocks.

    Raises:
        ValueError: unknown variant, fewer blocks than windows need, a split point that is
            unknown, out of range or not increasing.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown local variant {variant!r}; allowed: {list(VARIANTS)}")
    if n_blocks < 1:
        raise ValueError("a network needs at least one block")
    if variant == "backprop":
        return [Window(0, n_blocks - 1)]
    if variant == "greedy":
        return [Window(i, i) for i in range(n_blocks)]
    if variant == "overlapping":
        if n_blocks < 2:
            raise ValueError("overlapping windows need at least 2 blocks")
        return [Window(i, i + 1) for i in range(n_blocks - 1)]
    if split_points:
        starts = [_block_index(p, n_blocks, block_names) for p in split_points]
        if starts != sorted(set(starts)) or starts[0] <= 0:
            raise ValueError(f"local.split_points {split_points} must be increasing block indices/names after block 0")
    else:
        if not 1 <= chunks <= n_blocks:
            raise ValueError(f"local.chunks = {chunks}: must be between 1 and the number of blocks ({n_blocks})")
        starts = [round(j * n_blocks / chunks) for j in range(1, chunks)]
    bounds = [0, *starts, n_blocks]
    return [Window(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:])]


def _block_index(point: int | str, n_blocks: int, names: list[str] | None) -> int:
    if isinstance(point, int):
        if not 0 < point < n_blocks:
            raise ValueError(f"split point {point} is outside 1..{n_blocks - 1}")
        return point
    if names is None or point not in names:
        raise ValueError(f"split point {point!r} names no block; blocks are {names}")
    return names.index(point)


def owners(windows: list[Window], n_blocks: int) -> list[int]:
    """Owner window of every block (module docstring)."""
    out = []
    for b in range(n_blocks):
        ending = [i for i, w in enumerate(windows) if w.end == b]
        out.append(ending[0] if ending else next(i for i, w in enumerate(windows) if b in w))
    return out
