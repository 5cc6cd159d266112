"""The ``prepare`` stage: raw archives -> one pandera-checked Parquet file per dataset.

Output ``<data_dir>/prepared/<name>/data.parquet``, one row per image:

=============  ========  ==============================================================
column         type      meaning
=============  ========  ==============================================================
image          binary    raw uint8 pixels in (H, W, C) order, ``H*W*C`` bytes
label          int64     class id in ``[0, num_classes)``
split          string    ``train`` / ``val`` / ``test``
source_split   string    the split of the original dataset (``train`` or ``test``)
source_index   int64     index of the image in its original split
=============  ========  ==============================================================

Schema metadata holds ``name``, ``classes`` (JSON list), ``height``, ``width``,
``channels``, ``mean`` and ``std`` (JSON lists, per channel, of pixels/255 over the train
split) and ``flip``. The validation split is a seeded ``val_fraction`` of the original
training set. The folder is built in a temporary sibling and swapped in whole, so a failure
leaves no partial output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from sparse_core.artifacts import atomic_dir, write_parquet
from sparse_core.config import DataSection
from sparse_core.data.fetch import DataError, extract_archive, fetch_file, mirror_dir, verify_md5

SPLITS = ("train", "val", "test")


def prepared_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / "prepared" / name / "data.parquet"


def prepared_schema(num_classes: int, image_bytes: int, split_sizes: dict[str, int] | None = None) -> pa.DataFrameSchema:
    """pandera schema of a prepared dataset.

    Checks: labels in range, images of the declared size, split names, each original image
    in at most one split (``(source_split, source_index)`` unique, so no train/val leak),
    and, when given, the exact size of every split.
    """
    checks = [
        pa.Check(
            lambda df: not df.duplicated(["source_split", "source_index"]).any(),
            error="an original image appears in two rows/splits",
        ),
        pa.Check(
            lambda df: set(df.loc[df["split"] == "test", "source_split"]) <= {"test"}
            and set(df.loc[df["split"] != "test", "source_split"]) <= {"train"},
            error="val/train rows must come from the original train split, test rows from the original test split",
        ),
    ]
    if split_sizes is not None:
        expected = dict(split_sizes)
        checks.append(
            pa.Check(
                lambda df: {s: int((df["split"] == s).sum()) for s in SPLITS} == expected,
                error=f"split sizes differ from {expected}",
            )
        )
    return pa.DataFrameSchema(
        {
            "image": pa.Column(object, pa.Check(lambda s: s.map(len) == image_bytes, error=f"image must be {image_bytes} bytes")),
            "label": pa.Column("int64", pa.Check.in_range(0, num_classes - 1)),
            "split": pa.Column(str, pa.Check.isin(SPLITS)),
            "source_split": pa.Column(str, pa.Check.isin(("train", "test"))),
            "source_index": pa.Column("int64", pa.Check.ge(0)),
        },
        checks=checks,
        strict=True,
    )


class ImageFiles:
    """The images of one split of an image folder, decoded only when taken (:meth:`take`).

    Preparing a subset (``data.train_subset`` / ``test_subset``) of an image folder thus decodes
    only the images it keeps (the offline JPEG copy of CIFAR-10 has 60,000 files; a smoke-sized
    profile keeps 72). The split is drawn from the number of images alone, so the prepared rows are the same as from decoding everything; what
    differs is that an unreadable image outside the subset is not noticed.
    """

    def __init__(self, folder: Path, paths: list[str]):
        self.folder, self.paths = folder, paths

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` (positions in :attr:`paths`), decoded to RGB: (len(idx), H, W, 3) uint8.

        Raises:
            DataError: an image is unreadable (names its file), or the images differ in shape.
        """
        from PIL import Image, UnidentifiedImageError

        images = []
        for i in idx:
            path = self.paths[int(i)]
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                # Decoders of damaged files raise any of these (PIL's own errors included).
                raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DataError(f"{self.folder}: images have different shapes {sorted(shapes)[:5]}; resize them first")
        return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def _take(images: np.ndarray | ImageFiles, idx: np.ndarray) -> np.ndarray:
    return images.take(idx) if isinstance(images, ImageFiles) else images[idx]


