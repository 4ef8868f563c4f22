"""FSDP2 across two CPU processes (gloo), launched with torchrun like a real job:
it trains the same model as one process would, writes sharded checkpoints, and a
run interrupted and resumed ends bit-for-bit where an uninterrupted one does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mixtrain.train.checkpoint import latest_checkpoint
from mixtrain.train.export import read_checkpoint
from helpers import base_overrides, run


def grad_norms(run_dir) -> list[float]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]

pytestmark = pytest.mark.slow


def torchrun(cache, root, name, *extra) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mixtrain", "train", "trainer=cpu_fsdp",
        *base_overrides(cache, root, name, *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_fsdp_two_ranks_train_save_resume(shared_cache, tmp_path):
    # The same 8 samples make each global batch: 2 ranks x 1 micro-batch of 4, or
    # 1 process x 2 accumulated micro-batches of 4. Same init (built, then sharded).
    run(shared_cache, tmp_path, "single")
    torchrun(shared_cache, tmp_path, "fsdp", "trainer.meta_init=false")
    single = read_checkpoint(latest_checkpoint(tmp_path / "single"))[0]
    ckpt = latest_checkpoint(tmp_path / "fsdp")
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # sharded, distributed checkpoint
    sharded = read_checkpoint(ckpt)[0]
    assert single.keys() == sharded.keys()
    # The gradient (its global norm, before clipping) agrees at every step...
    g1, g2 = grad_norms(tmp_path / "single"), grad_norms(tmp_path / "fsdp")
    assert len(g1) == len(g2) == 6
    torch.testing.assert_close(torch.tensor(g2), torch.tensor(g1), rtol=1e-4, atol=0)
    # ...and so do the weights after 6 AdamW steps (Adam magnifies float noise in
    # rarely-seen embedding rows, hence the absolute tolerance).
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=0, atol=5e-4, msg=k)

    # Meta-device construction, interrupted after 3 steps and resumed, against the
    # same run uninterrupted: identical weights.
    torchrun(shared_cache, tmp_path, "meta_full")
    torchrun(shared_cache, tmp_path, "meta_split", "train.stop_after_steps=3")
    torchrun(shared_cache, tmp_path, "meta_split", "run.resume=auto")
    a = read_checkpoint(latest_checkpoint(tmp_path / "meta_full"))[0]
    b = read_checkpoint(latest_checkpoint(tmp_path / "meta_split"))[0]
    assert latest_checkpoint(tmp_path / "meta_split").name == "step-00000006.ckpt"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_ranks_match_one_process(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "single", "train.max_tokens=1536")
    cmd_extra = ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "train.max_tokens=1536"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mixtrain", "train", *base_overrides(shared_cache, tmp_path, "ddp", *cmd_extra),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    torch.testing.assert_close(
        torch.tensor(grad_norms(tmp_path / "ddp")), torch.tensor(grad_norms(tmp_path / "single")), rtol=1e-4, atol=0
    )


SIGNAL_RANK_1 = '''
import os, signal, sys
from mixtrain.train.module import LMModule
real = LMModule.on_train_batch_start
def start(self, batch, batch_idx):
    real(self, batch, batch_idx)
    if os.environ["RANK"] == "1" and batch_idx == 2:  # rank 1 only, as step 3 begins
        os.kill(os.getpid(), signal.SIGTERM)
LMModule.on_train_batch_start = start
from mixtrain.cli import main
sys.exit(main())
'''


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(shared_cache, tmp_path):
    """A preemption signal may reach the ranks at different moments, or only one of them:
    the ranks agree at the step boundary, all stop after step 3 with one checkpoint (no
    hang, no rank left waiting in a collective), and the resumed run ends bit-for-bit
    where an uninterrupted one does."""
    from mixtrain.train.checkpoint import list_checkpoints

    ddp = ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "train.save_every_steps=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(script, name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script,
               "train", *base_overrides(shared_cache, tmp_path, name, *ddp, *extra)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return proc

    hook = tmp_path / "signal_rank_1.py"
    hook.write_text(SIGNAL_RANK_1)
    stopped = launch([str(hook)], "sig")
    assert "stopping after step 3" in stopped.stdout + stopped.stderr
    assert [s for s, _ in list_checkpoints(tmp_path / "sig")] == [3]
    launch(["-m", "mixtrain"], "sig", "run.resume=auto")
    launch(["-m", "mixtrain"], "full")
    a = read_checkpoint(latest_checkpoint(tmp_path / "full"))[0]
    b = read_checkpoint(latest_checkpoint(tmp_path / "sig"))[0]
    assert latest_checkpoint(tmp_path / "sig").name == "step-00000006.ckpt"
    for k in a:
        assert torch.equal(a[k], b[k]), k
