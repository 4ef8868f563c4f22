"""Question answering over documents (RULER ``qa_1``, SQuAD-style, and ``qa_2``,
HotpotQA-style two-hop): synthetic fact documents (a person's city; a person's company
and its headquarters) among distractors of the same shape, with filler words from the
document haystack when there is one. Scoring ``any``."""

from __future__ import annotations

import random
from typing import Optional

from mixtrain.eval.tasks.base import RulerError, Sample, register_task
from mixtrain.eval.tasks.fit import LengthFitter
from mixtrain.eval.tasks.haystack import depths_for, essay_words, take_words
from mixtrain.eval.tasks.words import PROFESSIONS, pseudo_word


_QA_HEAD = ("Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n")


def _qa_tail(question: str) -> str:
    return ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
            f"other words.\n\nQuestion: {question} Answer:")


def _name(rng: random.Random) -> str:
    return f"{pseudo_word(rng, 2).capitalize()} {pseudo_word(rng, 3).capitalize()}"


def _filler(rng: random.Random, words: Optional[list[str]], n: int = 24) -> str:
    if not words:
        return ""
    s = rng.randrange(len(words))
    return " " + " ".join(take_words(words, s, n))


def question_answering(task: str, hops: int):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 32
        fitter = LengthFitter(tokenizer, length, max_new, probe, task)
        words = None
        if haystack_docs:
            try:
                words = essay_words(haystack_docs)
            except RulerError:
                words = None
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            used: set[str] = set()

            def fresh(make) -> str:
                while True:
                    x = make(rng)
                    if x not in used:
                        used.add(x)
                        return x

            pool: list[str] = []

            def person_doc() -> str:
                who, city, job = fresh(_name), fresh(lambda r: pseudo_word(r, 3).capitalize()), rng.choice(PROFESSIONS)
                year = rng.randint(1900, 2000)
                return f"{who} is a {job} who was born in {year} and lives in the city of {city}.{_filler(rng, words)}"

            def company_doc() -> str:
                who, comp = fresh(_name), fresh(lambda r: pseudo_word(r, 3).capitalize() + " Works")
                city = fresh(lambda r: pseudo_word(r, 3).capitalize())
                return (f"{who} works for {comp}.{_filler(rng, words)} {comp} has its headquarters in the city of "
                        f"{city}.{_filler(rng, words)}")

            if hops == 1:
                who, city = fresh(_name), fresh(lambda r: pseudo_word(r, 3).capitalize())
                job, year = rng.choice(PROFESSIONS), rng.randint(1900, 2000)
                gold = [f"{who} is a {job} who was born in {year} and lives in the city of {city}.{_filler(rng, words)}"]
                question, refs = f"In which city does {who} live?", [city]
                make_distractor = person_doc
            else:
                who, comp = fresh(_name), fresh(lambda r: pseudo_word(r, 3).capitalize() + " Works")
                city = fresh(lambda r: pseudo_word(r, 3).capitalize())
                gold = [f"{who} works for {comp}.{_filler(rng, words)}",
                        f"{comp} has its headquarters in the city of {city}.{_filler(rng, words)}"]
                question = f"In which city is the headquarters of the company that {who} works for?"
                refs = [city]
                make_distractor = company_doc
            depths = depths_for(i, n_samples, len(gold))

            extra = take_words(words, rng.randrange(len(words)), 400) if words else \
                [pseudo_word(rng, 2) for _ in range(400)]

            def build(h: int, n_extra: int = 0) -> str:
                while len(pool) < h:
                    pool.append(make_distractor())
                docs = list(pool[:h])
                if n_extra and docs:  # fine filling: more words in the last distractor document
                    docs[-1] = docs[-1] + " " + " ".join(extra[:n_extra])
                for pos, g in sorted(((int(round(d * h)), g) for d, g in zip(depths, gold)), key=lambda x: -x[0]):
                    docs.insert(pos, g)
                body = "\n\n".join(f"Document {j + 1}:\n{d}" for j, d in enumerate(docs))
                return _QA_HEAD + body + _qa_tail(question)

            h, prompt, ids = fitter.fit(task, build)
            if h > 0:
                _, prompt, ids = fitter.fit(task + "/fill", lambda w: build(h, w), h_max=len(extra))
            out.append(Sample(task, length, i, prompt, ids, refs, max_new, depths))
        return out

    return generate


register_task("qa_1", question_answering("qa_1", hops=1), metric="any", max_new_tokens=32, documents="optional")
register_task("qa_2", question_answering("qa_2", hops=2), metric="any", max_new_tokens=32, documents="optional")
