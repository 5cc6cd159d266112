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
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sparse_core.artifacts import atomic_dir, atomic_path

MIRROR_ENV = "SPARSEFLOW_DATA_MIRROR"


@dataclass(frozen=True)
class RawFile:
    """One archive a dataset needs: its name, official md5 and download URL."""

    filename: str
    md5: str
    url: str


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


def verify_md5(path: Path, md5: str, origin: str, name: Path | None = None) -> None:
    """Check ``path`` against ``md5``.

    Args:
        origin: where the expected md5 or the file comes from, for the message.
        name: the path to name in the message when ``path`` is a temporary copy of it.

    Raises:
        DataError: the md5 differs; the message names the file, both md5s and ``origin``.
    """
    actual = md5sum(path)
    if actual != md5:
        raise DataError(
            f"{name or path}: md5 {actual} does not match the expected {md5} ({origin}); "
            "the file is corrupt, truncated or a different version. Replace it with the original archive."
        )


def fetch_file(raw: RawFile, dest_dir: Path, subdir: str = ".", download: bool = True) -> Path:
    """Make ``dest_dir/raw.filename`` a verified copy and return its path.

    A copy already in ``dest_dir`` is kept only when its md5 matches. A mirror copy or a
    download is verified *before* it replaces ``dest``, through a temporary file, so a bad
    copy never lands under the final name.

    Args:
        download: try the official URL when neither a local nor a mirror copy exists.

    Raises:
        DataError: the mirror copy fails its md5, or no copy exists and download fails (or is
            not allowed, or the download fails its md5); the message names the file.
    """
    dest = dest_dir / raw.filename
    stale = ""
    if dest.is_file():
        actual = md5sum(dest)
        if actual == raw.md5:
            return dest
        stale = f" (the copy in {dest_dir} has md5 {actual}, expected {raw.md5}: corrupt or truncated)"
    mirror = mirror_dir()
    if mirror is not None:
        found = find_in_mirror(mirror, raw.filename, subdir)
        if found is not None:
            verify_md5(found, raw.md5, f"mirror {MIRROR_ENV}")
            with atomic_path(dest) as tmp:
                shutil.copyfile(found, tmp)
                verify_md5(tmp, raw.md5, f"copied from {found}", name=dest)  # the copy itself, not just the source
            return dest
    where = f"the mirror {mirror}" if mirror else f"a mirror ({MIRROR_ENV} is unset)"
    if not download:
        raise DataError(f"{raw.filename}: not in {dest_dir}{stale} nor in {where}, and downloading is off")
    try:
        from torchvision.datasets.utils import download_url

        with atomic_path(dest) as tmp:
            tmp.unlink()  # download_url would take an existing (empty) file for a finished download
            download_url(raw.url, str(tmp.parent), filename=tmp.name, md5=raw.md5)
            verify_md5(tmp, raw.md5, f"downloaded from {raw.url}", name=dest)
    except DataError:
        raise
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"{raw.filename}: not in {dest_dir}{stale}, not in {where}, and download from {raw.url} failed: {exc}"
        ) from None
    return dest


def safe_extract(tar: tarfile.TarFile, dest: Path, archive: Path) -> None:
    """Extract regular files and folders only, never outside ``dest`` (no absolute paths,
    ``..``, links or devices), on every Python (the ``data`` filter exists from 3.11.4).

    Raises:
        DataError: an archive member is unsafe (names the archive and the member).
    """
    if hasattr(tarfile, "data_filter"):
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"{archive}: refusing unsafe archive member ({exc})") from None
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise DataError(f"{archive}: refusing unsafe archive member {member.name!r}")
    tar.extractall(dest)


def extract_archive(archive: Path, dest: Path, inner: str = ".") -> None:
    """Extract the ``inner`` folder of the tar ``archive`` (any compression) to ``dest``.

    Extraction happens in a temporary sibling of ``dest`` that replaces it only when complete,
    so a corrupt archive leaves an existing ``dest`` untouched.

    Raises:
        DataError: the archive is corrupt or truncated, holds an unsafe member, or lacks
            ``inner``; the message names the archive.
    """
    # Any name: an archive's content is not known in advance. ``dest`` is a dataset's folder under
    # ``<data_dir>/raw`` (a registry name, never a name from the user), which validation keeps
    # apart from every other output.
    with atomic_dir(dest, holds=("*",), owner="extract") as tmp:
        try:
            with tarfile.open(archive) as tar:
                safe_extract(tar, tmp, archive)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # zlib/lzma errors included
            raise DataError(f"{archive}: cannot extract ({exc}); the archive is corrupt or truncated") from None
        if inner not in (".", ""):
            src = tmp / inner
            if not src.is_dir():
                raise DataError(f"{archive}: has no folder {inner!r}; is it the right archive?")
            for child in list(src.iterdir()):
                os.replace(child, tmp / child.name)
            src.rmdir()
