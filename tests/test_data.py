"""Data preparation: checksums, splits, schema, image folders, and no partial output on error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sparse_core.config import DataSection
from sparse_core.data import DataError, load_prepared, prepare_dataset
from sparse_core.data.prepare import prepared_schema


def test_prepare_fashion_mnist_from_mirror(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    cfg = DataSection(dataset="fashion_mnist", val_fraction=0.1, train_subset=2000, test_subset=500)
    out = prepare_dataset(cfg, tmp_path / "data", seed=3)
    df = pd.read_parquet(out)
    counts = df["split"].value_counts().to_dict()
    assert counts == {"train": 1800, "val": 200, "test": 500}
    prepared_schema(10, 784, counts).validate(df)
    train_val = df[df.split != "test"]
    assert not train_val.duplicated("source_index").any(), "an original image is in train and val"
    data = load_prepared(out)
    assert data.shape == (1, 28, 28) and data.num_classes == 10 and data.flip is False
    # Pixels are the genuine ones: row i equals torchvision's image at its source index.
    import torchvision

    tv = torchvision.datasets.FashionMNIST(str(tmp_path / "data" / "raw"), train=True, download=False)
    row = train_val.iloc[7]
    assert np.array_equal(np.frombuffer(row.image, np.uint8).reshape(28, 28), tv.data[row.source_index].numpy())
    assert row.label == int(tv.targets[row.source_index])
    # Same seed, same split; the validation split is seeded.
    again = pd.read_parquet(prepare_dataset(cfg, tmp_path / "data2", seed=3))
    assert set(again[again.split == "val"].source_index) == set(df[df.split == "val"].source_index)


def test_corrupted_archive_is_refused_and_nothing_is_prepared(tmp_path, mirror, monkeypatch):
    bad_mirror = tmp_path / "mirror" / "MNIST" / "raw"
    bad_mirror.mkdir(parents=True)
    for f in (mirror / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(f, bad_mirror / f.name)
    victim = bad_mirror / "train-labels-idx1-ubyte.gz"
    blob = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated download
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: md5 .* does not match"):
        prepare_dataset(DataSection(dataset="mnist"), tmp_path / "data", seed=0)
    assert not (tmp_path / "data" / "prepared").exists()


def test_failed_prepare_keeps_existing_output(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    good = prepare_dataset(DataSection(dataset="mnist", train_subset=500, test_subset=100), tmp_path / "data", 0)
    before = good.read_bytes()
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    shutil.rmtree(tmp_path / "data" / "raw")
    monkeypatch.setattr("torchvision.datasets.utils.download_url", _no_network)
    with pytest.raises(DataError, match="not in .*download .* failed"):
        prepare_dataset(DataSection(dataset="mnist"), tmp_path / "data", 0)
    assert good.read_bytes() == before


def _no_network(*args, **kwargs):
    raise OSError("network unreachable")


def _image_tree(root: Path, classes: dict[str, list[str]], n: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_prepare(tmp_path):
    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat", "dog"]}, n=5)
    cfg = DataSection(dataset="imagefolder", imagefolder={"root": str(tmp_path / "tree")})
    data = load_prepared(prepare_dataset(cfg, tmp_path / "data", 0))
    assert data.classes == ["cat", "dog"] and data.shape == (3, 8, 8) and data.flip is True
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9, "val": 1, "test": 10}


def test_imagefolder_missing_class_folder(tmp_path):
    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat"]})
    cfg = DataSection(dataset="imagefolder", imagefolder={"root": str(tmp_path / "tree")})
    with pytest.raises(DataError, match=r"test: class folders \['cat'\] differ .*dog"):
        prepare_dataset(cfg, tmp_path / "data", 0)
    assert not (tmp_path / "data" / "prepared").exists()


def test_imagefolder_unreadable_image(tmp_path):
    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    (tmp_path / "tree" / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    cfg = DataSection(dataset="imagefolder", imagefolder={"root": str(tmp_path / "tree")})
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        prepare_dataset(cfg, tmp_path / "data", 0)


def test_imagefolder_from_archive_in_mirror(tmp_path, monkeypatch):
    import tarfile

    from sparse_core.data.fetch import md5sum

    _image_tree(tmp_path / "src" / "imgs", {"train": ["a", "b"], "test": ["a", "b"]})
    (tmp_path / "mirror").mkdir()
    archive = tmp_path / "mirror" / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "imgs", arcname="imgs")
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(tmp_path / "mirror"))
    spec = {"archive": "imgs.tar.gz", "archive_md5": md5sum(archive), "root": "imgs"}
    data = load_prepared(prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "data", 0))
    assert data.classes == ["a", "b"] and len(data.splits["test"]) == 6

    archive.write_bytes(archive.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=r"imgs\.tar\.gz: md5 .* does not match"):
        prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "data2", 0)
    assert not (tmp_path / "data2" / "prepared").exists()


def test_imagefolder_subset_decodes_only_the_images_it_keeps(tmp_path, monkeypatch):
    """A subset of an image folder is prepared from its own images only (the offline CIFAR-10
    JPEG copy has 60,000): the rows are the images at their source indices, decoded as PIL
    does, and a damaged file outside the subset is never opened."""
    from torchvision.datasets import ImageFolder

    from sparse_core.data import prepare

    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat", "dog"]}, n=20)
    cfg = DataSection(dataset="imagefolder", imagefolder={"root": str(tmp_path / "tree")}, train_subset=6, test_subset=4,
                      val_fraction=0.5)  # fmt: skip
    opened: list[str] = []
    real_take = prepare.ImageFiles.take
    monkeypatch.setattr(prepare.ImageFiles, "take", lambda self, idx: opened.extend(self.paths[i] for i in idx) or real_take(self, idx))
    data = pd.read_parquet(prepare_dataset(cfg, tmp_path / "data", seed=1))
    assert data["split"].value_counts().to_dict() == {"train": 3, "val": 3, "test": 4}
    assert len(opened) == 10
    for source in ("train", "test"):
        samples = ImageFolder(str(tmp_path / "tree" / source)).samples
        for row in data[data.source_split == source].itertuples():
            path, label = samples[row.source_index]
            assert row.label == label and row.image == np.asarray(Image.open(path).convert("RGB")).tobytes()
    # The rows depend on the number of images only: a damaged image not drawn changes nothing.
    unused = next(p for p, _ in ImageFolder(str(tmp_path / "tree" / "train")).samples if p not in opened)
    Path(unused).write_bytes(b"not a png")
    again = pd.read_parquet(prepare_dataset(cfg, tmp_path / "data2", seed=1))
    assert again.equals(data)


def test_imagefolder_images_of_different_shapes_are_refused(tmp_path):
    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "tree" / "test" / "dog" / "tall.png")
    cfg = DataSection(dataset="imagefolder", imagefolder={"root": str(tmp_path / "tree")})
    with pytest.raises(DataError, match=r"tree/test: images have different shapes \[\(8, 8, 3\), \(9, 8, 3\)\]"):
        prepare_dataset(cfg, tmp_path / "data", 0)
    assert not (tmp_path / "data" / "prepared").exists()
