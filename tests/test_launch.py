"""The launchers, without a cluster: shell syntax, the commands they generate for a
given environment (SLURM variables faked), the requeue on SLURM's warning signal, a
real 2-process CPU job through launch/torchrun.sh (and its restart), and the Hydra
submitit launcher configs (composed, and run with submitit's local executor)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
RECALL_SWEEP = REPO / "launch" / "recall_sweep.sh"


def sh(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIXTRAIN_RUN", "MASTER_"))}
    return subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("script", [TORCHRUN, SBATCH, RECALL_SWEEP])
def test_scripts_parse(script):
    proc = sh(["bash", "-n", str(script)])
    assert proc.returncode == 0, proc.stderr


def dry_torchrun(*args: str, **env) -> tuple[dict, list[str]]:
    proc = sh(["bash", str(TORCHRUN), "--dry-run", *args], env)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assignments = dict(w.split("=", 1) for w in words[:1])
    return assignments, words[1:]


def test_torchrun_one_node_command():
    env, cmd = dry_torchrun("--nproc", "4", "--name", "ma-1", "model=dense_125m", "layout=ma_offset", MIXTRAIN_RUN_STAMP="s1")
    assert env == {"MIXTRAIN_RUN_STAMP": "s1"}
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    i = cmd.index("-m")
    assert cmd[i : i + 3] == ["-m", "mixtrain", "train"]
    assert cmd[i + 3 :] == [
        "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=1", "run.name=ma-1", "run.resume=auto",
        "model=dense_125m", "layout=ma_offset",
    ]
    # CPU (gloo) processes, NGPUS from the environment, a stamp made up when none is
    # given, and the user's own run.resume wins.
    env, cmd = dry_torchrun("--cpu", "run.resume=null", NGPUS="3")
    assert env["MIXTRAIN_RUN_STAMP"] and "--nproc-per-node=3" in cmd
    assert "trainer=cpu_fsdp" in cmd and "trainer.devices=3" in cmd
    assert "run.resume=auto" not in cmd and cmd[-1] == "run.resume=null"


def test_torchrun_multi_node_uses_c10d_on_the_given_host():
    env, cmd = dry_torchrun("--nproc", "8", "--nnodes", "2", "--node-rank", "1", "--master", "node01:29500",
                            MIXTRAIN_RUN_STAMP="exp7")
    assert "--standalone" not in cmd
    for arg in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29500",
                "--rdzv-id=exp7", "--nproc-per-node=8", "trainer.num_nodes=2", "trainer.devices=8", "run.resume=auto"):
        assert arg in cmd, arg
    # Each node would pick its own clock stamp (and run directory): refused.
    proc = sh(["bash", str(TORCHRUN), "--dry-run", "--nnodes", "2", "--master", "node01:29500"])
    assert proc.returncode == 2 and "MIXTRAIN_RUN_STAMP" in proc.stderr


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "ma-offset",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_CPUS_PER_TASK": "12",
}


def fake_bin(tmp_path: Path, **scripts: str) -> str:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (d / name).chmod(0o755)
    return f"{d}:{os.environ['PATH']}"


def dry_sbatch(env: dict, *args: str) -> tuple[dict, list[str]]:
    proc = sh(["bash", str(SBATCH), *args], {**env, "MIXTRAIN_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return dict(l.split("=", 1) for l in lines[:-1]), shlex.split(lines[-1])


def test_slurm_template_header_and_command(tmp_path):
    header = [l for l in SBATCH.read_text().splitlines() if l.startswith("#SBATCH")]
    for opt in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--signal=B:USR1@90", "--requeue"):
        assert any(opt in l for l in header), opt

    # With scontrol (as on a cluster; faked) and without it (a fallback parse).
    path = fake_bin(tmp_path, scontrol='[[ "$1 $2" == "show hostnames" ]] && printf "gpu07\\ngpu08\\n"')
    for env in ({**SLURM_ENV, "PATH": path}, SLURM_ENV):
        exported, cmd = dry_sbatch(env, "model=dense_125m", "layout=ma_offset")
        assert exported == {"MIXTRAIN_RUN_STAMP": "4242", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
        assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8"]
        i = cmd.index("-m")
        assert cmd[i : i + 3] == ["-m", "mixtrain", "train"]
        assert cmd[i + 3 :] == [
            "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2", "run.name=ma-offset-4242", "run.resume=auto",
            "model=dense_125m", "layout=ma_offset",
        ]
    # The user's run name wins; a single node.
    _, cmd = dry_sbatch({**SLURM_ENV, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "a100-3"}, "run.name=mine")
    assert "trainer.num_nodes=1" in cmd and cmd.count("run.name=mine") == 1 and "run.name=ma-offset-4242" not in cmd
    exported, _ = dry_sbatch({**SLURM_ENV, "SLURM_JOB_NODELIST": "a100-3,a100-9"})
    assert exported["MASTER_ADDR"] == "a100-3"
    assert sh(["bash", str(SBATCH)], {"MIXTRAIN_DRY_RUN": "1"}).returncode != 0  # not in a job


def test_slurm_warning_signal_requeues_the_job(tmp_path):
    log = tmp_path / "calls.txt"
    path = fake_bin(
        tmp_path,
        scontrol=f'echo "scontrol $*" >> {log}; [[ "$1" == show ]] && echo gpu07; true',
        srun=f'echo "srun $*" >> {log}; exec sleep 30',
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "layout=ma"],
        env={**SLURM_ENV, "PATH": path, "HOME": str(tmp_path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 20
    while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # SLURM's warning, 90 s before the end
    time.sleep(0.5)
    for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(child), signal.SIGTERM)  # what SLURM does to the job's steps next
    _, err = proc.communicate(timeout=20)
    calls = log.read_text()
    assert "scontrol requeue 4242" in calls, (calls, err)
    assert "requeueing job 4242" in err


@pytest.mark.slow
def test_two_cpu_processes_through_the_launcher_and_restart(shared_cache, tmp_path):
    from helpers import base_overrides

    overrides = base_overrides(shared_cache, tmp_path, "unused", "train.max_tokens=1024", "train.save_every_steps=1")
    overrides = [o for o in overrides if not o.startswith("run.name=")]
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MIXTRAIN_RUN_STAMP": "pinned"}
    launch = ["bash", str(TORCHRUN), "--cpu", "--nproc", "2", *overrides]

    # Interrupted after one step (like a crash or preemption)...
    first = sh([*launch, "train.stop_after_steps=1"], env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    run_dir = tmp_path / "tiny-ma_offset-pinned"  # the recipe's run name with the pinned stamp
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and result["steps"] == 1
    ckpt = run_dir / "checkpoints" / "step-00000001.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # sharded by the 2 ranks

    # ...and the same command again continues it in the same directory.
    second = sh(launch, env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    assert "resuming from" in second.stdout and "step-00000001.ckpt" in second.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tiny-")] == [run_dir.name]
    # One training-loss curve over both attempts: one point per optimizer step.
    from mixtrain.report import read_metrics_csv

    steps = [s for s, _ in read_metrics_csv(run_dir / "csv" / "metrics.csv")["train/loss"]]
    assert len(steps) == 2 and steps == sorted(set(steps)), steps


def hydra_compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from mixtrain.config import RECIPES_PACKAGE, setup_hydra

    setup_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=RECIPES_PACKAGE, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_sweep_preset_composes():
    cfg = hydra_compose(["+sweep=layouts"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.layout.split(",") == ["standard", "ma", "ma_offset", "ma_pairs", "ma_endslide"]


def test_submitit_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    cfg = hydra_compose(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 2  # one task per GPU, for Lightning
    assert launcher.signal_delay_s == 90 and launcher.max_num_timeout > 0 and launcher.partition is None
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"


@pytest.mark.slow
def test_submitit_local_launcher_runs_points_in_their_own_processes(shared_cache, tmp_path):
    """The pickled job runs in a fresh process (as on SLURM): the sweep directory, the
    run directories and the failure summary must still come out right."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    from helpers import mixtrain, sweep_dir, tiny

    root = tmp_path / "runs"
    proc = mixtrain(
        ["train", "-m", "hydra/launcher=local", "layout=standard,ma_successive_1", "logger=csv",
         *tiny(shared_cache, root)],
        tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "1 sweep point(s) failed: 1-layout=ma_successive_1" in proc.stderr
    sweep = sweep_dir(root)
    assert json.loads((sweep / "0-layout=standard" / "result.json").read_text())["status"] == "completed"
    assert json.loads((sweep / "1-layout=ma_successive_1" / "result.json").read_text())["status"] == "failed"


def test_recall_sweep_deals_layouts_into_one_thread_sweeps():
    proc = sh(["bash", str(RECALL_SWEEP), "--dry-run", "--out", "o", "--jobs", "2", "--compile", "off", "optim.lr=1e-3"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("OMP_NUM_THREADS=1 mixtrain train -m experiment=recall layout=standard,ma,ma_offset "
                        "run.root=o/sweep-0 optim.lr=1e-3")
    assert lines[1].split()[5:7] == ["layout=swa,ma_endslide,ma_pairs_6", "run.root=o/sweep-1"]
    assert lines[-1] == "mixtrain compare o/sweep-*/sweeps/* --out o/compare"
    bad = sh(["bash", str(RECALL_SWEEP), "--jobs", "two"])
    assert bad.returncode == 2 and "--jobs two is not a positive whole number" in bad.stderr
    on = sh(["bash", str(RECALL_SWEEP), "--dry-run", "--jobs", "1", "--compile", "on", "optim.lr=1e-3"])
    assert on.stdout.splitlines()[0].endswith("trainer.compile=true optim.lr=1e-3")
    # auto: torch.compile only where inductor finds a C++ compiler to build its CPU kernels with
    bare = sh(["/bin/bash", str(RECALL_SWEEP), "--dry-run", "--jobs", "1", "--out", "o"], {"PATH": "/nonexistent", "CXX": ""})
    assert "trainer.compile" not in bare.stdout and "no C++ compiler found" in bare.stderr
    bad = sh(["bash", str(RECALL_SWEEP), "--compile", "maybe"])
    assert bad.returncode == 2 and "--compile maybe is not one of auto, on, off" in bad.stderr


@pytest.mark.slow
def test_recall_sweep_trains_scores_and_compares_every_layout(tmp_path):
    """launch/recall_sweep.sh end to end, tiny: two parallel sweeps, an eval per run, one compare."""
    out = tmp_path / "r"
    proc = sh(["bash", str(RECALL_SWEEP), "--out", str(out), "--jobs", "2", "--layouts", "swa,ma_offset", "--compile", "off",
               "train.max_tokens=4096", "train.val_every_steps=1", "train.val_batches=1", "train.save_every_steps=2",
               "data.recall_val_sequences=16", "trainer.progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted(r.parent for r in out.glob("sweep-*/sweeps/*/*/result.json"))
    assert len(runs) == 2 and [r.parts[-4] for r in runs] == ["sweep-0", "sweep-1"]
    for run in runs:
        rec = json.loads((run / "eval" / "recall.json").read_text())
        assert set(rec["by_length"]) == {"64", "128"} and rec["settings"]["queries"] == 16
    assert (out / "compare" / "recall.png").stat().st_size > 1000
    rows = json.loads((out / "compare" / "compare.json").read_text())["runs"]
    assert sorted(r["layout"] for r in rows) == ["ma_offset", "swa"]
    assert all(r["recall_beyond"] is not None for r in rows)
