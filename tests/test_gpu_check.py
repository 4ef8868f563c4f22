"""`launch/gpu_check.sh` / `mixtrain bench gpu` on a machine without a GPU: the
self-check stops at once and says what is missing, every step's command is one the
real command line accepts (a typo must not cost a GPU lease), a step that hangs is
cut at its limit, the budget is kept, and the whole orchestration runs end to end
with tiny models (--smoke)."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import torch

from mixtrain import gpucheck
from mixtrain.cli import main

REPO = Path(__file__).resolve().parents[1]
STEPS = ["tests", "moe_layer", "ratio_32k", "dense_1b", "moe_mfu", "infer_32k"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_self_check_without_cuda_runs_nothing_and_says_why(tmp_path, capsys, monkeypatch):
    # only the planted module: a CPU machine may lack real GPU-side packages (triton) as well
    monkeypatch.setattr(gpucheck, "NEEDED_MODULES", {"surely_not_installed_module": "the-missing-package"})
    ran = []
    monkeypatch.setattr(gpucheck, "run_step", lambda *a, **k: ran.append(a))
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the self-check failed, nothing was run" in err
    assert "CUDA: no GPU is visible" in err
    assert "missing Python packages: the-missing-package (ModuleNotFoundError" in err
    assert ran == []
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["self_check"]["ok"] is False and result["steps"] == []
    assert len(result["self_check"]["problems"]) == 2
    assert "CUDA: no GPU is visible" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # two fresh interpreters importing the whole stack
def test_shell_script_stops_at_the_self_check_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CUDA: no GPU is visible" in proc.stderr
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"] == []
    dry = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and [line.split("]")[0][1:] for line in dry.stdout.splitlines()
                                    if line.startswith("[")] == STEPS


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_step_command_is_accepted_by_the_real_parsers(tmp_path, smoke):
    """Each `mixtrain bench ...` step parses with the CLI's own argparse, its recipe
    overrides compose and build a valid layout, and the pytest step names real files."""
    from mixtrain.cli import _register_bench
    from mixtrain.config import compose
    from mixtrain.layouts import build_layout

    parser = argparse.ArgumentParser(prog="mixtrain")
    _register_bench(parser.add_subparsers(dest="command"))
    steps = gpucheck.plan(tmp_path, smoke=smoke)
    assert [s.name for s in steps] == STEPS
    assert sum(s.timeout_s for s in steps) <= (1800 if smoke else 700)
    for step in steps:
        if step.argv[0] == "pytest":
            files = [a for a in step.argv if a.startswith("tests/")]
            assert files and all((REPO / f).is_file() for f in files)
            assert "-m" in step.argv and "gpu" in step.argv and "--junitxml" in step.argv
            continue
        assert step.argv[:2] == ["mixtrain", "bench"], step.argv
        args = parser.parse_args(step.argv[1:])
        assert Path(args.out) == tmp_path / step.name
        overrides = getattr(args, "overrides", None)
        if overrides is not None:
            cfg = compose(list(overrides))
            build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
            if getattr(args, "layouts", None):
                for name in args.layouts.split(","):
                    build_layout({"preset": name}, cfg.model.n_layers, cfg.model.sliding_window)
    if not smoke:  # the GPU test files are the ones holding GPU-only tests
        assert "tests/test_moe.py" in steps[0].argv and "tests/test_model.py" in steps[0].argv


def test_a_hanging_step_is_cut_at_its_limit_and_the_budget_is_kept(tmp_path, monkeypatch):
    hang = gpucheck.Step("hang", "sleeps", ["timeit", "-n", "1", "import time; time.sleep(60)"], 3,
                         lambda folder: [])
    rec = gpucheck.run_step(hang, tmp_path, timeout_s=3)
    assert rec["status"] == "timed out" and rec["seconds"] < 30
    assert (tmp_path / "hang" / "log.txt").is_file()

    calls = []

    def fake_runner(step, out, timeout_s):
        calls.append((step.name, timeout_s))
        return {"step": step.name, "status": "ok", "seconds": 0, "figures": []}

    clock = iter(range(0, 10_000, 100))  # every look at the clock: 100 s later
    monkeypatch.setattr(gpucheck.time, "monotonic", lambda: next(clock))
    result = gpucheck.run_check(tmp_path / "budget", budget_s=380, smoke=True, runner=fake_runner)
    statuses = [s["status"] for s in result["steps"]]
    # 380 s: steps start at 100, 200, 300 s (each given at most its own limit and what is
    # left); at 400 s nothing is left and the rest are skipped, listed.
    assert calls == [("tests", 280), ("moe_layer", 180), ("ratio_32k", 80)]  # each: min(300, what is left)
    assert statuses == ["ok"] * 3 + ["skipped (budget spent)"] * 3


def test_figures_are_read_from_each_steps_outputs(tmp_path):
    """The figures come from the files the benchmarks write (shapes as they write them)."""
    (tmp_path / "ratio").mkdir()
    rows = [{"layout": "standard", "seq_len": 32768, "step_time_s": 3.0, "speedup_vs_baseline": 1.0},
            {"layout": "ma_offset", "seq_len": 32768, "step_time_s": 1.0, "speedup_vs_baseline": 3.0}]
    (tmp_path / "ratio" / "bench_train.json").write_text(json.dumps(rows))
    figs = {f["figure"]: f for f in gpucheck._ratio_figures(tmp_path / "ratio")}
    assert figs["32768 step time, standard / ma_offset"]["value"] == 3.0
    assert figs["32768 step time, standard / ma_offset"]["target"] == "3x"
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
    assert [f["value"] for f in gpucheck._junit_figures(tmp_path / "tests")] == [3, 1, 1]


@pytest.mark.slow
def test_smoke_run_end_to_end_on_cpu(tmp_path, capsys):
    """Every step for real, tiny sizes, on this machine: statuses, one JSON and one table."""
    rc = main(["bench", "gpu", "--smoke", "--device", "cpu", "--budget", "1800", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["step"], s["status"]) for s in result["steps"]] == [(n, "ok") for n in STEPS], result["steps"]
    assert rc == 0
    figures = {f["figure"]: f for s in result["steps"] for f in s["figures"]}
    assert figures["GPU-only tests failed"]["value"] == 0
    assert figures["64 step time, standard / ma_offset"]["value"] > 0
    assert figures["dense ~1B MFU at 64 (eager)"]["value"] is None  # no peak for a CPU: not invented
    assert figures["ma_offset KV bytes/token at 96 (allocated / accounting)"]["value"] == "426.7 / 426.7"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| infer_32k | ok |" in table and "MoE layer speed / grouped matmuls alone" in table


def test_the_readme_lists_what_the_check_measures():
    """The README's "not measured yet" list and the check's steps stay in sync: every
    target the check compares against is named there, and so is every step's model."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("Not measured yet"):]
    section = section[:section.index("\n## ")]
    for target in ("45%", "35%", "3x"):
        assert f"target {target}" in section, target
    for needle in ("launch/gpu_check.sh", "pytest -m gpu", "bench moe", "model=dense_125m", "model=cla_1b",
                   "model=paper_moe model.n_layers=12", "--context 32768", "gpu_check.json", "gpu_check.md"):
        assert needle in section, needle
    steps = {s.name: " ".join(s.argv) for s in gpucheck.plan(Path("out"))}
    assert "model=cla_1b" in steps["dense_1b"] and "model=dense_125m" in steps["ratio_32k"]
    assert "model=paper_moe model.n_layers=12" in steps["moe_mfu"] and "--context 32768" in steps["infer_32k"]
