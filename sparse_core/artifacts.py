"""Writing and reading artifacts atomically: JSON, Parquet, safetensors and torch checkpoints.

Every writer goes through :func:`atomic_path`: the bytes land in a temporary file in the
destination folder and are renamed into place only when complete, so a crash never leaves a
half-written file under its final name (``os.replace`` is atomic on POSIX within one
filesystem). Checkpoints are read with ``torch.load(weights_only=True)``: no pickle code runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it in for ``dest`` if the block succeeds.

    On failure the temporary folder is removed and an existing ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj: Any, dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(df: pd.DataFrame, dest: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``df`` as Parquet (pyarrow, no pandas index) with optional key/value metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


def parquet_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas")}


def write_csv(df: pd.DataFrame, dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        df.to_csv(tmp, index=False)


#: The one safetensors metadata key: a sorted JSON object. safetensors writes its metadata
#: map in hash order, which varies between processes; one key keeps files byte-identical.
TENSOR_METADATA_KEY = "sparseflow"


def save_tensors(tensors: dict[str, torch.Tensor], dest: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file of contiguous CPU tensors; ``metadata`` is read back by
    :func:`load_tensor_metadata`. The same inputs give the same bytes in every process."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {TENSOR_METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(dest) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensor_metadata(path: str | Path) -> dict[str, str]:
    """The metadata written by :func:`save_tensors` (files of older versions: the raw map)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[TENSOR_METADATA_KEY]) if TENSOR_METADATA_KEY in meta else dict(meta)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_checkpoint(obj: dict[str, Any], dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without running pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)