def _read_imagefolder(cfg: DataSection, raw_dir: Path) -> tuple[dict[bool, tuple[ImageFiles, np.ndarray]], list[str]]:
    """List ``<root>/{train,test}/<class>/*`` (extracting the archive first when one is set);
    the images are decoded later, only those prepared (:class:`ImageFiles`)."""
    from torchvision.datasets import ImageFolder

    spec = cfg.imagefolder
    assert spec is not None
    if spec.archive:
        archive = Path(spec.archive)
        if not archive.is_absolute():
            mirror = mirror_dir()
            if mirror is None:
                raise DataError(f"data.imagefolder.archive={spec.archive!r} is relative but SPARSEFLOW_DATA_MIRROR is unset")
            archive = mirror / archive
        if not archive.is_file():
            raise DataError(f"data.imagefolder.archive: {archive} does not exist")
        if spec.archive_md5:
            verify_md5(archive, spec.archive_md5, "data.imagefolder.archive_md5")
        extract_to = raw_dir / "imagefolder" / cfg.dataset
        marker = extract_to / ".extracted"
        if not marker.is_file() or marker.read_text() != str(archive):
            extract_archive(archive, extract_to)
            marker.write_text(str(archive))
        root = extract_to / spec.root
        # The params check refuses such roots; DataSection objects built in code reach here too.
        if not root.resolve().is_relative_to(extract_to.resolve()):
            raise DataError(f"data.imagefolder.root={spec.root!r} leads outside the extracted archive {extract_to}")
    else:
        root = Path(spec.root)
    out: dict[bool, tuple[ImageFiles, np.ndarray]] = {}
    classes: list[str] | None = None
    for train, split in ((True, "train"), (False, "test")):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; an image folder needs {root}/train/<class>/ and {root}/test/<class>/")
        try:
            ds = ImageFolder(str(folder))
        except FileNotFoundError as exc:
            raise DataError(f"{folder}: {exc}") from None
        if classes is None:
            classes = ds.classes
        elif ds.classes != classes:
            missing, extra = sorted(set(classes) - set(ds.classes)), sorted(set(ds.classes) - set(classes))
            raise DataError(
                f"{folder}: class folders {ds.classes} differ from train's {classes} (mismatch: {missing + extra}; "
                f"missing here: {missing}, unexpected here: {extra})"
            )
        out[train] = (ImageFiles(folder, [path for path, _ in ds.samples]), np.asarray(ds.targets, dtype=np.int64))
    assert classes is not None
    return out, classes


def load_raw(cfg: DataSection, raw_dir: Path) -> tuple[dict[bool, tuple[np.ndarray | ImageFiles, np.ndarray]], list[str], bool]:
    """Original train/test splits: ``{train: (images (N,H,W,C) uint8, labels (N,) int64)}``, the
    images of an image folder as :class:`ImageFiles` (decoded when taken)."""
    if cfg.dataset == "imagefolder":
        arrays, classes = _read_imagefolder(cfg, raw_dir)
        return arrays, classes, True
    from sparse_core.data.sources import REGISTRY  # built on first use (torchvision)

    spec = REGISTRY[cfg.dataset]
    dest = raw_dir / spec.subdir
    dest.mkdir(parents=True, exist_ok=True)
    for raw in spec.files:
        fetch_file(raw, dest, spec.subdir)
    arrays = {}
    classes: list[str] = []
    for train in (True, False):
        try:
            x, y, classes = spec.load(str(raw_dir), train)
        except DataError:
            raise  # already names the file
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{dest}: torchvision could not read {cfg.dataset} ({exc})") from None
        arrays[train] = (x, y)
    return arrays, classes, spec.flip


def prepare_dataset(cfg: DataSection, data_dir: str | Path, seed: int) -> Path:
    """Build ``<data_dir>/prepared/<name>/data.parquet`` and return its path.

    Raises:
        DataError: archives missing or corrupt, folders malformed.
        pandera.errors.SchemaError: the assembled table breaks the schema (a bug, not bad data).
    """
    data_dir = Path(data_dir)
    arrays, classes, flip = load_raw(cfg, data_dir / "raw")
    rng = np.random.default_rng(seed)
    (x_tr, y_tr), (x_te, y_te) = arrays[True], arrays[False]
    order = rng.permutation(len(x_tr))
    if cfg.train_subset:
        order = order[: cfg.train_subset]
    n_val = int(round(cfg.val_fraction * len(order)))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    test_idx = np.arange(len(x_te))
    if cfg.test_subset:
        test_idx = np.sort(rng.permutation(len(x_te))[: cfg.test_subset])

    # Only the images kept are decoded (an image folder's are read here: ImageFiles).
    x_fit = _take(x_tr, np.concatenate([train_idx, val_idx]))
    x_train, x_val, x_test = x_fit[: len(train_idx)], x_fit[len(train_idx):], _take(x_te, test_idx)

    def rows(x: np.ndarray, y: np.ndarray, idx: np.ndarray, split: str, source: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "image": [im.tobytes() for im in x],
                "label": y[idx].astype(np.int64),
                "split": split,
                "source_split": source,
                "source_index": idx.astype(np.int64),
            }
        )

    df = pd.concat(
        [
            rows(x_train, y_tr, train_idx, "train", "train"),
            rows(x_val, y_tr, val_idx, "val", "train"),
            rows(x_test, y_te, test_idx, "test", "test"),
        ],
        ignore_index=True,
    )
    h, w, c = x_fit.shape[1:]
    sizes = {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)}
    prepared_schema(len(classes), h * w * c, sizes).validate(df)
    pix = x_train.reshape(-1, c).astype(np.float64) / 255.0
    meta = {
        "name": cfg.dataset,
        "classes": json.dumps(classes),
        "height": str(h),
        "width": str(w),
        "channels": str(c),
        "mean": json.dumps(pix.mean(0).round(6).tolist()),
        "std": json.dumps(pix.std(0).round(6).tolist()),
        "flip": json.dumps(bool(flip)),
        "split_sizes": json.dumps(sizes),
        "seed": str(seed),
    }
    out = prepared_path(data_dir, cfg.dataset)
    with atomic_dir(out.parent, holds=("*.parquet",), owner="prepare") as tmp:
        write_parquet(df, tmp / out.name, metadata=meta)
    return out
