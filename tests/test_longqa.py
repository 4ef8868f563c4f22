"""The long-context QA builder (stage 3): one QA pair per chunk, chunks of different
documents, QA block at the end, labels on the answers (+ EOS) only, one example per
sequence, 32K lengths, the offline generators and the JSONL plug-in."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from mixtrain.config import DataConfig
from mixtrain.data import build_datamodule
from mixtrain.data.longqa import (
    LongQADataModule,
    LongQADataset,
    LongQAError,
    fact_qa,
    offline_generator,
    prepare_longqa,
    span_qa,
)
from mixtrain.data.tokenizer import EOS_TOKEN, train_bpe

from helpers import WORDS


def make_docs(folder: Path, n: int, sentences: tuple[int, int], seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                 for _ in range(rng.randint(*sentences))]
        p = folder / f"doc{i:03d}.txt"
        p.write_text(f"Document {i} begins. " + " ".join(sents))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("longqa")
    paths = make_docs(root / "docs", 40, (40, 80))
    tok = train_bpe([p.read_text() for p in paths], vocab_size=300)
    tok_path = tok.save(root / "tok.json")
    return root, tok_path


def qa_cfg(root: Path, tok_path: Path, **kw) -> DataConfig:
    base = dict(kind="longqa", source="files", paths=[str(root / "docs" / "*.txt")], tokenizer=str(tok_path),
                cache_dir=str(root / "cache"), val_fraction=0.1, qa_chunk_tokens=64, seed=7)
    base.update(kw)
    return DataConfig(**base)


def example_parts(ds: LongQADataset, i: int, tok):
    item = ds[i]
    mask = item["labels"] != -100
    n = int((item["input_ids"] != ds.pad_id).nonzero().max()) + 1
    return item, mask, n


def check_examples(prepared, split: str, seq_len: int):
    tok = prepared.tokenizer
    ds = LongQADataset(prepared.dir, split, seq_len)
    records = ds.qa()
    assert len(ds) == len(records) > 0
    for i in range(len(ds)):
        item = ds[i]
        assert all(item[k].shape == (seq_len,) for k in ("input_ids", "labels", "doc_ids"))
        assert int(item["doc_ids"].abs().sum()) == 0  # one document id: questions see every chunk
        answers = [q["answer"] for q in records[i]["qa"]]
        # The loss covers exactly the answers and the EOS after each, in the order asked.
        supervised = item["labels"][item["labels"] != -100].tolist()
        assert tok.decode(supervised) == "".join(f" {a}{EOS_TOKEN}" for a in answers)
        # One example per sequence: its tokens, then padding with no loss (never another example).
        n = records[i]["tokens"] - 1
        assert n <= seq_len
        assert (item["input_ids"][n:] == ds.pad_id).all() and (item["labels"][n:] == -100).all()
        text = tok.decode(item["input_ids"][:n].tolist())
        tail = text.split("\n\nQuestion: ", 1)
        assert len(tail) == 2, "the QA block follows the chunks"
        # Nothing but this example's own chunks (one per QA pair; the test corpus has no blank lines).
        assert len(tail[0].split("\n\n")) == len(answers)
        qa_block = "Question: " + tail[1]
        assert qa_block.count("Question: ") == len(answers)
        last = records[i]["qa"][-1]
        assert text.endswith(f"Question: {last['question']}\nAnswer: {last['answer']}")
        # Chunks of different documents, each question's evidence in the context.
        docs = [q["doc"] for q in records[i]["qa"]]
        assert len(set(docs)) == len(docs)
        context = tail[0]
        for q in records[i]["qa"]:
            m = re.match(r"What is the secret code of the (.+)\?", q["question"])
            if m:
                assert f"The secret code of the {m.group(1)} is {q['answer']}." in context
            else:
                quote = re.search(r'contains "(.+)", what', q["question"]).group(1)
                assert f"{quote} {q['answer']}" in " ".join(context.split())
    return ds, records


def test_labels_cover_exactly_the_answers_and_examples_never_mix(corpus):
    root, tok_path = corpus
    prepared = prepare_longqa(qa_cfg(root, tok_path), seq_len=512, model_vocab_size=512)
    meta = prepared.meta
    assert meta["splits"]["train"]["examples"] > 10 and meta["splits"]["val"]["examples"] > 0
    ds, records = check_examples(prepared, "train", 512)
    # Several chunks per example, both generators used, every pair used once.
    assert max(len(r["qa"]) for r in records) >= 3
    kinds = {("secret" in q["question"]) for r in records for q in q_list(r)}
    assert kinds == {True, False}
    assert sum(len(r["qa"]) for r in records) == meta["splits"]["train"]["qa_pairs"]
    assert meta["splits"]["train"]["answer_tokens"] == sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))
    check_examples(prepared, "val", 512)
    # Train and validation documents are disjoint.
    val_docs = {q["doc"] for r in LongQADataset(prepared.dir, "val", 512).qa() for q in r["qa"]}
    assert val_docs and not val_docs & {q["doc"] for r in records for q in r["qa"]}
    # Deterministic and cached: a second prepare returns the same folder and content.
    again = prepare_longqa(qa_cfg(root, tok_path), seq_len=512, model_vocab_size=512)
    assert again.dir == prepared.dir and again.meta == meta


def q_list(record):
    return record["qa"]


def test_builds_32k_examples(tmp_path):
    paths = make_docs(tmp_path / "docs", 40, (260, 300), seed=3)  # ~40 documents of ~1.3K tokens
    tok = train_bpe([p.read_text() for p in paths], vocab_size=300)
    cfg = qa_cfg(tmp_path, tok.save(tmp_path / "tok.json"), qa_chunk_tokens=1024, val_fraction=0.0,
                 qa_generator="fact")
    prepared = prepare_longqa(cfg, seq_len=32768, model_vocab_size=512)
    ds, records = check_examples(prepared, "train", 32768)
    assert max(r["tokens"] for r in records) > 0.85 * 32768  # filled to the target length
    assert max(len(r["qa"]) for r in records) >= 25  # ~1K-token chunks of 25+ different documents


def test_jsonl_plugin_source(tmp_path, corpus):
    _, tok_path = corpus
    rows = []
    for i in range(30):
        ctx = f"Record {i}: the {WORDS[i % len(WORDS)]} of island {i} is painted {WORDS[(i * 7) % len(WORDS)]}."
        rows.append({"ctx": ctx, "q": f"What colour is island {i}?", "a": WORDS[(i * 7) % len(WORDS)]})
    rows.append({"ctx": rows[0]["ctx"], "q": "Which record is this?", "a": {"text": ["Record 0"], "answer_start": [0]}})
    rows.append({"ctx": rows[1]["ctx"], "q": "Which island?", "a": ["island 1", "1"]})
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = qa_cfg(tmp_path, tok_path, qa_source="jsonl", qa_path=str(qa_file), qa_context_field="ctx",
                 qa_question_field="q", qa_answer_field="a", val_fraction=0.0)
    (tmp_path / "docs").mkdir()
    prepared = prepare_longqa(cfg, seq_len=256, model_vocab_size=512)
    ds = LongQADataset(prepared.dir, "train", 256)
    records = ds.qa()
    tok = prepared.tokenizer
    pairs = [q for r in records for q in r["qa"]]
    # Every record's pair is used once, except one that could only have formed an
    # example of its own document (reported as unplaced).
    unplaced = prepared.meta["splits"]["train"]["qa_pairs_unplaced"]
    assert len(pairs) + unplaced == len(rows) and unplaced <= 1
    assert {"Record 0", "island 1"} <= {q["answer"] for q in pairs}
    for i, r in enumerate(records):
        item = ds[i]
        assert tok.decode(item["labels"][item["labels"] != -100].tolist()) == "".join(f" {q['answer']}{EOS_TOKEN}" for q in r["qa"])
        text = tok.decode(item["input_ids"].tolist())
        docs = [q["doc"] for q in r["qa"]]
        assert len(set(docs)) == len(docs)  # records sharing a context never share an example
        for q in r["qa"]:
            assert rows[[x["q"] for x in rows].index(q["question"])]["ctx"] in text


def test_offline_generators_are_grounded_and_deterministic():
    text = ("The first sentence is here. A second one follows it closely. Then comes a third, longer "
            "sentence with many words in it. And the last sentence ends the passage.")
    ctx, q, a = fact_qa(text, random.Random(1))
    key = re.match(r"What is the secret code of the (.+)\?", q).group(1)
    assert f"The secret code of the {key} is {a}." in ctx and a.isdigit() and len(a) == 7
    assert ctx.replace(f"The secret code of the {key} is {a}. ", "") == text
    assert fact_qa(text, random.Random(1)) == (ctx, q, a)
    ctx, q, a = span_qa(text, random.Random(2))
    quote = re.search(r'contains "(.+)", what are the next 5 words\?', q).group(1)
    assert ctx == text and f"{quote} {a}" in " ".join(text.split()) and len(a.split()) == 5
    assert span_qa("too short", random.Random(0)) is None
    assert offline_generator("span")("too short.", random.Random(0))[1].startswith("What is the secret code")
    assert offline_generator("test_longqa:custom_generator")("x", random.Random(0)) == ("x", "Q?", "A")
    with pytest.raises(LongQAError, match="qa_generator='nope'.*fact.*span.*mixed"):
        offline_generator("nope")


def custom_generator(text, rng):
    return text, "Q?", "A"


def test_datamodule_interface_and_resume(corpus):
    root, tok_path = corpus
    cfg = qa_cfg(root, tok_path)
    dm = build_datamodule(cfg, seq_len=512, micro_batch_size=2, vocab_size=512)
    assert isinstance(dm, LongQADataModule)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (2, 512)
    assert len(dm.val_dataloader()) >= 1 and dm.tokenizer.vocab_size == 300
    dm.on_batch_consumed(2)
    dm.on_batch_consumed(2)
    state = dm.state_dict()
    dm2 = build_datamodule(cfg, seq_len=512, micro_batch_size=2, vocab_size=512)
    dm2.load_state_dict(state)
    dm2.setup("fit")
    assert dm2.samples_consumed == 4
    first_after = next(iter(dm2.train_dataloader()))
    order = list(dm.sampler.epoch_indices(0)[4:6])
    expected = torch.stack([dm.train_set[i]["input_ids"] for i in order])
    assert torch.equal(first_after["input_ids"], expected)


def test_errors_name_the_setting(tmp_path, corpus):
    root, tok_path = corpus
    with pytest.raises(LongQAError, match="qa_chunk_tokens=1024 leaves no room.*seq_len=256"):
        prepare_longqa(qa_cfg(root, tok_path, qa_chunk_tokens=1024, cache_dir=str(tmp_path)), 256, 512)
    with pytest.raises(LongQAError, match="qa_source='squad'.*offline.*jsonl.*hf"):
        prepare_longqa(qa_cfg(root, tok_path, qa_source="squad", cache_dir=str(tmp_path)), 256, 512)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "query": "q", "answer": "a"}) + "\n")
    with pytest.raises(LongQAError, match=r"no field\(s\) \['question'\].*qa_question_field"):
        prepare_longqa(qa_cfg(root, tok_path, qa_source="jsonl", qa_path=str(bad), cache_dir=str(tmp_path)), 256, 512)
    with pytest.raises(LongQAError, match="qa_source=jsonl needs data.qa_path"):
        prepare_longqa(qa_cfg(root, tok_path, qa_source="jsonl", cache_dir=str(tmp_path)), 256, 512)


PLUGIN = """
def pair(text, rng):
    return text, "Q?"

