"""Checkpoints of a run folder: ``last.pt`` and the one before it, ``prev.pt``.

Writing (:meth:`CheckpointStore.save`): the new checkpoint goes to a temporary file beside
``last.pt`` (``sparse_core.artifacts.atomic_path``); only when it is complete does the current
``last.pt`` become ``prev.pt`` and the new file ``last.pt``. A crash at any instant leaves
complete files under final names: at worst ``last.pt`` is missing and ``prev.pt`` (one epoch
older) is the newest, and a resumed run, being deterministic, still ends with the same weights.

Reading (:meth:`CheckpointStore.load`): ``last.pt``, else ``prev.pt``. A file that cannot be
used (truncated or not a torch file, pickled code refused by ``weights_only``, another schema
version, a state dict of another model) is reported by path and reason, moved aside to
``<name>.bad`` so it can never be rotated over the good ``prev.pt``, and the next candidate is
tried. A checkpoint of another configuration (fingerprint) is not an error: it is ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from sparse_core.artifacts import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class StaleCheckpoint(Exception):
    """The checkpoint belongs to another configuration (not a fault)."""


class CheckpointStore:
    """``last.pt`` / ``prev.pt`` of ``run_dir``."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.last = self.dir / "last.pt"
        self.prev = self.dir / "prev.pt"

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` (with ``version``) as the new ``last.pt``; the old one becomes ``prev.pt``."""
        tmp = self.dir / ".last.pt.next"
        save_checkpoint({"version": CHECKPOINT_VERSION, **state}, tmp)  # complete before anything moves
        if self.last.exists():
            os.replace(self.last, self.prev)
        os.replace(tmp, self.last)
        return self.last

    def candidates(self) -> list[Path]:
        return [p for p in (self.last, self.prev) if p.is_file()]

    def read(self, path: Path, fingerprint: str) -> dict[str, Any]:
        """The checkpoint at ``path`` if it is usable for ``fingerprint``.

        Raises:
            StaleCheckpoint: it belongs to another configuration.
            Exception: any other reason it cannot be used (the message says why).
        """
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
            found = ckpt.get("version") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"checkpoint schema version {found!r}, expected {CHECKPOINT_VERSION}")
        if ckpt.get("fingerprint") != fingerprint:
            raise StaleCheckpoint(f"{path}: written for another configuration")
        return ckpt

    def _quarantine(self, path: Path, reason: str) -> None:
        bad = path.with_name(path.name + ".bad")
        log.warning("%s: cannot resume from it (%s); moved to %s, trying an older checkpoint", path, reason, bad.name)
        os.replace(path, bad)

    def resumable(self, fingerprint: str) -> bool:
        """True when some checkpoint would be resumed (files are only read, never moved)."""
        for path in self.candidates():
            try:
                self.read(path, fingerprint)
                return True
            except Exception:  # noqa: BLE001 - unusable: look further
                continue
        return False

    def load(self, fingerprint: str, apply: Callable[[dict[str, Any]], None], restore: Callable[[], None]) -> dict[str, Any] | None:
        """The newest usable checkpoint, after ``apply(ckpt)`` succeeded on it; ``None`` if none.

        ``apply`` loads the checkpoint into the model, optimizer and method; if it fails half-way
        (e.g. a state dict of another model), ``restore()`` puts the initial state back before
        the next candidate is tried, so a failed attempt never leaves a half-loaded model.
        """
        for path in self.candidates():
            try:
                ckpt = self.read(path, fingerprint)
                apply(ckpt)
                return ckpt
            except StaleCheckpoint:
                continue
            except Exception as exc:  # noqa: BLE001 - reported by path and reason, then skipped
                restore()
                self._quarantine(path, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400])
        return None
