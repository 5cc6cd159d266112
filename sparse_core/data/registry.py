"""What each named dataset is: the torchvision class that reads it and the archives it needs.

The file names and md5s come from torchvision's own class attributes, so they are the
official ones and stay in step with the installed torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torchvision.datasets as tvd


@dataclass(frozen=True)
class RawFile:
    """One archive a dataset needs: its name, official md5 and download URL."""

    filename: str
    md5: str
    url: str


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset readable by torchvision once its archives sit in ``<raw>/<subdir>/``.

    Attributes:
        name: registry name (``fashion_mnist``...).
        subdir: folder under the raw root where torchvision looks for the archives.
        files: archives needed, with official md5s.
        load: ``load(root, train) -> (images uint8 (N, H, W, C), labels int64 (N,), classes)``.
        flip: whether horizontal flips are a label-preserving augmentation (not for digits).
    """

    name: str
    subdir: str
    files: tuple[RawFile, ...]
    load: Callable[[str, bool], tuple[np.ndarray, np.ndarray, list[str]]]
    flip: bool


def _mnist_like(cls: type) -> Callable[[str, bool], tuple[np.ndarray, np.ndarray, list[str]]]:
    def load(root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ds = cls(root=root, train=train, download=True)  # files are verified; extracts only
        return ds.data.numpy()[..., None], ds.targets.numpy().astype(np.int64), list(ds.classes)

    return load


def _cifar(cls: type) -> Callable[[str, bool], tuple[np.ndarray, np.ndarray, list[str]]]:
    def load(root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ds = cls(root=root, train=train, download=True)
        return np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)

    return load


def _svhn_load(root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = tvd.SVHN(root=root, split="train" if train else "test", download=True)
    # SVHN stores (N, C, H, W); label 10 was already mapped to 0 by torchvision.
    return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), ds.labels.astype(np.int64), [str(i) for i in range(10)]


def _mnist_files(cls: type) -> tuple[RawFile, ...]:
    mirror = cls.mirrors[0]
    return tuple(RawFile(f, md5, mirror + f) for f, md5 in cls.resources)


def _svhn_files() -> tuple[RawFile, ...]:
    return tuple(RawFile(v[1], v[2], v[0]) for k, v in tvd.SVHN.split_list.items() if k in ("train", "test"))


REGISTRY: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "MNIST/raw", _mnist_files(tvd.MNIST), _mnist_like(tvd.MNIST), flip=False),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "FashionMNIST/raw", _mnist_files(tvd.FashionMNIST), _mnist_like(tvd.FashionMNIST), flip=False
    ),
    "cifar10": DatasetSpec(
        "cifar10", ".", (RawFile(tvd.CIFAR10.filename, tvd.CIFAR10.tgz_md5, tvd.CIFAR10.url),), _cifar(tvd.CIFAR10), True
    ),
    "cifar100": DatasetSpec(
        "cifar100", ".", (RawFile(tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5, tvd.CIFAR100.url),), _cifar(tvd.CIFAR100), True
    ),
    # Digits: a flipped 2 is not a 2.
    "svhn": DatasetSpec("svhn", ".", _svhn_files(), _svhn_load, flip=False),
}
