"""A run directory and the files ``mixtrain train`` keeps in it.

    <run dir>/config.yaml        the resolved recipe (written when training starts)
    <run dir>/result.json        how the job ended and its final metrics
    <run dir>/wandb_id           the W&B run every resume of this run continues
    <run dir>/csv/metrics.csv    the CSV logger's metrics (logger=csv)
    <run dir>/wandb/             offline W&B logs (logger=wandb)
    <run dir>/eval/*.json        ``mixtrain eval`` results
    <run dir>/checkpoints/       step-N.ckpt (see mixtrain.train.checkpoint)
    <run dir>/tokenizer.json     the run's tokenizer (later stages, export, eval, generate)

:class:`RunDir` is the one place that knows these names and what makes a folder a
run directory (training, export, eval, generate and compare all ask it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from mixtrain.files import atomic_write_text


class RunDir:
    """The files of one run directory (the folder need not exist yet)."""

    # Files only a training job writes; config.yaml alone is also what an export folder
    # or Hydra's .hydra/ holds, so it counts only together with one of these.
    JOB_FILES = ("checkpoints", "result.json", "wandb_id", "csv", "wandb", "eval")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ finding one
    @classmethod
    def of_config(cls, cfg: Any) -> "RunDir":
        """The directory a composed recipe trains in: Hydra's job output directory under
        ``mixtrain train``, else ``run.root/run.name``."""
        try:
            from hydra.core.hydra_config import HydraConfig

            return cls(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not running under @hydra.main
            return cls(Path(cfg.run.root) / cfg.run.name)

    @classmethod
    def of_path(cls, path: str | os.PathLike) -> "RunDir":
        """The run directory a path belongs to: itself for a run directory or an export
        folder, ``<run>`` for ``<run>/checkpoints/step-N.ckpt``, the folder of any other
        file. Pure path logic for paths that do not exist yet (recipes resolve it early)."""
        path = Path(path)
        if path.parent.name == "checkpoints":
            return cls(path.parent.parent)
        return cls(path.parent if path.is_file() else path)

    @classmethod
    def is_run_dir(cls, path: str | os.PathLike) -> bool:
        """A folder ``mixtrain train`` made: it holds checkpoints/ or result.json, or its
        config.yaml with logs, a W&B id or eval results. Not an exported model folder
        (model.safetensors), a sharded checkpoint (.metadata) or Hydra's .hydra/."""
        p = Path(path)
        if not p.is_dir() or p.name == ".hydra":
            return False
        if (p / "model.safetensors").is_file() or (p / ".metadata").is_file():
            return False
        if (p / "checkpoints").is_dir() or (p / "result.json").is_file():
            return True
        return (p / "config.yaml").is_file() and any((p / n).exists() for n in cls.JOB_FILES)

    # ------------------------------------------------------------- its files
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_id"

    @property
    def csv_dir(self) -> Path:
        return self.path / "csv"

    @property
    def metrics_csv(self) -> Path:
        return self.csv_dir / "metrics.csv"

    @property
    def wandb_dir(self) -> Path:
        return self.path / "wandb"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def discard_if_unused(self) -> bool:
        """Remove the folder when it holds nothing but Hydra's record (``.hydra/``): a run
        refused before it wrote anything leaves nothing behind. True if removed."""
        import shutil

        try:
            entries = [p.name for p in self.path.iterdir()]
        except OSError:
            return False
        if any(name != ".hydra" for name in entries):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    # ------------------------------------------------------ reading, writing
    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_file, yaml_text)  # other ranks may be reading it

    def read_config(self) -> Optional[dict[str, Any]]:
        """The resolved recipe the run was trained with (None when unreadable)."""
        from omegaconf import OmegaConf

        try:
            cfg = OmegaConf.to_container(OmegaConf.load(self.config_file), resolve=True)
        except Exception:  # noqa: BLE001 - missing or not YAML
            return None
        return cfg if isinstance(cfg, dict) else None

    def write_result(self, result: dict[str, Any]) -> Path:
        """``result.json``: how the job ended (``status`` "completed", "stopped"
        (``train.stop_after_steps``) or "failed", with the error) and its final metrics.
        ``mixtrain compare`` and the sweep summary read it. Written atomically."""
        import time

        text = json.dumps({**result, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str)
        atomic_write_text(self.result_file, text)
        return self.result_file

    def read_result(self) -> dict[str, Any]:
        """``result.json`` as a dict ({} when missing or unreadable)."""
        try:
            data = json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def wandb_run_id(self, fresh: bool = False, write: bool = True) -> str:
        """One W&B run per run directory, continued by every resume: the id is kept in
        ``wandb_id``. A fresh start (no checkpoint to resume) opens a new run, so an
        attempt that died before its first checkpoint does not share its curves."""
        import hashlib
        import time

        path = self.wandb_id_file
        if not fresh and path.is_file():
            return path.read_text().strip()
        key = str(self.path.resolve()) + (f"@{time.time_ns()}" if path.exists() or self.wandb_dir.exists() else "")
        run_id = hashlib.sha1(key.encode()).hexdigest()[:16]
        if write:
            atomic_write_text(path, run_id + "\n")
        return run_id

    def saved_wandb_id(self) -> Optional[str]:
        """The W&B id of the training run, if it logged to W&B."""
        return self.wandb_id_file.read_text().strip() if self.wandb_id_file.is_file() else None

    def trim_csv_log(self, resume_step: int) -> None:
        """Drop the rows an abandoned attempt logged at or after the step the run
        resumes from (they are about to be logged again); all rows for a fresh start."""
        import csv
        import io

        path = self.metrics_csv
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = [r for r in reader if r.get("step") and int(r["step"]) < resume_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, out.getvalue())

    def eval_results(self) -> list[dict[str, Any]]:
        """The JSON objects of ``eval/*.json``, oldest first; unreadable files skipped."""
        out = []
        for path in sorted(self.eval_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(data)
        return out
