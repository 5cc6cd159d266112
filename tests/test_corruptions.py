"""CIFAR-10-C-style corruption suite (:mod:`sparse_core.corruptions`).

Every corruption at every severity, on fixed synthetic batches (1x28x28 gray and 3x32x32 colour): deterministic for a
seed, seed-dependent only where the corruption is random, shape and dtype kept, and the mean absolute change from the
clean batch strictly increasing with severity. Plus a few checks against reference implementations and the errors.
"""

from __future__ import annotations

import colorsys
import functools
import gzip

import numpy as np
import pytest
import torch

from sparse_core.corruptions import (
    ALL_CORRUPTIONS,
    CATEGORY,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    PUBLISHED_PARAMS,
    SEVERITIES,
    corrupt,
    parameters,
)


#: Corruptions that draw random numbers (noise, random offsets/angles/fields/textures); the others are deterministic.
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "spatter",
    "elastic_transform",
}
SHAPES = {"gray28": (1, 28), "rgb32": (3, 32)}


def synthetic_batch(channels: int, size: int, n: int = 8, seed: int = 1234) -> torch.Tensor:
    """uint8 (n, channels, size, size): a linear gradient between two colours, 2-4 discs/rectangles, a faint
    diagonal sine ripple. Colours are random hues of saturation 0.35-1 (C = 3) or gray levels 0.05-0.95 (C = 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    out = np.empty((n, channels, size, size), dtype=np.uint8)

    def colour() -> np.ndarray:
        if channels == 1:
            return np.array([rng.uniform(0.05, 0.95)])
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)))

    for i in range(n):
        a, b = colour(), colour()
        theta = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5), 0, 1)
        img = a[:, None, None] * (1 - t) + b[:, None, None] * t
        for _ in range(rng.integers(2, 5)):
            col = colour()[:, None, None]
            cy, cx = rng.uniform(0.15, 0.85, 2)
            r = rng.uniform(0.1, 0.3)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= rng.uniform(0.05, 0.3))
            img = np.where(mask[None], col, img)
        img = img + 0.08 * np.sin(2 * np.pi * rng.uniform(3, 6) * (xx + yy))[None]
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


@functools.cache
def batch(shape: str) -> torch.Tensor:
    return synthetic_batch(*SHAPES[shape])


@functools.cache
def corrupted(shape: str, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    return corrupt(batch(shape), name, severity, seed=seed)


def mean_abs_change(clean: torch.Tensor, out: torch.Tensor) -> float:
    return (out.double() - clean.double()).abs().mean().item()


# ------------------------------------------------------------------------------------------------------------------
# Names and tables
# ------------------------------------------------------------------------------------------------------------------


def test_names_order_and_categories():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert ALL_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert set(CATEGORY) == set(ALL_CORRUPTIONS)
    counts = {c: sum(v == c for v in CATEGORY.values()) for c in ("noise", "blur", "weather", "digital")}
    assert counts == {"noise": 4, "blur": 5, "weather": 5, "digital": 5}
    assert [CATEGORY[n] for n in EXTRA_CORRUPTIONS] == ["noise", "blur", "weather", "digital"]


# Documented deviations from the published CIFAR-10-C table (module docstring); everything else must be published.
DEVIATIONS = {
    "glass_blur": {2, 3, 5},
    "motion_blur": {4},
    "frost": {3, 4, 5},
    "elastic_transform": {1, 2, 4, 5},
    "spatter": {4, 5},
    "saturate": {1, 2},
}


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_32x32_parameters_are_published_except_documented_deviations(name):
    for severity in SEVERITIES:
        ours = parameters(name, severity, 32)
        published = PUBLISHED_PARAMS[name][severity - 1]
        if name == "elastic_transform":
            published = tuple(32 * f for f in published)
        if severity in DEVIATIONS.get(name, set()):
            assert ours != published
        else:
            assert ours == pytest.approx(published)


def test_28x28_scales_pixel_sizes_only():
    s = 28 / 32
    assert parameters("gaussian_blur", 5, 28) == pytest.approx(1.0 * s)
    assert parameters("motion_blur", 1, 28) == pytest.approx((6 * s, 1 * s))
    assert parameters("elastic_transform", 3, 28) == pytest.approx((28 * 0.08, 28 * 0.06, 28 * 0.06))
    assert parameters("defocus_blur", 4, 28) == parameters("defocus_blur", 4, 32)  # disk kept on the pixel grid
    assert parameters("glass_blur", 4, 28)[1:] == (1, 2)
    for name in ("gaussian_noise", "shot_noise", "contrast", "jpeg_compression", "pixelate", "saturate", "fog"):
        assert parameters(name, 3, 28) == parameters(name, 3, 32)


# ------------------------------------------------------------------------------------------------------------------
# The three properties, every corruption x severity x shape
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_deterministic_and_seed_dependent_only_if_random(name, shape):
    images = batch(shape)
    for severity in SEVERITIES:
        first = corrupted(shape, name, severity)
        again = corrupt(images.clone(), name, severity, seed=0)
        assert first.numpy().tobytes() == again.numpy().tobytes(), (name, severity)
        other = corrupted(shape, name, severity, seed=1)
        if name in RANDOM:
            assert not torch.equal(first, other), f"{name} sev {severity}: seed has no effect"
        else:
            assert torch.equal(first, other), f"{name} sev {severity}: deterministic corruption depends on seed"
    assert torch.equal(batch(shape), synthetic_batch(*SHAPES[shape]))  # the input was not modified in place


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_keeps_shape_and_dtype(name, shape):
    for severity in SEVERITIES:
        out = corrupted(shape, name, severity)
        assert out.shape == batch(shape).shape
        assert out.dtype == torch.uint8
        assert out.device == batch(shape).device


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_change_grows_strictly_with_severity(name, shape):
    clean = batch(shape)
    changes = [mean_abs_change(clean, corrupted(shape, name, s)) for s in SEVERITIES]
    assert changes[0] > 0, f"{name}: severity 1 leaves the images unchanged"
    assert all(a < b for a, b in zip(changes, changes[1:])), f"{name} {shape}: {[round(c, 3) for c in changes]}"


def test_change_grows_with_severity_on_real_fashion_mnist(mirror):
    """Real images from the data mirror (the ``mirror`` fixture fails, never skips, without it)."""
    with gzip.open(mirror / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    images = torch.from_numpy(raw[:64].copy())
    for name in ALL_CORRUPTIONS:
        changes = [mean_abs_change(images, corrupt(images, name, s, seed=3)) for s in SEVERITIES]
        assert all(a < b for a, b in zip(changes, changes[1:])), (name, [round(c, 3) for c in changes])


# ------------------------------------------------------------------------------------------------------------------
# Against reference implementations / the published formulas
# ------------------------------------------------------------------------------------------------------------------


def _hsv_roundtrip(images: torch.Tensor, channel: int, fn) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(images.numpy().transpose(0, 2, 3, 1) / 255.0)
    hsv[..., channel] = fn(hsv[..., channel])
    return np.clip(np.rint(hsv2rgb(hsv) * 255), 0, 255).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_and_saturate_match_skimage_hsv(severity):
    images = batch("rgb32")
    b = parameters("brightness", severity)
    ref = _hsv_roundtrip(images, 2, lambda v: np.clip(v + b, 0, 1))
    assert np.abs(corrupt(images, "brightness", severity).numpy().astype(int) - ref).max() <= 1
    f, o = parameters("saturate", severity)
    ref = _hsv_roundtrip(images, 1, lambda s: np.clip(s * f + o, 0, 1))
    assert np.abs(corrupt(images, "saturate", severity).numpy().astype(int) - ref).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_zoom_blur_matches_scipy_clipped_zoom(severity):
    from scipy.ndimage import zoom

    images = batch("rgb32")
    x = images.numpy().astype(np.float64) / 255
    factors = np.arange(1, PUBLISHED_PARAMS["zoom_blur"][severity - 1], 0.01)
    acc = x.copy()
    for z in factors:
        crop = int(np.ceil(32 / z))
        top = (32 - crop) // 2
        zoomed = zoom(x[:, :, top : top + crop, top : top + crop], (1, 1, z, z), order=1)
        trim = (zoomed.shape[-1] - 32) // 2
        acc += zoomed[:, :, trim : trim + 32, trim : trim + 32]
    ref = np.clip(np.rint(acc / (len(factors) + 1) * 255), 0, 255)
    assert np.abs(corrupt(images, "zoom_blur", severity).numpy() - ref).max() <= 1


def test_gaussian_blur_and_contrast_match_formulas():
    from skimage.filters import gaussian

    images = batch("rgb32")
    x = images.numpy().astype(np.float64) / 255
    sigma = parameters("gaussian_blur", 4)
    ref = gaussian(x.transpose(0, 2, 3, 1), sigma=(0, sigma, sigma, 0), mode="nearest").transpose(0, 3, 1, 2)
    assert np.abs(corrupt(images, "gaussian_blur", 4).numpy() - np.rint(ref * 255)).max() <= 1
    c = parameters("contrast", 5)
    means = x.mean(axis=(2, 3), keepdims=True)
    ref = np.clip(np.rint(((x - means) * c + means) * 255), 0, 255)
    assert np.abs(corrupt(images, "contrast", 5).numpy() - ref).max() <= 1


def test_gaussian_noise_has_the_published_std():
    images = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    for severity in SEVERITIES:
        diff = (corrupt(images, "gaussian_noise", severity).double() - 128) / 255
        assert diff.std().item() == pytest.approx(parameters("gaussian_noise", severity), rel=0.03)


def test_impulse_noise_hits_the_published_fraction():
    images = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    out = corrupt(images, "impulse_noise", 5)
    hit = (out != 128).double().mean().item()
    assert hit == pytest.approx(0.07, abs=0.01)
    assert set(out[out != 128].unique().tolist()) == {0, 255}


def test_pixelate_and_jpeg_match_pillow():
    from io import BytesIO

    from PIL import Image

    images = batch("rgb32")
    img = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    px = img.resize((int(32 * 0.65), int(32 * 0.65)), Image.BOX).resize((32, 32), Image.BOX)
    assert np.array_equal(corrupt(images, "pixelate", 5)[0].permute(1, 2, 0).numpy(), np.asarray(px))
    buf = BytesIO()
    img.save(buf, "JPEG", quality=40)
    assert np.array_equal(corrupt(images, "jpeg_compression", 5)[0].permute(1, 2, 0).numpy(),
                          np.asarray(Image.open(buf)))


def test_grayscale_saturate_changes_mid_tones_only():
    images = torch.tensor([0, 64, 128, 192, 255], dtype=torch.uint8).view(1, 1, 1, 5).expand(1, 1, 8, 5).contiguous()
    images = torch.cat([images, images], dim=3)  # 8x10
    out = corrupt(images, "saturate", 1)[0, 0, 0, :5].tolist()
    assert out[0] == 0 and out[4] == 255 and out[2] == 128
    assert out[1] < 64 and out[3] > 192


def test_empty_batch_and_non_square_images():
    empty = torch.zeros((0, 3, 32, 32), dtype=torch.uint8)
    assert corrupt(empty, "fog", 3).shape == (0, 3, 32, 32)
    images = synthetic_batch(3, 32, n=2)[:, :, :, 4:28]  # 32x24, not contiguous
    for name in ALL_CORRUPTIONS:
        out = corrupt(images, name, 5)
        assert out.shape == images.shape
        assert torch.equal(out, corrupt(images.contiguous(), name, 5))


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------

GOOD = torch.zeros((2, 1, 28, 28), dtype=torch.uint8)


def test_unknown_name_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown corruption 'gaussian'.*gaussian_noise.*saturate"):
        corrupt(GOOD, "gaussian", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True])
def test_bad_severity_is_rejected(severity):
    with pytest.raises(ValueError, match=r"severity.*\(1, 2, 3, 4, 5\)") as info:
        corrupt(GOOD, "fog", severity)
    assert repr(severity) in str(info.value)
    with pytest.raises(ValueError, match="severity"):
        parameters("fog", severity)


def test_float_input_is_rejected():
    with pytest.raises(ValueError, match=r"torch.uint8.*torch.float32"):
        corrupt(GOOD.float(), "fog", 1)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(GOOD.to(torch.int16), "fog", 1)


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (torch.zeros((28, 28), dtype=torch.uint8), r"4 dimensions.*\(28, 28\)"),
        (torch.zeros((2, 28, 28), dtype=torch.uint8), r"4 dimensions.*\(2, 28, 28\)"),
        (torch.zeros((2, 2, 28, 28), dtype=torch.uint8), r"1 or 3 channels.*C=2"),
        (torch.zeros((2, 4, 28, 28), dtype=torch.uint8), r"1 or 3 channels.*C=4"),
        (torch.zeros((2, 28, 28, 3), dtype=torch.uint8), r"1 or 3 channels.*C=28"),
        (torch.zeros((2, 3, 4, 28), dtype=torch.uint8), r"at least 8x8.*H=4"),
    ],
)
def test_bad_shape_is_rejected(images, pattern):
    with pytest.raises(ValueError, match=pattern):
        corrupt(images, "contrast", 1)


def test_bad_seed_and_non_tensor_are_rejected():
    with pytest.raises(ValueError, match="seed"):
        corrupt(GOOD, "fog", 1, seed=-1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        corrupt(GOOD.numpy(), "fog", 1)  # type: ignore[arg-type]
