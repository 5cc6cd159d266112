"""The data path's cost, measured in one run: sparseflow's batched in-memory path against the
torchvision reference loop, and a CIFAR-10 / ResNet-20 epoch against the pure step rate.

    .venv/bin/python benchmarks/data_path.py [--fmnist-images 12800] [--cifar-images 3200] [--rounds 3] [--json PATH]
    .venv/bin/python benchmarks/data_path.py --smoke [--json PATH]   # seconds: 64 images, batch 16, 1 round

Both datasets are prepared once (untimed; the preparation time is printed) from the offline
mirror (``SPARSEFLOW_DATA_MIRROR`` or ``../shared/data``) into a temporary folder: Fashion-MNIST
and the lossy JPEG copy of CIFAR-10. Every timed block trains the same model with the engine's
own ``training_step`` (dense, plain SGD) over the same number of images, so only the data path
differs:

- ``sparseflow``: :func:`sparse_core.data.loader.iterate_batches` on the prepared uint8 tensor
  (one gather, crop and flip per batch on whole tensors, as every stage trains);
- ``torchvision w0`` / ``w2``: the reference loop every tutorial writes: a torchvision dataset
  (``FashionMNIST``, or ``ImageFolder`` on the extracted JPEGs, which decodes each file every
  epoch) with ``RandomCrop(padding=4)``, ``RandomHorizontalFlip`` (CIFAR), ``ToTensor``,
  ``Normalize``, and a shuffling ``DataLoader`` with 0 or 2 worker processes;
- ``pure step``: the same number of steps on one fixed, already normalised batch: the step
  rate with no data path at all.

Prints, per dataset, seconds per epoch of the subset and ratios to ``sparseflow`` (the
speed-up of our path over each reference loop), and for CIFAR-10 / ResNet-20 the data path's
overhead ``sparseflow / pure step - 1`` (target <= 10%), in fp32 and in bf16 + channels-last
(faster steps leave the data path a larger share). Rounds interleave the setups; medians and
min..max spreads of per-round ratios. Every ratio is also printed as a ``ratio:`` line (and
recorded with ``--json``): each setup's epoch time over ``sparseflow``'s, per dataset, and the
epoch over the pure step rate with its target.

``--smoke`` (seconds; its numbers mean nothing): 64 images per epoch, batch 16, 1 round.
Fashion-MNIST is prepared from the mirror as in the full run, but CIFAR-10 is replaced by a
synthetic stand-in: extracting the mirror's 60,000-JPEG archive takes about 20 s on a 2-core
machine even when only a few of its images are decoded, so the smoke run writes a small archive of 100 random 32x32 JPEGs in the same
``<root>/{train,test}/<class>/`` layout and prepares it the same way (``prepare_dataset`` of an
``imagefolder``, the torchvision loop decoding the extracted files every epoch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments, interleaved, print_rows, ratio_rows  # noqa: E402

from sparse_core.config import DataSection, ImageFolderSection  # noqa: E402
from sparse_core.data import load_prepared, prepare_dataset  # noqa: E402
from sparse_core.data.loader import BatchTransform, Split, iterate_batches  # noqa: E402
from sparse_core.engine import make_optimizer, training_step  # noqa: E402
from sparse_core.config import OptimSection  # noqa: E402
from sparse_core.methods import Method  # noqa: E402
from sparse_core.models import create_model  # noqa: E402
from sparse_core.precision import Precision  # noqa: E402

CIFAR_JPEG = DataSection(
    dataset="imagefolder",
    imagefolder=ImageFolderSection(archive="cifar10/CIFAR-10-images-jpeg.tar.gz", archive_md5="3fe5f3f24461c358c418de9575dc03ef",
                                   root="CIFAR-10-images"),
)  # fmt: skip


def subset(split: Split, n: int) -> Split:
    """The first ``n`` images of a seeded permutation (all classes represented)."""
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
    return Split(split.images[idx].contiguous(), split.labels[idx].contiguous())


def trainer(model_name: str, shape: tuple[int, int, int], precision: Precision, batch_size: int):
    """A fresh seeded model and a function that runs one engine training step on ``(x, y)``."""
    torch.manual_seed(0)
    c, h, _ = shape
    model = create_model(model_name, in_channels=c, num_classes=10, image_size=h)
    model.train()
    opt = make_optimizer(model, OptimSection(batch_size=batch_size, lr=0.01, schedule="constant"))
    method = Method(model, 0)
    state = {"step": 0}

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        training_step(model, method, opt, x, y, state["step"], precision=precision)
        state["step"] += 1

    return step


def blocks_for(name: str, split: Split, reference, transform: BatchTransform, model_name: str, batch_size: int,
               precisions: dict[str, Precision]) -> dict:  # fmt: skip
    """The timed blocks of one dataset (module docstring)."""
    shape = tuple(split.images.shape[1:])
    blocks = {}
    for label, prec in precisions.items():
        step = trainer(model_name, shape, prec, batch_size)
        tag = "" if len(precisions) == 1 else f" {label}"

        def ours(r: int, step=step) -> None:
            for x, y in iterate_batches(split, batch_size, transform, train=True, seed=0, epoch=r):
                step(x, y)

        fixed_x, fixed_y = next(iterate_batches(split, batch_size, transform, train=True, seed=0, epoch=0))
        n_steps = -(-len(split) // batch_size)

        def pure(r: int, step=step, fixed_x=fixed_x, fixed_y=fixed_y) -> None:
            for _ in range(n_steps):
                step(fixed_x, fixed_y)

        blocks[f"sparseflow{tag}"] = ours
        blocks[f"pure step{tag}"] = pure
    step = trainer(model_name, shape, Precision(), batch_size)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(reference, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))  # fmt: skip

        def ref(r: int, loader=loader) -> None:
            for x, y in loader:
                step(x, y)

        blocks[f"torchvision w{workers}"] = ref
    return blocks


def synthetic_cifar_archive(folder: Path, train_per_class: int = 8, test_per_class: int = 2) -> Path:
    """``--smoke``'s stand-in for the CIFAR-10 JPEG archive: random 32x32 RGB JPEGs in its
    layout (``CIFAR-10-images/{train,test}/<class>/<i>.jpg``, 10 classes), as a ``.tar.gz``."""
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tree = folder / "synthetic-cifar"
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(10):
            d = tree / "CIFAR-10-images" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    archive = folder / "synthetic-cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "CIFAR-10-images", arcname="CIFAR-10-images")
    return archive


def main() -> None:
    import os

    from torchvision import datasets, transforms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmnist-images", type=int, default=12800)
    ap.add_argument("--cifar-images", type=int, default=3200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.fmnist_images, args.cifar_images, args.batch_size, args.rounds = 64, 64, 16, 1
    if "SPARSEFLOW_DATA_MIRROR" not in os.environ:
        os.environ["SPARSEFLOW_DATA_MIRROR"] = str(Path(__file__).resolve().parents[2] / "shared" / "data")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, {args.rounds} rounds"
          + ("  (smoke run: tiny sizes, synthetic CIFAR-10 stand-in)" if args.smoke else ""))  # fmt: skip
    cifar_title = "synthetic CIFAR-10 stand-in JPEG / ResNet-20" if args.smoke else "CIFAR-10 JPEG / ResNet-20"
    with tempfile.TemporaryDirectory() as tmp:
        measured = {}
        # ----- Fashion-MNIST / LeNet-5 --------------------------------------------------------
        t0 = time.perf_counter()
        fm = load_prepared(prepare_dataset(DataSection(dataset="fashion_mnist"), tmp, 0))
        print(f"prepare fashion_mnist: {time.perf_counter() - t0:.1f} s (once)")
        split = subset(fm.splits["train"], args.fmnist_images)
        tf = BatchTransform(fm.mean, fm.std, crop_padding=4, flip=False)
        ref_tf = transforms.Compose([transforms.RandomCrop(28, padding=4), transforms.ToTensor(),
                                     transforms.Normalize(fm.mean, fm.std)])  # fmt: skip
        ref = datasets.FashionMNIST(str(Path(tmp) / "raw"), train=True, transform=ref_tf)
        ref = torch.utils.data.Subset(ref, range(args.fmnist_images))
        fm_blocks = blocks_for("fashion_mnist", split, ref, tf, "lenet5", args.batch_size, {"fp32": Precision()})
        measured["Fashion-MNIST / LeNet-5"] = (interleaved(fm_blocks, args.rounds), len(split))
        # ----- CIFAR-10 (JPEG copy) / ResNet-20 -----------------------------------------------
        t0 = time.perf_counter()
        if args.smoke:
            archive = synthetic_cifar_archive(Path(tmp) / "smoke")
            spec = CIFAR_JPEG.imagefolder.model_copy(update={"archive": str(archive), "archive_md5": None})
            cf = load_prepared(prepare_dataset(CIFAR_JPEG.model_copy(update={"imagefolder": spec}), tmp, 0))
            print(f"prepare synthetic CIFAR-10 stand-in (100 random JPEGs; smoke run): {time.perf_counter() - t0:.1f} s (once)")
        else:
            cf = load_prepared(prepare_dataset(CIFAR_JPEG, tmp, 0))
            print(f"prepare cifar10 JPEG copy (decode 60,000 JPEGs once): {time.perf_counter() - t0:.1f} s (once)")
        split = subset(cf.splits["train"], args.cifar_images)
        tf = BatchTransform(cf.mean, cf.std, crop_padding=4, flip=True)
        ref_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                     transforms.Normalize(cf.mean, cf.std)])  # fmt: skip
        root = Path(tmp) / "raw" / "imagefolder" / "imagefolder" / "CIFAR-10-images" / "train"
        ref = datasets.ImageFolder(str(root), transform=ref_tf)
        idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(0))[: args.cifar_images].tolist()
        ref = torch.utils.data.Subset(ref, idx)
        precs = {"fp32": Precision(), "bf16+cl": Precision("bf16", True)}
        cf_blocks = blocks_for("cifar10", split, ref, tf, "resnet20", args.batch_size, precs)
        measured[cifar_title] = (interleaved(cf_blocks, args.rounds), len(split))
    results = Results("data_path", args.smoke)
    for title, (times, n) in measured.items():
        base = "sparseflow" if "sparseflow" in times else "sparseflow fp32"
        print(f"\n{title}: {n} images per epoch; speed-up of {base} over each setup (setup time / {base} time)")
        print_rows(ratio_rows(times, base, invert=False), "s/epoch", "x sparseflow")
        results.compare(times, base, f"epoch time ({title})")
    times, _ = measured[cifar_title]
    print(f"\n{'Synthetic CIFAR-10 stand-in' if args.smoke else 'CIFAR-10'} / ResNet-20 epoch over the pure step rate (target <= 1.10):")
    for label in precs:
        rows = ratio_rows({"pure": times[f"pure step {label}"], "epoch": times[f"sparseflow {label}"]}, "pure")
        _, t, med, lo, hi = rows[1]
        print(f"  {label:8s} epoch {t:7.2f} s   x{med:.3f} of pure steps  (spread {lo:.3f}..{hi:.3f})")
    for label in precs:
        per_round = [e / p for e, p in zip(times[f"sparseflow {label}"], times[f"pure step {label}"])]
        results.ratio(f"epoch / pure step time ({cifar_title}, {label})", per_round, at_most=1.10)
    results.write(args.json)


if __name__ == "__main__":
    main()
