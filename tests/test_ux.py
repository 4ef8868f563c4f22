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


# --------------------------------------------------------------------- no litter
def mixtrain_cli(args: list[str], cwd: Path) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MIXTRAIN_RUN_STAMP", None)
    return subprocess.run([sys.executable, "-m", "mixtrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer.json with more ids than a model.vocab_size=260 has rows."""
    from mixtrain.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(["the quick brown fox jumps over the lazy dog " * 50] * 20, 300).save(path)
    return path


@pytest.mark.parametrize("bad, message", [
    (["data.val_fraction=1.5"], r"data\.val_fraction=1\.5 must be in \[0, 1\)"),
    (["optim.lr=-1"], r"optim\.lr=-1.* must be positive"),
    (["trainer.devices=abc"], r"trainer\.devices='abc' is not a device count"),
    (["model.vocab_size=260", "data.tokenizer=<TOK>"], r"needs \d+ embedding rows .* model's vocab_size is 260"),
])
def test_a_refused_run_leaves_nothing_behind(shared_cache, tmp_path, big_tokenizer, bad, message):
    import re

    root = tmp_path / "runs"
    bad = [b.replace("<TOK>", str(big_tokenizer)) for b in bad]
    res = mixtrain_cli(["train", "model=tiny", "logger=csv", f"data.cache_dir={shared_cache}", f"run.root={root}", *bad],
                       tmp_path)
    assert res.returncode == 2, res.stderr
    assert re.search(message, res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    assert not root.exists()  # no run folder, no failed result.json for `mixtrain compare` to list


def test_a_sweep_keeps_its_record_of_refused_points(shared_cache, tmp_path):
    import json

    root = tmp_path / "runs"
    res = mixtrain_cli(["train", "-m", "model=tiny", "logger=csv", f"data.cache_dir={shared_cache}",
                        f"run.root={root}", "optim.lr=-1,-2"], tmp_path)
    assert res.returncode == 1, res.stderr
    results = sorted(root.glob("sweeps/*/*/result.json"))
    assert len(results) == 2
    for r in results:
        rec = json.loads(r.read_text())
        assert rec["status"] == "failed" and "must be positive" in rec["error"]


# ------------------------------------------------------------- read-only places
def test_run_root_under_a_file_is_named_before_anything_starts(shared_cache, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    res = mixtrain_cli(["train", "model=tiny", "logger=csv", f"data.cache_dir={shared_cache}",
                        f"run.root={blocker}/runs"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{blocker} is a file, not a folder" in res.stderr and "run.root=<folder>" in res.stderr


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only as a read-only mount would (root ignores chmod): every
    file creation under them fails with EACCES."""
    import errno
    import tempfile

    places: list[Path] = []
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and any(Path(dir) == p or p in Path(dir).parents for p in places):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return places


@pytest.fixture(scope="module")
def trained(shared_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run(shared_cache, root, "t", "train.max_tokens=768", "train.save_every_steps=2")
    return root / "t"


def test_read_only_places_get_one_paragraph_before_any_work(shared_cache, tmp_path, trained, read_only, capsys):
    from mixtrain.cli import main
    from mixtrain.train.export import export

    # Resuming a run whose folder is read-only.
    read_only.append(trained)
    before = sorted(p.name for p in trained.rglob("*"))
    with pytest.raises(UserError, match=rf"cannot write to {trained}: it is not writable .*chmod u\+w"):
        run(shared_cache, trained.parent, "t", "train.max_tokens=1024", "run.resume=auto")
    assert sorted(p.name for p in trained.rglob("*")) == before
    # A read-only run.root: named, and no folder made.
    ro_root = tmp_path / "ro"
    ro_root.mkdir()
    read_only.append(ro_root)
    with pytest.raises(UserError, match=rf"run directory \(run\.root={ro_root}\): cannot write to {ro_root}/new: "
                                        rf"{ro_root} \(the nearest existing folder\) is not writable"):
        run(shared_cache, ro_root, "new")
    assert list(ro_root.iterdir()) == []
    # A data cache under a file.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(UserError, match=rf"data\.cache_dir={blocker}/cache\): cannot create .* {blocker} is a file.*"
                                        r"MIXTRAIN_CACHE"):
        run(shared_cache, tmp_path, "c", f"data.cache_dir={blocker}/cache")
    assert not (tmp_path / "c").exists()
    # Export and eval into a read-only folder.
    with pytest.raises(UserError, match=rf"export folder \(--out\): cannot write to {ro_root}/exp.*--out"):
        export(trained, ro_root / "exp")
    assert main(["eval", "--model", str(trained), "--tasks", "niah_single_1", "--lengths", "64",
                 "--out", str(ro_root / "ev")]) == 2
    assert f"eval output folder (--out): cannot write to {ro_root}/ev" in capsys.readouterr().err
    assert list(ro_root.iterdir()) == []


def test_exported_weights_follow_the_umask(trained, tmp_path):
    import os

    from mixtrain.train.export import export

    old = os.umask(0o022)
    try:
        out = export(trained, tmp_path / "exp")
    finally:
        os.umask(old)
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == oct(0o644)


# ------------------------------------------------------------ choices as types
def test_a_choice_is_refused_at_compose_time_with_the_values():
    from omegaconf import OmegaConf

    for override, message in [
        ("train.trainable=mlp", "train.trainable='mlp' is not known; use one of: all, attention"),
        ("trainer.strategy=deepspeed", "trainer.strategy='deepspeed' is not known; use one of: auto, ddp, fsdp"),
        ("logger.kind=tensorboard", "logger.kind='tensorboard' is not known; use one of: wandb, csv, none"),
        ("data.source=s3", "data.source='s3' is not known; use one of: embedded, files, hub"),
        ("model.attn_impl=fast", "model.attn_impl='fast' is not known; use one of: auto, sdpa, flex"),
    ]:
        with pytest.raises(UserError) as e:
            compose([override])
        assert str(e.value) == message
    cfg = compose(["logger=csv", "model=paper_moe"])
    # A choice reads as its string everywhere: comparisons, messages, YAML, containers.
    assert cfg.logger.kind == "csv" and f"{cfg.logger.kind}" == "csv" and repr(cfg.model.moe.impl) == "'native'"
    assert "kind: csv" in OmegaConf.to_yaml(cfg.logger)
    assert type(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["logger"]["kind"]) is str


@pytest.mark.parametrize("chunk, seq_len", [(8, 128), (100, 128)])
def test_early_and_late_checks_of_qa_chunk_tokens_agree(shared_cache, tmp_path, chunk, seq_len):
    """data.qa_chunk_tokens=8 passed the early check and failed after the run directory
    existed: now refused up front with the data builder's own words, nothing made."""
    from mixtrain.train.checks import check_recipe

    over = overrides(shared_cache, tmp_path, "qa", "data.kind=longqa", f"data.qa_chunk_tokens={chunk}",
                     f"train.seq_len={seq_len}", "model.max_seq_len=256")
    with pytest.raises(UserError) as early:
        check_recipe(compose(over))
    assert not (tmp_path / "qa").exists()
    # The late check (the long-QA builder, after the data is loaded) says the same.
    from mixtrain.data import longqa
    from mixtrain.data.pretrain import load_tokenizer

    cfg = compose(over)
    with pytest.raises(UserError) as late:
        longqa.build(cfg.data, load_tokenizer(cfg.data, cfg.model.vocab_size), seq_len, tmp_path / "late")
    assert str(early.value) == str(late.value)


# ------------------------------------------------------------- truthful output
def test_result_json_holds_the_final_train_loss_and_the_step_time_spread(trained):
    import csv
    import json

    res = json.loads((trained / "result.json").read_text())
    with open(trained / "csv" / "metrics.csv") as f:
        logged = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert res["train_loss"] is not None and res["train_loss"] == pytest.approx(logged[-1], rel=1e-6)
    speed = res["throughput"]
    assert speed["steps_timed"] == 2  # 3 steps, the first (warm-up) not timed
    assert speed["step_time_min_s"] <= speed["step_time_median_s"] <= speed["step_time_max_s"]
    assert speed["tokens_per_s_median"] == pytest.approx(256 / speed["step_time_median_s"])
    assert speed["load_avg_1m_start"] is not None and speed["cpu_count"] >= 1


def test_compare_marks_throughput_of_separate_runs_as_not_like_for_like(shared_cache, trained, tmp_path):
    from mixtrain.report import compare

    run(shared_cache, tmp_path, "other", "train.max_tokens=768", "layout=standard")
    out = compare([trained, tmp_path / "other"], out=tmp_path / "cmp", plots=False)
    table = out["table"]
    assert "tokens/s*" in table and "not like-for-like" in table and "mixtrain bench train" in table
    for name in ("t", "other"):
        line = next(l for l in table.splitlines() if l.startswith(f"  {name}: step "))
        assert "s median (" in line and "load average" in line
    single = compare([trained], out=tmp_path / "one", plots=False)["table"]
    assert "tokens/s*" not in single and "like-for-like" not in single


def test_generate_from_a_checkpoint_finds_the_run_tokenizer_and_echoes_the_prompt(trained, capsys):
    from mixtrain.cli import main
    from mixtrain.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(trained)
    assert main(["generate", "--model", str(ckpt), "--prompt", "The river", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The river") and "[0]" not in out
    assert main(["generate", "--model", str(ckpt), "--prompt", "A", "--prompt", "B", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("--- prompt 2 of 2 ---\n")
    assert first.startswith("--- prompt 1 of 2 ---\nA") and second.startswith("B")


# ---------------------------------------------------------------- quiet output
def test_a_log_file_gets_plain_progress_lines_and_no_library_noise(shared_cache, tmp_path, capfd):
    """stdout is not a terminal here (as in a log file): no bars, no escape codes, no
    carriage returns, no litlogger tip or LeafSpec warning; plain step lines instead."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(shared_cache, tmp_path, "q", "trainer.progress_bar=true", "train.max_tokens=1024")
    out = capfd.readouterr()
    text = out.out + out.err
    assert "\r" not in text and "\x1b" not in text and "litlogger" not in text and "LeafSpec" not in text
    assert "weights_only" not in text
    assert "it/s]" not in text and "Epoch 0" not in text
    lines = [l for l in out.out.splitlines() if l.startswith("step ")]
    assert [l.split("  ")[0] for l in lines] == [f"step {s}/4 ({25 * s}%)" for s in (1, 2, 3, 4)]
    assert all("loss " in l for l in lines)
    assert not [w for w in caught if "LeafSpec" in str(w.message) or "weights_only" in str(w.message)]
    assert "trainable parameters: " in out.out


# ------------------------------------------------------------ Hydra's messages
def test_a_misspelt_key_or_recipe_names_the_nearest_valid_one():
    with pytest.raises(UserError) as e:
        compose(["train.max_tokns=5"])
    assert str(e.value).endswith("train.max_tokns is not a setting; did you mean train.max_tokens?")
    assert "+train.max_tokns" not in str(e.value)
    with pytest.raises(UserError) as e:
        compose(["model=tinyy"])
    text = str(e.value)
    assert "Could not find 'model/tinyy': did you mean model=tiny?" in text
    assert "\ttiny\n" in text and "_schema" not in text and "search path" not in text


def test_a_sweep_with_a_misspelt_key_is_refused_before_any_point_runs():
    from mixtrain.cli import _sweep_problem

    hint = "train.max_tokns is not a setting; did you mean train.max_tokens?"
    assert _sweep_problem(["experiment=quickstart", "train.max_tokns=5", "layout=ma,standard"]).endswith(hint)
    assert _sweep_problem(["experiment=quickstart", "train.max_tokns=5,6", "layout=ma"]).endswith(hint)
    # A bad swept value fails its own point only (the sweep records it; the others run).
    assert _sweep_problem(["experiment=quickstart", "layout=bogus,ma"]) is None
    assert _sweep_problem(["experiment=quickstart", "layout=ma,standard", "optim.lr=1e-3,3e-3"]) is None


def test_a_key_under_a_null_block_says_which_block_and_what_to_do():
    with pytest.raises(UserError) as e:
        compose(["experiment=quickstart", "model.moe.top_k=2"])
    assert str(e.value) == ("model.moe.top_k=2: model.moe is null in this recipe (a dense model): choose an MoE "
                            "model recipe (model=tiny_moe, model=paper_moe) and then override its keys")
    assert compose(["model=tiny_moe", "model.moe.top_k=1"]).model.moe.top_k == 1  # the way it says


def test_mixtrain_train_answers_a_misspelt_key_itself(tmp_path):
    res = mixtrain_cli(["train", "optim.lrr=1e-3", f"run.root={tmp_path / 'runs'}"], tmp_path)
    assert res.returncode == 2 and "did you mean optim.lr?" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------ the bad-input suite
# Every bad value issue 12 lists, refused before anything is made, with the key named.
BAD_RECIPES = [
    (["data.val_fraction=1.5"], r"data\.val_fraction=1\.5 must be in \[0, 1\)"),
    (["data.val_fraction=-0.1"], r"data\.val_fraction=-0\.1 must be in \[0, 1\)"),
    (["optim.lr=-1"], r"optim\.lr=-1(\.0)? must be positive"),
    (["optim.lr=0"], r"optim\.lr=0(\.0)? must be positive"),
    (["optim.betas=[0.9]"], r"optim\.betas=\[0\.9\] must be two numbers in \[0, 1\)"),
    (["optim.warmup_fraction=2"], r"optim\.warmup_fraction=2(\.0)? must be in \[0, 1\]"),
    (["optim.eps=0"], r"optim\.eps=0(\.0)? must be positive"),
    (["trainer.devices=abc"], r"trainer\.devices='abc' is not a device count"),
    (["trainer.devices=0"], r"trainer\.devices=0 is not a device count"),
    (["trainer.num_nodes=0"], r"trainer\.num_nodes=0 must be at least 1"),
    (["train.keep_checkpoints=0"], r"train\.keep_checkpoints=0 must be at least 1"),
    (["train.val_batches=0"], r"train\.val_batches=0 must be at least 1"),
    (["data.vocab_size=1024"], r"data\.vocab_size=1024 exceeds the model's model\.vocab_size=512"),
    (["data.kind=longqa", "data.qa_chunk_tokens=8"], r"data\.qa_chunk_tokens=8 is too small; use at least 16"),
    (["train.seq_len=512"], r"train\.seq_len=512 is longer than the model's model\.max_seq_len=256"),
    (["train.stage=extend"], r"stage 'extend' starts from the previous stage's weights: set train\.init_from"),
]


@pytest.mark.parametrize("bad, message", BAD_RECIPES, ids=[" ".join(b) for b, _ in BAD_RECIPES])
def test_bad_recipe_values_are_refused_before_anything_is_made(shared_cache, tmp_path, bad, message):
    from mixtrain.train.checks import check_recipe

    with pytest.raises(UserError, match=message):
        check_recipe(compose(overrides(shared_cache, tmp_path, "bad", *bad)))
    assert list(tmp_path.iterdir()) == []


BAD_CHOICES = [
    ("train.trainable=mlp", "all, attention"), ("train.stage=finetune", "pretrain, extend, longqa"),
    ("trainer.strategy=deepspeed", "auto, ddp, fsdp"), ("trainer.activation_checkpointing=most", "none, full, selective"),
    ("logger.kind=tensorboard", "wandb, csv, none"), ("logger.mode=sometimes", "auto, online, offline, disabled"),
    ("data.kind=chat", "pretrain, longqa, recall"), ("data.source=s3", "embedded, files, hub"),
    ("data.qa_source=web", "offline, jsonl, hf"), ("model.attn_impl=fast", "auto, sdpa, flex"),
]


@pytest.mark.parametrize("override, allowed", BAD_CHOICES, ids=[o for o, _ in BAD_CHOICES])
def test_every_choice_is_refused_at_compose_time_naming_the_values(override, allowed):
    key, value = override.split("=")
    with pytest.raises(UserError) as e:
        compose([override])
    assert str(e.value) == f"{key}={value!r} is not known; use one of: {allowed}"


def test_a_later_stage_says_what_it_loaded_and_what_trains(shared_cache, trained, tmp_path, capsys):
    from mixtrain.train.checkpoint import latest_checkpoint

    run(shared_cache, tmp_path, "s2", "train.max_tokens=256", "train.trainable=attention",
        f"train.init_from={trained}", f"data.tokenizer={trained / 'tokenizer.json'}")
    out = capsys.readouterr().out
    assert f"from {latest_checkpoint(trained)}" in out and "init_from: loaded " in out
    line = next(l for l in out.splitlines() if l.startswith("trainable parameters: "))
    trainable, total = (int(x.replace(",", "")) for x in line.split(": ")[1].split(" (")[0].split(" of "))
    assert 0 < trainable < total and line.endswith("(attention only)")


@pytest.mark.parametrize("overrides, message", [
    (["+layout.presett=ma"], r"layout\.presett is not a setting; did you mean layout\.preset\?"),
    (["+foo=1"], r"^foo is not a setting; nothing would read it"),
    (["layout.shared_attention={3: 2}"], r"layout\.shared_attention=\{3: 2\}: this recipe leaves layout\.shared_attention "
                                         r"null.*MIXTRAIN_RECIPES"),
])
def test_keys_nothing_reads_and_mappings_into_null_are_refused_in_words(overrides, message):
    from mixtrain.config import compose
    from mixtrain.errors import UserError

    with pytest.raises(UserError, match=message):
        compose(overrides)
    # What does work: a mapping the recipe sets takes single entries from the command line.
    cfg = compose(["layout=shared_attention_example", "layout.shared_attention={3: 2}"])
    assert dict(cfg.layout.shared_attention) == {2: 1, 3: 2, 14: 13, 15: -2}
