"""OOD and corrupted evaluation sets: shape conversion, seeded noise, skipped sets, CIFAR-10-C files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_core import evalsets
from sparse_core import corrupted_sets
from sparse_core.config import parse_params
from sparse_core.data import DataError, PreparedData, Split
from sparse_core.evalsets import load_eval_sets, noise_images, to_shape


def _fake_data(shape=(1, 28, 28), n=20) -> PreparedData:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.arange(n) % 10)
    return PreparedData("fashion_mnist", [str(i) for i in range(10)], shape, [0.3], [0.3], False,
                        {"train": split, "val": split, "test": split})  # fmt: skip


def test_to_shape_converts_channels_and_size():
    gray = torch.full((2, 1, 28, 28), 100, dtype=torch.uint8)
    rgb = to_shape(gray, (3, 32, 32))
    assert rgb.shape == (2, 3, 32, 32) and rgb.dtype == torch.uint8
    assert (rgb == 100).all()  # a constant image stays constant; channels repeated
    color = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    color[:, 0] = 255  # pure red -> luma 0.2989 * 255
    back = to_shape(color, (1, 28, 28))
    assert back.shape == (1, 1, 28, 28) and int(back[0, 0, 5, 5]) in (76, 77)
    with pytest.raises(ValueError, match="channels"):
        to_shape(torch.zeros((1, 2, 8, 8), dtype=torch.uint8), (3, 8, 8))


def test_noise_images_are_seeded():
    a = noise_images("gaussian", 5, (1, 28, 28), seed=3)
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, noise_images("gaussian", 5, (1, 28, 28), seed=3))
    assert not torch.equal(a, noise_images("gaussian", 5, (1, 28, 28), seed=4))
    assert not torch.equal(a, noise_images("uniform", 5, (1, 28, 28), seed=3))
    assert abs(a.float().mean().item() / 255 - 0.5) < 0.02


@pytest.fixture
def params(tmp_path, monkeypatch, default_params_dict):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(empty))
    monkeypatch.setattr(evalsets, "prepared", lambda p: _fake_data())
    raw = dict(default_params_dict)
    raw["ood"] = {"sets": {"fashion_mnist": ["mnist", "uniform"]}, "max_examples": 7}
    raw["corrupt"] = {"corruptions": ["contrast", "gaussian_noise"], "severities": [2, 4], "test_subset": 6}
    return raw


def test_missing_optional_ood_set_is_recorded_and_warned(params):
    p = parse_params(params)
    with pytest.warns(UserWarning, match="OOD set 'mnist' skipped"):
        out = evalsets.stage_ood(p)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["set"], m["status"]) for m in manifest] == [("mnist", "missing"), ("uniform", "ok")]
    assert "downloading is off" in manifest[0]["reason"]
    corrupted_sets.stage_corrupt(p)
    sets = load_eval_sets(p)
    assert list(sets.ood) == ["uniform"] and sets.ood["uniform"].shape == (7, 1, 28, 28)
    assert [m["set"] for m in sets.ood_missing] == ["mnist"]
    assert sorted(sets.corrupted) == [("contrast", 2), ("contrast", 4), ("gaussian_noise", 2), ("gaussian_noise", 4)]
    assert sets.corrupted[("contrast", 4)].shape == (6, 1, 28, 28)
    assert torch.equal(sets.corrupted_labels, torch.arange(6) % 10)


def test_missing_required_ood_set_is_an_error_and_keeps_old_output(params):
    evalsets.stage_ood(parse_params(params | {"ood": {"sets": {"fashion_mnist": ["uniform"]}}}))
    before = Path("data/ood/fashion_mnist/manifest.json").read_text()
    params["ood"] |= {"required": ["mnist"]}
    with pytest.raises(DataError, match="ood.required lists 'mnist'"):
        evalsets.stage_ood(parse_params(params))
    assert Path("data/ood/fashion_mnist/manifest.json").read_text() == before  # untouched


def test_genuine_cifar10_c_files_are_used(tmp_path, monkeypatch, default_params_dict):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARSEFLOW_DATA_MIRROR", raising=False)
    data = _fake_data((3, 32, 32), n=4)
    monkeypatch.setattr(evalsets, "prepared", lambda p: data)
    monkeypatch.setattr(corrupted_sets, "_test_source_index", lambda cfg, d: np.array([3, 1, 0, 2]))
    folder = Path("data/raw/CIFAR-10-C")
    folder.mkdir(parents=True)
    labels = np.zeros(50000, dtype=np.int64)
    labels[[3, 1, 0, 2]] = data.splits["test"].labels.numpy()
    np.save(folder / "labels.npy", labels)
    fog = np.zeros((50000, 32, 32, 3), dtype=np.uint8)
    fog[2 * 10000 + 3] = 77  # severity 3, original test image 3 = our first test image
    np.save(folder / "fog.npy", fog)
    raw = dict(default_params_dict) | {"data": {**default_params_dict["data"], "dataset": "cifar10"}}
    raw["corrupt"] = {"corruptions": ["fog"], "severities": [3], "test_subset": 0}
    p = parse_params(raw)
    out = corrupted_sets.stage_corrupt(p)
    assert "genuine CIFAR-10-C" in json.loads((out / "manifest.json").read_text())["source"]
    from sparse_core.artifacts import load_tensors

    images = load_tensors(out / "fog.safetensors")["images"]
    assert images.shape == (1, 4, 3, 32, 32) and (images[0, 0] == 77).all() and (images[0, 1:] == 0).all()
    np.save(folder / "labels.npy", labels[::-1].copy())
    with pytest.raises(DataError, match="labels differ"):
        corrupted_sets.stage_corrupt(p)
