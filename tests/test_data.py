"""Data: embedded corpus, loading and its errors, BPE, packing, resumable order, DataModule.

Everything runs offline on tiny corpora under ``tmp_path``.
"""

from __future__ import annotations

import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

from mixtrain.config import DataConfig
from mixtrain.data import corpus, pretrain, shards
from mixtrain.data.corpus import DataError, embedded_corpus_path, load_documents
from mixtrain.data.pretrain import PretrainDataModule, ResumableSampler, prepare
from mixtrain.data.tokenizer import EOS_TOKEN, get_tokenizer, load_tokenizer_file, train_bpe

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "every jolly box of pizza and several tiny models learn to predict tokens"
).split()


def make_docs(n: int, words: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS, size=words))
        docs.append(f"Document {i}. {body.capitalize()}.\nSecond line with café, naïve, 東京 and 🙂.")
    return docs


def write_txt(dirpath, docs) -> list[str]:
    dirpath.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = dirpath / f"doc{i:03d}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(str(p))
    return paths


# The two readers of a corpus: datasets (tokenizer training, long-QA, perplexity) and the
# record-by-record stream the shard builder tokenises; both name a bad input the same way.
READERS = (load_documents, lambda c: list(shards.iter_corpus_texts(c)))


@pytest.fixture
def files_cfg(tmp_path):
    paths = write_txt(tmp_path / "corpus", make_docs(12))
    return DataConfig(source="files", paths=[str(tmp_path / "corpus" / "*.txt")], cache_dir=str(tmp_path / "cache"),
                      vocab_size=300, val_fraction=0.2), paths


# --------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus_real_deterministic_cached(tmp_path):
    cfg_a = DataConfig(cache_dir=str(tmp_path / "a"), embedded_max_chars=200_000)
    cfg_b = DataConfig(cache_dir=str(tmp_path / "b"), embedded_max_chars=200_000)
    pa = embedded_corpus_path(cfg_a)
    pb = embedded_corpus_path(cfg_b)
    assert pa.name == pb.name and pa.name.startswith("embedded-") and pa.suffix == ".jsonl"
    assert pa.read_bytes() == pb.read_bytes()  # deterministic
    texts = [json.loads(line)["text"] for line in pa.read_text(encoding="utf-8").splitlines()]
    total = sum(map(len, texts))
    assert len(texts) >= 5 and 150_000 <= total <= 200_000
    words = re.findall(r"[A-Za-z]+", " ".join(texts))
    common = {"the", "of", "and", "to", "is", "a", "in"}
    assert sum(w.lower() in common for w in words) / len(words) > 0.10  # English prose, not code
    mtime = pa.stat().st_mtime_ns
    assert embedded_corpus_path(cfg_a) == pa and pa.stat().st_mtime_ns == mtime  # reused, not rebuilt
    docs = load_documents(cfg_a)
    assert docs.column_names == ["text"] and len(docs) == len(texts) and docs[0]["text"] == texts[0]
    # a different cap is a different file
    assert embedded_corpus_path(DataConfig(cache_dir=str(tmp_path / "a"), embedded_max_chars=100_000)) != pa


# --------------------------------------------------------------------------- loading


