"""What each named dataset is: the torchvision class that reads it and the archives it needs.

The file names and md5s come from torchvision's own class attributes, so they are the
official ones and stay in step with the installed torchvision.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sparse_core.data.fetch import DataError, RawFile


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


def _numpy_array_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct = core.multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of protocol 2 store bytes as _codecs.encode(str, "latin1"): a pure
        # function (torch's weights-only unpickler allows it for the same reason).
        ("_codecs", "encode"): codecs.encode,
    }


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers only.

    Every global a pickle names goes through :meth:`find_class`; anything but the three numpy
    callables needed for an ``ndarray`` (``_reconstruct``, ``ndarray``, ``dtype``) and
    ``_codecs.encode`` is refused before it can be called, so a crafted file cannot run code
    (``os.system``, ``__reduce__``).
    """

    _allowed = _numpy_array_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (numpy arrays and plain data only)")
        return found


def load_array_pickle(path: str | Path) -> Any:
    """Read a pickle of numpy arrays and plain containers (the CIFAR "python version" batches)
    without running pickled code; Python 2 strings are read as latin-1, as the originals need.

    Raises:
        DataError: the file holds other objects (refused, not run), or is truncated or corrupt.
    """

    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused to unpickle ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise DataError(f"{path}: not a readable pickle of arrays, truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _cifar(cls: type) -> Callable[[str, bool], tuple[np.ndarray, np.ndarray, list[str]]]:
    """Reader of CIFAR-10/100 "python version" batches, equal to torchvision's ``cls`` but
    without plain ``pickle.load``: the archive (md5-checked by :func:`fetch_file`) is extracted
    with the safe tar filter, every batch file is checked against torchvision's official md5,
    and read with :func:`load_array_pickle`."""

    def load(root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from sparse_core.data.fetch import DataError, extract_archive, md5sum, verify_md5

        base = Path(root) / cls.base_folder
        listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        if not all((base / f).is_file() and md5sum(base / f) == md5 for f, md5 in listed):
            extract_archive(Path(root) / cls.filename, base, inner=cls.base_folder)
        for f, md5 in listed:
            verify_md5(base / f, md5, f"torchvision {cls.__name__} official md5")
        data, labels = [], []
        for f, _ in cls.train_list if train else cls.test_list:
            entry = load_array_pickle(base / f)
            try:
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32))
                labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{base / f}: not a CIFAR batch ({type(exc).__name__}: {exc})") from None
        try:
            classes = [str(c) for c in load_array_pickle(base / cls.meta["filename"])[cls.meta["key"]]]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{base / cls.meta['filename']}: not CIFAR metadata ({type(exc).__name__}: {exc})") from None
        images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C), as torchvision
        return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), classes

    return load


def _svhn_load(root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import torchvision.datasets as tvd

    ds = tvd.SVHN(root=root, split="train" if train else "test", download=True)
    # SVHN stores (N, C, H, W); label 10 was already mapped to 0 by torchvision.
    return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), ds.labels.astype(np.int64), [str(i) for i in range(10)]


def _mnist_files(cls: type) -> tuple[RawFile, ...]:
    mirror = cls.mirrors[0]
    return tuple(RawFile(f, md5, mirror + f) for f, md5 in cls.resources)


def _svhn_files(tvd: Any) -> tuple[RawFile, ...]:
    return tuple(RawFile(v[1], v[2], v[0]) for k, v in tvd.SVHN.split_list.items() if k in ("train", "test"))


def _build_registry() -> dict[str, DatasetSpec]:
    import torchvision.datasets as tvd

    return {
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
        "svhn": DatasetSpec("svhn", ".", _svhn_files(tvd), _svhn_load, flip=False),
    }


def __getattr__(name: str) -> Any:
    """``REGISTRY`` (dataset name -> :class:`DatasetSpec`), built on first use: it reads
    torchvision's dataset classes, and importing ``torchvision.datasets`` costs about 2 s, which a
    stage that only trains on the prepared Parquet file should not pay (PEP 562)."""
    if name == "REGISTRY":
        globals()["REGISTRY"] = registry = _build_registry()
        return registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
