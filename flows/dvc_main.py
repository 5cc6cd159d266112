"""``python -m flows.dvc_main <dvc arguments>``: DVC's own command line (:func:`dvc.cli.main`), where
writing ``dvc.lock`` after a stage reuses the document written after the stage before instead of
parsing the file again. ``sparseflow with-server -- dvc ...`` (``make repro``) runs DVC this way
(README, "Orchestration"); ``--plain-dvc`` runs the ``dvc`` command as given.

**Why.** After every stage DVC records it in ``dvc.lock``: ``Lockfile.dump_stages`` opens the
file with ``modify_yaml``, which reads it, parses it with ruamel.yaml's round-trip parser (pure
Python; it keeps comments and layout), lets DVC update the stage's entry and writes the whole
document back. The parse costs more than the write (the 306 KB lock of the default profile:
about 2.0 s to parse, 1.1 s to write, on the 2-core machine), and a default ``make repro`` has
about 100 stages. Nothing but DVC writes the file meanwhile, so the document DVC wrote last is
the one it would parse.

**What changes.** :func:`modify_lockfile` replaces ``dvc.dvcfile.modify_yaml`` for files named
``dvc.lock`` on the local file system. It keeps, per file, the text it wrote and the document it
wrote it from; when the file holds exactly that text (nothing else wrote it since), DVC gets that
document again, otherwise (the first write, or a file changed by anyone else) DVC's own
``modify_yaml`` parses it. The document is written by DVC's own writer either way, and is
forgotten while DVC changes it (a stage that fails before the write leaves nothing to reuse).
Every other file (``dvc.yaml``, ``.dvc`` files, configuration) goes to DVC's ``modify_yaml``.
``tests/test_dvc_main.py`` checks that a ``dvc repro`` this way writes the same ``dvc.lock``,
byte for byte, as plain ``dvc``, and that an edit by another writer between two stages is kept.

If the installed DVC no longer has ``dvc.dvcfile.modify_yaml`` (the patch is written for DVC 3,
``pyproject.toml`` pins ``dvc<4``), nothing is replaced: DVC runs as it is, with a warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

#: ``{absolute path: (text written, document it was written from)}``.
_written: dict[str, tuple[str, Any]] = {}
_original: Any = None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fd:
            return fd.read()
    except FileNotFoundError:
        return None


@contextmanager
def modify_lockfile(path: Any, fs: Any = None) -> Iterator[Any]:
    """``dvc.dvcfile.modify_yaml`` (a context manager: yields the parsed document, writes it back
    when the block ends without an exception), reusing the last document written to a
    ``dvc.lock`` on the local file system when the file still holds what was written from it."""
    from dvc.dvcfile import dump_yaml

    local = fs is None or getattr(fs, "protocol", None) == "local"
    if not local or os.path.basename(os.fspath(path)) != "dvc.lock":
        with _original(path, fs=fs) as data:
            yield data
        return
    key = os.path.abspath(os.fspath(path))
    cached = _written.pop(key, None)
    text = _read(key)
    if cached is not None and text is not None and text == cached[0]:
        data = cached[1]
        yield data
        dump_yaml(path, data, fs=fs)
    else:
        with _original(path, fs=fs) as data:
            yield data
    written = _read(key)
    if written is not None:
        _written[key] = (written, data)


def install() -> bool:
    """Put :func:`modify_lockfile` in place of ``dvc.dvcfile.modify_yaml``; False (with a
    warning) when this DVC has no such function."""
    global _original
    import dvc.dvcfile

    current = getattr(dvc.dvcfile, "modify_yaml", None)
    if current is None or not hasattr(dvc.dvcfile, "dump_yaml"):
        warnings.warn("flows.dvc_main: this DVC has no dvc.dvcfile.modify_yaml; dvc.lock is parsed after every stage",
                      stacklevel=2)  # fmt: skip
        return False
    if current is not modify_lockfile:
        _original = current
        dvc.dvcfile.modify_yaml = modify_lockfile
    return True


def main(argv: list[str] | None = None) -> int:
    """Run DVC's command line with :func:`install` done; returns its exit status."""
    from dvc.cli import main as dvc_cli

    install()
    return dvc_cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
