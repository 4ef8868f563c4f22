"""Sweeps and `mixtrain compare`, through the real command line on CPU: one job (run
directory, result.json, W&B run) per point, a failed point does not stop the others,
and the comparison's numbers are the runs' own (accounting, last logged losses)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mixtrain.config import compose

from helpers import mixtrain, sweep_dir, tiny

pytestmark = pytest.mark.slow


def csv_column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_cpu_sweep_of_three_layouts_then_compare(shared_cache, tmp_path, capsys):
    layouts = ["standard", "ma_offset", "ma_pairs"]
    root = tmp_path / "runs"
    proc = mixtrain(["train", "-m", f"layout={','.join(layouts)}", "logger=csv", *tiny(shared_cache, root)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep = sweep_dir(root)
    # One directory per point, named by the swept value only (shared overrides, paths
    # included, stay out of the name).
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs) == [f"{i}-layout={name}" for i, name in enumerate(layouts)]
    for i, name in enumerate(layouts):
        job = jobs[f"{i}-layout={name}"]
        assert (job / "config.yaml").is_file() and (job / "checkpoints" / "step-00000002.ckpt").is_file()
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "completed" and result["steps"] == 2
        assert result["val_loss"] == pytest.approx(csv_column(job, "val/loss")[-1])

    # An eval result written by `mixtrain eval` next to one run shows up as columns.
    (jobs["1-layout=ma_offset"] / "eval").mkdir()
    (jobs["1-layout=ma_offset"] / "eval" / "ruler.json").write_text(
        json.dumps({"scores": {"niah": 0.5, "vt": 0.25}, "average": 0.375})
    )
    (jobs["1-layout=ma_offset"] / "eval" / "broken.json").write_text("{not json")

    from mixtrain.cli import main

    assert main(["compare", str(sweep)]) == 0
    table = capsys.readouterr().out
    for name in layouts:
        assert name in table
    assert "KV B/tok@32K" in table and "val loss" in table
    for f in ("compare.csv", "compare.json", "loss_curves.png", "quality_vs_kv.png"):
        assert (sweep / f).is_file() and (sweep / f).stat().st_size > 0, f
    for png in ("loss_curves.png", "quality_vs_kv.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(sweep / "compare.csv") as f:
        rows = {r["layout"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(layouts)
    # Counted by hand for model=tiny (d 64, 6 layers, 2 KV heads of dim 16, W=32, vocab 512
    # untied, FFN 192): a stored token of a producer is 2 x 2 x 16 x 2 = 128 bytes in bf16.
    # standard: 6 global producers. ma_offset (0:s 1:s<0 2:s 3:s<2 4:s<2 5:G) and ma_pairs
    # (0:G 1:s 2:s<1 3:s 4:s<3 5:s<3): 1 global + 2 sliding producers keeping 32 of 32768
    # tokens = 128 + 2 x 128 x 32 / 32768 = 128.25. Parameters: embeddings 2 x 512 x 64,
    # per layer wq 4096 + wk 2048 + wv 2048 + wo 4096 + MLP 3 x 64 x 192 + norms 128, final
    # norm 64 = 361,280; each of the 3 consumers lacks wk and wv (4,096).
    by_hand = {"standard": (768.0, 361_280), "ma_offset": (128.25, 348_992), "ma_pairs": (128.25, 348_992)}
    for i, name in enumerate(layouts):
        job, row = jobs[f"{i}-layout={name}"], rows[name]
        kv_bytes, params = by_hand[name]
        assert float(row["kv_bytes_per_token_32k"]) == kv_bytes
        assert int(row["params_total"]) == int(row["params_active"]) == params  # dense: all active
        val = csv_column(job, "val/loss")
        assert float(row["final_val_loss"]) == val[-1] and float(row["best_val_loss"]) == min(val)
        assert float(row["final_train_loss"]) == csv_column(job, "train/loss")[-1]
        assert float(row["tokens_per_s"]) > 0
        assert row["mfu"] == ""  # no known peak on CPU: not logged, not invented
    assert float(rows["ma_offset"]["eval/niah"]) == 0.5 and float(rows["ma_offset"]["eval/average"]) == 0.375
    assert rows["standard"]["eval/average"] == ""
    # The memory ordering the layouts exist for.
    kv = {n: float(rows[n]["kv_bytes_per_token_32k"]) for n in layouts}
    assert kv["standard"] > kv["ma_pairs"] and kv["standard"] > kv["ma_offset"]

    runs = json.loads((sweep / "compare.json").read_text())["runs"]
    assert len(runs) == 3 and all(r["curves"]["val/loss"] for r in runs)

    # A list of run directories, with --out, compares the same way.
    out = tmp_path / "cmp"
    assert main(["compare", str(jobs["0-layout=standard"]), str(jobs["2-layout=ma_pairs"]), "--out", str(out)]) == 0
    with open(out / "compare.csv") as f:
        assert [r["layout"] for r in csv.DictReader(f)] == ["standard", "ma_pairs"]


def test_failed_point_does_not_stop_the_sweep(shared_cache, tmp_path):
    root = tmp_path / "runs"
    # ma_successive_1 is a 24-layer layout; the tiny model has 6 layers.
    proc = mixtrain(
        ["train", "-m", "layout=ma_successive_1,standard", "logger=csv", *tiny(shared_cache, root)], tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "sweep point #0" in proc.stderr and "24 layers" in proc.stderr
    assert "1 sweep point(s) failed: 0-layout=ma_successive_1" in proc.stderr
    sweep = sweep_dir(root)
    bad = json.loads((sweep / "0-layout=ma_successive_1" / "result.json").read_text())
    assert bad["status"] == "failed" and "24 layers" in bad["error"] and "layout=ma_successive_1" in bad["overrides"]
    good = sweep / "1-layout=standard"
    assert json.loads((good / "result.json").read_text())["status"] == "completed"
    assert (good / "checkpoints" / "step-00000002.ckpt").is_file()

    # compare lists the failed point with its error and compares the rest.
    proc = mixtrain(["compare", str(sweep), "--no-plots"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed" in proc.stdout and "24 layers" in proc.stdout


def test_wandb_sweep_gives_one_grouped_run_per_point(shared_cache, tmp_path):
    pytest.importorskip("wandb")
    from mixtrain.report import wandb_records

    root = tmp_path / "runs"
    proc = mixtrain(
        ["train", "-m", "layout=standard,ma_offset", "logger=wandb", "logger.mode=offline", *tiny(shared_cache, root)],
        tmp_path,
        WANDB_MODE="offline",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep = sweep_dir(root)
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        (log,) = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        for rec in wandb_records(log):
            if rec.WhichOneof("record_type") == "run":
                runs[job.name] = rec.run
    assert sorted(runs) == ["0-layout=standard", "1-layout=ma_offset"]
    assert len({r.run_id for r in runs.values()}) == 2  # two runs, not one merged run
    assert {r.run_group for r in runs.values()} == {sweep.name}
    for job, r in runs.items():
        assert "sweep" in r.tags and job.split("-", 1)[1] in r.tags
        assert r.display_name.endswith(f"-{job.split('-', 1)[0]}")

    # compare reads the offline W&B history when there is no CSV log.
    from mixtrain.report import compare

    recs = {r["layout"]: r for r in compare([sweep], plots=False)["records"]}
    for layout, r in recs.items():
        assert r["final_val_loss"] is not None and r["curves"]["val/loss"]
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert r["final_val_loss"] == pytest.approx(result["val_loss"])


# ----------------------------------------------------------------------------- resumed runs' logs


def resumed_run_dir(tmp_path: Path) -> Path:
    """A run directory whose config composes (for run_record), with no logs yet."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(compose(["model=tiny", "layout=ma_offset"]), run_dir / "config.yaml")
    (run_dir / "result.json").write_text(json.dumps({"status": "completed", "steps": 6}))
    return run_dir


