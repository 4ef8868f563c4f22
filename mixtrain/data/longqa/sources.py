"""Where the (document, context, question, answer) tuples come from (``data.qa_source``):

- ``offline``: the corpus (``data.source``, as in pretraining) tokenised and cut into
  ``data.qa_chunk_tokens``-token chunks, one pair per chunk from an offline generator
  (:mod:`mixtrain.data.longqa.generators`);
- ``jsonl`` (``data.qa_path``) or ``hf`` (``data.qa_hub_name``): an existing QA data
  set, one record per pair (records sharing a context, or ``data.qa_document_field``,
  are one document).

:func:`qa_pairs` returns them with the number of documents; :func:`source_identity`
is the part of the cache key that names the source.
"""

from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path
from typing import Any, Optional

from mixtrain.data.corpus import corpus_identity, load_documents, short_repr
from mixtrain.data.longqa.generators import GENERATOR_SIGNATURE, LongQAError, checked_output, offline_generator
from mixtrain.data.tokenizer import Tok

SOURCES = ("offline", "jsonl", "hf")


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
        got = checked_output(generator, got, i, doc)
        if got is None:
            continue
        context, question, answer = got
        if question and answer.strip():
            pairs.append((doc, context, question, answer.strip()))
    return pairs


def answer_text(value: Any) -> Optional[str]:
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
        answer = answer_text(r[fields[2]])
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


def qa_pairs(c, tok: Tok, seq_len: int) -> tuple[list[tuple[int, str, str, str]], int]:
    """(document index, context, question, answer) tuples of the configured source, and
    the number of documents."""
    if c.qa_source == "offline":
        texts = [row["text"] for row in load_documents(c)]
        if c.qa_chunk_tokens + 64 > seq_len + 1:
            raise LongQAError(
                f"data.qa_chunk_tokens={c.qa_chunk_tokens} leaves no room for a question in seq_len={seq_len}; "
                f"lower data.qa_chunk_tokens (the paper: 1024-token chunks in 32K sequences)"
            )
        return offline_pairs(texts, tok, c.qa_chunk_tokens, c.qa_generator, c.seed), len(texts)
    pairs = plugin_pairs(c)
    return pairs, 1 + max(p[0] for p in pairs)


def source_identity(c) -> str:
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
