"""Hostile and broken inputs: each is refused with one error naming the file (or key) and the
problem, runs no code it carries, and leaves earlier outputs byte for byte as they were.

Payload tests first prove their payload is live (an unsafe reader really creates the marker
file), so a refusal by the project's reader means something.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from sparse_core import artifacts
from sparse_core.artifacts import ArtifactError, CheckpointError, load_checkpoint, load_tensors, save_checkpoint
from sparse_core.config import OUTPUT_KEYS, PATH_KEYS, ConfigError, DataSection, load_params, parse_params
from sparse_core.data import DataError, load_prepared, prepare_dataset
from sparse_core.data.fetch import fetch_file, md5sum
from sparse_core.data.fetch import RawFile
from sparse_core.data.sources import load_array_pickle
from sparse_core.sparsity.masks import MaskSet, prunable_parameters
from tests.conftest import TinyNet


# ----- payloads --------------------------------------------------------------------------------
class _ShellPayload:
    """Unpickling it runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _WritePayload:
    """Unpickling it writes the marker through a bound ``pathlib`` method (no shell)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


PAYLOADS = {"os.system": _ShellPayload, "pathlib.write_text": _WritePayload}


def _write_malicious(path: Path, payload_cls, marker: Path, writer: str) -> None:
    obj = {"version": 1, "model": {"w": torch.ones(2)}, "fingerprint": payload_cls(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def _assert_payload_is_live(path: Path, marker: Path, writer: str) -> None:
    """Control: an unsafe reader of ``path`` does run the payload."""
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists(), "the payload is not live; the refusal below would prove nothing"
    marker.unlink()


# ----- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, payload, writer):
    ckpt = tmp_path / "runs" / "dpf" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    _write_malicious(ckpt, PAYLOADS[payload], marker, writer)
    _assert_payload_is_live(ckpt, marker, writer)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    msg = str(info.value)
    assert msg.startswith(f"{ckpt}: refused to load: the file holds pickled Python objects that are not weights"), msg
    assert "no pickled code is run" in msg and "weights_only=False" not in msg
    assert not marker.exists()
    assert ckpt.read_bytes() == before  # refused, not deleted or rewritten
    assert isinstance(info.value, ValueError)


def test_resuming_from_a_malicious_last_pt_never_runs_it(tmp_path, caplog):
    """The engine's resume path goes through load_checkpoint: the payload is refused (the engine
    then either stops or reports the file and starts over; it owns that choice) and never run."""
    from sparse_core.config import OptimSection, PruningSection
    from sparse_core.data.loader import BatchTransform
    from sparse_core.engine import fit
    from sparse_core.methods import create_method
    from tests.conftest import make_split

    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    run_dir.mkdir()
    _write_malicious(run_dir / "last.pt", _ShellPayload, marker, "torch.save")
    model = TinyNet()
    method = create_method("dense", model, 6, PruningSection(), seed=0, epochs=1)
    try:
        fit(model, method, make_split(32), make_split(16, seed=2), BatchTransform([0.5], [0.25]),
            OptimSection(batch_size=16), epochs=1, run_dir=run_dir, seed=0, device=torch.device("cpu"),
            fingerprint="fp", progress=False)  # fmt: skip
        outcome = caplog.text
    except CheckpointError as exc:
        outcome = str(exc)
    assert f"{run_dir / 'last.pt'}: refused to load: the file holds pickled Python objects" in outcome
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "not a readable torch checkpoint, truncated or corrupt"),
        (lambda b: b"", "not a readable torch checkpoint, truncated or corrupt"),
        (lambda b: b"\x00\x01 binary junk" * 10, r"refused to load: the file is not a pickle of plain weights"),
        (lambda b: _zip_with_text(), "not a readable torch checkpoint, truncated or corrupt"),
    ],
    ids=["truncated", "empty", "junk", "other-zip"],
)
def test_damaged_checkpoint_names_the_file(tmp_path, damage, reason):
    good = tmp_path / "good.pt"
    save_checkpoint({"epoch": 3, "model": {"w": torch.arange(1000.0)}}, good)
    assert load_checkpoint(good)["epoch"] == 3
    bad = tmp_path / "last.pt"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"^{bad}: {reason}"):
        load_checkpoint(bad)


def _zip_with_text() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "a zip archive, not a torch checkpoint")
    return buf.getvalue()


def test_pickle_refusal_gives_no_advice_to_trust_the_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"cbuiltins\nexec\n(Vprint(1)\ntR.")  # a protocol-0 pickle calling exec
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: refused to load") and "GLOBAL" in msg and "exec" in msg
    assert "add_safe_globals" not in msg and "weights_only=False" not in msg and "trust" not in msg


def test_checkpoint_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: a checkpoint holds a mapping, this file holds a Tensor"):
        load_checkpoint(path)


def test_missing_checkpoint_stays_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


# ----- safetensors: model weights and masks ----------------------------------------------------
def _saved_masks(tmp_path: Path) -> Path:
    masks = MaskSet(prunable_parameters(TinyNet()))
    masks.target_density = {n: 0.5 for n in masks.params}
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    return path


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) - 7], lambda b: b[:5], lambda b: b"", lambda b: b"\x00" * 64, lambda b: b"PK\x03\x04 a zip"],
    ids=["truncated-end", "truncated-header", "empty", "zeros", "other-format"],
)
def test_damaged_safetensors_names_the_file(tmp_path, damage):
    good = _saved_masks(tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(ArtifactError, match=rf"^{bad}: not a valid safetensors file"):
        load_tensors(bad)
    with pytest.raises(ArtifactError, match=rf"^{bad}: not a valid safetensors file"):
        artifacts.load_tensor_metadata(bad)
    target = MaskSet(prunable_parameters(TinyNet()))
    before = {n: m.clone() for n, m in target.masks.items()}
    with pytest.raises(ArtifactError, match=rf"^{bad}: not a valid safetensors file"):
        target.load(bad)
    assert all(torch.equal(target.masks[n], before[n]) for n in before)


def test_torch_checkpoint_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "masks.safetensors"
    _write_malicious(path, _ShellPayload, tmp_path / "marker", "torch.save")
    with pytest.raises(ArtifactError, match=rf"^{path}: not a valid safetensors file"):
        MaskSet(prunable_parameters(TinyNet())).load(path)
    assert not (tmp_path / "marker").exists()


def test_masks_of_another_model_name_the_file(tmp_path):
    path = _saved_masks(tmp_path)

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

    with pytest.raises(ArtifactError, match=rf"^{path}: masks do not fit this model: mask names differ"):
        MaskSet(prunable_parameters(Other())).load(path)
    # A mask with values other than 0/1 (a weight file passed as masks) is no mask.
    weights = tmp_path / "weights.safetensors"
    artifacts.save_tensors({n: torch.randn(p.shape) for n, p in prunable_parameters(TinyNet()).items()}, weights)
    with pytest.raises(ArtifactError, match=rf"^{weights}: masks do not fit this model: mask .* is not binary"):
        MaskSet(prunable_parameters(TinyNet())).load(weights)
    # Target densities in the metadata must be fractions.
    odd = tmp_path / "odd.safetensors"
    artifacts.save_tensors(artifacts.load_tensors(path), odd, metadata={"conv.weight": "7.5", "fc.weight": "0.5"})
    with pytest.raises(ArtifactError, match=rf"^{odd}: masks do not fit this model: target densities outside"):
        MaskSet(prunable_parameters(TinyNet())).load(odd)


# ----- Parquet ---------------------------------------------------------------------------------
def _image_tree(root: Path, classes: dict[str, list[str]], n: int = 3, size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def _imagefolder_cfg(root: Path) -> DataSection:
    return DataSection(dataset="imagefolder", imagefolder={"root": str(root)})


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A genuine prepared ``data.parquet`` (image folder: 2 classes, 8x8 RGB)."""
    _image_tree(tmp_path / "tree", {"train": ["cat", "dog"], "test": ["cat", "dog"]}, n=5)
    out = prepare_dataset(_imagefolder_cfg(tmp_path / "tree"), tmp_path / "data", 0)
    assert load_prepared(out).num_classes == 2
    return out


