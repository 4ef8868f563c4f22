"""Data at scale, on small inputs: preparation killed and resumed gives the same shards,
memory does not grow with the corpus, two ranks read disjoint sequences and resume
exactly (torchrun, gloo), mixtures keep their proportions in every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtrain.config import DataConfig
from mixtrain.data import shards
from mixtrain.data.corpus import DataError
from mixtrain.data.pretrain import MixtureSampler, PretrainDataModule, prepare, prepare_all
from mixtrain.data.tokenizer import train_bpe

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega model token shard stream corpus memory resume rank").split()


def write_jsonl(path: Path, n_docs: int, seed: int = 0, words: int = 80) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=words))}) + "\n")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    return str(train_bpe((" ".join(rng.choice(WORDS, size=80)) for _ in range(200)), 320).save(d / "tok.json"))


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "parts").iterdir()) if not p.name.startswith(".tmp-")
            and not p.name.endswith(".json")}


# --------------------------------------------------------------------------- kill and resume

PREPARE = """
import sys, time
from mixtrain.config import DataConfig
from mixtrain.data import shards
from mixtrain.data.pretrain import prepare
real = shards.build_unit
def slow(spec, u, unit, max_docs=None):
    m = real(spec, u, unit, max_docs)
    print(f"unit {u} done", flush=True)
    time.sleep(float(sys.argv[2]))
    return m
shards.build_unit = slow
prepare(DataConfig(**__import__("json").loads(sys.argv[1])), 32, 512)
print("complete", flush=True)
"""


def test_a_killed_preparation_resumes_to_identical_shards(tmp_path, tok_path):
    """SIGKILL a build after its first unit: no index, no half shard is trusted; the rerun
    builds only the missing units, cleans the dead process's temporary files and ends
    with byte-identical shards to an uninterrupted build."""
    write_jsonl(tmp_path / "a.jsonl", 600)
    base = dict(source="files", paths=[str(tmp_path / "a.jsonl")], tokenizer=tok_path, shard_mb=0.02, num_proc=1,
                val_fraction=0.05)
    ref = prepare(DataConfig(**base, cache_dir=str(tmp_path / "ref")), 32, 512)
    assert ref.meta["units"] >= 4
    cfg = dict(base, cache_dir=str(tmp_path / "killed"))
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, json.dumps(cfg), "30"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "unit 0 done"
    out = Path(str(ref.dir).replace(str(tmp_path / "ref"), str(tmp_path / "killed")))
    # a half-written shard of unit 1, as a build killed mid-write leaves it
    stale = shards.tmp_name(shards.unit_paths(out, 1)["train.bin"])
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
    stale.write_bytes(b"\x01\x02\x03")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists() and (out / "parts" / "u000000.json").exists()
    assert not (out / "parts" / "u000001.json").exists()

    built = []
    real = shards.build_unit
    shards.build_unit = lambda spec, u, unit, max_docs=None: built.append(u) or real(spec, u, unit, max_docs)
    try:
        again = prepare(DataConfig(**cfg), 32, 512)
    finally:
        shards.build_unit = real
    assert built == list(range(1, ref.meta["units"]))  # unit 0 was kept
    assert not stale.exists() and not [p for p in (out / "parts").iterdir() if p.name.startswith(".tmp-")]
    assert _files(again.dir) == _files(ref.dir)
    assert again.meta["splits"] == ref.meta["splits"]


def test_parallel_and_multi_part_builds_equal_the_serial_one(tmp_path, tok_path):
    """num_proc=2 worker processes, and the units split in two parts as two machines
    (SLURM array tasks) would build them, give the same dataset as one process."""
    for i in range(3):
        write_jsonl(tmp_path / f"p{i}.jsonl", 150, seed=i)
    base = dict(source="files", paths=[str(tmp_path / "p*.jsonl")], tokenizer=tok_path, shard_mb=0.02)
    one = prepare(DataConfig(**base, num_proc=1, cache_dir=str(tmp_path / "one")), 32, 512)
    two = prepare(DataConfig(**base, num_proc=2, cache_dir=str(tmp_path / "two")), 32, 512)
    assert _files(one.dir) == _files(two.dir)
    cfg = DataConfig(**base, num_proc=1, cache_dir=str(tmp_path / "nodes"))
    assert prepare(cfg, 32, 512, node_rank=1, num_nodes=2, wait=False) is None  # part 1 first: no index yet
    last = prepare(cfg, 32, 512, node_rank=0, num_nodes=2, wait=False)  # the last part writes the index
    assert last is not None and _files(last.dir) == _files(one.dir) and last.meta["splits"] == one.meta["splits"]


# --------------------------------------------------------------------------- bounded memory


def test_preparation_memory_does_not_grow_with_the_corpus(tmp_path, tok_path, monkeypatch):
    """Python allocations while building a corpus 4x larger stay within the small one's,
    (1.3x allows 2 bytes per added token: the old pipeline held >= 24 bytes per token in
    RAM). Memory is one tokenizer batch, made small here."""
    import tracemalloc

    monkeypatch.setattr(shards, "ENCODE_BATCH_CHARS", 1 << 16)
    peaks = {}
    for n in (1, 4):
        d = tmp_path / f"c{n}"
        d.mkdir()
        for i in range(n):
            write_jsonl(d / f"part{i}.jsonl", 1200, seed=i)  # ~330K tokens per file
        cfg = DataConfig(source="files", paths=[str(d / "*.jsonl")], tokenizer=tok_path, num_proc=1,
                         cache_dir=str(tmp_path / f"cache{n}"), shard_mb=0.5)
        tracemalloc.start()
        p = prepare(cfg, 64, 512)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[f"tokens{n}"] = p.meta["tokens"]
    assert peaks["tokens4"] > 3.5 * peaks["tokens1"] > 200_000, peaks
    assert peaks[4] < 1.3 * peaks[1], peaks
    assert peaks[4] < 8 * peaks["tokens4"], peaks  # an int64 array of the corpus's tokens would not fit


# --------------------------------------------------------------------------- reading on two ranks

TWO_RANKS = r"""
import json, os, sys, torch, lightning as L
from mixtrain.config import DataConfig
from mixtrain.data.pretrain import PretrainDataModule
cfg = DataConfig(**json.loads(sys.argv[1]))
steps, ckpt, out = int(sys.argv[2]), (sys.argv[3] or None), sys.argv[4]
seen = []
class Probe(L.LightningModule):
    def __init__(self):
        super().__init__(); self.w = torch.nn.Linear(1, 1)
    def on_train_batch_start(self, batch, batch_idx):
        self.trainer.datamodule.on_batch_consumed(batch["input_ids"].shape[0])
    def training_step(self, batch, batch_idx):
        seen.append(batch["input_ids"].tolist())
        return self.w(batch["input_ids"][:, :1].float()).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