def test_load_files_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(6)
    write_txt(tmp_path / "t", docs[:2])
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for d in docs[2:4]:
            f.write(json.dumps({"id": 1, "body": d}) + "\n")
    pq.write_table(pa.table({"body": docs[4:]}), tmp_path / "d.parquet")
    cfg = DataConfig(source="files", text_field="body", cache_dir=str(tmp_path / "cache"),
                     paths=[str(tmp_path / "t" / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")])
    ds = load_documents(cfg)
    assert ds.column_names == ["text"]
    assert ds["text"] == docs  # .txt: whole file is one document, line breaks kept


def test_bad_inputs_name_the_problem(tmp_path):
    cache = str(tmp_path / "cache")

    def err(**kw) -> str:
        """The message of both readers (datasets for a tokenizer/long-QA, the shard builder's stream)."""
        msgs = []
        for read in READERS:
            with pytest.raises(DataError) as e:
                read(DataConfig(cache_dir=cache, **kw))
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] or ".docx" in str(kw.get("paths")), msgs  # the stream also reads .zst/.gz
        return msgs[0]

    missing = str(tmp_path / "nope.txt")
    msg = err(source="files", paths=[missing])
    assert missing in msg and "does not exist" in msg and "data.paths" in msg
    msg = err(source="files", paths=[str(tmp_path / "none" / "*.jsonl")])
    assert "matches no file" in msg and "*.jsonl" in msg
    assert "data.paths" in err(source="files", paths=None)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    msg = err(source="files", paths=[str(empty)])
    assert str(empty) in msg and "empty" in msg

    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"content": "hello", "id": 3}) + "\n")
    msg = err(source="files", paths=[str(jl)])
    assert str(jl) in msg and "'text'" in msg and "['content', 'id']" in msg and "data.text_field" in msg

    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello world, " * 10 + "caf\u00e9".encode("latin-1") + b" more text")
    msg = err(source="files", paths=[str(bad)])
    assert str(bad) in msg and "UTF-8" in msg and "offset 133" in msg

    msg = err(source="ftp")
    assert "'ftp'" in msg and "embedded" in msg and "files" in msg

    weird = tmp_path / "x.docx"
    weird.write_text("hi")
    assert ".docx" in err(source="files", paths=[str(weird)])


