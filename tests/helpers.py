"""What several test modules share: recipe overrides for tiny CPU runs, running
training in-process or the ``mixtrain`` command in a subprocess, and a cheap
synthetic vocabulary. (Test modules import from here, never from each other.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Words for cheap synthetic documents (long-QA, RULER haystacks).
WORDS = ("river stone light shadow forest ocean tower garden silver window paper engine market "
         "winter summer harbor valley candle mirror letter bridge castle meadow lantern").split()


def base_overrides(cache: Path, root: Path, name: str, *extra: str) -> list[str]:
    """A tiny ma_offset run on CPU: 6 optimizer steps of 2 micro-batches, validation
    and a checkpoint every 3 steps, CSV logs."""
    return [
        "model=tiny",
        "layout=ma_offset",
        "logger=csv",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"data.cache_dir={cache}",
        "data.embedded_max_chars=300000",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.global_batch_tokens=512",  # 2 micro-batches accumulated
        "train.max_tokens=3072",  # 6 optimizer steps
        "train.val_every_steps=3",
        "train.val_batches=2",
        "train.save_every_steps=3",
        f"run.root={root}",
        f"run.name={name}",
        *extra,
    ]


def run(cache, root, name, *extra):
    """Train in this process with :func:`base_overrides` plus ``extra``."""
    from mixtrain.config import compose
    from mixtrain.train.run import train

    return train(compose(base_overrides(cache, root, name, *extra)))


def tiny(cache: Path, root: Path) -> list[str]:
    """Overrides of a 2-step tiny run for sweeps (no layout, no run name: the sweep sets them)."""
    return [
        "model=tiny",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"data.cache_dir={cache}",
        "data.embedded_max_chars=300000",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.global_batch_tokens=512",
        "train.max_tokens=1024",  # 2 optimizer steps
        "train.val_every_steps=1",
        "train.val_batches=2",
        f"run.root={root}",
    ]


def mixtrain(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """The ``mixtrain`` command in a subprocess (one CPU thread, no pinned run stamp)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("MIXTRAIN_RUN_STAMP", None)
    return subprocess.run(
        [sys.executable, "-m", "mixtrain", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


def sweep_dir(root: Path) -> Path:
    """The one sweep directory under ``root/sweeps``."""
    (d,) = list((root / "sweeps").iterdir())
    return d