def _rewrite(src: Path, dest: Path, mutate_df=None, mutate_meta=None) -> Path:
    table = pq.read_table(src)
    df, meta = table.to_pandas(), dict(table.schema.metadata)
    if mutate_df:
        df = mutate_df(df)
    if mutate_meta:
        mutate_meta(meta)
    out = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(out.replace_schema_metadata(meta), dest)
    return dest


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda b: b[: len(b) // 2], "cannot read prepared dataset"),
        (lambda b: b[:-4], "cannot read prepared dataset"),
        (lambda b: b"", "cannot read prepared dataset"),
        (lambda b: b[:-200] + b"\xff" * 192 + b[-8:], "cannot read prepared dataset"),
        (lambda b: b"PAR1" + b"\x00" * 64 + b"PAR1", "cannot read prepared dataset"),
    ],
    ids=["half", "no-footer-magic", "empty", "scrambled-footer", "magic-only"],
)
def test_corrupt_prepared_parquet_names_the_file(prepared, tmp_path, damage, problem):
    bad = tmp_path / "bad" / "data.parquet"
    bad.parent.mkdir()
    bad.write_bytes(damage(prepared.read_bytes()))
    with pytest.raises(DataError) as info:
        load_prepared(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: {problem}") and "prepare stage" in msg, msg
    assert msg.count(str(bad)) == 1, msg  # named once, not repeated by nested errors


@pytest.mark.parametrize(
    "mutate_df, mutate_meta, problem",
    [
        (lambda df: df.drop(columns=["image"]), None, "cannot read prepared dataset"),
        (lambda df: df.assign(image=df.image.map(lambda b: b[:-1])), None, r"row 0: image is 191 bytes, expected 192"),
        (lambda df: df.assign(label=df.label + 5), None, r"labels must lie in \[0, 1\]"),
        (lambda df: df.assign(split="holdout"), None, r"unknown split names \['holdout'\]"),
        (None, lambda m: m.pop(b"channels"), "missing metadata key 'channels'"),
        (None, lambda m: m.update({b"classes": b"[not json"}), "malformed prepared metadata"),
        (None, lambda m: m.update({b"height": b"-8"}), "malformed prepared metadata"),
        (None, lambda m: m.update({b"mean": b"[0.5]"}), "metadata 'mean' must list one value per channel"),
    ],
    ids=["no-image-column", "short-image", "label-range", "split-name", "no-channels", "classes-json", "height",
         "mean-length"],  # fmt: skip
)
def test_well_formed_parquet_with_wrong_content_names_the_problem(prepared, tmp_path, mutate_df, mutate_meta, problem):
    bad = _rewrite(prepared, tmp_path / "wrong.parquet", mutate_df, mutate_meta)
    with pytest.raises(DataError, match=rf"^{bad}: {problem}"):
        load_prepared(bad)


def test_artifact_parquet_readers_name_the_file(prepared, tmp_path):
    bad = tmp_path / "history.parquet"
    bad.write_bytes(prepared.read_bytes()[:300])
    import pandera.pandas as pandera

    from sparse_core.schemas import HISTORY_SCHEMA

    anything = pandera.DataFrameSchema()  # no columns: any table passes
    readers = (lambda p, **kw: artifacts.read_parquet(p, schema=HISTORY_SCHEMA, **kw), artifacts.read_parquet_table,
               artifacts.parquet_metadata)  # fmt: skip
    for reader in readers:
        with pytest.raises(ArtifactError, match=rf"^{bad}: not a readable Parquet file"):
            reader(bad)
    with pytest.raises(ArtifactError, match=rf"^{prepared}: not a readable Parquet file .*nonexistent"):
        artifacts.read_parquet(prepared, schema=anything, columns=["nonexistent"])
    assert artifacts.read_parquet(prepared, schema=anything, columns=["label"]).shape == (20, 1)


# ----- image folders: a failed re-prepare keeps the earlier output -----------------------------
def _garbage_png(tree: Path) -> str:
    (tree / "train" / "dog" / "broken.png").write_bytes(b"\x00garbage, not a png" * 4)
    return r"train/dog/broken\.png: unreadable image"


def _truncated_png(tree: Path) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buf, format="PNG")
    (tree / "test" / "cat" / "cut.png").write_bytes(buf.getvalue()[:40])
    return r"test/cat/cut\.png: unreadable image"