def boom(text, rng):
    raise RuntimeError("model server down")

def number(text, rng):
    return text, "Q?", 42

def words(text, rng):
    return "just a string"

def some(text, rng):  # None skips a chunk; a list of three strings is fine too
    return None if rng.random() < 0.5 else [text, "Which?", "this one"]

NOT_A_FUNCTION = 3
"""


def test_a_plugin_generator_that_fails_or_returns_the_wrong_thing_is_named(tmp_path, corpus, monkeypatch):
    """data.qa_generator=module:function: a wrong return value or an exception of the
    user's function names the setting, the chunk, what came back and the expected signature."""
    from mixtrain.data.corpus import load_documents
    from mixtrain.data.longqa import chunk_documents
    from mixtrain.data.tokenizer import load_tokenizer_file

    root, tok_path = corpus
    (tmp_path / "qa_plugin_for_tests.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sig = "f(chunk_text: str, rng: random.Random) -> (context, question, answer)"
    chunks = chunk_documents([r["text"] for r in load_documents(qa_cfg(root, tok_path, cache_dir=str(tmp_path)))],
                             load_tokenizer_file(tok_path), 64)
    first = chunks[0][1]
    assert first.startswith("Document 0 begins. ") and len(first) > 60

    def err(fn: str) -> LongQAError:
        with pytest.raises(LongQAError) as e:
            prepare_longqa(qa_cfg(root, tok_path, qa_generator=f"qa_plugin_for_tests:{fn}", cache_dir=str(tmp_path)),
                           256, 512)
        return e.value

    tail = f"for chunk 0 (document 0); it must be {sig} returning three strings, or None to skip the chunk"
    assert str(err("pair")) == (
        f"data.qa_generator='qa_plugin_for_tests:pair' returned a tuple of 2 item(s) ({repr((first, 'Q?'))[:57]}...) "
        f"{tail}")
    assert str(err("number")) == (
        f"data.qa_generator='qa_plugin_for_tests:number' returned a tuple whose answer is of type int (42) {tail}")
    assert str(err("words")) == (
        f"data.qa_generator='qa_plugin_for_tests:words' returned a value of type str ('just a string') {tail}")

    e = err("boom")
    assert str(e) == (
        f"data.qa_generator='qa_plugin_for_tests:boom' raised RuntimeError: model server down on chunk 0 "
        f"(document 0, {len(first)} characters: {repr(first)[:37]}...); fix the function, called as {sig}")
    assert isinstance(e.__cause__, RuntimeError)

    with pytest.raises(LongQAError) as not_fn:
        offline_generator("qa_plugin_for_tests:NOT_A_FUNCTION")
    assert str(not_fn.value) == (
        f"data.qa_generator='qa_plugin_for_tests:NOT_A_FUNCTION': qa_plugin_for_tests.NOT_A_FUNCTION is a value "
        f"of type int (3), not a function; name a function {sig}")

    # None skips a chunk: only the other chunks get a pair.
    prepared = prepare_longqa(qa_cfg(root, tok_path, qa_generator="qa_plugin_for_tests:some",
                                     cache_dir=str(tmp_path)), 256, 512)
    records = LongQADataset(prepared.dir, "train", 256).qa()
    assert records and {(q["question"], q["answer"]) for r in records for q in r["qa"]} == {("Which?", "this one")}
    assert 0.3 * len(chunks) < prepared.meta["qa_pairs"] < 0.7 * len(chunks)


def test_qa_records_whose_fields_are_not_strings_are_named(tmp_path, corpus):
    """data.qa_source=jsonl: a context/question that is not a string, an answer that is
    not a string (or a list of them / SQuAD's {"text": [...]}), or a record that is not an
    object names the file, the line and the setting; null fields skip the record."""
    from mixtrain.data.longqa import plugin_pairs

    root, tok_path = corpus
    qa_file = tmp_path / "qa.jsonl"
    ok = {"context": "The lamp is green.", "question": "What colour is the lamp?", "answer": "green"}

    def err(bad) -> str:
        qa_file.write_text(json.dumps(ok) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(LongQAError) as e:
            plugin_pairs(qa_cfg(root, tok_path, qa_source="jsonl", qa_path=str(qa_file)))
        return str(e.value)

    where = f"{str(qa_file)!r} line 3"
    assert err({**ok, "context": 5}) == (
        f"{where}: data.qa_context_field='context' holds a value of type int (5), not a string; make it a string "
        f"(null skips the record) or set data.qa_context_field")
    assert err({**ok, "question": ["a", "b"]}) == (
        f"{where}: data.qa_question_field='question' holds a value of type list (['a', 'b']), not a string; make it "
        f"a string (null skips the record) or set data.qa_question_field")
    answer_tail = ('an answer must be a string or number, a list of them or {"text": [...]} (null skips the record); '
                   'fix the record or set data.qa_answer_field')
    assert err({**ok, "answer": {"start": 3}}) == (
        f"{where}: data.qa_answer_field='answer' holds a value of type dict ({{'start': 3}}); {answer_tail}")
    assert err({**ok, "answer": {"text": [{"a": 1}]}}) == (
        f"{where}: data.qa_answer_field='answer' holds a value of type dict ({{'text': [{{'a': 1}}]}}); {answer_tail}")
    from mixtrain.data.longqa import answer_text

    assert [answer_text(v) for v in (1998, [2.5], {"text": [7]}, True)] == ["1998", "2.5", "7", None]
    assert err(["The lamp is green.", "What colour?", "green"]) == (
        f"{where}: a QA record must be a JSON object with the fields ['context', 'question', 'answer'], not a list "
        f"(['The lamp is green.', 'What colour?', 'green']); fix the record")
    assert err({"context": "c", "answer": "a"}) == (
        f"{where}: QA record has no field(s) ['question'] (it has ['answer', 'context']); set data.qa_context_field / "
        f"data.qa_question_field / data.qa_answer_field / data.qa_document_field")

    rows = [ok, {**ok, "context": None}, {**ok, "question": None}, {**ok, "answer": None},
            {**ok, "answer": {"text": ["green", "lime"]}}]
    qa_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = plugin_pairs(qa_cfg(root, tok_path, qa_source="jsonl", qa_path=str(qa_file)))
    assert pairs == [(0, ok["context"], ok["question"], "green")] * 2


def test_leftover_chunks_of_one_long_document_are_not_examples_of_their_own():
    from mixtrain.data.longqa import QAItem, assemble

    def item(doc, k):
        return QAItem(doc=doc, context=[1] * 100, question_ids=[2] * 5, answer_ids=[3] * 2,
                      question=f"q{doc}-{k}", answer="a")

    items = [item(d, k) for d in range(20) for k in range(4)] + [item(99, k) for k in range(300)]
    examples = assemble(items, capacity=1000, seed=0)
    docs = [{items[i].doc for i in e} for e in examples]
    assert all(len(d) >= 2 for d in docs)  # every example mixes documents
    assert sum(len(e) for e in examples) >= 80  # the short documents are all used


def test_plugin_records_of_one_document_never_share_an_example(tmp_path, corpus):
    """SQuAD-style data: several paragraphs of one article (data.qa_document_field=title)
    are one document, so they never meet in an example."""
    _, tok_path = corpus
    rows = [{"title": f"article {i // 4}", "ctx": f"Paragraph {i} says the {WORDS[i % len(WORDS)]} is blue.",
             "q": f"What does paragraph {i} describe?", "a": WORDS[i % len(WORDS)]} for i in range(32)]
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = qa_cfg(tmp_path, tok_path, qa_source="jsonl", qa_path=str(qa_file), qa_context_field="ctx",
                 qa_question_field="q", qa_answer_field="a", qa_document_field="title", val_fraction=0.0)
    prepared = prepare_longqa(cfg, seq_len=256, model_vocab_size=512)
    title_of = {r["q"]: r["title"] for r in rows}
    records = LongQADataset(prepared.dir, "train", 256).qa()
    assert records
    for r in records:
        titles = [title_of[q["question"]] for q in r["qa"]]
        assert len(set(titles)) == len(titles) >= 2


def test_step_gradient_weighs_every_answer_token_equally(corpus):
    """Examples supervise different numbers of answer tokens. One optimizer step over two
    examples has the gradient of the mean loss over all their answer tokens, whether
    they come as one micro-batch of 2 or as two accumulated micro-batches of 1 (a mean
    of per-batch means would over-weigh the example with fewer answer tokens)."""
    import lightning as L

    from mixtrain.config import compose
    from mixtrain.layouts import build_layout
    from mixtrain.train.module import LMModule

    root, tok_path = corpus
    data_cfg = qa_cfg(root, tok_path)

    class FinalGradients(L.Callback):  # after the step (which leaves them in place)
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

    def step(micro: int, accumulate: int):
        cfg = compose(["model=tiny", "layout=ma_offset", "model.max_seq_len=512", "optim.grad_clip=0",
                       f"train.micro_batch_size={micro}", "train.seq_len=512"])
        module = LMModule(cfg, build_layout(cfg.layout, 6, 32), total_steps=1)
        dm = build_datamodule(data_cfg, seq_len=512, micro_batch_size=micro, vocab_size=512)
        grads = FinalGradients()
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                            callbacks=[grads])
        trainer.fit(module, datamodule=dm)
        return grads.grads, dm, cfg

    one_batch, dm, cfg = step(2, 1)
    accumulated, _, _ = step(1, 2)

    # Reference: plain autograd of the token-weighted mean over both examples.
    items = [dm.train_set[int(i)] for i in dm.sampler.epoch_indices(0)[:2]]
    counts = [int((it["labels"] != -100).sum()) for it in items]
    assert counts[0] != counts[1], counts  # otherwise any weighting agrees
    ref = LMModule(cfg, build_layout(cfg.layout, 6, 32), total_steps=1)
    ref.configure_model()
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    logits = ref.model(batch["input_ids"]).logits.float()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    expected = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}

    assert expected.keys() == one_batch.keys() == accumulated.keys()
    for name, g in expected.items():
        torch.testing.assert_close(one_batch[name], g, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(accumulated[name], g, rtol=1e-4, atol=1e-7, msg=name)
