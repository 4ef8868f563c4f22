"""`mixtrain bench train` at tiny scale on CPU: real steps, a baseline in the same
run, figures consistent with the accounting."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mixtrain.cli import main
from mixtrain.config import compose
from mixtrain.layouts import build_layout


class FakeClock:
    """A clock that only moves when a training step computes its loss: ``cost[i]`` seconds
    for the i-th configuration benched (``calls_per_config`` loss calls each)."""

    def __init__(self, costs, calls_per_config):
        self.now, self.calls, self.costs, self.per = 0.0, 0, costs, calls_per_config

    def perf_counter(self):
        return self.now

    def wrap(self, fn):
        def timed(*a, **k):
            self.now += self.costs[self.calls // self.per]
            self.calls += 1
            return fn(*a, **k)

        return timed


def test_bench_train_times_steps_against_a_different_baseline(tmp_path, capsys, monkeypatch):
    """With a clock that charges the baseline (standard) 3 s and ma_offset 1 s per step,
    the figures must be: warm-up untimed, step time 3 s / 1 s, tokens/s 128/3 and 128,
    ma_offset 3x the baseline, and MFU from FLOPs counted by hand against --peak-tflops."""
    import mixtrain.train.bench as bench
    import mixtrain.train.module as module

    clock = FakeClock([3.0, 1.0], calls_per_config=3)  # 1 warm-up + 2 timed steps
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(module, "lm_loss", clock.wrap(module.lm_loss))
    rc = main(["bench", "train", "model=tiny", "layout=ma_offset", "--seq-len", "64", "--micro-batch", "2",
               "--steps", "2", "--warmup", "1", "--activation-checkpointing", "full", "--peak-tflops", "1e-6",
               "--out", str(tmp_path)])
    assert rc == 0 and clock.calls == 6
    standard, ma_offset = json.loads((tmp_path / "bench_train.json").read_text())
    assert (standard["layout"], ma_offset["layout"]) == ("standard", "ma_offset")
    assert (standard["step_time_s"], ma_offset["step_time_s"]) == (3.0, 1.0)
    assert (standard["tokens_per_s"], ma_offset["tokens_per_s"]) == (128 / 3, 128.0)
    assert (standard["speedup_vs_baseline"], ma_offset["speedup_vs_baseline"]) == (1.0, 3.0)
    # Training FLOPs per token by hand (model=tiny, T=64): 6 x the parameters but the input
    # embedding (output head 32,768 + attention + MLP 221,184 + norms 13 x 64) + 3 x attention:
    # per layer 2 (QK, PV) x 2 x 64 x the mean keys per query: (64+1)/2 = 32.5 global,
    # (528 + 32 x 32)/64 = 24.25 sliding with W=32.
    flops = {"standard": 6 * (32768 + 73728 + 221184 + 832) + 3 * 256 * 6 * 32.5,
             "ma_offset": 6 * (32768 + 61440 + 221184 + 832) + 3 * 256 * (5 * 24.25 + 32.5)}
    for r in (standard, ma_offset):
        assert r["train_flops_per_token"] == flops[r["layout"]]
        assert r["mfu"] == pytest.approx(flops[r["layout"]] * r["tokens_per_s"] / 1e6, rel=1e-12)
    assert (standard["params_active"], ma_offset["params_active"]) == (361_280, 348_992)
    out = capsys.readouterr().out
    assert "3.00x" in out and "ma_offset" in out


def test_bench_train_runs_real_training_steps(tmp_path):
    """The bench's last loss is the one a plain training loop reaches (a second
    implementation: no activation checkpointing, cross-entropy by hand, same AdamW)."""
    import torch.nn.functional as F

    from mixtrain.model import build_model

    rc = main(["bench", "train", "model=tiny", "layout=ma_offset", "--baseline", "", "--seq-len", "32",
               "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--activation-checkpointing", "full",
               "--out", str(tmp_path)])
    assert rc == 0
    (result,) = json.loads((tmp_path / "bench_train.json").read_text())
    cfg = compose(["model=tiny", "layout=ma_offset"])
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    model = build_model(cfg.model, layout, device=torch.device("cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 512).float(), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert result["final_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert abs(result["final_loss"] - math.log(512)) > 1e-4  # not an untrained model's loss


def test_bench_moe_times_the_layer_against_the_experts_alone(tmp_path, capsys, monkeypatch):
    """Both timed functions run (forward and backward); with 2 ms for the experts alone and
    5 ms for the whole layer, the layer is at 40% of experts-only speed and the expert
    FLOPs are counted by hand: 3 matmuls of 2 x (64 tokens x top-2) x 32 x 16, x3 for
    forward and backward = 1,179,648."""
    import mixtrain.train.bench as bench

    times = iter([0.002, 0.005])

    def fake_time_per_call(fn, device, steps=1, warmup=0):
        fn()  # the benchmarked work itself must run
        return next(times)

    monkeypatch.setattr(bench, "time_per_call", fake_time_per_call)
    rc = main(["bench", "moe", "--d-model", "32", "--experts", "4", "--top-k", "2", "--hidden", "16",
               "--tokens", "64", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_moe.json").read_text())
    assert [r["what"] for r in rows] == ["experts only", "MoE layer"]
    assert [r["ms"] for r in rows] == [2.0, 5.0]
    assert [r["fraction_of_experts_only_speed"] for r in rows] == [1.0, 0.4]
    assert [r["tflops"] for r in rows] == [pytest.approx(1_179_648 / 0.002 / 1e12), pytest.approx(1_179_648 / 0.005 / 1e12)]
    assert "40.0% of experts-only speed" in capsys.readouterr().out


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