def test_resumed_csv_log_gives_one_curve_of_the_last_rows(tmp_path):
    """metrics.csv of a run resumed at step 3: the abandoned attempt logged steps 0..5
    (with a val loss at 4 lower than anything the finished run reached), the resumed one
    logged 3..5 again. The curves are monotone in step and hold the values written last."""
    from mixtrain.report import read_metrics_csv, run_record

    run_dir = resumed_run_dir(tmp_path)
    (run_dir / "csv").mkdir()
    rows = [(s, 10.0 - s, "") for s in range(6)] + [(4, "", 0.5)]  # attempt 1
    rows += [(s, 20.0 - s, "") for s in range(3, 6)] + [(5, "", 3.0)]  # attempt 2, resumed at 3
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/loss"])
        w.writerows([0, s, tl, vl] for s, tl, vl in rows)

    curves = read_metrics_csv(run_dir / "csv" / "metrics.csv")
    assert curves["train/loss"] == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    assert curves["val/loss"] == [(5, 3.0)]  # the abandoned attempt's step-4 value is gone
    rec = run_record(run_dir)
    assert rec["final_train_loss"] == 15.0 and rec["final_val_loss"] == 3.0
    assert rec["best_val_loss"] == 3.0  # from the kept curve, not the abandoned 0.5
    assert rec["steps"] == 5


