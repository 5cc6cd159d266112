"""The names of the corruption benchmark (Hendrycks & Dietterich, ICLR 2019), without its code.

Kept apart from :mod:`sparse_core.corruptions` (which imports SciPy, Pillow and torch) so that
params validation, which checks ``corrupt.corruptions`` against these names, stays cheap in
every stage process.
"""

from __future__ import annotations

#: The 15 corruptions of CIFAR-10-C / ImageNet-C in the paper's order (Section 3, Figure 1).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The four extra (validation) corruptions of the paper's appendix.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
