"""Long-context QA examples (the paper's stage 3), built offline from any corpus.

Construction (docs/paper.md, "Long-context QA fine-tuning"):

1. Documents (the same sources as pretraining: ``data.source`` embedded/files/hub)
   are tokenised and cut into chunks of ``data.qa_chunk_tokens`` tokens (1024 in the
   paper; a document's tail shorter than a quarter chunk is dropped).
2. Each chunk gets one question-answer pair. ``data.qa_source``:

   - ``offline`` (default, no model needed): ``data.qa_generator`` = ``fact`` plants
     "The secret code of the <adjective noun> is <7 digits>." at a random sentence
     boundary of the chunk and asks for it; ``span`` quotes 8 consecutive words of the
     chunk and asks for the next 5; ``mixed`` picks one per chunk. Deterministic in
     ``data.seed``. ``module:function`` plugs in your own generator (e.g. an
     instruction model): ``f(chunk_text, rng) -> (context, question, answer)``, three
     strings, or None to skip the chunk.
   - ``jsonl`` (``data.qa_path``, a file or glob) or ``hf`` (``data.qa_hub_name``):
     an existing QA data set; each record's context is a chunk and its pair the pair
     (field names ``data.qa_{context,question,answer}_field``; an answer may be a
     string, a list of strings or SQuAD's ``{"text": [...]}``: the first is used).
     Records sharing a context count as one document. A record with a null (or empty)
     context, question or answer is skipped.

3. Chunks of *different* documents (and with different questions) are concatenated,
   separated by a blank line, until the next chunk and its QA pair would not fit in
   ``seq_len``; then all the example's QA pairs are appended in a shuffled order::

       <chunk 1>\\n\\n<chunk 2>\\n\\n ... <chunk k>\\n\\n
       Question: <q>\\nAnswer: <a><EOS>Question: <q>\\nAnswer: <a><EOS> ...

4. Loss on the answers only: ``labels`` is -100 everywhere except at the positions
   whose next token is an answer token or the EOS that ends an answer. One example is
   exactly one training sequence (never packed with another), padded to ``seq_len``
   with the pad id (labels -100). ``doc_ids`` is 0 for the whole example, so
   ``data.intra_doc_attention`` never hides the context from the questions.

Built once per (corpus, tokenizer, seq_len, QA settings) under
``<cache_dir>/longqa/<hash>/`` (written to a temporary folder and renamed into place):
``{train,val}.tokens.npy`` (all examples' token streams, each ``<= seq_len + 1``
tokens), ``{train,val}.offsets.npy`` (example boundaries), ``{train,val}.answer.npy``
(1 where a token is an answer/EOS target), ``{train,val}.qa.jsonl`` (the questions and
answers of every example, for inspection) and ``meta.json``.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mixtrain.data.corpus import (
    DataError,
    as_data_config,
    cache_root,
    corpus_identity,
    load_documents,
    short_hash,
    short_repr,
)
from mixtrain.data.pretrain import commit_build, split_documents
from mixtrain.data.tokenizer import Tok, get_tokenizer

LONGQA_FORMAT = 1
SOURCES = ("offline", "jsonl", "hf")
GENERATORS = ("fact", "span", "mixed")
CHUNK_SEP = "\n\n"
SPAN_QUOTE_WORDS, SPAN_ANSWER_WORDS = 8, 5
GENERATOR_SIGNATURE = "f(chunk_text: str, rng: random.Random) -> (context, question, answer)"

# Small fixed word lists for the planted facts (adjective + noun keys, as RULER's needles).
ADJECTIVES = (
    "amber ancient bitter brave bright calm clever cold crimson curious dark eager early "
    "fancy fierce gentle golden grand green hidden hollow honest humble icy jolly kind "
    "late lively lone loud lucky mellow misty modest narrow noble odd pale patient "
    "plain polite proud quick quiet rapid rare rough royal rusty sandy secret sharp "
    "shiny silent silver simple sleepy slow smooth soft solar spare steady stormy "
    "sunny swift tall tame tidy tiny vast velvet violet warm wild windy wise young"
).split()
NOUNS = (
    "anchor apple arrow badger basket beacon bell bison bridge brook cabin camel candle "
    "canyon castle cedar cloud comet copper coral crane crown dagger desert dolphin "
    "dragon eagle ember falcon feather fern forest fox garden glacier goat harbor hawk "
    "helmet heron island jaguar kettle ladder lantern lemon lily lizard maple meadow "
    "mirror moose needle oak orchid otter owl palace panther pebble pepper piano "
    "pigeon planet pond quartz rabbit raven reef river saddle salmon shell spider "
    "spruce statue stone summit temple thistle tiger tower valley violin walrus willow"
).split()


class LongQAError(DataError):
    pass


# --------------------------------------------------------------------------- QA generators


def fact_qa(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Plant "The secret code of the <key> is <number>." at a sentence boundary."""
    key = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    sentence = f"The secret code of the {key} is {value}."
    bounds = [m.end() for m in re.finditer(r"[.!?]\s+|\n+", text)]
    bounds = [b for b in bounds if 0 < b < len(text)] or [0, len(text)]
    at = rng.choice(bounds)
    if at == 0:
        context = f"{sentence} {text}"
    elif at >= len(text):
        context = f"{text.rstrip()} {sentence}"
    else:
        context = f"{text[:at]}{sentence} {text[at:]}"
    return context, f"What is the secret code of the {key}?", value


