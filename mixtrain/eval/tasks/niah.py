"""Needle in a haystack (NIAH): eight RULER tasks, one factory.

==================  =========================================================
niah_single_1       1 needle (key word, value 7-digit number); noise haystack
niah_single_2       1 needle (word -> number); corpus-document haystack
niah_single_3       1 needle (word -> uuid); corpus-document haystack
niah_multikey_1     4 needles of different keys, 1 queried; documents
niah_multikey_2     1 needle; haystack made of distractor needles (words)
niah_multikey_3     1 needle; distractor-needle haystack, uuid keys and values
niah_multivalue     4 values for one key; documents
niah_multiquery     4 keys, all queried; documents
==================  =========================================================

Scoring ``all`` (every value queried must appear in the prediction).
"""

from __future__ import annotations

import random

from mixtrain.eval.tasks.base import Sample, register_task
from mixtrain.eval.tasks.fit import LengthFitter
from mixtrain.eval.tasks.haystack import depths_for, essay_words, insert_in_units, insert_in_words, take_words
from mixtrain.eval.tasks.words import NOISE_SENTENCES, random_value, unique_words

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."


def _niah_text(type_v: str, single: bool, query: str, context: str) -> tuple[str, str]:
    if single:
        t = type_v[:-1]
        head = f"A special magic {t} is hidden within the following text. Make sure to memorize it. I will quiz you about the {t} afterwards.\n"
        q = f"\nWhat is the special magic {t} for {query} mentioned in the provided text?"
        prefix = f" The special magic {t} for {query} mentioned in the provided text is"
    else:
        head = f"Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_v} afterwards.\n"
        q = f"\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
        prefix = f" The special magic {type_v} for {query} mentioned in the provided text are"
    return head + context + q + prefix, prefix


def niah(task: str, *, haystack: str, type_k: str, type_v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 128
        fitter = LengthFitter(tokenizer, length, max_new, probe, task)
        words = essay_words(haystack_docs) if haystack == "essay" else None
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            keys = unique_words(rng, max(num_k, num_q), lambda r: random_value(type_k, r))
            values = [[random_value(type_v, rng) for _ in range(num_v)] for _ in keys]
            needles = [NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
            rng.shuffle(needles)
            depths = depths_for(i, n_samples, len(needles))
            q_idx = rng.sample(range(len(keys)), num_q)
            queries = [keys[j] for j in q_idx]
            refs = [v for j in q_idx for v in values[j]]
            query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
            single = num_q * num_v == 1
            start = rng.randrange(len(words)) if words else 0
            pool: list[str] = []  # distractor needles, drawn lazily (in order) as the haystack grows
            taken, prng = set(keys), random.Random(f"{task}-{seed}-{length}-{i}-distractors")

            def distractors(h: int) -> list[str]:
                while len(pool) < h:
                    k = random_value(type_k, prng)
                    if k not in taken:
                        pool.append(NEEDLE.format(type_v=type_v, key=k, value=random_value(type_v, prng)))
                return pool[:h]

            def build(h: int) -> str:
                if haystack == "essay":
                    context = insert_in_words(take_words(words, start, h), needles, depths)
                elif haystack == "repeat":
                    units = [NOISE_SENTENCES[j % len(NOISE_SENTENCES)] for j in range(h)]
                    context = insert_in_units(units, needles, depths, " ")
                else:
                    context = insert_in_units(distractors(h), needles, depths, "\n")
                return _niah_text(type_v, single, query, context)[0]

            _, prompt, ids = fitter.fit(task, build)
            out.append(Sample(task, length, i, prompt, ids, refs, max_new, depths))
        return out

    return generate


for _name, _kw in {
    "niah_single_1": dict(haystack="repeat", type_k="words", type_v="numbers"),
    "niah_single_2": dict(haystack="essay", type_k="words", type_v="numbers"),
    "niah_single_3": dict(haystack="essay", type_k="words", type_v="uuids"),
    "niah_multikey_1": dict(haystack="essay", type_k="words", type_v="numbers", num_k=4),
    "niah_multikey_2": dict(haystack="needle", type_k="words", type_v="numbers"),
    "niah_multikey_3": dict(haystack="needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": dict(haystack="essay", type_k="words", type_v="numbers", num_v=4),
    "niah_multiquery": dict(haystack="essay", type_k="words", type_v="numbers", num_k=4, num_q=4),
}.items():
    register_task(_name, niah(_name, **_kw), metric="all", max_new_tokens=128,
                  documents="required" if _kw["haystack"] == "essay" else "none")
