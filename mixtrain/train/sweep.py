"""The Hydra callback ``mixtrain train`` adds to every invocation.

- Before a single run, the recipe and the places it writes are checked *before* Hydra
  makes the run directory, so a refused run leaves nothing behind (``on_run_start``).
- Before a sweep, its folder must be writable (``on_multirun_start``); each point is
  checked by its own job and keeps its record (``result.json``, status "failed").
- After a sweep, the points that failed are collected (``on_multirun_end``), whichever
  launcher ran them (in this process, or SLURM jobs via submitit), so the command exits
  non-zero naming them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[misc,assignment]


def refuse(message: str) -> None:
    """A user error before anything started: one message, exit status 2 (as ``train``)."""
    print(f"mixtrain train: error: {message}", file=sys.stderr)
    sys.exit(2)


class SweepOutcome(_HydraCallback):  # type: ignore[misc]
    """See the module docstring. ``SweepOutcome.failed`` lists the failed points of the
    last sweep, ``SweepOutcome.sweep_dir`` its folder."""

    failed: list[str] = []
    sweep_dir: Optional[str] = None

    def __init__(self) -> None:
        import time

        self.started = time.time()

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a submitit job's fresh process before Hydra resolves the job's
        # directory (``${mixtrain.stamp:}``): register the resolvers there.
        from mixtrain.config import register_resolvers

        register_resolvers()
        self.__dict__.update(state)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from mixtrain.errors import UserError
        from mixtrain.train.checks import check_places, check_recipe
        from mixtrain.train.loggers import is_first_process

        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            check_recipe(config)
            if is_first_process():
                check_places(config, run_dir)
        except UserError as e:
            refuse(str(e))
        except Exception:  # noqa: BLE001 - not a user error: the job itself meets and reports it
            pass

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from mixtrain.errors import UserError
        from mixtrain.files import check_writable

        sweep = Path(str(config.hydra.sweep.dir))
        try:
            check_writable(sweep, f"sweep directory (run.root={config.run.root})",
                           "Give a writable folder: run.root=<folder>")
        except UserError as e:
            refuse(str(e))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import json

        sweep = Path(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(sweep.rglob("result.json")):
            try:
                if path.stat().st_mtime < self.started - 1:
                    continue  # an earlier invocation's point
                res = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if res.get("status") == "failed":
                error = str(res.get("error", "")).splitlines()
                failed.append(f"{path.parent.relative_to(sweep)} ({error[0] if error else 'failed'})")
        SweepOutcome.failed, SweepOutcome.sweep_dir = failed, str(sweep)