def span_qa(text: str, rng: random.Random) -> Optional[tuple[str, str, str]]:
    """Quote 8 consecutive words of the chunk and ask for the next 5 (whitespace
    collapsed to single spaces). None when the chunk has no unique such span."""
    words = text.split()
    n = SPAN_QUOTE_WORDS + SPAN_ANSWER_WORDS
    if len(words) < n + 2:
        return None
    flat = " ".join(words)
    for _ in range(8):
        s = rng.randrange(0, len(words) - n + 1)
        quote = " ".join(words[s : s + SPAN_QUOTE_WORDS])
        if '"' in quote or flat.count(quote) != 1:
            continue
        answer = " ".join(words[s + SPAN_QUOTE_WORDS : s + n])
        question = f'In the passage that contains "{quote}", what are the next {SPAN_ANSWER_WORDS} words?'
        return text, question, answer
    return None


def offline_generator(name: str) -> Callable[[str, random.Random], tuple[str, str, str]]:
    """The QA generator ``data.qa_generator`` names (a built-in or ``module:function``)."""
    if name == "fact":
        return fact_qa
    if name == "span":
        return lambda text, rng: span_qa(text, rng) or fact_qa(text, rng)
    if name == "mixed":
        return lambda text, rng: (span_qa(text, rng) if rng.random() < 0.5 else None) or fact_qa(text, rng)
    if ":" in name:
        module, _, fn = name.partition(":")
        try:
            gen = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise LongQAError(f"data.qa_generator={name!r}: cannot import {fn!r} from {module!r} ({e})") from e
        if not callable(gen):
            raise LongQAError(
                f"data.qa_generator={name!r}: {module}.{fn} is a value of type {type(gen).__name__} "
                f"({short_repr(gen)}), not a function; name a function {GENERATOR_SIGNATURE}"
            )
        return gen
    raise LongQAError(
        f"data.qa_generator={name!r} is not known; use one of {list(GENERATORS)} or 'module:function' "
        f"(a callable (chunk_text, random.Random) -> (context, question, answer))"
    )


# --------------------------------------------------------------------------- items


@dataclass
class QAItem:
    """One chunk with its QA pair, tokenised."""

    doc: int  # document index (chunks of one document never share an example)
    context: list[int]
    question_ids: list[int]  # "Question: <q>\nAnswer:"
    answer_ids: list[int]  # " <a>" + EOS (the supervised tokens)
    question: str
    answer: str

    @property
    def cost(self) -> int:
        return len(self.context) + len(self.question_ids) + len(self.answer_ids)


