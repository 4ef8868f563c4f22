"""A new user's first hour (issue 12): nothing lost (checkpoint retention, read-only
places, no litter from refused runs), truthful and quiet output, and the bad inputs a
user meets, each answered with an error that names the key or path and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mixtrain.config import compose
from mixtrain.errors import UserError
from mixtrain.train.checkpoint import is_loadable, latest_checkpoint, list_checkpoints, retention_plan


def overrides(cache: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "model=tiny", "layout=ma_offset", "logger=csv", "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1", f"data.cache_dir={cache}", "data.embedded_max_chars=300000",
        "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_tokens=256",
        "train.max_tokens=2048", "train.val_every_steps=4", "train.val_batches=1",
        "train.save_every_steps=1", f"run.root={root}", f"run.name={name}", *extra,
    ]


def run(cache, root, name, *extra):
    from mixtrain.train.run import train

    return train(compose(overrides(cache, root, name, *extra)))


# --------------------------------------------------------------------------- retention
def test_retention_plan_never_counts_damaged_checkpoints():
    ck = [(s, Path(f"step-{s:08d}.ckpt")) for s in (2, 3, 4, 5)]
    damaged = {Path("step-00000005.ckpt")}
    ok = lambda p: p not in damaged  # noqa: E731
    # keep=2: the two newest *complete* ones (3, 4) stay, the damaged newest one too
    # (it is newer than every complete one: a later save of step 5 replaces it).
    assert retention_plan(ck, 2, ok) == [Path("step-00000002.ckpt")]
    # A damaged checkpoint older than a complete one is useless: removed.
    damaged = {Path("step-00000003.ckpt")}
    assert retention_plan(ck, 2, ok) == [Path("step-00000002.ckpt"), Path("step-00000003.ckpt")]
    # The checkpoint a run resumed from stays until a newer complete one exists.
    damaged = {Path("step-00000003.ckpt"), Path("step-00000004.ckpt"), Path("step-00000005.ckpt")}
    assert retention_plan(ck, 1, ok, protect=Path("step-00000002.ckpt")) == []
    assert retention_plan(ck, 1, lambda p: True, protect=Path("step-00000002.ckpt")) == [
        Path("step-00000002.ckpt"), Path("step-00000003.ckpt"), Path("step-00000004.ckpt")]
    # Nothing complete: nothing removed.
    assert retention_plan(ck, 1, lambda p: False) == []


def test_resume_past_a_damaged_checkpoint_keeps_the_good_ones(shared_cache, tmp_path):
    """The issue's case: the newest checkpoint is truncated, resume falls back to the
    previous good one; the rotation must then keep `keep` good checkpoints, not the
    damaged one at the expense of the one the run resumed from."""
    run(shared_cache, tmp_path, "r", "train.stop_after_steps=3", "train.keep_checkpoints=2")
    ckdir = tmp_path / "r" / "checkpoints"
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [2, 3]
    # A checkpoint of a later step, cut short (a copy that died half way).
    good3 = ckdir / "step-00000003.ckpt"
    damaged = ckdir / "step-00000007.ckpt"
    damaged.write_bytes(good3.read_bytes()[: good3.stat().st_size // 2])
    assert not is_loadable(damaged) and latest_checkpoint(tmp_path / "r") == good3

    res = run(shared_cache, tmp_path, "r", "run.resume=auto", "train.stop_after_steps=1", "train.keep_checkpoints=2")
    assert res["steps"] == 4
    good = [s for s, p in list_checkpoints(tmp_path / "r") if is_loadable(p)]
    assert good == [3, 4]  # two good ones, the one it resumed from included
    assert damaged.exists()  # newer than every good one: replaced when step 7 is saved

    res = run(shared_cache, tmp_path, "r", "run.resume=auto", "train.keep_checkpoints=2")
    assert res["steps"] == 8
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [7, 8]
    assert all(is_loadable(p) for _, p in list_checkpoints(tmp_path / "r"))