def _missing_test_class(tree: Path) -> str:
    for f in (tree / "test" / "dog").iterdir():
        f.unlink()
    (tree / "test" / "dog").rmdir()
    return r"test: class folders \['cat'\] differ from train's \['cat', 'dog'\] .*missing here: \['dog'\]"


def _extra_test_folder(tree: Path) -> str:
    _image_tree(tree, {"test": ["zebra"]})
    return r"test: class folders .* differ .*unexpected here: \['zebra'\]"


def _empty_class(tree: Path) -> str:
    (tree / "train" / "bird").mkdir()
    return r"train: .*no valid file for the classes bird"


def _non_image_class(tree: Path) -> str:
    (tree / "train" / "notes").mkdir()
    (tree / "train" / "notes" / "readme.txt").write_text("hello")
    return r"train: .*no valid file for the classes notes"


def _mixed_sizes(tree: Path) -> str:
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tree / "train" / "cat" / "tall.png")
    return r"train: images have different shapes"


@pytest.mark.parametrize(
    "breakage",
    [_garbage_png, _truncated_png, _missing_test_class, _extra_test_folder, _empty_class, _non_image_class, _mixed_sizes],
)
def test_broken_image_folder_is_refused_and_keeps_the_prepared_file(tmp_path, breakage):
    tree = tmp_path / "tree"
    _image_tree(tree, {"train": ["cat", "dog"], "test": ["cat", "dog"]}, n=4)
    out = prepare_dataset(_imagefolder_cfg(tree), tmp_path / "data", 0)
    before = out.read_bytes()
    problem = breakage(tree)
    with pytest.raises(DataError, match=problem):
        prepare_dataset(_imagefolder_cfg(tree), tmp_path / "data", 0)
    assert out.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == ["imagefolder"]  # no temp leftovers
    assert [p.name for p in out.parent.iterdir()] == ["data.parquet"]


