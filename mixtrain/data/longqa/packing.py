"""Packing QA chunks into training examples.

Chunks of *different* documents (with different questions) are concatenated, separated
by a blank line, until the next chunk and its pair would not fit in ``seq_len``; then
all the example's pairs follow in a shuffled order::

    <chunk 1>\n\n<chunk 2>\n\n ... <chunk k>\n\n
    Question: <q>\nAnswer: <a><EOS>Question: <q>\nAnswer: <a><EOS> ...

with an answer mask that is 1 on the answer tokens and the EOS after each (the
supervised targets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mixtrain.data.tokenizer import Tok

CHUNK_SEP = "\n\n"


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
