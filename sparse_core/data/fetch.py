"""Find a dataset's archives: a verified local copy, then the mirror folder, then download.

Offline machines point ``SPARSEFLOW_DATA_MIRROR`` at a folder of original archives (for
example ``../shared/data``). Files are looked up there as ``<mirror>/<subdir>/<file>``,
``<mirror>/<file>``, then anywhere below the mirror by file name. Every archive is checked
against its official md5 before it is used; a mismatch is an error naming the file, never a
silent re-download over a file the user provided.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sparse_core.artifacts import atomic_path
from sparse_core.data.registry import RawFile

MIRROR_ENV = "SPARSEFLOW_DATA_MIRROR"


class DataError(RuntimeError):
    """A dataset archive or folder is missing, corrupt or not laid out as expected."""


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def mirror_dir() -> Path | None:
    """The mirror folder from ``SPARSEFLOW_DATA_MIRROR``, or None when unset.

    Raises:
        DataError: the variable is set but does not name a folder.
    """
    value = os.environ.get(MIRROR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"{MIRROR_ENV}={value!r} is not a folder")
    return path


def find_in_mirror(mirror: Path, filename: str, subdir: str = ".") -> Path | None:
    for candidate in (mirror / subdir / filename, mirror / filename):
        if candidate.is_file():
            return candidate
    return next((p for p in sorted(mirror.rglob(filename)) if p.is_file()), None)


def verify_md5(path: Path, md5: str, origin: str) -> None:
    actual = md5sum(path)
    if actual != md5:
        raise DataError(
            f"{path}: md5 {actual} does not match the expected {md5} ({origin}); "
            "the file is corrupt, truncated or a different version. Replace it with the original archive."
        )


def fetch_file(raw: RawFile, dest_dir: Path, subdir: str = ".", download: bool = True) -> Path:
    """Make ``dest_dir/raw.filename`` a verified copy and return its path.

    Args:
        download: try the official URL when neither a local nor a mirror copy exists.

    Raises:
        DataError: the mirror copy fails its md5, or no copy exists and download fails (or is
            not allowed).
    """
    dest = dest_dir / raw.filename
    if dest.is_file() and md5sum(dest) == raw.md5:
        return dest
    mirror = mirror_dir()
    if mirror is not None:
        found = find_in_mirror(mirror, raw.filename, subdir)
        if found is not None:
            verify_md5(found, raw.md5, f"mirror {MIRROR_ENV}")
            with atomic_path(dest) as tmp:
                shutil.copyfile(found, tmp)
            return dest
    if not download:
        where = f"the mirror {mirror}" if mirror else f"a mirror ({MIRROR_ENV} is unset)"
        raise DataError(f"{raw.filename}: not in {dest_dir} nor in {where}, and downloading is off")
    try:
        from torchvision.datasets.utils import download_url

        download_url(raw.url, str(dest_dir), filename=raw.filename, md5=raw.md5)
    except Exception as exc:  # network errors come in many types
        where = f"the mirror {mirror}" if mirror else f"a mirror ({MIRROR_ENV} is unset)"
        raise DataError(
            f"{raw.filename}: not in {dest_dir}, not in {where}, and download from {raw.url} failed: {exc}"
        ) from None
    verify_md5(dest, raw.md5, f"downloaded from {raw.url}")
    return dest