# ----- archives: checksums and unsafe members --------------------------------------------------
def test_corrupt_local_copy_and_wrong_download_never_land(tmp_path, monkeypatch):
    good = b"the genuine archive bytes" * 100
    raw = RawFile("archive.gz", hashlib.md5(good).hexdigest(), "https://example.invalid/archive.gz")
    dest_dir = tmp_path / "raw"
    dest_dir.mkdir()
    (dest_dir / "archive.gz").write_bytes(good[:50])  # an interrupted earlier copy
    monkeypatch.delenv("SPARSEFLOW_DATA_MIRROR", raising=False)
    with pytest.raises(DataError, match=r"archive\.gz: not in .* \(the copy in .* has md5 [0-9a-f]{32}, expected "
                                        r"[0-9a-f]{32}: corrupt or truncated\) .*downloading is off"):  # fmt: skip
        fetch_file(raw, dest_dir, download=False)

    def wrong_download(url, root, filename=None, md5=None):
        Path(root, filename).write_bytes(b"a captive portal page")  # md5=None: no check inside

    monkeypatch.setattr("torchvision.datasets.utils.download_url", wrong_download)
    (dest_dir / "archive.gz").unlink()
    with pytest.raises(DataError, match=rf"^{dest_dir / 'archive.gz'}: md5 [0-9a-f]+ does not match .*downloaded from"):
        fetch_file(raw, dest_dir)
    assert list(dest_dir.iterdir()) == []  # the wrong bytes never landed under the final name


def test_mirror_archive_with_wrong_md5_keeps_the_prepared_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _image_tree(src / "imgs", {"train": ["a", "b"], "test": ["a", "b"]})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "imgs", arcname="imgs")
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    spec = {"archive": "imgs.tar.gz", "archive_md5": md5sum(archive), "root": "imgs"}
    out = prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "data", 0)
    before = out.read_bytes()
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    archive.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=rf"^{archive}: md5 [0-9a-f]+ does not match the expected {spec['archive_md5']}"):
        prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "data", 0)
    assert out.read_bytes() == before


