"""The training job end to end on CPU: exact resume, crash-safe checkpoints, export,
attention-only training, W&B offline logging, and the errors a user meets."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mixtrain.config import compose
from mixtrain.errors import UserError
from mixtrain.train.checkpoint import latest_checkpoint, list_checkpoints
from mixtrain.train.export import export, load_model, read_checkpoint

from helpers import run


def losses(run_dir: Path) -> dict[int, float]:
    """Per optimizer step training loss from the CSV log."""
    out = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def train_rows(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def test_resume_reproduces_uninterrupted_run_bitwise(shared_cache, tmp_path):
    full = run(shared_cache, tmp_path, "full")
    assert full["steps"] == 6

    part = run(shared_cache, tmp_path, "split", "train.stop_after_steps=3")
    assert part["steps"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [3]
    # A time-sliced job repeats the same command: each invocation does 2 more steps.
    more = run(shared_cache, tmp_path, "split", "train.stop_after_steps=2", "run.resume=auto")
    assert more["steps"] == 5
    rest = run(shared_cache, tmp_path, "split", "run.resume=auto")
    assert rest["steps"] == 6

    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(a) >= 6 and a == b  # the same loss at every step, bit for bit
    assert len(train_rows(tmp_path / "split")) == 6  # one row per step across the three invocations
    wa = weights(latest_checkpoint(tmp_path / "full"))
    wb = weights(latest_checkpoint(tmp_path / "split"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The data position travelled with the checkpoint.
    ckpt = torch.load(latest_checkpoint(tmp_path / "split"), weights_only=False)
    dm_state = next(v for k, v in ckpt.items() if "DataModule" in k)
    assert dm_state["sampler"]["consumed"] == 6 * 2 * 4


def test_existing_run_directory_is_refused_and_kept(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "once", "train.max_tokens=1024", "train.save_every_steps=1")
    before = {p.name: p.stat().st_mtime_ns for _, p in list_checkpoints(tmp_path / "once")}
    with pytest.raises(UserError, match=r"already holds checkpoints.*run\.resume=auto.*another run\.name"):
        run(shared_cache, tmp_path, "once", "train.max_tokens=1024")
    after = {p.name: p.stat().st_mtime_ns for _, p in list_checkpoints(tmp_path / "once")}
    assert before == after


def test_crash_mid_save_leaves_last_good_checkpoint(shared_cache, tmp_path, monkeypatch):
    import lightning as L

    real_save = L.Trainer.save_checkpoint

    def crashing_save(self, filepath, *a, **k):
        if self.global_step >= 4:
            Path(filepath).write_bytes(b"half a checkpoint")  # the process dies mid-write
            raise KeyboardInterrupt("killed while saving")
        return real_save(self, filepath, *a, **k)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", crashing_save)
    with pytest.raises(BaseException):
        run(shared_cache, tmp_path, "crash", "train.save_every_steps=2")
    ckpts = list_checkpoints(tmp_path / "crash")
    assert [s for s, _ in ckpts] == [2]
    assert (tmp_path / "crash" / "checkpoints" / ".tmp-step-00000004.ckpt").exists()
    assert latest_checkpoint(tmp_path / "crash") == ckpts[0][1]

    # A damaged newest checkpoint is skipped in favour of the previous good one.
    bad = tmp_path / "crash" / "checkpoints" / "step-00000009.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert latest_checkpoint(tmp_path / "crash") == ckpts[0][1]
    with pytest.raises(UserError, match="is not a complete checkpoint"):
        run(shared_cache, tmp_path, "crash", f"run.resume={bad}")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", real_save)
    bad.unlink()
    assert train_rows(tmp_path / "crash") == [0, 1, 2]  # logged before the crash while saving step 4
    resumed = run(shared_cache, tmp_path, "crash", "train.save_every_steps=2", "run.resume=auto")
    assert resumed["steps"] == 6
    # The abandoned attempt's row past the checkpoint (step index 2) was replaced, not duplicated.
    assert train_rows(tmp_path / "crash") == [0, 1, 2, 3, 4, 5]
    assert not list((tmp_path / "crash" / "checkpoints").glob(".tmp-*"))


def test_export_loads_on_one_device_with_identical_logits(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "exp", "train.max_tokens=1024")
    out = export(tmp_path / "exp", tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert (out / "tokenizer.json").is_file()  # generation needs no data cache
    model, cfg = load_model(out)
    ref, _ = load_model(tmp_path / "exp")  # straight from the checkpoint
    x = torch.randint(0, cfg.model.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    assert cfg.layout.preset == "ma_offset"


def test_attention_only_training_freezes_the_rest(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "stage1", "train.max_tokens=1024")
    start = weights(latest_checkpoint(tmp_path / "stage1"))
    run(
        shared_cache,
        tmp_path,
        "stage2",
        "train.max_tokens=1024",
        "train.trainable=attention",
        f"train.init_from={tmp_path / 'stage1'}",
        "model.rope_theta=80000",
    )
    end = weights(latest_checkpoint(tmp_path / "stage2"))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed, "attention weights should train"
    assert all(".attn." in k for k in changed), sorted(changed)
    assert any(k.endswith("attn.wq.weight") for k in changed)


def test_wandb_offline_run_holds_the_metrics(shared_cache, tmp_path):
    pytest.importorskip("wandb")
    from mixtrain.report import wandb_records  # the reader `mixtrain compare` uses

    run(shared_cache, tmp_path, "wb", "logger=wandb", "logger.mode=offline", "train.max_tokens=2048")
    files = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config, summary = set(), {}, {}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
        elif kind == "config":
            config.update({item.key: item.value_json for item in rec.config.update})
        elif kind == "run":
            config.update({item.key: item.value_json for item in rec.run.config.update})
        elif kind == "summary":
            summary.update({item.key: item.value_json for item in rec.summary.update})
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "val/loss"):
        assert key in history, (key, sorted(history))
    assert "model" in config and "tiny" in config["model"]
    assert "kv_bytes_per_token_32k" in summary


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.seq_len=512"], r"train\.seq_len=512 is longer than the model's model\.max_seq_len=256"),
        (["train.global_batch_tokens=1000"], r"train\.global_batch_tokens=1000 is not a multiple of .* = 256"),
        (["train.max_tokens=100"], r"train\.max_tokens=100 is less than one optimizer step"),
        (["layout=ma_successive_1"], r"layout: .*24 layers"),
        (["data=files", "data.paths=[/no/such/file.txt]"], r"/no/such/file\.txt"),
        (["train.trainable=mlp"], r"train\.trainable='mlp' is not known; use one of: all, attention"),
        (["trainer.activation_checkpointing=most"], r"trainer\.activation_checkpointing='most' is not known"),
        (["model.n_kv_heads=3"], r"model\.n_heads=4 must be a multiple of model\.n_kv_heads=3"),
        (["model.attn_impl=fast"], r"model\.attn_impl='fast' is not known"),
        (["data.kind=longqa", "data.qa_generator=mystery"], r"data\.qa_generator='mystery' is not known"),
        (["data.kind=longqa", "data.qa_source=jsonl"], r"data\.qa_source=jsonl needs data\.qa_path"),
    ],
)
def test_bad_input_gets_a_clear_error(shared_cache, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        run(shared_cache, tmp_path, "bad", *extra)
    assert not list_checkpoints(tmp_path / "bad")


def test_unknown_override_names_the_key():
    with pytest.raises(UserError, match="Key 'd_modle' not in 'ModelConfig'"):
        compose(["model.d_modle=3"])
    with pytest.raises(UserError, match="Value 'six' of type 'str' could not be converted to Integer"):
        compose(["model.n_layers=six"])


def test_sigterm_mid_step_stops_at_the_step_boundary_with_a_checkpoint(shared_cache, tmp_path, monkeypatch):
    """A preemption signal arriving mid gradient accumulation: the step finishes, a
    checkpoint is written, and the resumed run ends exactly where an uninterrupted one does."""
    import os
    import signal

    from mixtrain.train.module import LMModule

    run(shared_cache, tmp_path, "full")
    real = LMModule.on_train_batch_start

    def start_and_get_killed(self, batch, batch_idx):
        real(self, batch, batch_idx)
        if batch_idx == 4 and self.trainer.global_step == 2:  # first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LMModule, "on_train_batch_start", start_and_get_killed)
    before = signal.getsignal(signal.SIGTERM)
    stopped = run(shared_cache, tmp_path, "killed", "train.save_every_steps=100")
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back
    assert stopped["steps"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [3]
    monkeypatch.setattr(LMModule, "on_train_batch_start", real)
    run(shared_cache, tmp_path, "killed", "train.save_every_steps=100", "run.resume=auto")
    wa = weights(latest_checkpoint(tmp_path / "full"))
    wb = weights(latest_checkpoint(tmp_path / "killed"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_init_from_a_different_layout_is_refused(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "base", "train.max_tokens=1024")
    with pytest.raises(UserError, match=r"holds a different model: layout: ma_offset there, ma_pairs here"):
        run(shared_cache, tmp_path, "next", "layout=ma_pairs", "train.max_tokens=1024",
            f"train.init_from={tmp_path / 'base'}")
    with pytest.raises(UserError, match=r"model\.d_model: 64 there, 96 here"):
        run(shared_cache, tmp_path, "next2", "model.d_model=96", "train.max_tokens=1024",
            f"train.init_from={tmp_path / 'base'}")


def test_train_loss_is_the_token_weighted_mean_over_the_micro_batches_of_a_step():
    """The logged step loss is sum(CE over every supervised token of the step) / their
    number, not the mean of the micro-batches' means: with 3 supervised tokens in one
    micro-batch and 32 in the other the two differ, and only the first is accepted."""
    import torch.nn.functional as F

    from mixtrain.layouts import build_layout
    from mixtrain.train.module import LMModule

    cfg = compose(["model=tiny", "layout=ma_offset"])
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    module = LMModule(cfg, layout, total_steps=10)
    module.configure_model()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    g = torch.Generator().manual_seed(0)
    batches = []
    for n_supervised in (3, 32):
        labels = torch.randint(0, 512, (2, 16), generator=g)
        labels.view(-1)[n_supervised:] = -100
        batches.append({"input_ids": torch.randint(0, 512, (2, 16), generator=g), "labels": labels})
    for i, b in enumerate(batches):
        module.training_step(b, i)
    module._log_step_metrics()
    # Reference: the model's logits, cross-entropy summed token by token in float64.
    sums, counts, means = [], [], []
    with torch.no_grad():
        for b in batches:
            logits = module.model(b["input_ids"]).logits.double().reshape(-1, 512)
            labels = b["labels"].reshape(-1)
            keep = labels != -100
            per_token = F.cross_entropy(logits[keep], labels[keep], reduction="none")
            sums.append(float(per_token.sum()))
            counts.append(int(keep.sum()))
            means.append(float(per_token.mean()))
    assert counts == [3, 32]
    token_weighted = sum(sums) / sum(counts)
    mean_of_means = sum(means) / 2
    assert abs(token_weighted - mean_of_means) > 1e-3  # the case tells the two apart
    assert logged["train/loss"] == pytest.approx(token_weighted, rel=1e-5, abs=0)
    assert logged["train/loss"] != pytest.approx(mean_of_means, rel=1e-4)


def test_validation_loss_is_weighted_by_supervised_tokens():
    """Batches supervising different numbers of tokens (the long-QA stage) count by tokens."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from mixtrain.layouts import build_layout
    from mixtrain.train.module import LMModule

    cfg = compose(["model=tiny", "layout=ma_offset"])
    module = LMModule(cfg, build_layout(cfg.layout, 6, 32), total_steps=10)
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    g = torch.Generator().manual_seed(1)
    batches = []
    for n_supervised in (2, 30):
        labels = torch.randint(0, 512, (2, 16), generator=g)
        labels.view(-1)[n_supervised:] = -100
        batches.append({"input_ids": torch.randint(0, 512, (2, 16), generator=g), "labels": labels})
    module.on_validation_epoch_start()
    for i, b in enumerate(batches):
        module.validation_step(b, i)
    module.on_validation_epoch_end()
    with torch.no_grad():
        logits = torch.cat([module.model(b["input_ids"]).logits for b in batches]).flatten(0, 1)
        labels = torch.cat([b["labels"] for b in batches]).flatten()
        expected = F.cross_entropy(logits, labels, ignore_index=-100)  # over all 32 supervised tokens
    assert logged["val/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_progress_bar_counts_optimizer_steps(shared_cache, tmp_path, capsys, monkeypatch):
    """With 2 micro-batches per step the bar still runs 0..6 of 6 steps (Lightning's own
    counts micro-batches against a total of steps: 12 of 6), and a resumed run's bar
    starts at the step it resumes from."""
    import re

    monkeypatch.setattr("mixtrain.train.console.interactive", lambda: True)  # the bar of a terminal

    run(shared_cache, tmp_path, "bar", "trainer.progress_bar=true", "train.stop_after_steps=3")
    run(shared_cache, tmp_path, "bar", "trainer.progress_bar=true", "run.resume=auto")
    out = capsys.readouterr()
    err = (out.err + out.out).replace("\r", "\n")
    counts = [(int(a), int(b)) for a, b in re.findall(r"^step:.*?\| *(\d+)/(\d+) ", err, re.M)]
    assert counts and all(total == 6 and 0 <= n <= 6 for n, total in counts), counts
    assert (6, 6) in counts and (3, 6) in counts  # the resumed attempt starts at step 3


def test_resume_with_another_model_or_layout_is_refused(shared_cache, tmp_path):
    run(shared_cache, tmp_path, "r", "train.max_tokens=1024")
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"^run .*/r was trained with a different model than this command asks for: "
                       r"layout: ma_offset there, standard here \(different layer kinds or KV sharing\)\. "
                       r"To continue it \(step-00000002\.ckpt\) give the model and layout of .*/r/config\.yaml"):
        run(shared_cache, tmp_path, "r", "layout=standard", "run.resume=auto", "train.max_tokens=2048")
    with pytest.raises(UserError, match=r"model\.d_model: 64 there, 96 here"):
        run(shared_cache, tmp_path, "r", "model.d_model=96", "run.resume=auto", "train.max_tokens=2048")
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before  # nothing was changed
    run(shared_cache, tmp_path, "r", "run.resume=auto", "train.max_tokens=2048", "model.attn_impl=sdpa")  # the kernel may change


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusals")
def test_gpu_only_kernels_are_refused_on_cpu_before_anything_is_made(shared_cache, tmp_path):
    with pytest.raises(UserError, match=r"^model\.attn_impl=flex trains on CUDA only .* use model\.attn_impl=sdpa"):
        run(shared_cache, tmp_path, "flex", "model.attn_impl=flex")
    with pytest.raises(UserError, match=r"^no GPU is visible, and megablocks runs on CUDA only\. .*model\.moe\.impl=native"):
        run(shared_cache, tmp_path, "mb", "model=tiny_moe", "model.moe.impl=megablocks")
    assert not (tmp_path / "flex").exists() and not (tmp_path / "mb").exists()


def test_lr_schedules_warmup_cosine_and_warmup_stable_decay():
    """The multiplier of the peak lr at each step: cosine (the default) and wsd, by hand."""
    from mixtrain.train.module import lr_lambda

    # 100 steps, 10 of warmup, down to 0.1.
    assert [lr_lambda(s, 100, 10, 0.1) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_lambda(55, 100, 10, 0.1) == pytest.approx(0.55)  # cosine halfway: (1 + 0.1) / 2
    assert lr_lambda(100, 100, 10, 0.1) == pytest.approx(0.1)
    wsd = [lr_lambda(s, 100, 10, 0.1, "wsd", 0.2) for s in (9, 10, 50, 80, 90, 100, 120)]
    assert wsd == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert compose(["optim.schedule=wsd"]).optim.schedule == "wsd"
    with pytest.raises(UserError, match=r"optim\.schedule.*cosine.*wsd"):
        compose(["optim.schedule=linear"])
