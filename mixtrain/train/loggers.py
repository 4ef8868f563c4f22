"""The training logger (``logger.kind``: wandb, csv or none) and the W&B plumbing
shared with ``mixtrain eval``: the offline/online choice, one W&B run per run
directory continued by every resume, sweep points grouped and tagged, and a finish
that waits until the offline log is complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

from mixtrain.errors import UserError
from mixtrain.rundir import RunDir


def is_first_process() -> bool:
    """Global rank 0, known before the Trainer exists (torchrun, SLURM, Lightning's launcher)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return rank == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def make_logger(cfg: DictConfig, run: RunDir, resolved: dict[str, Any], resume_step: Optional[int] = None):
    """The configured logger. ``resume_step``: the optimizer step the run resumes
    from (None for a fresh start): logs of an abandoned attempt past it are dropped,
    and a fresh start in a used directory opens a new W&B run."""
    kind = cfg.logger.kind
    if is_first_process():
        run.trim_csv_log(resume_step or 0)
    if kind == "none":
        return False
    if kind == "csv":
        return AppendingCSVLogger(save_dir=str(run.path), name=run.csv_dir.name, version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        from mixtrain.train.console import wandb_settings

        mode = cfg.logger.mode
        if mode == "auto":
            mode = wandb_mode()
        group, tags, name = cfg.logger.group, list(cfg.logger.tags), cfg.run.name
        sweep = sweep_point()
        if sweep:  # one W&B run per sweep point, grouped by the sweep, tagged by its values
            group = group or sweep["group"]
            tags = list(dict.fromkeys([*tags, "sweep", *sweep["tags"]]))
            name = f"{name}-{sweep['num']}"
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=group,
            tags=[t[:64] for t in tags] or None,  # W&B limits a tag to 64 characters
            name=name,
            id=run.wandb_run_id(fresh=resume_step is None, write=is_first_process()),
            save_dir=str(run.path),
            mode=mode,
            config=resolved,
            resume="allow",
            settings=wandb_settings(sweep),
        )
    raise UserError(f"logger.kind={kind!r} is not known; use wandb, csv or none")


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run appends to it.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (rows are appended; the rows of an
    abandoned attempt past the resume step are trimmed first, see RunDir.trim_csv_log)."""

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when an API key is configured (environment or
    ``~/.netrc``), offline otherwise (the run syncs later with ``wandb sync``)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def finish_wandb() -> None:
    """Finish the active W&B run and wait until its log is complete on disk.

    ``wandb.finish()`` only informs the W&B service that the run is done; the service
    writes the end of the offline log afterwards. Tearing the service down waits for
    that, so code that reads the log next (``mixtrain compare``, a following
    ``mixtrain eval --wandb`` in the same process) sees every record. The next
    ``wandb.init`` starts a fresh service."""
    import wandb

    wandb.finish()
    wandb.teardown()


def sweep_point() -> Optional[dict[str, Any]]:
    """Under ``mixtrain train -m``: the sweep (its directory name, the W&B group), this
    job's number and its swept values (``layout=ma_offset``, the W&B tags)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    item_sep = hc.job.config.override_dirname.item_sep
    pieces = [p for p in str(hc.job.override_dirname).split(item_sep) if p]
    return {"group": Path(str(hc.sweep.dir)).name, "num": int(hc.job.num), "tags": pieces}