def test_archive_with_escaping_member_is_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    spec = {"archive": "evil.tar", "archive_md5": md5sum(archive), "root": "imgs"}
    with pytest.raises(DataError, match=rf"^{archive}: refusing unsafe archive member"):
        prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "work" / "data", 0)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "work" / "data" / "raw" / "imagefolder" / "imagefolder").exists()


def test_truncated_archive_without_md5_is_a_clear_error(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _image_tree(tmp_path / "src" / "imgs", {"train": ["a"], "test": ["a"]})
    mirror.mkdir()
    archive = mirror / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "imgs", arcname="imgs")
    archive.write_bytes(archive.read_bytes()[:200])
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    with pytest.raises(DataError, match=rf"^{archive}: cannot extract .*corrupt or truncated"):
        prepare_dataset(DataSection(dataset="imagefolder", imagefolder={"archive": "imgs.tar.gz", "root": "imgs"}),
                        tmp_path / "data", 0)  # fmt: skip


# ----- CIFAR "python version" batches: pickles read without plain pickle.load ------------------
def test_cifar_batch_pickle_with_a_payload_is_refused(tmp_path):
    batch, marker = tmp_path / "data_batch_1", tmp_path / "marker"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": _ShellPayload(marker)}, f, protocol=2)
    _assert_payload_is_live(batch, marker, "pickle.dump")
    with pytest.raises(DataError, match=rf"^{batch}: refused to unpickle \(global posix\.system is not allowed"):
        load_array_pickle(batch)
    assert not marker.exists()
    batch.write_bytes(batch.read_bytes()[:30])
    with pytest.raises(DataError, match=rf"^{batch}: (refused|not a readable pickle)"):
        load_array_pickle(batch)


