"""Writing files so that a crash never leaves half of one: a temporary file, then
``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never
    see a half-written file; concurrent writers of the same content are harmless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_dir_of_path(path: str | os.PathLike) -> Path:
    """The run directory a path belongs to: itself for a run directory or an export
    folder, ``<run>`` for ``<run>/checkpoints/step-N.ckpt``, the folder of any other file.
    Pure path logic for paths that do not exist yet (recipes resolve it early)."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path.parent if path.is_file() else path
