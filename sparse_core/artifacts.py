"""Writing and reading artifacts atomically: JSON, Parquet, safetensors and torch checkpoints.

Every writer goes through :func:`atomic_path`: the bytes land in a temporary file in the
destination folder and are renamed into place only when complete, so a crash never leaves a
half-written file under its final name (``os.replace`` is atomic on POSIX within one
filesystem). Checkpoints are read with ``torch.load(weights_only=True)``: no pickle code runs.

Readers refuse broken or hostile files with one :class:`ArtifactError` (a ``ValueError``) whose
message starts with the file's path and says what is wrong: a checkpoint that holds pickled
Python objects (:class:`CheckpointError`), a truncated or non-safetensors tensor file, a corrupt
Parquet file. A missing file stays a ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

if TYPE_CHECKING:
    import pandera.api.pandas.container
    import pandera.errors


class ArtifactError(ValueError):
    """An artifact file exists but is corrupt, truncated or not in the format its reader expects."""


class CheckpointError(ArtifactError):
    """A checkpoint cannot be loaded safely: not a torch checkpoint, truncated, or holding pickled
    Python objects beyond tensors and plain containers (refused, never executed)."""


class StorageError(OSError):
    """An artifact could not be written for lack of space, quota or permission; the message names
    the file (the OS's own message often names none)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without "[Errno N]"


#: errno values of a full, over-quota, read-only or too-small file system: raised only by writes,
#: so within a writer's block they concern the file being written.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
#: ... and of a folder the process may not write in (creating the temporary file).
_DENIED_ERRNOS = _FULL_ERRNOS | {errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def storage_errors_named(dest: str | Path, errnos: frozenset[int] = _FULL_ERRNOS) -> Iterator[None]:
    """Re-raise an OS storage error (disk full, quota, read-only, file too large; with
    ``errnos``, also permission) raised in the block as a :class:`StorageError` naming ``dest``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno not in errnos:
            raise
        raise StorageError(exc.errno, f"{dest}: cannot write ({os.strerror(exc.errno)}); nothing was replaced. Free "
                                      f"space on (or allow writing to) the file system of {Path(dest).parent}") from None  # fmt: skip


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds.

    Raises:
        StorageError: the file system is full, over quota, read-only or refuses the write (the
            message names ``dest``; an existing ``dest`` is untouched).
    """
    dest = Path(dest)
    with storage_errors_named(dest, _DENIED_ERRNOS):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with storage_errors_named(dest):
            yield tmp_path
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
            os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


class ForeignFolderError(ArtifactError):
    """A stage was about to delete or replace a folder that holds files it does not write: the
    folder belongs to something else (another stage's output, the user's files), so it is left
    untouched."""


#: Names of leftovers of an interrupted atomic write (:func:`atomic_path`, safetensors' own
#: temporary file), allowed in any folder a stage replaces.
TEMPORARY_NAMES = (".*.tmp", ".tmp??????")


def check_replaceable(folder: str | Path, holds: tuple[str, ...], owner: str) -> None:
    """Refuse to let ``owner`` delete or replace ``folder`` unless every entry in it matches one
    of the glob patterns ``holds`` (the names ``owner`` writes there) or is a leftover temporary
    file. A missing folder passes.

    This is the guard that keeps a stage from destroying what it did not create: with
    overlapping output settings (``base.runs_dir: ensembles``) or a mistyped ``--out``, the
    folder at the destination holds someone else's files, and the stage stops before touching it.

    Raises:
        ForeignFolderError: ``folder`` is not a folder, or holds an entry ``owner`` does not write
            (the message names the folder and up to five such entries).
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ForeignFolderError(f"{folder}: {owner} would replace it, but it is not a folder {owner} created; "
                                 "move it away or change the output setting")  # fmt: skip
    patterns = holds + TEMPORARY_NAMES
    foreign = sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignFolderError(f"{folder}: {owner} would replace this folder, but it holds {shown}, which {owner} "
                                 f"does not write (it writes {', '.join(holds)}); nothing was changed. Is an output "
                                 "setting pointing at another stage's folder? Move the folder away or change the setting")  # fmt: skip


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, holds: tuple[str, ...], owner: str = "this stage") -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it in for ``dest`` if the block succeeds.

    On failure the temporary folder is removed and an existing ``dest`` is left untouched. An
    existing ``dest`` is replaced only if it holds nothing but what the caller writes there
    (glob patterns ``holds``; :func:`check_replaceable`), checked before the block runs.

    Raises:
        ForeignFolderError: ``dest`` exists and holds files the caller does not write.
    """
    dest = Path(dest)
    check_replaceable(dest, holds, owner)
    with storage_errors_named(dest, _DENIED_ERRNOS):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with storage_errors_named(dest):
            yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            check_replaceable(dest, holds, owner)  # still ours after the (possibly long) block
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
    """The JSON document in ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is not UTF-8 JSON (the message names the file, line and column).
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                            "re-run the stage that writes it") from None  # fmt: skip
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not a UTF-8 text file ({_reason(exc)})") from None


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
    """Key/value metadata written by :func:`write_parquet` (pandas' own key left out).

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is not a readable Parquet file or its metadata is not UTF-8.
    """
    try:
        meta = pq.read_schema(path).metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas")}
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise ArtifactError(f"{path}: not a readable Parquet file ({_reason(exc)})") from None


def read_parquet_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file (optionally only ``columns``) into an Arrow table.

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is truncated, corrupt, not Parquet, or lacks a requested column.
    """
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError, ... for damaged files
        raise ArtifactError(f"{path}: not a readable Parquet file ({_reason(exc)})") from None


def read_parquet(path: str | Path, *, schema: "pandera.api.pandas.container.DataFrameSchema", columns: list[str] | None = None) -> pd.DataFrame:
    """Read the Parquet artifact ``path`` (optionally only ``columns``) as a pandas DataFrame
    checked against its pandera ``schema`` (:mod:`sparse_core.schemas`). Every reader of a
    Parquet artifact goes through here, so every table read back is validated.

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is truncated, corrupt, not Parquet, lacks a requested column, or
            breaks ``schema`` (the message names the file, the column and the check).
    """
    table = read_parquet_table(path, columns)
    try:
        df = table.to_pandas()
    except Exception as exc:
        raise ArtifactError(f"{path}: Parquet data cannot be converted to a table ({_reason(exc)})") from None
    return validated(df, schema, path)


def read_csv(path: str | Path, *, schema: "pandera.api.pandas.container.DataFrameSchema") -> pd.DataFrame:
    """Read the CSV artifact ``path`` (a plotted table under ``plots/``) checked against ``schema``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is empty, not CSV, or breaks ``schema`` (naming file and column).
    """
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise
    except pd.errors.EmptyDataError:
        raise ArtifactError(f"{path}: empty file (no header row); re-run the stage that writes it") from None
    except Exception as exc:  # ParserError, UnicodeDecodeError, ...
        raise ArtifactError(f"{path}: not a readable CSV file ({_reason(exc)})") from None
    if df.empty:  # a header without rows (a stage with zero epochs): pandas types its columns object
        df = df.astype({c: str(col.dtype) for c, col in schema.columns.items() if c in df and not col.regex and col.dtype})
    return validated(df, schema, path)


def validated(df: pd.DataFrame, schema: "pandera.api.pandas.container.DataFrameSchema", path: str | Path) -> pd.DataFrame:
    """``df`` checked against ``schema`` (all problems collected), or an :class:`ArtifactError`
    that names ``path`` and the first few failing columns and checks."""
    import pandera.errors

    try:
        return schema.validate(df, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        raise ArtifactError(f"{path}: does not match its schema: {_schema_problems(exc)}") from None


def _schema_problems(exc: "pandera.errors.SchemaErrors", limit: int = 3) -> str:
    """``column 'step': dtype('int64') (failure: object); ...``: the first ``limit`` distinct
    (column, check) failures of a lazy validation, with one failing value each."""
    cases = exc.failure_cases
    seen: list[str] = []
    for row in cases.itertuples(index=False):
        column = getattr(row, "column", None)
        where = f"column {column!r}" if column not in (None, "") and column == column else "table"
        text = f"{where}: {getattr(row, 'check', '?')} (failing value: {str(getattr(row, 'failure_case', '?'))[:60]})"
        if text.split(" (failing")[0] not in [s.split(" (failing")[0] for s in seen]:
            seen.append(text)
        if len(seen) == limit:
            break
    more = len(cases) - len(seen)
    return "; ".join(seen) + (f"; and {more} more failure(s)" if more > 0 else "")


def _reason(exc: BaseException) -> str:
    """One-line description of ``exc`` for an error message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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
        # The bytes go into our own temporary file: safetensors' save_file would stage them in a
        # hidden file of its own, which a killed process leaves behind under another name.
        tmp.write_bytes(safetensors_bytes(flat, metadata=meta))


def load_tensor_metadata(path: str | Path) -> dict[str, str]:
    """The metadata written by :func:`save_tensors` (files of older versions: the raw map).

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: not a safetensors file, truncated, or its metadata is not valid JSON.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError for damaged headers
        raise ArtifactError(f"{path}: not a valid safetensors file ({_reason(exc)})") from None
    if TENSOR_METADATA_KEY not in meta:
        return dict(meta)
    try:
        decoded = json.loads(meta[TENSOR_METADATA_KEY])
    except ValueError as exc:
        raise ArtifactError(f"{path}: metadata {TENSOR_METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(decoded, dict):
        raise ArtifactError(f"{path}: metadata {TENSOR_METADATA_KEY!r} is not a JSON object")
    return decoded


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU (safetensors never runs code).

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: not a safetensors file, truncated, or with an inconsistent header.
    """
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError for damaged headers
        raise ArtifactError(f"{path}: not a valid safetensors file ({_reason(exc)})") from None


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the safetensors state dict in ``path`` into ``model`` (strict), after checking it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ArtifactError: the file is not safetensors; its tensor names or shapes do not match the
            model (the message names the first few: a run trained with another architecture or
            ``model.kwargs``); or a floating-point tensor holds NaN or infinity (naming it).
    """
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]  # fmt: skip
    problems = [f"{what}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                for what, names in (("shapes differ", shapes), ("missing", missing), ("not in the model", unexpected)) if names]  # fmt: skip
    if problems:
        raise ArtifactError(f"{path}: does not fit the model ({'; '.join(problems)}); was it trained with another "
                            "model or model.kwargs? Re-run the stage that writes it")  # fmt: skip
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ArtifactError(f"{path}: tensor {k!r} holds NaN or infinite values; the run diverged or the file "
                                "was altered. Re-run the stage that writes it")  # fmt: skip
    model.load_state_dict(tensors)


def save_checkpoint(obj: dict[str, Any], dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without running pickled code.

    ``torch.load(weights_only=True)`` rebuilds tensors, numbers, strings and plain containers
    only; any other pickled global (``os.system``, a class with ``__reduce__``) is refused
    before it is called.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file holds pickled objects beyond weights (refused, not run), is
            truncated or is not a torch checkpoint holding a mapping.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        what = "holds pickled Python objects that are not weights" if "global" in reason.lower() else (
            "is not a pickle of plain weights (corrupt, or not written by save_checkpoint)")  # fmt: skip
        raise CheckpointError(
            f"{path}: refused to load: the file {what} ({reason}); only tensors and plain containers are loaded, "
            "no pickled code is run. Delete the file if you did not write it."
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a checkpoint holds a mapping, this file holds a {type(obj).__name__}")
    return obj


def _weights_only_reason(exc: pickle.UnpicklingError) -> str:
    """The part of torch's weights-only refusal that names the problem (the offending global),
    without its advice to retry with ``weights_only=False`` or to allowlist the global (either
    would run the pickled code)."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL \S+[^.]*", text)
    if found:
        return found.group(0).strip()
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if found and found.group(1).strip():
        return found.group(1).strip()
    return "pickled data beyond plain weights"