dm = PretrainDataModule(cfg, seq_len=16, micro_batch_size=2, vocab_size=512)
dm.prepare_before_fit()   # local rank 0 builds, rank 1 waits for the index
trainer = L.Trainer(max_steps=steps, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                    accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out)
trainer.fit(Probe(), datamodule=dm, ckpt_path=ckpt)
if not ckpt:
    trainer.save_checkpoint(os.path.join(out, f"step{steps}.ckpt"))
json.dump(seen, open(os.path.join(out, f"rank{trainer.global_rank}-{steps}-{bool(ckpt)}.json"), "w"))
"""


@pytest.mark.slow
def test_two_ranks_read_disjoint_sequences_and_resume_exactly(tmp_path, tok_path, mixture=False):
    """torchrun, 2 gloo ranks, a fresh cache: rank 0 prepares before fit while rank 1
    waits; 3 steps + checkpoint + resume to 6 give each rank the batches of 6 steps
    uninterrupted, bit for bit, and the ranks' sequences are disjoint."""
    write_jsonl(tmp_path / "a.jsonl", 120)
    write_jsonl(tmp_path / "b.jsonl", 120, seed=5)
    cfg = dict(source="files", paths=[str(tmp_path / "a.jsonl")], tokenizer=tok_path, cache_dir=str(tmp_path / "c"),
               shard_mb=0.01)
    if mixture:
        cfg["sources"] = [{"paths": [str(tmp_path / "a.jsonl")], "weight": 0.7},
                          {"paths": [str(tmp_path / "b.jsonl")], "weight": 0.3}]

    def launch(steps, ckpt=""):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", sys.executable, "-c", TWO_RANKS, json.dumps(cfg), str(steps), ckpt,
               str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    launch(6)
    launch(3)
    launch(6, str(tmp_path / "step3.ckpt"))
    load = lambda r, s, c: json.loads((tmp_path / f"rank{r}-{s}-{c}.json").read_text())  # noqa: E731
    for r in (0, 1):
        full, first, resumed = load(r, 6, False), load(r, 3, False), load(r, 6, True)
        assert len(full) == 6 and first == full[:3] and resumed == full[3:]
    rows = lambda r: {tuple(x) for b in load(r, 6, False) for x in b}  # noqa: E731
    assert not rows(0) & rows(1)