def _fake_cifar(root: Path, n: int = 4) -> type:
    """A CIFAR-10-format archive of random images plus a torchvision CIFAR10 subclass whose
    official md5s are those of the fake files."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    folder = root / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "test_batch"]
    for name in names:
        entry = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    archive = root / "raw" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    md5 = {p.name: md5sum(p) for p in folder.iterdir()}

    class FakeCIFAR10(tvd.CIFAR10):
        tgz_md5 = md5sum(archive)
        train_list = [[n_, md5[n_]] for n_ in names[:2]]
        test_list = [["test_batch", md5["test_batch"]]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]}

    return FakeCIFAR10


def test_cifar_reader_equals_torchvision_on_a_cifar_format_archive(tmp_path):
    from sparse_core.data.sources import _cifar

    cls = _fake_cifar(tmp_path)
    ours = {t: _cifar(cls)(str(tmp_path / "raw"), t) for t in (True, False)}
    for train in (True, False):
        tv = cls(root=str(tmp_path / "raw"), train=train, download=True)
        x, y, classes = ours[train]
        assert np.array_equal(x, tv.data) and x.shape == (8 if train else 4, 32, 32, 3)
        assert y.tolist() == tv.targets and classes == tv.classes
    # A batch file that fails its md5 after extraction is re-extracted from the verified archive.
    batch = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(b"tampered")
    x, _, _ = _cifar(cls)(str(tmp_path / "raw"), True)
    assert np.array_equal(x, ours[True][0])


# ----- params files ----------------------------------------------------------------------------
def test_yaml_python_tag_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "params.yaml"
    command = "touch " + shlex.quote(str(marker))
    bad.write_text(f"base: !!python/object/apply:os.system [{json.dumps(command)}]\n")
    yaml.unsafe_load(bad.read_text())  # control: the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: not valid YAML (Python tags are refused") and "python/object/apply:os.system" in msg
    assert f'in "{bad}", line 1' in msg  # the mark names the file, not "<unicode string>"
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("base:\n  seed: 1\n  seed: 2\n", r"found duplicate key 'seed' \(first at line 2\)"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg")),
         "more than 100000 values once YAML aliases are expanded"),
        ("a: &a [*a]\n", "a value contains itself"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ("- just\n- a list\n", "expected a mapping of sections at the top level, got list"),
        ("", "expected a mapping of sections at the top level, got NoneType"),
        ("base: {seed: 1\n", "not valid YAML"),
    ],
    ids=["duplicate-key", "alias-bomb", "recursive-alias", "deep-nesting", "list", "empty", "syntax"],
)
def test_broken_params_file_names_the_file(tmp_path, text, problem):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}:")


def test_params_file_that_is_not_text_or_not_there(tmp_path):
    binary = tmp_path / "params.yaml"
    binary.write_bytes(b"base:\n  seed: \xff\xfe\x00\n")
    with pytest.raises(ConfigError, match=rf"^{binary}: not a UTF-8 text file"):
        load_params(binary)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'absent.yaml'}: cannot read params file"):
        load_params(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read params file"):
        load_params(tmp_path)


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("train.epochs", "ten", r"train\.epochs = 'ten': Input should be a valid integer"),
        ("train.epochs", True, r"train\.epochs = True: expected a number, got the boolean True"),
        ("base.seeds", [0, True], r"base\.seeds = \[0, True\]: expected a number, got the boolean True in \[0, True\]"),
        ("train.optim.milestones", [False], r"milestones = \[False\]: expected a number, got the boolean False"),
        ("train.edst.refine_lr_multipliers", [1.0, True], r"refine_lr_multipliers = \[1\.0, True\]: expected a number"),
        ("train.optim.lr", float("inf"), r"train\.optim\.lr = inf: Input should be a finite number"),
        ("train.pruning.sparsity", float("nan"), r"train\.pruning\.sparsity = nan: Input should be a finite number"),
        ("train.edst.refine_lr_multipliers", [0.1, float("nan")], r"refine_lr_multipliers\.1 = nan"),
        ("train.dst.sparsity", 1.0, r"train\.dst\.sparsity = 1\.0: Input should be less than 1"),
        ("base.seed", 2**40, r"base\.seed = 1099511627776: Input should be less than or equal to 4294967295"),
        ("base.allow_external_paths", "sometimes", r"base\.allow_external_paths = 'sometimes'"),
        ("model.kwargs", {"when": __import__("datetime").date(2024, 1, 1)}, r"model\.kwargs: must hold plain JSON"),
        ("model.kwargs", {"widths": {1: 64}}, r"model\.kwargs: must hold plain JSON values \(mapping keys strings"),
        ("train.optimizer", {"lr": 1}, r"train\.optimizer = .*Extra inputs are not permitted"),
        ("model.kwargs", list(range(10**4)), r"model\.kwargs = \[0, 1, 2, 3, 4, 5, \.\.\.\]: Input should be a valid dict"),
    ],
    ids=["str-for-int", "bool-for-int", "bool-in-seeds", "bool-in-milestones", "bool-in-floats", "inf", "nan", "nan-in-list", "range", "seed-range", "bool-junk", "date",
         "int-key", "unknown-key", "long-value-shortened"],  # fmt: skip
)
def test_bad_params_values_name_key_value_and_problem(default_params_dict, key, value, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        parse_params(_set(default_params_dict, key, value), "params.yaml")
    assert str(info.value).startswith("params.yaml: ")
    assert max(len(line) for line in str(info.value).splitlines()) < 400  # junk values stay short


# ----- paths from params stay inside the project folder ----------------------------------------
def _with_imagefolder(raw: dict, **spec) -> dict:
    return _set(_set(raw, "data.dataset", "imagefolder"), "data.imagefolder", {"root": "tree", **spec})


@pytest.mark.parametrize("key", PATH_KEYS)
@pytest.mark.parametrize(
    "value, problem",
    [("/tmp/elsewhere", "absolute path"), ("../sibling", r"resolves outside \('\.\./sibling'\) through '\.\.'"),
     ("data/../../x", r"resolves outside \('\.\./x'\)"), ("..", r"resolves outside \('\.\.'\)")],
    ids=["absolute", "dotdot", "hidden-dotdot", "parent"],
)
def test_path_values_must_stay_in_the_project(default_params_dict, key, value, problem):
    raw = _with_imagefolder(default_params_dict, archive="a.tar.gz") if key == "data.imagefolder.archive" else (
        _with_imagefolder(default_params_dict) if key.startswith("data.imagefolder") else default_params_dict)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_params(_set(raw, key, value), "params.yaml")
    msg = str(info.value)
    assert f"{key} = {value!r}: " in msg, msg
    assert __import__("re").search(problem, msg), msg
    assert "base.allow_external_paths: true" in msg
    if value == ".." and key in OUTPUT_KEYS:  # allowed outside, but '..' holds the project's own folders
        with pytest.raises(ConfigError, match=rf"{key} = '\.\.' contains"):
            parse_params(_set(_set(raw, key, value), "base.allow_external_paths", True))
        return
    allowed = parse_params(_set(_set(raw, key, value), "base.allow_external_paths", True))
    assert allowed._get(key) == value


@pytest.mark.parametrize("allow", [False, True])
def test_nul_byte_in_a_path_is_refused_whatever_the_setting(default_params_dict, allow):
    raw = _set(default_params_dict, "base.allow_external_paths", allow)
    with pytest.raises(ConfigError, match=r"base\.runs_dir = 'runs\\x00x': contains a NUL byte"):
        parse_params(_set(raw, "base.runs_dir", "runs\x00x"))


def test_inside_paths_and_the_default_profiles_are_accepted(default_params_dict):
    raw = default_params_dict
    for key, value in [("base.data_dir", "data"), ("base.runs_dir", "out/../runs"), ("base.plots_dir", "./plots"),
                       ("base.metrics_dir", "out/metrics")]:  # fmt: skip
        raw = _set(raw, key, value)
    parse_params(_with_imagefolder(raw, archive="cifar10/imgs.tar.gz"))
    repo = Path(__file__).resolve().parents[1]
    for profile in [repo / "params.yaml", *sorted((repo / "profiles").glob("*.yaml"))]:
        assert load_params(profile).base.allow_external_paths is False


def test_root_inside_an_archive_never_escapes_even_when_external_paths_are_allowed(default_params_dict):
    raw = _set(default_params_dict, "base.allow_external_paths", True)
    for root in ("/etc", "../../outside"):
        with pytest.raises(ConfigError, match=r"root is a folder inside the extracted archive"):
            parse_params(_with_imagefolder(raw, archive="a.tar.gz", root=root))


def test_root_escaping_the_archive_is_refused_at_prepare_time_too(tmp_path, monkeypatch):
    """A DataSection built in code skips the params check; prepare refuses the root itself."""
    mirror = tmp_path / "mirror"
    _image_tree(tmp_path / "src" / "imgs", {"train": ["a"], "test": ["a"]})
    mirror.mkdir()
    with tarfile.open(mirror / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "imgs", arcname="imgs")
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    spec = {"archive": "imgs.tar.gz", "root": "../../../src/imgs"}
    with pytest.raises(DataError, match=r"data\.imagefolder\.root='\.\./\.\./\.\./src/imgs' leads outside the extracted"):
        prepare_dataset(DataSection(dataset="imagefolder", imagefolder=spec), tmp_path / "data", 0)


def test_new_setting_leaves_fingerprints_of_existing_checkpoints_unchanged(default_params_dict):
    """``base`` is part of every run's fingerprint: the new key must not change it, or every
    existing last.pt would stop resuming."""
    params = parse_params(default_params_dict)
    # The keys ``base`` had before the new settings give the old fingerprint.
    new_keys = ("allow_external_paths", "nonfinite_retries", "nonfinite_lr_factor", "seeds", "ensembles_dir", "reports_dir")
    old = json.dumps({"base": {k: v for k, v in default_params_dict["base"].items() if k not in new_keys}}, sort_keys=True)
    assert params.fingerprint("base") == hashlib.sha256(old.encode()).hexdigest()[:16]
    for key, value in (("allow_external_paths", True), ("nonfinite_retries", 3), ("nonfinite_lr_factor", 0.1),
                       ("seeds", [4, 5]), ("ensembles_dir", "elsewhere"), ("reports_dir", "out/reports")):
        changed = parse_params(_set(default_params_dict, f"base.{key}", value))
        assert changed.fingerprint("base", "data", "train") == params.fingerprint("base", "data", "train"), key
