"""Writing files so that a crash never leaves half of one: a temporary file, then
``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never
    see a half-written file; concurrent writers of the same content are harmless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique across hosts too: two nodes' containers may both run as PID 1 on a shared disk.
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)



def check_writable(path: str | os.PathLike, what: str, todo: str) -> None:
    """Refuse, before any work starts, a folder that cannot be made or written: ``path``
    (which need not exist) lies under a file, or its nearest existing folder is read-only.
    ``what`` names the setting (e.g. "run directory (run.root=runs)"), ``todo`` says what
    to do. Probes with a real temporary file, so read-only mounts and ACLs count too."""
    import tempfile

    from mixtrain.errors import UserError

    target = Path(path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(
            f"{what}: cannot create {target}, because {probe} is a file, not a folder. {todo}. Nothing was started."
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mixtrain-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "it" if probe == target else f"{probe} (the nearest existing folder)"
        raise UserError(
            f"{what}: cannot write to {target}: {where} is not writable ({e.strerror or e}). {todo}. "
            f"Nothing was started."
        ) from None
