"""Checkpoints that a crash mid-save cannot destroy.

Each checkpoint is written under a temporary name (``.tmp-step-N.ckpt``, a file on
one device or a sharded directory under FSDP) and renamed to ``step-N.ckpt`` only
once every rank has finished writing: the rename is the commit. Anything named
``.tmp-*`` is an interrupted save and is ignored (and cleaned up later), so the
newest ``step-*.ckpt`` is always complete. Older checkpoints are pruned only after a
newer one has been committed.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

_NAME = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    """The optimizer step of a committed checkpoint, from its name (None if unnamed)."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_loadable(path: Path) -> bool:
    """A cheap integrity check that reads no weights: a single-file checkpoint is a
    zip archive whose directory (written last) lists the pickled state; a sharded one
    has its distributed-checkpoint metadata and Lightning's meta file."""
    try:
        if path.is_dir():
            return (path / ".metadata").is_file() and (path / "meta.pt").is_file()
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("/data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete, loadable checkpoint of a run (older ones are fallbacks
    if the newest is damaged)."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if is_loadable(path):
            return path
        rank_zero_warn(f"checkpoint {path} is damaged (not a complete archive); falling back to an older one")
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def retention_plan(
    checkpoints: list[tuple[int, Path]], keep: int, loadable, protect: Optional[Path] = None
) -> list[Path]:
    """Which committed checkpoints to remove so that the newest ``keep`` *complete* ones
    remain. ``loadable(path)`` says whether one is complete.

    - A damaged checkpoint never counts toward ``keep``: it is removed once a newer
      complete one exists (it can never be resumed from), and kept otherwise (a later
      save of its step replaces it).
    - ``protect`` (the checkpoint this run resumed from) is removed only once a newer
      complete checkpoint exists.
    - With no complete checkpoint at all, nothing is removed."""
    keep = max(1, int(keep))
    good = [(s, p) for s, p in checkpoints if loadable(p)]
    if not good:
        return []
    newest_good = good[-1][0]
    remove = [p for s, p in good[:-keep]]
    remove += [p for s, p in checkpoints if s < newest_good and (s, p) not in good]
    if protect is not None:
        protect_step = checkpoint_step(protect)
        if protect_step is None or newest_good <= protect_step:
            remove = [p for p in remove if Path(p).resolve() != Path(protect).resolve()]
    return sorted(remove)


class AtomicCheckpoint(L.Callback):
    """Save every ``every_n_steps`` optimizer steps and at the end of training,
    keeping the newest ``keep`` complete checkpoints (see :func:`retention_plan`;
    ``resumed_from`` stays until a newer complete checkpoint exists)."""

    def __init__(
        self, run_dir: str | os.PathLike, every_n_steps: int, keep: int = 2, resumed_from: Optional[str] = None
    ) -> None:
        self.dir = checkpoint_dir(run_dir)
        self.every = max(1, int(every_n_steps))
        self.keep = max(1, int(keep))
        self.resumed_from = Path(resumed_from) if resumed_from else None
        self._last_saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in self.dir.glob(".tmp-*"):  # leftovers of an interrupted save
                _remove(p)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        step = trainer.global_step
        final = self.dir / f"step-{step:08d}.ckpt"
        tmp = self.dir / f".tmp-step-{step:08d}.ckpt"
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp)  # collective under FSDP: every rank writes its shard
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            if final.exists():
                _remove(final)
            os.replace(tmp, final)  # the commit point
            _fsync_dir(self.dir)
            if is_loadable(final):  # rotate only once the new checkpoint is known to be complete
                plan = retention_plan(list_checkpoints(self.dir.parent), self.keep, is_loadable, self.resumed_from)
                for old in plan:
                    _remove(old)
            else:
                rank_zero_warn(f"checkpoint {final} does not read back as complete; older checkpoints kept")
            rank_zero_info(f"checkpoint saved: {final}")
        trainer.strategy.barrier()
        self._last_saved_step = step
        return final


def resume_path(resume: Optional[str], run_dir: str | os.PathLike) -> Optional[str]:
    """The checkpoint a run continues from, by ``run.resume``: null/"never" (a fresh
    run; refused when the directory already holds checkpoints), "auto" (the newest
    complete one, if any) or a path (which must be a complete checkpoint)."""
    from mixtrain.errors import UserError

    existing = list_checkpoints(run_dir)
    if resume in (None, "never", "null"):
        if existing:
            raise UserError(
                f"run directory {run_dir} already holds checkpoints (newest: {existing[-1][1].name}). "
                f"Continue it with run.resume=auto, or start a new run with another run.name; nothing was changed"
            )
        return None
    if resume == "auto":
        ckpt = latest_checkpoint(run_dir)
        return str(ckpt) if ckpt else None
    if not Path(resume).exists():
        raise UserError(f"run.resume={resume!r}: no such checkpoint; give a path, 'auto' or null")
    if not is_loadable(Path(resume)):
        raise UserError(
            f"run.resume={resume!r} is not a complete checkpoint (damaged or cut short); "
            f"use run.resume=auto to take the newest complete one"
        )
    return str(resume)
