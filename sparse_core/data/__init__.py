"""Datasets: registry of torchvision sources, fetching with md5 checks, preparation to Parquet,
and in-memory loading with batched augmentation."""

from sparse_core.data.fetch import MIRROR_ENV, DataError
from sparse_core.data.loader import BatchTransform, PreparedData, Split, iterate_batches, load_prepared
from sparse_core.data.prepare import prepare_dataset, prepared_path

__all__ = [
    "MIRROR_ENV",
    "DataError",
    "BatchTransform",
    "PreparedData",
    "Split",
    "iterate_batches",
    "load_prepared",
    "prepare_dataset",
    "prepared_path",
]
