"""`mixtrain bench train` at tiny scale on CPU: real steps, a baseline in the same
run, figures consistent with the accounting."""

import json

from mixtrain import accounting
from mixtrain.cli import main
from mixtrain.config import compose
from mixtrain.layouts import build_layout


def test_bench_train_reports_against_a_baseline(tmp_path, capsys):
    rc = main(["bench", "train", "model=tiny", "layout=ma_offset", "--seq-len", "64", "--micro-batch", "2",
               "--steps", "2", "--warmup", "1", "--activation-checkpointing", "full", "--out", str(tmp_path)])
    assert rc == 0
    results = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["layout"] for r in results] == ["standard", "ma_offset"]
    assert results[0]["speedup_vs_baseline"] == 1.0
    for r in results:
        cfg = compose(r["config"].split())
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
        assert r["train_flops_per_token"] == accounting.train_flops_per_token(cfg.model, layout, 64)
        assert r["params_active"] == accounting.param_counts(cfg.model, layout).active
        assert r["tokens_per_s"] > 0 and r["tokens_per_s"] == 2 * 64 / r["step_time_s"]
        assert r["mfu"] is None  # no peak for a CPU
    out = capsys.readouterr().out
    assert "x baseline" in out and "ma_offset" in out


def test_bench_moe_times_the_layer_against_the_experts_alone(tmp_path, capsys):
    rc = main(["bench", "moe", "--d-model", "32", "--experts", "4", "--top-k", "2", "--hidden", "16",
               "--tokens", "64", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_moe.json").read_text())
    assert [r["what"] for r in rows] == ["experts only", "MoE layer"]
    assert rows[0]["fraction_of_experts_only_speed"] == 1.0
    assert all(r["ms"] > 0 for r in rows)
    assert "of experts-only speed" in capsys.readouterr().out


def test_throughput_monitor_times_steps_not_the_gaps_between_them(monkeypatch):
    """tokens/s over the last steps, from each step's first micro-batch to its optimizer
    step (validation or checkpoint time between steps is not counted, nor the first
    step after a start); MFU = FLOPs/token x tokens/s / peak."""
    from types import SimpleNamespace

    import mixtrain.train.callbacks as cb

    clock = iter([])
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(global_step=0, world_size=1, strategy=SimpleNamespace(root_device=SimpleNamespace(type="cpu")))
    logged = []
    module = SimpleNamespace(log_dict=lambda d, **k: logged.append(dict(d)))
    mon = cb.ThroughputMonitor(tokens_per_step=1000, flops_per_token=6e6, window=2)
    mon.on_train_start(trainer, module)
    mon.peak = 1e12  # as for a GPU with a known peak

    # (start of first micro-batch, end of the step) for 4 steps of 2 micro-batches each;
    # between steps: 10 s of validation or checkpointing that must not count.
    times = [(0.0, 5.0), (15.0, 16.0), (26.0, 28.0), (38.0, 42.0)]
    clock = iter([t for start, end in times for t in (start, end)])
    for step, _ in enumerate(times, start=1):
        mon.on_train_batch_start(trainer, module, None, 0)
        mon.on_train_batch_end(trainer, module, None, None, 0)  # accumulating: no step yet
        mon.on_train_batch_start(trainer, module, None, 1)
        trainer.global_step = step
        mon.on_train_batch_end(trainer, module, None, None, 1)

    # Step 1 (start-up) is skipped; then windows of the last two durations: [1], [1, 2], [2, 4].
    assert [d["perf/tokens_per_s"] for d in logged] == [1000.0, 2000 / 3, 2000 / 6]
    assert logged[-1]["perf/mfu"] == 6e6 * (2000 / 6) / 1e12
