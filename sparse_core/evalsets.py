"""Evaluation sets beyond the clean test split: out-of-distribution sets (``ood`` stage) and
corrupted copies of the test split (``corrupt`` stage). Both are DVC outputs, so they are
built once per dataset and cached.

Layout (all written atomically, each folder swapped in whole)::

    <data_dir>/ood/<dataset>/<set>.safetensors       images uint8 (N, C, H, W), in-distribution shape
    <data_dir>/ood/<dataset>/manifest.json           [{"set", "status": "ok"|"missing", "examples",
                                                       "source", "reason"}]
    <data_dir>/corrupted/<dataset>/<name>.safetensors  images uint8 (S, N, C, H, W), labels int64 (N,),
                                                       severities int64 (S,)
    <data_dir>/corrupted/<dataset>/manifest.json     {"source", "examples", "corruptions", "severities", "seed"}

OOD images are converted to the in-distribution shape (RGB -> grayscale with ITU-R 601
luma, grayscale -> RGB by repeating the channel, then antialiased bilinear resize with
torchvision), and later normalised with the in-distribution mean and std exactly like the
test images. Noise sets (seeded by ``base.seed``): ``gaussian`` draws each pixel from
N(0.5, 0.25²) in [0, 1] units, clipped; ``uniform`` from U[0, 1]; both quantised to uint8.

Corrupted sets use :func:`sparse_core.corruptions.corrupt` on the first ``corrupt.test_subset``
test images, seeded by ``base.seed``; when the in-distribution dataset is ``cifar10`` and
genuine CIFAR-10-C files (``CIFAR-10-C/<name>.npy`` and ``labels.npy``, 50,000 images =
5 severities × the 10,000 test images in original order) are found under
``<data_dir>/raw`` or the mirror, those images are used instead (manifest ``source``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_core import artifacts
from sparse_core.config import SYNTHETIC_OOD, Params
from sparse_core.data import PreparedData, load_prepared
from sparse_core.data.fetch import DataError, fetch_file
from sparse_core.data.prepare import prepared_path


#: What an evaluation-set folder holds (``ood`` and ``corrupt`` stages): one tensor file per set
#: and the manifest.
EVAL_SET_FILES = ("manifest.json", "*.safetensors")


def ood_dir(params: Params) -> Path:
    return Path(params.base.data_dir) / "ood" / params.data.dataset


def corrupted_dir(params: Params) -> Path:
    return Path(params.base.data_dir) / "corrupted" / params.data.dataset


def to_shape(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 ``(N, C', H', W')`` -> uint8 ``(N, C, H, W)`` of ``shape`` (module docstring)."""
    from torchvision.transforms.v2 import functional as TF  # here: torchvision costs ~2 s to import

    c, h, w = shape
    if images.shape[1] == 3 and c == 1:
        images = TF.rgb_to_grayscale(images)
    elif images.shape[1] == 1 and c == 3:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != c:
        raise ValueError(f"cannot convert {images.shape[1]} channels to {c}")
    if images.shape[2:] != (h, w):
        images = TF.resize(images, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return images.contiguous()


def noise_images(kind: str, n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Seeded noise images uint8 ``(n, C, H, W)``; ``kind`` is ``gaussian`` or ``uniform``."""
    rng = np.random.default_rng([seed, SYNTHETIC_OOD.index(kind)])
    x = rng.normal(0.5, 0.25, (n, *shape)) if kind == "gaussian" else rng.random((n, *shape))
    return torch.from_numpy(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8))


def _dataset_test_images(name: str, raw_dir: Path, download: bool, limit: int) -> torch.Tensor:
    from sparse_core.data.sources import REGISTRY  # built on first use (torchvision)

    spec = REGISTRY[name]
    dest = raw_dir / spec.subdir
    dest.mkdir(parents=True, exist_ok=True)
    for raw in spec.files:
        fetch_file(raw, dest, spec.subdir, download=download)
    try:
        x, _, _ = spec.load(str(raw_dir), False)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{dest}: torchvision could not read {name} ({exc})") from None
    return torch.from_numpy(np.ascontiguousarray(x[:limit])).permute(0, 3, 1, 2)


def prepared(params: Params) -> PreparedData:
    """The prepared dataset (``prepare`` stage output) the sets are made for."""
    return load_prepared(prepared_path(params.base.data_dir, params.data.dataset))


def stage_ood(params: Params) -> Path:
    """``ood``: every OOD set declared for ``data.dataset`` -> ``<data_dir>/ood/<dataset>/``.

    A dataset set that cannot be found is recorded as ``missing`` with the reason and a
    ``UserWarning`` (the report shows it as a warning row).

    Raises:
        DataError: a set listed in ``ood.required`` is missing.
    """
    cfg = params.ood
    shape = prepared(params).shape
    names = cfg.sets.get(params.data.dataset, [])
    manifest = []
    out = ood_dir(params)
    with artifacts.atomic_dir(out, holds=EVAL_SET_FILES, owner="ood") as tmp:
        for name in names:
            entry = {"set": name, "status": "ok", "reason": ""}
            try:
                if name in SYNTHETIC_OOD:
                    images, entry["source"] = noise_images(name, cfg.max_examples, shape, params.base.seed), "synthetic"
                else:
                    raw = _dataset_test_images(name, Path(params.base.data_dir) / "raw", cfg.download, cfg.max_examples)
                    images, entry["source"] = to_shape(raw, shape), f"{name} test split"
            except DataError as exc:
                if name in cfg.required:
                    raise DataError(f"ood.required lists {name!r}, which is missing: {exc}") from None
                warnings.warn(f"OOD set {name!r} skipped: {exc}", stacklevel=2)
                manifest.append({**entry, "status": "missing", "examples": 0, "source": "", "reason": str(exc)})
                continue
            artifacts.save_tensors({"images": images}, tmp / f"{name}.safetensors")
            manifest.append({**entry, "examples": int(images.shape[0])})
        artifacts.write_json(manifest, tmp / "manifest.json")
    return out


@dataclass
class EvalSets:
    """OOD and corrupted sets of one dataset, loaded for evaluation."""

    ood: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> uint8 (N, C, H, W)
    ood_missing: list[dict] = field(default_factory=list)  # manifest rows with status "missing"
    corrupted: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (name, severity) -> uint8 (N, C, H, W)
    corrupted_labels: torch.Tensor | None = None  # int64 (N,)


def load_eval_sets(params: Params) -> EvalSets:
    """Read the ``ood`` and ``corrupt`` stage outputs.

    Raises:
        FileNotFoundError: a stage output is missing (run ``dvc repro`` for it first).
    """
    sets = EvalSets()
    folder = ood_dir(params)
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"{folder / 'manifest.json'}: missing; run the ood stage first")
    for row in artifacts.read_json(folder / "manifest.json"):
        if row["status"] == "ok":
            sets.ood[row["set"]] = artifacts.load_tensors(folder / f"{row['set']}.safetensors")["images"]
        else:
            sets.ood_missing.append(row)
    folder = corrupted_dir(params)
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"{folder / 'manifest.json'}: missing; run the corrupt stage first")
    manifest = artifacts.read_json(folder / "manifest.json")
    for name in manifest["corruptions"]:
        t = artifacts.load_tensors(folder / f"{name}.safetensors")
        sets.corrupted_labels = t["labels"]
        for i, s in enumerate(t["severities"].tolist()):
            sets.corrupted[(name, s)] = t["images"][i]
    return sets