def test_a_text_field_that_is_not_a_string_names_the_file_and_record(tmp_path, monkeypatch):
    """A record whose text is a number, list or object fails naming file, line/row, setting
    and type (null stays an empty document and is dropped)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = str(tmp_path / "cache")
    tail = "not a string; make it a string (null skips the record) or set data.text_field to the field holding the text"

    def err(paths, **kw) -> str:
        msgs = []
        for read in READERS:
            with pytest.raises(DataError) as e:
                read(DataConfig(source="files", paths=paths, cache_dir=cache, **kw))
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1], msgs
        return msgs[0]

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a document"}) + "\n" + json.dumps({"text": None}) + "\n")
    assert load_documents(DataConfig(source="files", paths=[str(good)], cache_dir=cache))["text"] == ["a document"]

    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ({"text": "fine"}, {"text": None})) + "\n\n" + '{"text": 5}\n')
    # Also when read with a file of strings (datasets would store the number as the text "5").
    assert err([str(good), str(jl)]) == (
        f"{str(jl)!r} line 4: data.text_field='text' holds a value of type int (5), {tail}")
    jl.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(["fine"]) + "\n")
    assert err([str(jl)]) == f"{str(jl)!r} line 2: records must be JSON objects with a 'text' field, got list"
    jl.write_text("\n".join(json.dumps(r) for r in ({"body": ["a"]}, {"body": "fine"})) + "\n")
    assert err([str(jl)], text_field="body") == (
        f"{str(jl)!r} line 1: data.text_field='body' holds a value of type list (['a']), {tail}")
    arr = tmp_path / "x.json"
    arr.write_text(json.dumps([{"text": "fine"}, {"text": {"k": "v" * 80}}]))
    assert err([str(arr)]) == (
        f"{str(arr)!r} row 1: data.text_field='text' holds a value of type dict "
        f"({{'k': 'vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv...), {tail}")
    pqf = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": [None, 7]}), pqf)
    assert err([str(pqf)]) == f"{str(pqf)!r} row 1: data.text_field='text' holds a value of type int (7), {tail}"

    # The hub (and any other source): the row of the data set, streamed or not.
    hub = datasets.Dataset.from_dict({"text": [None, 3.5]})
    for streaming in (False, True):
        monkeypatch.setattr(corpus, "_load_hub", lambda c: hub.to_iterable_dataset() if streaming else hub)
        for read in READERS:
          with pytest.raises(DataError) as e:
            list(read(DataConfig(source="hub", hub_name="org/set", streaming=streaming, cache_dir=cache)))
          assert str(e.value) == (
            f"hub data set 'org/set' (split 'train') row 1: data.text_field='text' holds a value of type float (3.5), "
            f"{tail}")


def test_utf8_offset_across_read_chunks(tmp_path):
    p = tmp_path / "a.txt"
    data = "é".encode() * 10 + b"\xff"  # the bad byte sits at offset 20
    p.write_bytes(data)
    with pytest.raises(DataError, match="offset 20"):
        corpus.check_utf8(p, chunk=3)  # chunks split the 2-byte characters


# --------------------------------------------------------------------------- tokenizer


def test_bpe_vocab_roundtrip_eos_and_reload(tmp_path):
    texts = make_docs(40)
    tok = train_bpe(texts, vocab_size=400)
    assert tok.vocab_size == 400
    assert tok.eos_id == 0 and tok.tk.id_to_token(0) == EOS_TOKEN and tok.pad_id == 1
    for s in ["Hello, world!  Two spaces\tand a tab.\n", "naïve café 東京 🙂 — ∑x²", texts[3], " leading space"]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.5  # merges were learned
    # the EOS string inside a document is text, not the EOS id
    assert tok.eos_id not in tok.encode(f"a {EOS_TOKEN} b")
    path = tok.save(tmp_path / "tok.json")
    again = load_tokenizer_file(path)
    assert again.encode_batch(texts[:5]) == tok.encode_batch(texts[:5])
    assert (again.eos_id, again.pad_id, again.vocab_size) == (0, 1, 400)
    # via the config: a tokenizer.json path
    cfg = DataConfig(tokenizer=str(path), cache_dir=str(tmp_path / "c"))
    assert get_tokenizer(cfg, 512).encode(texts[1]) == tok.encode(texts[1])


def test_tokenizer_larger_than_model_vocab(tmp_path, files_cfg):
    tok = train_bpe(make_docs(40), vocab_size=400)
    path = tok.save(tmp_path / "tok.json")
    with pytest.raises(DataError) as e:
        get_tokenizer(DataConfig(tokenizer=str(path), cache_dir=str(tmp_path)), model_vocab_size=300)
    assert "400" in str(e.value) and "300" in str(e.value) and "model.vocab_size" in str(e.value)
    cfg, _ = files_cfg
    with pytest.raises(DataError, match="data.vocab_size=300 exceeds the model's vocab_size=290"):
        get_tokenizer(cfg, model_vocab_size=290)
    with pytest.raises(DataError, match="does not exist"):
        get_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json"), cache_dir=str(tmp_path)), 512)


def test_trained_tokenizer_is_cached(files_cfg):
    cfg, _ = files_cfg
    tok = get_tokenizer(cfg, model_vocab_size=512)
    assert tok.vocab_size == 300 and tok.path.is_file() and tok.path.parent.name == "tokenizers"
    mtime = tok.path.stat().st_mtime_ns
    tok2 = get_tokenizer(cfg, model_vocab_size=512)
    assert tok2.path == tok.path and tok.path.stat().st_mtime_ns == mtime
    assert tok2.fingerprint() == tok.fingerprint()


# --------------------------------------------------------------------------- packing


def test_packing_layout_split_and_cache(files_cfg, monkeypatch):
    cfg, paths = files_cfg
    T = 32
    prep = prepare(cfg, T, 512)
    tok = prep.tokenizer
    meta = prep.meta
    docs = load_documents(cfg)["text"]
    assert meta["documents"] == len(docs) == 12 and meta["bytes_per_token"] == 2
    val_mask = shards.split_mask(len(docs), cfg.val_fraction, cfg.seed)
    # every 1/f-th document, round(n f) give or take one, the first one always
    assert val_mask[0] and abs(int(val_mask.sum()) - 12 * 0.2) <= 1
    assert meta["splits"]["val"]["documents"] == val_mask.sum()
    assert meta["splits"]["train"]["documents"] == 12 - val_mask.sum()

    for split, mask in (("train", ~val_mask), ("val", val_mask)):
        ds = prep.dataset(split)
        stream = [t for d, m in zip(docs, mask) if m for t in tok.encode(d) + [tok.eos_id]]
        n = len(ds)
        assert n == (len(stream) - 1) // T > 0
        rows = [ds[i] for i in range(n)]
        for r in rows:
            assert all(r[k].shape == (T,) and r[k].dtype == torch.long for k in ("input_ids", "labels", "doc_ids"))
            assert torch.equal(r["labels"][:-1], r["input_ids"][1:])  # labels = inputs shifted
            # doc ids start at 0 and increase by one exactly after each EOS
            d, x = r["doc_ids"].tolist(), r["input_ids"].tolist()
            assert d[0] == 0
            assert [d[j + 1] - d[j] for j in range(T - 1)] == [int(x[j] == tok.eos_id) for j in range(T - 1)]
        flat = torch.cat([r["input_ids"] for r in rows] + [rows[-1]["labels"][-1:]]).tolist()
        assert flat == stream[: n * T + 1]  # the EOS-joined stream, in order
        # on disk: 2 bytes per token and 8 bytes per document, nothing else per token
        part = shards.unit_paths(prep.dir, 0)
        assert part[f"{split}.bin"].stat().st_size == 2 * len(stream)
        assert part[f"{split}.ends"].stat().st_size == 8 * int(mask.sum())

    # a second prepare (another seq_len too) reuses the shards: no tokenisation, same files
    mtime = shards.unit_paths(prep.dir, 0)["train.bin"].stat().st_mtime_ns
    monkeypatch.setattr(shards, "build_dataset", lambda *a, **k: pytest.fail("rebuilt"))
    again = prepare(cfg, 16, 512)
    assert again.dir == prep.dir and again.meta["seq_len"] == 16
    assert shards.unit_paths(prep.dir, 0)["train.bin"].stat().st_mtime_ns == mtime


def test_shards_cross_units_and_keep_doc_boundaries(tmp_path):
    """Several units (small data.shard_mb): the split streams run across shard files in
    corpus order, and a sequence spanning two shards still numbers its documents right."""
    docs = make_docs(40, words=60)
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "cache"),
                     vocab_size=300, val_fraction=0.1, shard_mb=0.004, num_proc=1)
    prep = prepare(cfg, 50, 512)
    units = json.loads((prep.dir / "plan.json").read_text())["units"]
    assert len(units) == prep.meta["units"] >= 4
    tok = prep.tokenizer
    ranges = [(u["start"], u["end"]) for u in units]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # documents per unit: the lines starting inside its byte range, split by the per-unit rule
    offs = np.cumsum([0] + [len(json.dumps({"text": d}).encode()) + 1 for d in docs])[:-1]
    train = []
    for u, (a, b) in enumerate(ranges):
        mine = [d for d, o in zip(docs, offs) if a <= o < b]
        mask = shards.split_mask(len(mine), 0.1, cfg.seed, u)
        train += [t for d, m in zip(mine, mask) if not m for t in tok.encode(d) + [tok.eos_id]]
    ds = prep.dataset("train")
    got = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert got == train[: len(ds) * 50]
    for i in range(len(ds)):
        r = ds[i]
        d, x = r["doc_ids"].tolist(), r["input_ids"].tolist()
        assert d[0] == 0 and [d[j + 1] - d[j] for j in range(49)] == [int(x[j] == tok.eos_id) for j in range(49)]


def test_corpus_too_small_for_seq_len(tmp_path):
    write_txt(tmp_path / "c", make_docs(4, words=20))
    cfg = DataConfig(source="files", paths=[str(tmp_path / "c" / "*.txt")], cache_dir=str(tmp_path / "cache"),
                     vocab_size=300, val_fraction=0.25)
    with pytest.raises(DataError) as e:
        prepare(cfg, 4096, 512)
    msg = str(e.value)
    assert "seq_len=4096" in msg and "4097" in msg and "4 documents" in msg and "val_fraction=0.25" in msg
    one = tmp_path / "one.txt"
    one.write_text(make_docs(1)[0])
    with pytest.raises(DataError, match="1 document"):
        prepare(DataConfig(source="files", paths=[str(one)], cache_dir=str(tmp_path / "cache"), vocab_size=300), 8, 512)


# --------------------------------------------------------------------------- sampler


def test_sampler_ranks_disjoint_and_cover_epoch():
    n, world = 103, 4
    per = n // world
    samplers = [ResumableSampler(n, seed=7, rank=r, world_size=world) for r in range(world)]
    epoch0 = [list(itertools.islice(iter(s), per)) for s in samplers]
    flat = [i for e in epoch0 for i in e]
    assert all(len(e) == per for e in epoch0)
    assert len(set(flat)) == per * world  # disjoint
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert set(flat) == set(perm[: per * world])  # covers the epoch (remainder dropped)
    # the next epoch is a different permutation, and iteration never ends
    s = ResumableSampler(n, seed=7)
    two = list(itertools.islice(iter(s), 2 * n))
    assert sorted(two[:n]) == sorted(two[n:]) == list(range(n)) and two[:n] != two[n:]
    assert list(itertools.islice(iter(ResumableSampler(5, 0, shuffle=False)), 7)) == [0, 1, 2, 3, 4, 0, 1]


def test_sampler_resume_is_exact():
    n, world, rank = 50, 2, 1
    ref = list(itertools.islice(iter(ResumableSampler(n, 3, rank, world)), 130))
    s = ResumableSampler(n, 3, rank, world)
    it = iter(s)
    seen = [next(it) for _ in range(10)]  # prefetched beyond what was trained on
    s.advance(7)
    sd = s.state_dict()
    assert sd == {"consumed": 7, "seed": 3, "world_size": 2, "num_samples": 50, "shuffle": True}
    fresh = ResumableSampler(n, 3, rank, world)
    fresh.load_state_dict(sd)
    assert seen[:7] + list(itertools.islice(iter(fresh), 123)) == ref  # crosses epochs 0 -> 5
    other = ResumableSampler(n, 3, 0, 4)
    with pytest.raises(DataError, match="world_size=2.*world_size=4"):
        other.load_state_dict(sd)
    with pytest.raises(DataError, match="num_samples=50"):
        ResumableSampler(60, 3, rank, world).load_state_dict(sd)


# --------------------------------------------------------------------------- DataModule


def test_datamodule_end_to_end_and_resume(files_cfg):
    cfg, _ = files_cfg
    B, T = 3, 16
    dm = PretrainDataModule(cfg, seq_len=T, micro_batch_size=B, vocab_size=512)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer.vocab_size == 300 and dm.tokenizer.eos_id == 0
    it = iter(dm.train_dataloader())
    batches = []
    for _ in range(4):
        b = next(it)
        assert set(b) == {"input_ids", "labels", "doc_ids"}
        assert all(v.shape == (B, T) and v.dtype == torch.long for v in b.values())
        assert int(b["input_ids"].max()) < 300
        dm.on_batch_consumed(B)
        batches.append(b)
    assert dm.samples_consumed == 4 * B
    val = list(dm.val_dataloader())
    assert sum(len(v["input_ids"]) for v in val) == len(dm.val_set) and val[0]["input_ids"].shape[1] == T
    assert torch.equal(val[0]["input_ids"][0], dm.val_set[0]["input_ids"])  # in order, not shuffled

    # resume: after 2 consumed batches a new module continues with batch 3
    dm2 = PretrainDataModule(cfg, seq_len=T, micro_batch_size=B, vocab_size=512)
    sd = {"sampler": {**dm.state_dict()["sampler"], "consumed": 2 * B}}
    dm2.load_state_dict(sd)  # before setup, as when restored early
    dm2.setup("fit")
    assert dm2.state_dict() == sd
    nxt = next(iter(dm2.train_dataloader()))
    assert all(torch.equal(nxt[k], batches[2][k]) for k in nxt)
    torch.save(dm.state_dict(), os.devnull)  # plain, picklable types


def test_datamodule_accepts_dictconfig(files_cfg):
    from omegaconf import OmegaConf

    cfg, _ = files_cfg
    dc = OmegaConf.structured(cfg)
    dm = PretrainDataModule(dc, seq_len=16, micro_batch_size=2, vocab_size=512)
    assert dm.cfg.paths == cfg.paths and dm.cfg.vocab_size == 300


def test_cli_prepare_and_tokenizer(tmp_path, files_cfg, capsys):
    import argparse

    from mixtrain.data import cli

    cfg, _ = files_cfg
    parser = argparse.ArgumentParser(prog="mixtrain")
    cli.register_group(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", "--seq-len", "16", "--vocab-size", "300", "--val-fraction", "0.2",
                              "--paths", *cfg.paths, "--cache-dir", cfg.cache_dir])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "documents   12" in out and "seq_len 16" in out and str(tmp_path / "cache") in out
    sub = argparse.ArgumentParser(prog="mixtrain data")  # as the main cli.py registers it
    cli.register(sub.add_subparsers(dest="data_command", required=True))
    args = sub.parse_args(["tokenizer", "--out", str(tmp_path / "t.json"), "--vocab-size", "300",
                           "--paths", *cfg.paths, "--cache-dir", cfg.cache_dir])
    assert args.func(args) == 0
    assert load_tokenizer_file(tmp_path / "t.json").vocab_size == 300


def test_lightning_checkpoint_resume_continues_the_data_order(files_cfg, tmp_path):
    """Through a real Trainer: 3 steps + checkpoint + resume to 6 == 6 uninterrupted steps."""
    import lightning as L

    cfg, _ = files_cfg
    seen: list[torch.Tensor] = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def on_train_batch_start(self, batch, batch_idx):  # before any checkpoint of this step
            self.trainer.datamodule.on_batch_consumed(batch["input_ids"].shape[0])

        def training_step(self, batch, batch_idx):
            seen.append(batch["input_ids"].clone())
            return self.w(batch["input_ids"][:, :1].float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(steps, ckpt=None):
        dm = PretrainDataModule(cfg, seq_len=8, micro_batch_size=2, vocab_size=512)
        trainer = L.Trainer(max_steps=steps, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path), accelerator="cpu")
        trainer.fit(Probe(), datamodule=dm, ckpt_path=ckpt)
        return trainer, dm

    fit(6)
    full = list(seen)
    seen.clear()
    trainer, _ = fit(3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=False)["PretrainDataModule"]
    assert saved["sampler"]["consumed"] == 6
    seen.clear()
    _, dm = fit(6, str(tmp_path / "step3.ckpt"))
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(full[3:], seen))
    assert dm.samples_consumed == 12


def test_streaming_source_is_packed_from_max_documents(tmp_path, monkeypatch):
    """The hub path offline: a streamed (iterable) data set is read record by record (no
    cap needed), or capped at max_documents, and packed like a local one."""
    import datasets

    texts = make_docs(20)
    monkeypatch.setattr(corpus, "_load_hub",
                        lambda c: datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset())
    base = dict(source="hub", hub_name="fake/stream", streaming=True, cache_dir=str(tmp_path), vocab_size=300,
                val_fraction=0.2, num_proc=1)
    p = prepare(DataConfig(**base), 16, 512)
    assert p.meta["documents"] == 20
    p = prepare(DataConfig(**base, max_documents=10), 16, 512)
    assert p.meta["documents"] == 10 and p.meta["splits"]["val"]["documents"] == shards.split_mask(10, 0.2, 1234).sum()


def test_a_damaged_shard_is_rebuilt(tmp_path):
    """A truncated shard (disk error, interrupted copy) is detected and that unit rebuilt
    with the same content, instead of failing inside a memmap."""
    import warnings

    for name, text in (("a", "hello world, this is a document. "), ("b", "another text with words. ")):
        (tmp_path / f"{name}.txt").write_text(text * 300)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.5)
    first = prepare(cfg, 64, 512)
    path = shards.unit_paths(first.dir, 0)["train.bin"]
    good = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(len(good) // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = prepare(cfg, 64, 512)
    assert any("is damaged" in str(w.message) for w in caught)
    assert path.read_bytes() == good
    assert len(again.dataset("train")) == first.meta["splits"]["train"]["sequences"]


def test_held_out_documents_are_the_val_shards(tmp_path):
    """Perplexity's held-out documents (load_documents + held_out_mask) are exactly the
    documents of the val shards, also when the corpus spans several units."""
    docs = make_docs(30, words=40)
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "cache"),
                     vocab_size=300, val_fraction=0.2, shard_mb=0.002, num_proc=1)
    prep = prepare(cfg, 16, 512)
    assert prep.meta["units"] > 2
    mask = pretrain.held_out_mask(cfg, len(docs), prep.tokenizer)
    tok = prep.tokenizer
    val = [t for d, m in zip(docs, mask) if m for t in tok.encode(d) + [tok.eos_id]]
    got = np.concatenate([np.fromfile(shards.unit_paths(prep.dir, u)["val.bin"], dtype="<u2")
                          for u in range(prep.meta["units"])]).tolist()
    assert got == val and int(mask.sum()) == prep.meta["splits"]["val"]["documents"]


def test_cli_prepare_takes_the_training_overrides(files_cfg, capsys):
    """`mixtrain data prepare <overrides>` builds exactly what `mixtrain train <overrides>`
    reads: the model's vocabulary, the recipe's seq_len, the same folder (training finds
    it ready and builds nothing)."""
    from mixtrain.cli import main
    from mixtrain.config import compose

    cfg, _ = files_cfg
    over = ["data=files", f"data.paths=[{cfg.paths[0]}]", f"data.cache_dir={cfg.cache_dir}", "train.seq_len=16",
            "data.val_fraction=0.2", "data.num_proc=1"]
    assert main(["data", "prepare", *over]) == 0
    out = capsys.readouterr().out
    assert "seq_len 16" in out and "bytes/token" in out, out
    full = compose(over)
    dm = PretrainDataModule(full.data, seq_len=full.train.seq_len, micro_batch_size=2, vocab_size=full.model.vocab_size)
    ready = dm._prepare(build=False)  # None if training would have to build anything
    assert ready is not None and str(ready.dir) in out and f"vocab {ready.tokenizer.vocab_size})" in out
    assert ready.tokenizer.path.name == get_tokenizer(full.data, 512).path.name  # trained for the model's 512


def test_every_input_format_is_streamed_into_the_shards(tmp_path, monkeypatch):
    """.txt, .jsonl.zst, .jsonl.gz, .parquet (several row groups) and a non-streamed hub
    data set: the shards hold each document's tokens + EOS, in the order of data.paths."""
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_docs(14, words=30)
    (tmp_path / "a.txt").write_text(docs[0])
    lines = lambda ds: "".join(json.dumps({"body": d}) + "\n" for d in ds).encode()  # noqa: E731
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(docs[1:4])))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines(docs[4:7])))
    pq.write_table(pa.table({"body": docs[7:]}), tmp_path / "d.parquet", row_group_size=2)
    paths = [str(tmp_path / n) for n in ("a.txt", "b.jsonl.zst", "c.jsonl.gz", "d.parquet")]
    tok = train_bpe(docs, 300)
    tok_file = str(tok.save(tmp_path / "tok.json"))
    cfg = DataConfig(source="files", paths=paths, text_field="body", cache_dir=str(tmp_path / "cache"),
                     tokenizer=tok_file, val_fraction=0.0, num_proc=1, shard_mb=0.0001)
    prep = prepare(cfg, 8, 512)
    assert prep.meta["units"] >= 6  # the parquet file is cut by row groups
    want = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    got = np.concatenate([np.fromfile(shards.unit_paths(prep.dir, u)["train.bin"], dtype="<u2")
                          for u in range(prep.meta["units"])]).tolist()
    assert got == want
    monkeypatch.setattr(corpus, "_load_hub", lambda c: datasets.Dataset.from_dict({"text": docs}))
    hub = prepare(DataConfig(source="hub", hub_name="org/set", cache_dir=str(tmp_path / "cache"), tokenizer=tok_file,
                             val_fraction=0.0, num_proc=1), 8, 512)
    assert np.fromfile(shards.unit_paths(hub.dir, 0)["train.bin"], dtype="<u2").tolist() == want