# --------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.6, 0.25, 0.1, 0.05)])
def test_mixture_proportions_hold_in_every_step(weights):
    """Every global batch (any run of consecutive positions, here 16 and 64 sequences
    over 2 ranks) holds each source's share within one sequence (the stated tolerance);
    each source is drawn without repeats inside its epoch."""
    sizes = [50 + 17 * i for i in range(len(weights))]
    world = 2
    per_rank = 4000
    ranks = [MixtureSampler(sizes, list(weights), seed=3, rank=r, world_size=world) for r in range(world)]
    streams = [list(__import__("itertools").islice(iter(s), per_rank)) for s in ranks]
    glob = [streams[j % world][j // world] for j in range(per_rank * world)]
    offsets = np.cumsum([0] + sizes)
    src = np.searchsorted(offsets, glob, side="right") - 1
    for G in (16, 64):
        for step in range(len(glob) // G):
            counts = np.bincount(src[step * G:(step + 1) * G], minlength=len(weights))
            assert np.all(np.abs(counts - G * np.asarray(weights)) <= 1.0 + 1e-9), (G, step, counts)
    for i, n in enumerate(sizes):  # the first epoch of each source is a permutation of it
        first = [g - offsets[i] for g, s_ in zip(glob, src) if s_ == i][:n]
        assert sorted(first) == list(range(n))
    tokens = ranks[0].tokens_per_source(128, len(glob))
    assert tokens == [int(c) * 128 for c in np.bincount(src, minlength=len(weights))]


def test_mixture_prepares_each_source_and_resumes(tmp_path, tok_path):
    write_jsonl(tmp_path / "a.jsonl", 200)
    write_jsonl(tmp_path / "b.jsonl", 100, seed=9)
    cfg = DataConfig(cache_dir=str(tmp_path / "c"), tokenizer=tok_path, num_proc=1,
                     sources=[{"paths": [str(tmp_path / "a.jsonl")], "weight": 3},
                              {"paths": [str(tmp_path / "b.jsonl")], "weight": 1, "val_fraction": 0.1}])
    srcs = prepare_all(cfg, 16, 512)
    assert [round(w, 3) for w, _ in srcs] == [0.75, 0.25] and srcs[0][1].dir != srcs[1][1].dir
    assert all(p.meta["tokens"] > 0 for _, p in srcs) and srcs[1][1].meta["val_fraction"] == 0.1
    dm = PretrainDataModule(cfg, seq_len=16, micro_batch_size=4, vocab_size=512)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(5)]
    for b in batches:
        dm.on_batch_consumed(4)
    sd = dm.state_dict()
    dm2 = PretrainDataModule(cfg, seq_len=16, micro_batch_size=4, vocab_size=512)
    dm2.load_state_dict({"sampler": {**sd["sampler"], "consumed": 8}})
    dm2.setup("fit")
    nxt = next(iter(dm2.train_dataloader()))
    assert torch.equal(nxt["input_ids"], batches[2]["input_ids"])
    assert len(dm.val_set) == sum(p.num_sequences("val") for _, p in srcs)
    bad = DataConfig(cache_dir=str(tmp_path / "c"), sources=[{"paths": ["x"], "weight": 0}])
    with pytest.raises(DataError, match=r"data.sources\[0\] needs a positive weight"):
        prepare_all(bad, 16, 512)
    with pytest.raises(DataError, match="mixture"):
        one = DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "c"),
                         tokenizer=tok_path, num_proc=1)
        dm3 = PretrainDataModule(one, seq_len=16, micro_batch_size=4, vocab_size=512)
        dm3.load_state_dict({"sampler": sd["sampler"]})
        dm3.setup("fit")
