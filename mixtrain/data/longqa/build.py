"""Building the long-QA examples once and caching them.

Built once per (source, tokenizer, seq_len, QA settings) under
``<cache_dir>/longqa/<hash>/`` (written to a temporary folder and renamed into place):
``{train,val}.tokens.npy`` (all examples' token streams, each ``<= seq_len + 1``
tokens), ``{train,val}.offsets.npy`` (example boundaries), ``{train,val}.answer.npy``
(1 where a token is an answer/EOS target), ``{train,val}.qa.jsonl`` (the questions and
answers of every example, for inspection) and ``meta.json``. Documents are split
between train and validation as in pretraining (``data.val_fraction``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mixtrain.data.corpus import as_data_config, cache_root, short_hash
from mixtrain.data.longqa.generators import LongQAError
from mixtrain.data.longqa.packing import assemble, encode_example, make_items
from mixtrain.data.longqa.sources import SOURCES, qa_pairs, source_identity
from mixtrain.data.pretrain import commit_build, split_documents
from mixtrain.data.tokenizer import Tok, get_tokenizer

LONGQA_FORMAT = 1


def longqa_dir(cfg: Any, tok: Tok, seq_len: int) -> Path:
    c = as_data_config(cfg)
    key = short_hash(
        source_identity(c), tok.fingerprint(), seq_len, c.val_fraction, c.seed, c.qa_max_examples,
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
    pairs, n_docs = qa_pairs(c, tok, seq_len)
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