def _answer_text(value: Any) -> Optional[str]:
    """The answer of a QA record: a string or a number (``1998``), the first of a list of
    them or of SQuAD's ``{"text": [...]}``; "" for null or an empty list; None for
    anything else."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else None


def chunk_documents(texts: list[str], tok: Tok, chunk_tokens: int) -> list[tuple[int, str]]:
    """(document index, chunk text) for every ~chunk_tokens-token chunk of every document."""
    out = []
    min_tail = max(1, chunk_tokens // 4)
    for doc, ids in enumerate(tok.encode_batch(texts)):
        for s in range(0, len(ids), chunk_tokens):
            piece = ids[s : s + chunk_tokens]
            if len(piece) < min_tail:
                continue
            text = tok.decode(piece).strip()
            if text:
                out.append((doc, text))
    return out


def make_items(pairs: list[tuple[int, str, str, str]], tok: Tok) -> list[QAItem]:
    """Tokenise (doc, context, question, answer) tuples into items."""
    if not pairs:
        return []
    ctx = tok.encode_batch([p[1] + CHUNK_SEP for p in pairs])
    qs = tok.encode_batch([f"Question: {p[2]}\nAnswer:" for p in pairs])
    ans = tok.encode_batch([f" {p[3]}" for p in pairs])
    return [
        QAItem(p[0], c, q, a + [tok.eos_id], p[2], p[3])
        for p, c, q, a in zip(pairs, ctx, qs, ans)
    ]


def _generated(generator: str, got: Any, chunk: int, doc: int) -> Optional[tuple[str, str, str]]:
    """``got`` (a generator's return value for chunk ``chunk``) checked: None or three strings."""
    if got is None:
        return None
    problem = None
    if not isinstance(got, (tuple, list)):
        problem = f"a value of type {type(got).__name__} ({short_repr(got)})"
    elif len(got) != 3:
        problem = f"a {type(got).__name__} of {len(got)} item(s) ({short_repr(got)})"
    else:
        for name, value in zip(("context", "question", "answer"), got):
            if not isinstance(value, str):
                problem = (f"a {type(got).__name__} whose {name} is of type {type(value).__name__} "
                           f"({short_repr(value)})")
                break
    if problem is None:
        return tuple(got)
    raise LongQAError(
        f"data.qa_generator={generator!r} returned {problem} for chunk {chunk} (document {doc}); it must be "
        f"{GENERATOR_SIGNATURE} returning three strings, or None to skip the chunk"
    )


def offline_pairs(texts: list[str], tok: Tok, chunk_tokens: int, generator: str, seed: int):
    gen = offline_generator(generator)
    pairs = []
    for i, (doc, text) in enumerate(chunk_documents(texts, tok, chunk_tokens)):
        rng = random.Random(f"longqa-{seed}-{i}")
        try:
            got = gen(text, rng)
        except Exception as e:  # noqa: BLE001 (a user's function: say which setting and chunk)
            raise LongQAError(
                f"data.qa_generator={generator!r} raised {type(e).__name__}: {e} on chunk {i} (document {doc}, "
                f"{len(text)} characters: {short_repr(text, 40)}); fix the function, called as {GENERATOR_SIGNATURE}"
            ) from e
        got = _generated(generator, got, i, doc)
        if got is None:
            continue
        context, question, answer = got
        if question and answer.strip():
            pairs.append((doc, context, question, answer.strip()))
    return pairs


def _qa_records(c) -> list[tuple[str, Any]]:
    """Records of an existing QA data set (jsonl or hf), each with where it is (for messages):
    ``'<file>' line <n>`` (from 1) or ``data.qa_hub_name='<name>' row <n>`` (from 0)."""
    if c.qa_source == "jsonl":
        if not c.qa_path:
            raise LongQAError("data.qa_source=jsonl needs data.qa_path (a .jsonl file or a glob)")
        files = sorted(glob.glob(os.path.expanduser(c.qa_path))) or [os.path.expanduser(c.qa_path)]
        records = []
        for f in files:
            if not os.path.isfile(f):
                raise LongQAError(f"data.qa_path={c.qa_path!r}: no such file")
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append((f"{f!r} line {n}", json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise LongQAError(f"{f} line {n} is not valid JSON ({e})") from e
        return records
    if c.qa_source == "hf":
        if not c.qa_hub_name:
            raise LongQAError("data.qa_source=hf needs data.qa_hub_name (e.g. rajpurkar/squad)")
        import datasets

        try:
            ds = datasets.load_dataset(c.qa_hub_name, c.qa_hub_config, split=c.qa_hub_split)
        except Exception as e:  # noqa: BLE001
            raise LongQAError(
                f"data.qa_hub_name={c.qa_hub_name!r}: could not load it ({type(e).__name__}: {e}); hub data sets "
                f"need network or an HF cache. Offline, export it to JSONL and use data.qa_source=jsonl"
            ) from e
        return [(f"data.qa_hub_name={c.qa_hub_name!r} row {n}", r) for n, r in enumerate(ds)]
    raise LongQAError(f"data.qa_source={c.qa_source!r} is not known; use one of {list(SOURCES)}")


def plugin_pairs(c) -> list[tuple[int, str, str, str]]:
    records = _qa_records(c)
    fields = (c.qa_context_field, c.qa_question_field, c.qa_answer_field) + (
        (c.qa_document_field,) if c.qa_document_field else ())
    doc_of: dict[str, int] = {}
    pairs = []
    for where, r in records:
        if not isinstance(r, dict):
            raise LongQAError(
                f"{where}: a QA record must be a JSON object with the fields {list(fields)}, "
                f"not a {type(r).__name__} ({short_repr(r)}); fix the record"
            )
        missing = [f for f in fields if f not in r]
        if missing:
            raise LongQAError(
                f"{where}: QA record has no field(s) {missing} (it has {sorted(r)}); set "
                f"data.qa_context_field / data.qa_question_field / data.qa_answer_field / data.qa_document_field"
            )
        for setting, field in (("data.qa_context_field", fields[0]), ("data.qa_question_field", fields[1])):
            if r[field] is not None and not isinstance(r[field], str):
                raise LongQAError(
                    f"{where}: {setting}={field!r} holds a value of type {type(r[field]).__name__} "
                    f"({short_repr(r[field])}), not a string; make it a string (null skips the record) "
                    f"or set {setting}"
                )
        answer = _answer_text(r[fields[2]])
        if answer is None:
            raise LongQAError(
                f"{where}: data.qa_answer_field={fields[2]!r} holds a value of type {type(r[fields[2]]).__name__} "
                f"({short_repr(r[fields[2]])}); an answer must be "
                f"a string or number, a list of them or {{\"text\": [...]}} (null skips the record); fix the record "
                f"or set data.qa_answer_field"
            )
        context, question = r[fields[0]] or "", (r[fields[1]] or "").strip()
        if not context.strip() or not question or not answer:
            continue
        doc_key = str(r[c.qa_document_field]) if c.qa_document_field else context
        doc = doc_of.setdefault(doc_key, len(doc_of))
        pairs.append((doc, context, question, answer))
    if not pairs:
        raise LongQAError(f"data.qa_source={c.qa_source}: no usable (context, question, answer) records")
    return pairs


# --------------------------------------------------------------------------- assembly


def assemble(items: list[QAItem], capacity: int, seed: int, max_examples: Optional[int] = None) -> list[list[int]]:
    """Group item indices into examples of at most ``capacity`` tokens, no two items of
    one example from the same document or with the same question. Items are taken in
    a seeded random order; an item that conflicts with the open example waits for the
    next one. Examples that end up holding a single document are dropped."""
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    examples: list[list[int]] = []
    cur: list[int] = []
    docs: set[int] = set()
    questions: set[str] = set()
    used = 0

    def try_add(i: int) -> Optional[bool]:  # True added, False conflict, None full
        nonlocal used
        it = items[i]
        if it.doc in docs or it.question in questions:
            return False
        if used + it.cost > capacity:
            return None
        cur.append(i)
        docs.add(it.doc)
        questions.add(it.question)
        used += it.cost
        return True

    def close() -> None:
        nonlocal cur, used
        if cur:
            examples.append(cur)
        cur, used = [], 0
        docs.clear()
        questions.clear()

    pending: list[int] = []

    def refill() -> None:
        nonlocal pending
        keep = []
        for j in pending:
            if try_add(j) is not True:
                keep.append(j)
        pending = keep

    for i in order:
        if max_examples is not None and len(examples) >= max_examples:
            break
        r = try_add(i)
        if r is True:
            continue
        if r is False:
            pending.append(i)
            continue
        close()
        refill()
        if try_add(i) is not True:
            pending.append(i)
    while cur or pending:
        if max_examples is not None and len(examples) >= max_examples:
            break
        close()
        before = len(pending)
        refill()
        if not cur and len(pending) == before:
            break
    close()
    # Chunks left over from one long document cannot meet chunks of other documents:
    # an example of one document is not what this stage trains on, so it is dropped
    # (unless the corpus has a single document).
    mixed = [e for e in examples if len({items[i].doc for i in e}) >= 2]
    examples = mixed or examples
    return examples[:max_examples] if max_examples is not None else examples


def encode_example(items: list[QAItem], rng: random.Random) -> tuple[list[int], list[int], list[dict]]:
    """Token stream of one example, its answer mask, and its QA records (in order)."""
    tokens: list[int] = []
    for it in items:
        tokens += it.context
    mask = [0] * len(tokens)
    qa_order = list(items)
    rng.shuffle(qa_order)
    for it in qa_order:
        tokens += it.question_ids + it.answer_ids
        mask += [0] * len(it.question_ids) + [1] * len(it.answer_ids)
    return tokens, mask, [{"doc": it.doc, "question": it.question, "answer": it.answer} for it in qa_order]


# --------------------------------------------------------------------------- build and cache


def _source_identity(c) -> str:
    if c.qa_source == "offline":
        generator = c.qa_generator
        if ":" in generator:  # a user's function: its code is part of the cache key
            import hashlib
            import inspect

            fn = offline_generator(generator)
            try:
                generator += "#" + hashlib.sha1(inspect.getsource(fn).encode()).hexdigest()[:12]
            except (OSError, TypeError):  # no source available (builtins, C extensions)
                pass
        return repr(("offline", corpus_identity(c), generator, c.qa_chunk_tokens))
    if c.qa_source == "jsonl":
        files = sorted(glob.glob(os.path.expanduser(c.qa_path or ""))) or [c.qa_path]
        stats = [(str(Path(f).resolve()), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if f and os.path.isfile(f)]
        return repr(("jsonl", tuple(stats)))
    return repr(("hf", c.qa_hub_name, c.qa_hub_config, c.qa_hub_split))


def longqa_dir(cfg: Any, tok: Tok, seq_len: int) -> Path:
    c = as_data_config(cfg)
    key = short_hash(
        _source_identity(c), tok.fingerprint(), seq_len, c.val_fraction, c.seed, c.qa_max_examples,
        (c.qa_context_field, c.qa_question_field, c.qa_answer_field, c.qa_document_field), LONGQA_FORMAT,
    )
    return cache_root(c) / "longqa" / key


@dataclass
class PreparedQA:
    dir: Path
    meta: dict
    tokenizer: Tok

    def num_examples(self, split: str) -> int:
        return self.meta["splits"][split]["examples"]


def build(c, tok: Tok, seq_len: int, out: Path) -> dict:
    t0 = time.time()
    if c.qa_chunk_tokens < 16:
        raise LongQAError(f"data.qa_chunk_tokens={c.qa_chunk_tokens} is too small; use at least 16 (the paper: 1024)")
    capacity = seq_len + 1  # input_ids = stream[:-1], labels = stream[1:]
    if c.qa_source == "offline":
        docs = load_documents(c)
        texts = [row["text"] for row in docs]
        if c.qa_chunk_tokens + 64 > capacity:
            raise LongQAError(
                f"data.qa_chunk_tokens={c.qa_chunk_tokens} leaves no room for a question in seq_len={seq_len}; "
                f"lower data.qa_chunk_tokens (the paper: 1024-token chunks in 32K sequences)"
            )
        pairs = offline_pairs(texts, tok, c.qa_chunk_tokens, c.qa_generator, c.seed)
        n_docs = len(texts)
    else:
        pairs = plugin_pairs(c)
        n_docs = 1 + max(p[0] for p in pairs)
    items = make_items(pairs, tok)
    too_long = sum(1 for it in items if it.cost > capacity)
    items = [it for it in items if it.cost <= capacity]
    if not items:
        raise LongQAError(
            f"no chunk with its QA pair fits in seq_len={seq_len} ({too_long} too long); raise the sequence "
            f"length or lower data.qa_chunk_tokens"
        )
    val_docs = split_documents(n_docs, c.val_fraction, c.seed) if n_docs > 1 else np.zeros(n_docs, bool)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict = {
        "format": LONGQA_FORMAT,
        "seq_len": seq_len,
        "qa_source": c.qa_source,
        "qa_generator": c.qa_generator if c.qa_source == "offline" else None,
        "qa_chunk_tokens": c.qa_chunk_tokens,
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "documents": n_docs,
        "qa_pairs": len(items),
        "qa_pairs_too_long": too_long,
        "splits": {},
    }
    for split, is_val in (("train", False), ("val", True)):
        split_items = [it for it in items if bool(val_docs[it.doc]) == is_val]
        groups = assemble(split_items, capacity, c.seed + (1 if is_val else 0),
                          None if is_val else c.qa_max_examples)
        if split == "train" and not groups:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LongQAError(
                f"the long-QA training split is empty ({len(split_items)} QA chunks); add documents or lower "
                f"data.val_fraction"
            )
        streams, masks, offsets, n_pairs, used = [], [], [0], 0, 0
        with open(tmp / f"{split}.qa.jsonl", "w", encoding="utf-8") as f:
            for e, group in enumerate(groups):
                toks, mask, qa = encode_example([split_items[i] for i in group], random.Random(f"order-{c.seed}-{split}-{e}"))
                streams.append(np.asarray(toks, dtype=np.int64))
                masks.append(np.asarray(mask, dtype=np.uint8))
                offsets.append(offsets[-1] + len(toks))
                n_pairs += len(qa)
                used += len(toks)
                f.write(json.dumps({"example": e, "tokens": len(toks), "qa": qa}) + "\n")
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        np.save(tmp / f"{split}.tokens.npy", cat(streams, dtype))
        np.save(tmp / f"{split}.answer.npy", cat(masks, np.uint8))
        np.save(tmp / f"{split}.offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta["splits"][split] = {
            "examples": len(groups),
            "qa_pairs": n_pairs,
            # QA chunks that could not share an example with another document's
            # (leftovers of very long documents); capped max_examples not counted.
            "qa_pairs_unplaced": len(split_items) - n_pairs if c.qa_max_examples is None or is_val else None,
            "tokens": used,
            "fill": round(used / max(1, len(groups) * capacity), 4),
            "answer_tokens": int(sum(int(m.sum()) for m in masks)),
        }
    return commit_build(tmp, out, tok, meta, t0)


def prepare_longqa(cfg: Any, seq_len: int, model_vocab_size: Optional[int] = None) -> PreparedQA:
    """Build (once) and return the long-QA examples for ``seq_len``."""
    c = as_data_config(cfg)
    if c.qa_source not in SOURCES:
        raise LongQAError(f"data.qa_source={c.qa_source!r} is not known; use one of {list(SOURCES)}")
    tok = get_tokenizer(c, model_vocab_size)
    out = longqa_dir(c, tok, seq_len)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = build(c, tok, seq_len, out)
    return PreparedQA(out, meta, tok)


class LongQADataset(torch.utils.data.Dataset):
    """Item ``i``: one example as ``input_ids``/``labels``/``doc_ids`` of length ``seq_len``
    (padded with ``pad_id``; labels -100 except where the next token is an answer token)."""

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int):
        self.dir, self.split, self.seq_len = Path(directory), split, int(seq_len)
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta["seq_len"] != self.seq_len:
            raise LongQAError(f"{self.dir} was built for seq_len={meta['seq_len']}, not {seq_len}")
        self.pad_id = int(meta["pad_id"])
        self.n = meta["splits"][split]["examples"]
        self._tokens = self._mask = self._offsets = None

    def _open(self):
        if self._tokens is None:
            self._tokens = np.load(self.dir / f"{self.split}.tokens.npy", mmap_mode="r")
            self._mask = np.load(self.dir / f"{self.split}.answer.npy", mmap_mode="r")
            self._offsets = np.load(self.dir / f"{self.split}.offsets.npy")

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_mask": None, "_offsets": None}

    def __len__(self) -> int:
        return self.n

    def qa(self) -> list[dict]:
        """The QA records of every example (from ``{split}.qa.jsonl``)."""
        with open(self.dir / f"{self.split}.qa.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"example {i} out of range for {self.n} {self.split} examples")
        i %= self.n
        self._open()
        s, e = int(self._offsets[i]), int(self._offsets[i + 1])
        stream = torch.from_numpy(self._tokens[s:e].astype(np.int64))
        mask = torch.from_numpy(self._mask[s:e].astype(np.bool_))
        T, n = self.seq_len, e - s - 1
        input_ids = torch.full((T,), self.pad_id, dtype=torch.long)
        labels = torch.full((T,), -100, dtype=torch.long)
        input_ids[:n] = stream[:-1]
        labels[:n] = torch.where(mask[1:], stream[1:], torch.full_like(stream[1:], -100))
        return {"input_ids": input_ids, "labels": labels, "doc_ids": torch.zeros(T, dtype=torch.long)}


# --------------------------------------------------------------------------- Lightning

from mixtrain.data.pretrain import PretrainDataModule  # noqa: E402


class LongQADataModule(PretrainDataModule):
    """Long-QA examples for Lightning, with the interface of :class:`PretrainDataModule`
    (same resumable sampler, loaders, state dict and progress accounting)."""

    def _prepare(self):
        return prepare_longqa(self.cfg, self.seq_len, self.vocab_size)

    def _dataset(self, split: str):
        return LongQADataset(self.prepared.dir, split, self.seq_len)

    def _has_split(self, split: str) -> bool:
        return bool(self.prepared.num_examples(split))

    def _too_few_val(self, world: int):
        return None  # too few held-out examples to shard: validate on none


__all__ = [
    "LongQADataModule", "LongQADataset", "PreparedQA", "QAItem", "assemble", "chunk_documents",
    "encode_example", "fact_qa", "make_items", "offline_generator", "prepare_longqa", "span_qa",
]
