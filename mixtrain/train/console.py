"""What a training job prints: only what a user can act on.

- :func:`quiet_libraries` drops the noise of the libraries underneath (Lightning's
  litlogger advertisement, the ``LeafSpec`` deprecation warning that Lightning's own
  code triggers, ``weights_only`` notices about our own checkpoints).
- :func:`progress_callbacks`: on an interactive terminal a live step bar; in a log file
  (stdout not a TTY) plain lines every few steps, no escape codes, no redrawn bars.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Optional

import lightning as L

_NOISE = ("litlogger", "`weights_only` was not set")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(n in text for n in _NOISE)


def quiet_libraries() -> None:
    """Idempotent; called before the Trainer is built."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*weights_only.*", module=r"(torch|lightning)\..*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())


def interactive() -> bool:
    return sys.stdout.isatty()


class PlainProgress(L.Callback):
    """Progress for log files: one plain line every ``every`` optimizer steps (and at the
    last), ``step 50/292 (17%)  loss 3.412  val 3.551  9.8K tok/s  eta 2m10s``."""

    def __init__(self, every: int = 25) -> None:
        self.every = max(1, int(every))
        self._last_step = -1
        self._t0 = 0.0
        self._s0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = self._s0 = trainer.global_step
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # mid gradient accumulation
        self._last_step = step
        if trainer.is_global_zero and (step % self.every == 0 or step >= trainer.max_steps):
            print(self.line(trainer), flush=True)

    def line(self, trainer: L.Trainer) -> str:
        from mixtrain.report.format import human_count

        step, total = trainer.global_step, trainer.max_steps
        m = trainer.callback_metrics
        parts = [f"step {step}/{total} ({100 * step // max(1, total)}%)"]
        for key, label in (("train/loss", "loss"), ("val/loss", "val")):
            if key in m:
                parts.append(f"{label} {float(m[key]):.4g}")
        if "perf/tokens_per_s" in m:
            parts.append(f"{human_count(float(m['perf/tokens_per_s']))} tok/s")
        done, elapsed = step - self._s0, time.perf_counter() - self._t0
        if done > 0 and total > step:
            parts.append(f"eta {_duration(elapsed / done * (total - step))}")
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_callbacks(enabled: bool, steps: int) -> tuple[list[Any], bool]:
    """(callbacks, whether Lightning's own bars are on): a live bar on a terminal,
    plain lines (about 20 per run) in a log file, nothing when disabled."""
    if not enabled:
        return [], False
    if interactive():
        from mixtrain.train.callbacks import StepProgressBar

        return [StepProgressBar(refresh_rate=1)], True
    return [PlainProgress(every=max(1, steps // 20))], False


def wandb_settings(sweep: Optional[dict]) -> Any:
    """W&B prints a run-history block at every finish and warnings a user cannot act on:
    quiet for one run, silent for the points of a sweep (their summary is the sweep's)."""
    import wandb

    return wandb.Settings(silent=True) if sweep else wandb.Settings(quiet=True)
