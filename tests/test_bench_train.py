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
