"""The paper's three-stage recipe from recipes: every experiment=paper/<layout> composes
with the paper's settings for each stage, and the tiny chain runs end to end on a CPU
(pretrain -> extend -> long QA -> mixtrain eval), each stage starting from the previous
one's weights, stage 2 training attention only with the raised RoPE theta, stage 3's loss
on the answers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mixtrain.config import compose
from mixtrain.errors import UserError
from mixtrain.layouts import build_layout
from mixtrain.model.attention import rope_tables
from mixtrain.train.checkpoint import latest_checkpoint
from mixtrain.train.export import read_checkpoint
from mixtrain.train.module import LMModule, attention_parameter_names
from mixtrain.train.run import plan_steps, train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PAPER = sorted(p.stem for p in (RECIPES / "experiment" / "paper").glob("*.yaml") if p.stem != "common")


def test_every_paper_layout_has_a_recipe():
    assert PAPER == sorted([
        "standard", "ma", "ma_endslide", "ma_offset", "ma_pairs", "ma_offset_slideshare", "ma_pairs_slideshare",
        "swa", "ma_successive_1", "ma_successive_2", "ma_successive_3", "ma_successive_4",
        "ma_noshare_1", "ma_noshare_2", "ma_noshare_3",
    ])


@pytest.mark.parametrize("layout", PAPER)
def test_paper_recipe_composes_for_every_stage(layout):
    s1 = compose([f"experiment=paper/{layout}"])
    assert s1.layout.preset == layout and s1.model.name == "paper_moe"
    assert build_layout(s1.layout, s1.model.n_layers, s1.model.sliding_window).n_layers == 24
    assert (s1.train.seq_len, s1.model.max_seq_len, s1.model.rope_theta) == (4096, 4096, 5e5)
    assert s1.train.max_tokens == 101_000_000_000 and s1.train.trainable == "all" and s1.train.init_from is None
    assert (list(s1.optim.betas), s1.optim.weight_decay, s1.optim.grad_clip) == ([0.9, 0.95], 0.1, 1.0)
    assert (s1.optim.warmup_fraction, s1.optim.min_lr_ratio) == (0.05, 0.1)
    assert s1.trainer.strategy == "fsdp" and s1.model.sliding_window == 1024
    for stage, data_kind, budget in [("extend", "pretrain", 9_000_000_000), ("longqa", "longqa", 500_000_000)]:
        cfg = compose([f"experiment=paper/{layout}", f"stage={stage}", "train.init_from=/runs/previous"])
        OmegaConf.resolve(cfg)
        assert cfg.layout.preset == layout and cfg.model.name == "paper_moe"
        assert (cfg.train.seq_len, cfg.model.max_seq_len, cfg.model.rope_theta) == (32768, 32768, 8e6)
        assert cfg.train.trainable == "attention" and cfg.train.max_tokens == budget
        assert cfg.data.kind == data_kind and cfg.data.tokenizer == "/runs/previous/tokenizer.json"
        assert cfg.train.stage == stage
        assert f"-{stage}-" in cfg.run.name
        for world in (1, 8, 64):  # the global batch splits into whole micro-batches
            plan_steps(cfg, world)
    assert compose([f"experiment=paper/{layout}", "stage=longqa", "train.init_from=/r"]).data.qa_chunk_tokens == 1024


def test_later_stage_without_init_from_fails_naming_it(tmp_path):
    cfg = compose(["experiment=tiny_chain", "stage=tiny_extend", f"run.root={tmp_path}"])
    with pytest.raises(UserError, match=r"stage 'extend' starts from the previous stage's weights: set train\.init_from="):
        train(cfg)
    assert not any(tmp_path.iterdir())  # nothing was started


def common(cache: Path, root: Path, name: str) -> list[str]:
    return [
        "experiment=tiny_chain",
        "trainer.progress_bar=false",
        f"data.cache_dir={cache}",
        "data.embedded_max_chars=300000",
        f"run.root={root}",
        f"run.name={name}",
        "train.val_every_steps=2",
        "train.val_batches=1",
        "train.save_every_steps=4",
    ]


class Spy:
    """Records the weights each job starts from and the batches it trains on."""

    def __init__(self, monkeypatch):
        self.start: dict[str, torch.Tensor] = {}
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batches: list[dict[str, torch.Tensor]] = []
        real_configure, real_step = LMModule.configure_model, LMModule.training_step
        spy = self

        def configure_model(module):
            fresh = module.model is None
            real_configure(module)
            if fresh:
                spy.start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
                spy.rope = (module.model.rope_cos.clone(), module.model.rope_sin.clone())
                spy.theta = module.model.cfg.rope_theta

        def training_step(module, batch, batch_idx):
            spy.batches.append({k: v.detach().clone() for k, v in batch.items()})
            return real_step(module, batch, batch_idx)

        monkeypatch.setattr(LMModule, "configure_model", configure_model)
        monkeypatch.setattr(LMModule, "training_step", training_step)

    def reset(self):
        self.start, self.rope, self.batches = {}, None, []


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(latest_checkpoint(run_dir))[0]


def test_tiny_chain_end_to_end(shared_cache, tmp_path, monkeypatch):
    from mixtrain.cli import main as mixtrain_main
    from mixtrain.data.longqa import LongQADataset, prepare_longqa

    spy = Spy(monkeypatch)

    # Stage 1: pretrain at 128 tokens, RoPE theta 5e5 (4 optimizer steps).
    # (A 400-token vocabulary: a later stage that trained its own tokenizer would get 512.)
    r1 = train(compose(common(shared_cache, tmp_path, "s1") + ["train.max_tokens=8192", "data.vocab_size=400"]))
    s1 = Path(r1["run_dir"])
    assert r1["steps"] == 4 and spy.theta == 5e5 and (s1 / "tokenizer.json").is_file()
    w1 = final_weights(s1)

    # Stage 2: extend to 512 tokens, theta 8e6, attention only, from stage 1's weights.
    spy.reset()
    r2 = train(compose(common(shared_cache, tmp_path, "s2") + ["stage=tiny_extend", f"train.init_from={s1}",
                                                               "train.max_tokens=8192"]))
    s2 = Path(r2["run_dir"])
    assert r2["steps"] == 4
    assert spy.start.keys() == w1.keys() and all(torch.equal(spy.start[k], w1[k]) for k in w1)
    assert spy.theta == 8e6
    cos, sin = rope_tables(16, 512, 8e6)
    assert torch.allclose(spy.rope[0], cos) and torch.allclose(spy.rope[1], sin)
    assert not torch.allclose(spy.rope[0], rope_tables(16, 512, 5e5)[0])
    assert {b["input_ids"].shape for b in spy.batches} == {(2, 512)}
    w2 = final_weights(s2)
    from mixtrain.layouts import build_layout as _bl
    from mixtrain.model import Transformer

    cfg2 = OmegaConf.load(s2 / "config.yaml")
    attn = attention_parameter_names(Transformer(cfg2.model, _bl(cfg2.layout, 6, cfg2.model.sliding_window)))
    assert attn and all(not torch.equal(w2[k], w1[k]) for k in attn)  # attention trained
    frozen = [k for k in w1 if k not in attn]
    assert frozen and all(torch.equal(w2[k], w1[k]) for k in frozen)  # everything else untouched
    assert (cfg2.model.rope_theta, cfg2.model.max_seq_len, cfg2.train.trainable) == (8e6, 512, "attention")

    # Stage 3: long-context QA from stage 2's weights; the loss covers the answers only.
    spy.reset()
    cfg3 = compose(common(shared_cache, tmp_path, "s3") + ["stage=tiny_longqa", f"train.init_from={s2}",
                                                          "train.max_tokens=8192"])
    r3 = train(cfg3)
    s3 = Path(r3["run_dir"])
    assert r3["steps"] == 4 and spy.theta == 8e6
    assert all(torch.equal(spy.start[k], w2[k]) for k in w2)
    prepared = prepare_longqa(OmegaConf.to_container(cfg3.data, resolve=True), 512, 512)
    ds = LongQADataset(prepared.dir, "train", 512)
    by_input = {tuple(ds[i]["input_ids"].tolist()): i for i in range(len(ds))}
    records = ds.qa()
    tok = prepared.tokenizer
    assert len(spy.batches) == 4 * 2  # 2 micro-batches per step
    for batch in spy.batches:
        for row in range(batch["input_ids"].shape[0]):
            i = by_input[tuple(batch["input_ids"][row].tolist())]  # exactly one example per row
            labels = batch["labels"][row]
            answers = [q["answer"] for q in records[i]["qa"]]
            answer_tokens = sum(len(tok.encode(f" {a}")) + 1 for a in answers)
            assert int((labels != -100).sum()) == answer_tokens  # label mask = answer tokens (+ EOS)
            assert tok.decode(labels[labels != -100].tolist()) == "".join(f" {a}<|endoftext|>" for a in answers)
    w3 = final_weights(s3)
    assert all(torch.equal(w3[k], w2[k]) for k in frozen)
    # Stages 2 and 3 read stage 1's tokenizer: same vocabulary, same merges.
    assert tok.vocab_size == 400
    assert (s2 / "tokenizer.json").read_text() == (s3 / "tokenizer.json").read_text() == (s1 / "tokenizer.json").read_text()

    # Evaluate the result: 2 tasks x 1 length x 2 samples, and loss by position.
    rc = mixtrain_main(["eval", "--model", str(s3), "--tasks", "niah_single_1,vt", "--lengths", "512",
                        "--samples", "2", "--perplexity", "--ppl-sequences", "2"])
    assert rc == 0
    out = s3 / "eval"
    res = json.loads((out / "ruler.json").read_text())
    assert set(res["scores"]) == {"niah_single_1", "vt"} and set(res["by_length"]) == {"512"}
    assert all(0.0 <= v <= 1.0 for v in res["scores"].values()) and res["layout"] == "ma_offset"
    assert res["name"] == "s3" and res["samples"] == 2
    assert (out / "ruler_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    ppl = json.loads((out / "perplexity.json").read_text())
    assert len(ppl["position"]["loss"]) == 16 and ppl["position"]["sliding_window"] == 32
    assert ppl["val"]["ppl"] > 1 and (out / "position_loss.png").is_file()
    # A length beyond the model's context is refused with the reason.
    assert mixtrain_main(["eval", "--model", str(s3), "--tasks", "vt", "--lengths", "1024"]) == 2


def test_eval_results_join_the_training_runs_wandb_run(shared_cache, tmp_path):
    """`mixtrain eval --wandb` resumes the run's own W&B run (id in <run>/wandb_id) and logs
    RULER scores and the perplexity figures there."""
    pytest.importorskip("wandb")
    from mixtrain.cli import main
    from mixtrain.report import wandb_records, wandb_run_files

    train(compose(["experiment=tiny_chain", "trainer.progress_bar=false", f"data.cache_dir={shared_cache}",
                   "data.embedded_max_chars=300000", "train.max_tokens=8192", "logger=wandb",
                   "logger.mode=offline", "model.max_seq_len=512", f"run.root={tmp_path}", "run.name=wb"]))
    run_id = (tmp_path / "wb" / "wandb_id").read_text().strip()
    rc = main(["eval", "--model", str(tmp_path / "wb"), "--tasks", "niah_single_1", "--lengths", "512",
               "--samples", "1", "--perplexity", "--ppl-length", "128", "--ppl-sequences", "1", "--wandb"])
    assert rc == 0
    files = wandb_run_files(tmp_path / "wb")
    assert len(files) == 2 and all(run_id in str(f) for f in files)  # training, then eval: one W&B run
    keys = set()
    for rec in wandb_records(files[-1]):
        if rec.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
    assert {"ruler/average", "eval/val_loss", "eval/position_loss/first_minus_last"} <= keys
