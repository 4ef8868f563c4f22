"""Aggregation (RULER ``cwe``, ``fwe``): the most common words of a numbered list, and
the most frequent coded words of a Zipf-distributed text (scoring ``all``)."""

from __future__ import annotations

import random
import string

from mixtrain.eval.tasks.base import PromptTooLong, Sample, register_task
from mixtrain.eval.tasks.fit import LengthFitter
from mixtrain.eval.tasks.words import pseudo_word, unique_words


def common_words(task="cwe", num_cw: int = 10):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 120
        freq_cw, freq_ucw = (30, 3) if length >= 4096 else (6, 1)
        fitter = LengthFitter(tokenizer, length, max_new, probe, task)
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        tail = (f"\nQuestion: What are the {num_cw} most common words in the above list?"
                f" Answer: The top {num_cw} words that appear most often in the list are:")
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            # enough uncommon words to fill any length (each costs several tokens, x freq_ucw)
            vocab = unique_words(rng, num_cw + max(4096, length // 8), lambda r: pseudo_word(r, r.choice((2, 3))))
            common, uncommon = vocab[:num_cw], vocab[num_cw:]
            shuffle_seed = rng.random()

            def build(h: int) -> str:
                lst = common * freq_cw + uncommon[:h] * freq_ucw
                random.Random(shuffle_seed).shuffle(lst)
                return head + " ".join(f"{j + 1}. {w}" for j, w in enumerate(lst)) + tail

            _, prompt, ids = fitter.fit(task, build, h_max=len(uncommon))
            out.append(Sample(task, length, i, prompt, ids, list(common), max_new))
        return out

    return generate


def frequent_words(task="fwe", alpha: float = 2.0, word_len: int = 6):
    zeta = sum(k ** -alpha for k in range(1, 100000))

    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 50
        fitter = LengthFitter(tokenizer, length, max_new, probe, task)
        head = ("Read the following coded text and track the frequency of each coded word. "
                "Find the three most frequently appeared coded words. ")
        tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?"
                " Answer: According to the coded text above, the three most frequently appeared words are:")
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            vocab = unique_words(rng, max(8, length // 50), lambda r: "".join(r.choices(string.ascii_lowercase, k=word_len)))
            vocab[0] = "...."  # the most frequent "word" is noise, as in RULER
            shuffle_seed = rng.random()

            def counts(n_words: int) -> list[int]:
                return [int(n_words * (k ** -alpha) / zeta) for k in range(1, len(vocab) + 1)]

            def ranked(n_words: int) -> bool:
                """Whether ``n_words`` words rank the top three (the 4th more frequent than the 5th)."""
                c = counts(n_words)
                return c[3] > c[4] >= 0 and c[3] >= 1

            min_words = next(n for n in range(1, 1 << 20) if ranked(n))

            def build(h: int) -> str:
                words = [w for w, c in zip(vocab, counts(h)) for _ in range(c)]
                random.Random(shuffle_seed).shuffle(words)
                return head + " ".join(words) + tail

            # probe: whether the fewest words that still rank the top three fit
            n_words, prompt, ids = fitter.fit(task, build, h_min=min_words if probe else 0)
            if not ranked(n_words):  # counts are floors: a few words fewer may rank where n_words does not
                fewer = max((n for n in range(min_words, n_words) if ranked(n)), default=None)
                if fewer is None:
                    raise PromptTooLong(task, length, f"the prompt leaves room for {n_words} coded words, fewer "
                                        f"than the {min_words} a frequency ranking needs")
                n_words, prompt = fewer, build(fewer)
                ids = tokenizer.encode(prompt)
            out.append(Sample(task, length, i, prompt, ids, vocab[1:4], max_new))
        return out

    return generate


register_task("cwe", common_words(), metric="all", max_new_tokens=120)
register_task("fwe", frequent_words(), metric="all", max_new_tokens=50)
