"""In-memory datasets and batched, seeded augmentation on tensors.

The prepared Parquet is read once into uint8 tensors ``(N, C, H, W)``. Augmentation works on
whole batches (one gather for the random crop, one ``where`` for the flip), so it costs a
small fraction of a training step, and it draws from a generator seeded by ``(seed, epoch)``:
epoch ``e`` sees the same order and crops whether the run was resumed or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from sparse_core.artifacts import parquet_metadata, read_parquet_table
from sparse_core.data.fetch import DataError


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def resident(self, device: torch.device | str, fraction: float = 0.25) -> "Split":
        """This split on ``device`` when it is a GPU with room for it, else ``self``.

        On CUDA the images (uint8) and labels are copied once when they take at most
        ``fraction`` of the device's free memory, so batches are indexed, augmented and
        normalised on the device with no host-to-device copy per step. Batches are the same
        as from the host copy (the augmentation's randomness is drawn on the CPU generator).
        """
        device = torch.device(device)
        if device.type != "cuda" or self.images.device == device:
            return self
        size = self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()
        free, _ = torch.cuda.mem_get_info(device)
        return Split(self.images.to(device), self.labels.to(device)) if size <= fraction * free else self


@dataclass
class PreparedData:
    """One prepared dataset in memory. ``mean``/``std``: per channel, in units of pixel/255."""

    name: str
    classes: list[str]
    shape: tuple[int, int, int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    flip: bool
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_prepared(path: str | Path) -> PreparedData:
    """Read ``data.parquet`` written by :func:`sparse_core.data.prepare.prepare_dataset`.

    The file is checked before use: it must be readable Parquet with the prepared metadata,
    every image exactly ``height * width * channels`` bytes, labels in ``[0, len(classes))``
    and split names ``train``/``val``/``test``.

    Raises:
        DataError: the file is missing, truncated or corrupt, or its content does not match the
            prepared layout; the message names the file and the problem.
    """
    path = Path(path)
    hint = "run the prepare stage again (dvc repro prepare)"
    try:
        meta = parquet_metadata(path)
        table = read_parquet_table(path, columns=["image", "label", "split"])
    except (OSError, ValueError) as exc:  # ArtifactError is a ValueError and names the file
        reason = str(exc).removeprefix(f"{path}: ")
        raise DataError(f"{path}: cannot read prepared dataset ({reason}); {hint}") from None
    try:
        c, h, w = int(meta["channels"]), int(meta["height"]), int(meta["width"])
        info = {k: json.loads(meta[k]) for k in ("classes", "mean", "std", "flip")}
        name = meta["name"]
    except KeyError as exc:
        raise DataError(f"{path}: missing metadata key {exc}; was it written by the prepare stage?") from None
    except ValueError as exc:
        raise DataError(f"{path}: malformed prepared metadata ({exc}); {hint}") from None
    classes = info["classes"]
    if min(c, h, w) <= 0 or not isinstance(classes, list) or not classes:
        raise DataError(f"{path}: malformed prepared metadata (shape {(c, h, w)}, classes {classes!r}); {hint}")
    for key in ("mean", "std"):
        if not (isinstance(info[key], list) and len(info[key]) == c):
            raise DataError(f"{path}: metadata {key!r} must list one value per channel ({c}), got {info[key]!r}")
    schema = table.schema
    if not (pa.types.is_binary(schema.field("image").type) and pa.types.is_integer(schema.field("label").type)):
        raise DataError(f"{path}: columns image/label must be binary/integer, got {schema.field('image').type}/"
                        f"{schema.field('label').type}; {hint}")  # fmt: skip
    split_col = table.column("split").to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    images = table.column("image").to_pylist()
    size = h * w * c
    bad = next((i for i, b in enumerate(images) if b is None or len(b) != size), None)
    if bad is not None:
        got = "null" if images[bad] is None else f"{len(images[bad])} bytes"
        raise DataError(f"{path}: row {bad}: image is {got}, expected {size} (= {h}x{w}x{c}); {hint}")
    if table.column("label").null_count or (len(labels) and (labels.min() < 0 or labels.max() >= len(classes))):
        raise DataError(f"{path}: labels must lie in [0, {len(classes) - 1}]; {hint}")
    unknown = set(split_col.tolist()) - {"train", "val", "test"}
    if unknown:
        raise DataError(f"{path}: unknown split names {sorted(map(str, unknown))}; {hint}")
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.flatnonzero(split_col == split)
        buf = np.frombuffer(b"".join(images[i] for i in idx), dtype=np.uint8).reshape(len(idx), h, w, c)
        splits[split] = Split(
            torch.from_numpy(buf.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels[idx].astype(np.int64))
        )
    return PreparedData(
        name=name,
        classes=classes,
        shape=(c, h, w),
        mean=info["mean"],
        std=info["std"],
        flip=info["flip"],
        splits=splits,
    )


class BatchTransform:
    """Random crop with zero padding, horizontal flip, then normalisation, on a uint8 batch.

    Args:
        mean, std: per-channel statistics (pixel/255 units).
        crop_padding: pixels of zero padding per side before the random crop; 0 disables.
        flip: flip each image left-right with probability 1/2.
    """

    def __init__(self, mean: list[float], std: list[float], crop_padding: int = 0, flip: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = crop_padding
        self.flip = flip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, H, W), ``(x/255 - mean) / std``."""
        return (x.float().div_(255.0) - self.mean.to(x.device)) / self.std.to(x.device)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) -> augmented uint8 (B, C, H, W), randomness from ``gen``."""
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            dev = x.device  # offsets come from the CPU generator, then index on the data's device
            rows = (oy[:, None] + torch.arange(h))[:, None, :, None].to(dev)  # (B, 1, H, 1)
            cols = (ox[:, None] + torch.arange(w))[:, None, None, :].to(dev)  # (B, 1, 1, W)
            bidx = torch.arange(b, device=dev)[:, None, None, None]
            cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
            x = padded[bidx, cidx, rows, cols]
        if self.flip:
            coin = (torch.rand(b, generator=gen) < 0.5).to(x.device)
            x = torch.where(coin[:, None, None, None], x.flip(3), x)
        return x


def iterate_batches(
    split: Split,
    batch_size: int,
    transform: BatchTransform,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x float32 (B, C, H, W), y int64 (B,))`` on ``device``.

    With ``train=True`` the order is a permutation and the augmentation draws from a generator
    seeded by ``seed * 100003 + epoch``, so every epoch is reproducible on its own; the last
    partial batch is kept.
    """
    n = len(split)
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=gen) if train else torch.arange(n)
    order = order.to(split.images.device)  # a device-resident split (Split.resident) is indexed there
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = split.images[idx]
        if train:
            x = transform.augment(x, gen)
        yield transform.normalize(x.to(device, non_blocking=True)), split.labels[idx].to(device, non_blocking=True)