def _write_wandb_log(path: Path, history: list[dict[str, float]]) -> None:
    """An offline W&B transaction log holding a run record and these history rows
    (one full chunk per record, as W&B writes small records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = [wandb_internal_pb2.Record()]
    records[0].run.run_id = "abc"
    for row in history:
        rec = wandb_internal_pb2.Record()
        for k, v in row.items():
            item = rec.history.item.add()
            item.key, item.value_json = k, json.dumps(v)
        records.append(rec)
    out = bytearray(b":W&B\x00\x00\x01")
    for rec in records:
        data = rec.SerializeToString()
        left = 32768 - len(out) % 32768
        if left < 7 + len(data):
            out += b"\x00" * left  # start a new block (the tiny logs here never need to)
        out += struct.pack("<IHB", 0, len(data), 1) + data
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(out))


def test_resumed_wandb_run_reads_every_attempt(tmp_path):
    """A run resumed at step 2 has two W&B logs (one per attempt): both are read, oldest
    first, and the second replaces what the first logged from step 2 on."""
    pytest.importorskip("wandb")
    from mixtrain.report import read_wandb_history, run_record

    run_dir = resumed_run_dir(tmp_path)
    first = [{"trainer/global_step": s, "train/loss": 10.0 - s, "_step": s} for s in range(5)]
    first.append({"trainer/global_step": 3, "val/loss": 0.5})
    second = [{"trainer/global_step": s, "train/loss": 20.0 - s} for s in range(2, 6)]
    second.append({"trainer/global_step": 5, "val/loss": 4.0})
    # Folder names carry the start time: the resumed attempt sorts last even when its
    # file is older on disk (a copied run directory).
    _write_wandb_log(run_dir / "wandb" / "offline-run-20260101_100000-abc" / "run-abc.wandb", second)
    _write_wandb_log(run_dir / "wandb" / "offline-run-20260101_090000-abc" / "run-abc.wandb", first)

    curves = read_wandb_history(run_dir)
    assert curves["train/loss"] == [(0, 10.0), (1, 9.0), (2, 18.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    assert curves["val/loss"] == [(5, 4.0)]
    assert "_step" not in curves and "trainer/global_step" not in curves
    rec = run_record(run_dir)
    assert rec["final_val_loss"] == rec["best_val_loss"] == 4.0 and rec["final_train_loss"] == 15.0


def test_sweep_points_are_named_by_what_they_sweep():
    """Run directories of a sweep are named by the swept values only (the shared overrides
    are excluded from override_dirname); a one-point sweep by its own overrides, not ``0-``."""
    from mixtrain.cli import _sweep_overrides

    def excluded(*args):
        got = [a for a in _sweep_overrides(["-m", *args]) if a.startswith("hydra.job.config.override_dirname")]
        return got[0].split("=", 1)[1].strip("[]").replace("'", "").split(",")

    swept = excluded("experiment=recall", "layout=swa,ma", "run.root=x", "optim.lr=1e-3")
    assert "optim.lr" in swept and "run.root" in swept and "layout" not in swept
    one = excluded("experiment=recall", "layout=swa", "optim.lr=1e-3")
    assert "layout" not in one and "optim.lr" not in one and "experiment" in one
