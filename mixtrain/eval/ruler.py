"""RULER-style long-context evaluation, generated offline.

The 13 tasks of RULER (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER), with the
same templates, needle formats, answer prefixes and scoring, but nothing downloaded:

==================  =========================================================  =======
task                what the prompt holds                                      scoring
==================  =========================================================  =======
niah_single_1       1 needle (key word, value 7-digit number); noise haystack  all
niah_single_2       1 needle (word -> number); corpus-document haystack        all
niah_single_3       1 needle (word -> uuid); corpus-document haystack          all
niah_multikey_1     4 needles of different keys, 1 queried; documents          all
niah_multikey_2     1 needle; haystack made of distractor needles (words)      all
niah_multikey_3     1 needle; distractor-needle haystack, uuid keys and values all
niah_multivalue     4 values for one key; documents                            all
niah_multiquery     4 keys, all queried; documents                             all
vt                  a 4-hop chain VAR X = 12345, VAR Y = VAR X ...; noise      all
cwe                 numbered word list: the 10 most common words               all
fwe                 Zipf-distributed coded words: the 3 most frequent          all
qa_1                synthetic fact documents, one asked about (SQuAD-style)    any
qa_2                two linked documents, multi-hop question (HotpotQA-style)  any
==================  =========================================================  =======

"Documents" haystacks use any text you give (``haystack_docs``: the run's corpus by
default; RULER used Paul Graham essays). Every prompt is filled to the requested
length with the model's tokenizer: the haystack size is searched so that prompt +
``max_new_tokens`` fits ``length`` tokens (RULER's budget), the needles sit at
evenly spaced depths (sample ``i`` of ``n`` puts a single needle at depth
``(i + 0.5) / n``; ``k`` needles are spread ``1/k`` apart from there), and the answer
prefix ends the prompt. A prompt that cannot fit its length even without haystack
(:class:`PromptTooLong`) makes :func:`evaluate` skip that (task, length), found before any
decoding, and average over the cells that ran. Decoding is greedy; a prediction scores,
case-insensitively, the fraction of references it contains (``all``: NIAH, VT, CWE, FWE;
RULER's ``string_match_all``) or 1 if it contains any (``any``: QA; ``string_match_part``).

Differences from RULER, all deliberate for offline use: no in-context example for
vt/cwe; synthetic pronounceable words instead of the ``wonderwords`` lists; synthetic
fact passages instead of SQuAD/HotpotQA.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mixtrain.errors import UserError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

ADJECTIVES = (
    "abundant agreeable ancient aquatic bashful bewildered bitter brave breezy calm careful cheerful clever "
    "cloudy colossal cool crooked curious dazzling delightful eager elegant enchanted fancy fearless fierce "
    "fluffy fragile gentle gifted gleaming glorious graceful grumpy handsome helpful hilarious humble icy "
    "jolly jubilant kind lively lonely lucky magnificent mellow melodic mighty misty modern mysterious "
    "nervous nimble noisy obedient odd old orange perfect plain polite powerful precious proud quaint quick "
    "quiet rapid rare rich rough royal rustic scary shiny shy silent silly sleepy slimy smooth sparkling "
    "spicy splendid steady stormy strange sturdy sunny superb swift tall tame tender thankful thirsty tidy "
    "tiny tranquil ugly upbeat vast victorious vivid wandering warm wealthy whimsical wicked wide wild "
    "windy wise witty wooden worried young zany zealous"
).split()
NOUNS = (
    "airport alligator anchor apple apron arch armchair arrow avocado badge bakery balloon banjo barn "
    "basket beach beaver bench bicycle biscuit blanket blender bottle boulder bracelet bridge broom "
    "bucket butterfly cabin cactus camel candle cannon canoe carpet castle cathedral cello chimney "
    "citadel clock closet cobra compass cookie cottage crayon crocodile crown cupboard curtain dagger "
    "desert diamond dolphin donkey dragon drum eagle easel elephant emerald engine falcon feather fiddle "
    "flamingo flute fountain fox galaxy garden gazelle giraffe glacier goblet gondola guitar hammock "
    "harbor harp hedgehog helmet hippo hurricane igloo island jacket jaguar jellyfish kangaroo kettle "
    "kite koala ladder lagoon lantern lemon leopard library lighthouse lizard lobster locket magnet "
    "mango meadow meteor microscope mirror monastery moose mountain mushroom necklace nest oasis octopus "
    "orchard ostrich otter owl paddle pagoda palace panda parrot peacock pelican pencil penguin piano "
    "pyramid quilt rabbit raccoon radio rainbow raven reindeer rocket saddle salmon sandal satellite "
    "scarf scooter seahorse shovel skyscraper sled snail spaceship squirrel stadium starfish statue "
    "submarine sunflower swan sword telescope temple tiger tornado tortoise tractor trumpet tulip turtle "
    "umbrella unicorn vase violin volcano walrus waterfall whale whistle windmill wizard zebra"
).split()
CONSONANTS = "bcdfghjklmnprstvz"
VOWELS = "aeiou"
PROFESSIONS = (
    "architect baker carpenter chemist dentist designer editor electrician engineer farmer firefighter "
    "florist gardener geologist historian jeweler journalist lawyer librarian linguist mechanic musician "
    "nurse painter pharmacist photographer pilot plumber potter sailor sculptor surgeon tailor teacher "
    "translator veterinarian weaver writer"
).split()

TASK_NAMES = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "qa_1", "qa_2",
)


# Tasks whose haystack is document text (haystack_docs).
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


class RulerError(UserError, ValueError):
    """A bad task name, length or haystack; the message says what to change."""


class PromptTooLong(RulerError):
    """A task's prompt (with the smallest haystack) plus its generated tokens do not fit
    the length: ``detail`` says why, ``needed`` is the shortest length that fits (when
    known). :func:`evaluate` records such a (task, length) cell as skipped."""

    def __init__(self, task: str, length: int, detail: str, needed: Optional[int] = None):
        self.task, self.length, self.detail, self.needed = task, int(length), detail, needed
        advice = f"use a longer length (about {needed} or more)" if needed else "use a longer length"
        super().__init__(f"{task}: {detail}; {advice}")


MIN_HAYSTACK_WORDS = 200  # the document haystacks cycle through at least this much text


def _user_error(msg: str) -> RulerError:
    return RulerError(msg)


# --------------------------------------------------------------------------- samples and scoring


@dataclass
class Sample:
    """One prompt: ``prompt`` (ends with the answer prefix), its token ids, the
    references, and how many tokens to generate."""

    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    depths: list[float] = field(default_factory=list)

    def to_json(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        d.pop("input_ids")
        d["prompt_tokens"] = len(self.input_ids)
        if not with_prompt:
            d.pop("prompt")
        return d


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / max(1, len(references))


def string_match_any(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


# --------------------------------------------------------------------------- random material


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_key_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random(kind: str, rng: random.Random) -> str:
    return {"numbers": random_number, "words": random_key_word, "uuids": random_uuid}[kind](rng)


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))


def unique_words(rng: random.Random, n: int, make: Callable[[random.Random], str]) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        w = make(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# --------------------------------------------------------------------------- fitting to a length


class _Fitter:
    """Largest haystack size ``h`` whose prompt fits ``budget`` tokens: secant estimates
    (from the previous sample's size when there is one), galloping, then bisection to
    within ~0.05% of ``h``. Token counts are nearly monotone in ``h``."""

    def __init__(self, tokenizer, length: int, max_new: int, probe: bool = False, task: str = ""):
        self.tok, self.length, self.max_new = tokenizer, int(length), int(max_new)
        self.budget = self.length - self.max_new
        self.probe, self.task = probe, task  # probe: only check that the smallest haystack fits
        self.hint: dict[str, int] = {}

    def fit(self, key: str, build: Callable[[int], str], h_max: Optional[int] = None, h_min: int = 0) -> tuple[int, str, list[int]]:
        memo: dict[int, tuple[bool, str, list[int]]] = {}

        def fits(h: int) -> bool:
            if h not in memo:
                text = build(h)
                ids = self.tok.encode(text)
                memo[h] = (len(ids) <= self.budget, text, ids)
            return memo[h][0]

        if not fits(h_min):
            n = len(memo[h_min][2])
            smallest = "without any haystack" if h_min == 0 else "even with the smallest haystack"
            raise PromptTooLong(
                self.task or key.split("/")[0], self.length,
                f"the prompt needs {n} tokens {smallest}, plus {self.max_new} to generate: "
                f"{n + self.max_new} in all, more than the length {self.length}",
                needed=n + self.max_new,
            )
        if self.probe:
            _, text, ids = memo[h_min]
            return h_min, text, ids
        cap = h_max if h_max is not None else 1 << 40
        n0 = len(memo[h_min][2])
        h = max(h_min, min(self.hint.get(key, h_min + 64), cap))
        for _ in range(2):  # secant steps: tokens grow about linearly with the haystack size
            fits(h)
            n = len(memo[h][2])
            if h == h_min or n <= n0:
                break
            est = h_min + int((self.budget - n0) * (h - h_min) / (n - n0) * 0.998)
            est = max(h_min, min(est, cap))
            if est == h:
                break
            h = est
        step = max(1, (h - h_min) // 512)
        if fits(h):
            lo, hi = h, None
            while hi is None:
                nxt = lo + step
                if h_max is not None and nxt > h_max:
                    nxt = h_max
                    if nxt == lo:
                        break
                if fits(nxt):
                    lo = nxt
                    step *= 2
                    if h_max is not None and lo == h_max:
                        break
                else:
                    hi = nxt
        else:
            lo, hi = None, h
            while lo is None:
                nxt = max(h_min, hi - step)
                if fits(nxt):
                    lo = nxt
                else:
                    hi = nxt
                    step *= 2
        if hi is not None:
            # Stop within ~0.05% of the haystack (a few tokens even at 32K+).
            while hi - lo > max(1, (lo - h_min) // 2000):
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
        self.hint[key] = lo
        _, text, ids = memo[lo]
        return lo, text, ids


def _depths(index: int, n_samples: int, k: int) -> list[float]:
    """k evenly spaced depths in (0, 1), phase-shifted by the sample index."""
    phase = (index + 0.5) / max(1, n_samples)
    return sorted(((j + phase) / k) for j in range(k))


# --------------------------------------------------------------------------- haystacks


def haystack_words(haystack_docs: Optional[Sequence[str]]) -> list[str]:
    """The words of the document haystack text (whitespace-separated)."""
    text = " ".join(d for d in (haystack_docs or []) if d and d.strip())
    return re.sub(r"\s+", " ", text).strip().split(" ") if text.strip() else []


def _essay_words(haystack_docs: Optional[Sequence[str]]) -> list[str]:
    words = haystack_words(haystack_docs)
    if len(words) < MIN_HAYSTACK_WORDS:
        raise _user_error(
            f"the document haystack needs text: pass haystack_docs with at least {MIN_HAYSTACK_WORDS} words "
            f"(e.g. the run's corpus; got {len(words)} words)"
        )
    return words


def _take_words(words: list[str], start: int, n: int) -> list[str]:
    if n <= len(words) - start:
        return words[start : start + n]
    out = []
    pos = start
    while len(out) < n:  # cycle through the corpus when the haystack is longer than it
        take = words[pos : pos + n - len(out)]
        out += take
        pos = 0
    return out


def _insert_in_words(words: list[str], needles: list[str], depths: list[float]) -> str:
    """Insert needles at the sentence end nearest to each depth (within 40 words)."""
    n = len(words)
    cuts = []
    for d in depths:
        p = int(round(d * n))
        best = p
        for off in range(0, 41):
            for q in (p + off, p - off):
                if 0 < q <= n and words[q - 1].endswith((".", "!", "?")):
                    best = q
                    break
            else:
                continue
            break
        cuts.append(min(max(best, 0), n))
    parts, last = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda x: x[0]):
        parts.append(" ".join(words[last:cut]))
        parts.append(needle)
        last = cut
    parts.append(" ".join(words[last:]))
    return " ".join(p for p in parts if p)


def _insert_in_units(units: list[str], needles: list[str], depths: list[float], sep: str) -> str:
    n = len(units)
    out = list(units)
    for pos, needle in sorted(((int(round(d * n)), nd) for d, nd in zip(depths, needles)), key=lambda x: -x[0]):
        out.insert(pos, needle)
    return sep.join(out)


# --------------------------------------------------------------------------- NIAH


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


def _niah(task: str, *, haystack: str, type_k: str, type_v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 128
        fitter = _Fitter(tokenizer, length, max_new, probe, task)
        words = _essay_words(haystack_docs) if haystack == "essay" else None
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            keys = unique_words(rng, max(num_k, num_q), lambda r: _random(type_k, r))
            values = [[_random(type_v, rng) for _ in range(num_v)] for _ in keys]
            needles = [NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
            rng.shuffle(needles)
            depths = _depths(i, n_samples, len(needles))
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
                    k = _random(type_k, prng)
                    if k not in taken:
                        pool.append(NEEDLE.format(type_v=type_v, key=k, value=_random(type_v, prng)))
                return pool[:h]

            def build(h: int) -> str:
                if haystack == "essay":
                    context = _insert_in_words(_take_words(words, start, h), needles, depths)
                elif haystack == "repeat":
                    units = [NOISE_SENTENCES[j % len(NOISE_SENTENCES)] for j in range(h)]
                    context = _insert_in_units(units, needles, depths, " ")
                else:
                    context = _insert_in_units(distractors(h), needles, depths, "\n")
                return _niah_text(type_v, single, query, context)[0]

            _, prompt, ids = fitter.fit(task, build)
            out.append(Sample(task, length, i, prompt, ids, refs, max_new, depths))
        return out

    return generate


# --------------------------------------------------------------------------- VT, CWE, FWE


def _vt(task="vt", num_hops: int = 4):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 30
        fitter = _Fitter(tokenizer, length, max_new, probe, task)
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            names = unique_words(rng, num_hops + 1, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)))
            value = str(rng.randint(10000, 99999))
            chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(num_hops)]
            depths = _depths(i, n_samples, len(chain))
            head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            tail = (
                f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
                f" Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
                f"variables are assigned the value {value}, they are:"
            )

            def build(h: int) -> str:
                units = [NOISE_SENTENCES[j % len(NOISE_SENTENCES)] for j in range(h)]
                return head + _insert_in_units(units, chain, depths, " ") + tail

            _, prompt, ids = fitter.fit(task, build)
            out.append(Sample(task, length, i, prompt, ids, names, max_new, depths))
        return out

    return generate


def _cwe(task="cwe", num_cw: int = 10):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 120
        freq_cw, freq_ucw = (30, 3) if length >= 4096 else (6, 1)
        fitter = _Fitter(tokenizer, length, max_new, probe, task)
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


def _fwe(task="fwe", alpha: float = 2.0, word_len: int = 6):
    zeta = sum(k ** -alpha for k in range(1, 100000))

    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 50
        fitter = _Fitter(tokenizer, length, max_new, probe, task)
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


# --------------------------------------------------------------------------- QA


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
    return " " + " ".join(_take_words(words, s, n))


def _qa(task: str, hops: int):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 32
        fitter = _Fitter(tokenizer, length, max_new, probe, task)
        words = None
        if haystack_docs:
            try:
                words = _essay_words(haystack_docs)
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
            depths = _depths(i, n_samples, len(gold))

            extra = _take_words(words, rng.randrange(len(words)), 400) if words else \
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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[..., list[Sample]]
    metric: str  # "all" or "any"
    max_new_tokens: int

    def score(self, prediction: str, references: Sequence[str]) -> float:
        return (string_match_all if self.metric == "all" else string_match_any)(prediction, references)


TASKS: dict[str, Task] = {
    "niah_single_1": Task("niah_single_1", _niah("niah_single_1", haystack="repeat", type_k="words", type_v="numbers"), "all", 128),
    "niah_single_2": Task("niah_single_2", _niah("niah_single_2", haystack="essay", type_k="words", type_v="numbers"), "all", 128),
    "niah_single_3": Task("niah_single_3", _niah("niah_single_3", haystack="essay", type_k="words", type_v="uuids"), "all", 128),
    "niah_multikey_1": Task("niah_multikey_1", _niah("niah_multikey_1", haystack="essay", type_k="words", type_v="numbers", num_k=4), "all", 128),
    "niah_multikey_2": Task("niah_multikey_2", _niah("niah_multikey_2", haystack="needle", type_k="words", type_v="numbers"), "all", 128),
    "niah_multikey_3": Task("niah_multikey_3", _niah("niah_multikey_3", haystack="needle", type_k="uuids", type_v="uuids"), "all", 128),
    "niah_multivalue": Task("niah_multivalue", _niah("niah_multivalue", haystack="essay", type_k="words", type_v="numbers", num_v=4), "all", 128),
    "niah_multiquery": Task("niah_multiquery", _niah("niah_multiquery", haystack="essay", type_k="words", type_v="numbers", num_k=4, num_q=4), "all", 128),
    "vt": Task("vt", _vt(), "all", 30),
    "cwe": Task("cwe", _cwe(), "all", 120),
    "fwe": Task("fwe", _fwe(), "all", 50),
    "qa_1": Task("qa_1", _qa("qa_1", hops=1), "any", 32),
    "qa_2": Task("qa_2", _qa("qa_2", hops=2), "any", 32),
}
assert tuple(TASKS) == TASK_NAMES


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``all`` / None, a comma-separated string, or a list -> task names (checked)."""
    if spec is None or spec == "all" or spec == ["all"]:
        return list(TASK_NAMES)
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise _user_error(f"unknown RULER task(s) {unknown}; valid tasks: all, {', '.join(TASK_NAMES)}")
    return names


def generate(task: str, tokenizer, length: int, n_samples: int, seed: int = 0,
             haystack_docs: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None) -> list[Sample]:
    """``n_samples`` prompts of ``task`` filled to ``length`` tokens. Raises
    :class:`PromptTooLong` when they cannot fit ``length``."""
    t = TASKS[parse_tasks([task])[0]]
    return t.generate(tokenizer, length, n_samples, seed, haystack_docs, max_new_tokens or t.max_new_tokens)


def check_fits(task: str, tokenizer, length: int, n_samples: int, seed: int = 0,
               haystack_docs: Optional[Sequence[str]] = None,
               max_new_tokens: Optional[int] = None) -> Optional[PromptTooLong]:
    """Why ``task``'s prompts cannot fit ``length`` (a :class:`PromptTooLong`), or None
    when they can. Cheap: builds each sample's prompt with the smallest haystack only."""
    t = TASKS[parse_tasks([task])[0]]
    try:
        t.generate(tokenizer, length, n_samples, seed, haystack_docs, max_new_tokens or t.max_new_tokens, probe=True)
    except PromptTooLong as e:
        return e
    return None


def score(task: str, prediction: str, references: Sequence[str]) -> float:
    return TASKS[task].score(prediction, references)


# --------------------------------------------------------------------------- running a model


def predict(model, tokenizer, samples: list[Sample], batch_size: int = 4, prefill_chunk: int = 1024) -> list[str]:
    """Greedy continuations of the samples' prompts (stop at EOS), decoded."""
    from mixtrain.infer.generate import Engine

    engine = Engine(model, prefill_chunk=prefill_chunk, pad_id=getattr(tokenizer, "pad_id", 0))
    eos = getattr(tokenizer, "eos_id", None)
    preds: list[str] = []
    order = sorted(range(len(samples)), key=lambda j: (samples[j].max_new_tokens, len(samples[j].input_ids)))
    out: dict[int, str] = {}
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s : s + batch_size]
        max_new = max(samples[j].max_new_tokens for j in idx)
        gen = engine.generate([samples[j].input_ids for j in idx], max_new_tokens=max_new,
                              temperature=0.0, stop_tokens=[eos] if eos is not None else ())
        for j, toks in zip(idx, gen):
            toks = toks[: samples[j].max_new_tokens]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            out[j] = tokenizer.decode(toks, skip_special_tokens=True) if _accepts_skip(tokenizer) else tokenizer.decode(toks)
    preds = [out[j] for j in range(len(samples))]
    engine.cache = None
    return preds


def _accepts_skip(tokenizer) -> bool:
    import inspect

    try:
        return "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return False


def evaluate(model, tokenizer, tasks: Sequence[str] | str = "all", lengths: Sequence[int] = (4096,),
             samples: int = 10, out_dir: Optional[str | Path] = None, *, seed: int = 0,
             haystack_docs: Optional[Sequence[str]] = None, batch_size: int = 4,
             max_new_tokens: Optional[int] = None, names: Optional[dict[str, Any]] = None,
             wandb_log: Optional[bool] = None, log: Callable[[str], None] = print) -> dict:
    """Generate, decode greedily and score every (task, length); write ``ruler.json``,
    ``ruler_samples.jsonl`` and ``ruler_heatmap.png`` under ``out_dir``; print a table.

    Every (task, length) cell is checked before any decoding: a cell whose prompt cannot
    fit its length is skipped (score None; listed in ``skipped`` with the reason) and the
    others run. Raises a :class:`RulerError` when no cell fits.

    Returns ``{"scores": {task: mean over the lengths it ran at, or None},
    "by_length": {length: {task: score or None}}, "average": mean over the cells that ran,
    "cells": {"ran": n, "skipped": k}, "skipped": [{"task", "length", "reason",
    "min_length"}], ...}`` (lengths as strings in JSON)."""
    task_names = parse_tasks(tasks)
    lengths = [int(x) for x in lengths]
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    max_len = int(max_len) if max_len is not None else None
    for L in lengths:
        if max_len is not None and L > max_len:
            raise _user_error(f"length {L} is above the model's model.max_seq_len={max_len}; evaluate at <= {max_len} "
                              f"(extend the context first: stage=extend)")
    if any(t in ESSAY_TASKS for t in task_names):
        _essay_words(haystack_docs)  # fail early, before any decoding
    skipped: dict[tuple[int, str], PromptTooLong] = {}
    for L in lengths:  # every cell up front: generating prompts is cheap, decoding is not
        for t in task_names:
            why = check_fits(t, tokenizer, L, samples, seed, haystack_docs, max_new_tokens)
            if why is not None:
                skipped[(L, t)] = why
    if len(skipped) == len(lengths) * len(task_names):
        raise _user_error(_nothing_fits(skipped, lengths, task_names, max_len))
    for (L, t), why in skipped.items():
        log(_skip_line(t, L, why, max_len))
    by_length: dict[str, dict[str, Optional[float]]] = {str(L): {} for L in lengths}
    records: list[dict] = []
    t0 = time.time()
    for L in lengths:
        for t in task_names:
            if (L, t) in skipped:
                by_length[str(L)][t] = None
                continue
            t1 = time.time()
            try:
                ss = generate(t, tokenizer, L, samples, seed, haystack_docs, max_new_tokens)
            except PromptTooLong as why:  # a filled prompt the up-front check could not foresee
                skipped[(L, t)] = why
                by_length[str(L)][t] = None
                log(_skip_line(t, L, why, max_len))
                continue
            preds = predict(model, tokenizer, ss, batch_size=batch_size)
            scores = [TASKS[t].score(p, s.references) for p, s in zip(preds, ss)]
            by_length[str(L)][t] = sum(scores) / max(1, len(scores))
            for s, p, sc in zip(ss, preds, scores):
                records.append({**s.to_json(), "prediction": p, "score": sc})
            log(f"  {t:<16} {L:>7}  {by_length[str(L)][t]:.3f}  ({len(ss)} samples, {time.time() - t1:.1f}s)")
    ran = [v for row in by_length.values() for v in row.values() if v is not None]
    if not ran:
        raise _user_error(_nothing_fits(skipped, lengths, task_names, max_len))
    scores = {t: _mean([by_length[str(L)][t] for L in lengths]) for t in task_names}
    result = {
        **(names or {}),
        "suite": "ruler-offline",
        "tasks": task_names,
        "lengths": lengths,
        "samples": samples,
        "seed": seed,
        "scores": scores,
        "by_length": by_length,
        "average": sum(ran) / len(ran),
        "cells": {"ran": len(ran), "skipped": len(skipped)},
        "skipped": [{"task": t, "length": L, "reason": why.detail, "min_length": why.needed}
                    for L in lengths for t in task_names for why in [skipped.get((L, t))] if why is not None],
        "seconds": round(time.time() - t0, 1),
    }
    log(format_table(result))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / "ruler.json", result)
        with open(out / "ruler_samples.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        heatmap(result, out / "ruler_heatmap.png")
        result["files"] = [str(out / "ruler.json"), str(out / "ruler_samples.jsonl"), str(out / "ruler_heatmap.png")]
    log_to_wandb(result, Path(out_dir) / "ruler_heatmap.png" if out_dir else None, force=wandb_log)
    return result


def _skip_line(task: str, length: int, why: PromptTooLong, max_len: Optional[int]) -> str:
    if why.needed is None:
        advice = "it needs a longer length"
    elif max_len is not None and why.needed > max_len:
        advice = (f"it needs a length of about {why.needed}, above the model's max_seq_len={max_len} "
                  f"(extend the context first: stage=extend)")
    else:
        advice = f"it needs --lengths of about {why.needed} or more"
    return f"  skipped {task} at length {length}: {why.detail}; {advice}"


def _nothing_fits(skipped: dict, lengths: list[int], tasks: list[str], max_len: Optional[int]) -> str:
    longest = max(lengths)
    need = {t: skipped[(longest, t)].needed if (longest, t) in skipped else None for t in tasks}
    shown = ", ".join(f"{t} {n}" if n else f"{t} more" for t, n in need.items())
    known = [n for n in need.values() if n]
    if max_len is not None:
        fitting = [t for t, n in need.items() if n and n <= max_len]
        if fitting:
            fix = (f"these need no more than the model's max_seq_len={max_len}: try --lengths {max_len} "
                   f"--tasks {','.join(fitting)}")
        else:
            fix = (f"none of them fits the model's max_seq_len={max_len}: extend its context first "
                   f"(stage=extend), then evaluate at the longer length")
    else:
        fix = f"use --lengths of about {max(known)} or more" if known else "use longer --lengths"
    task_list = "all" if tuple(tasks) == TASK_NAMES else ",".join(tasks)
    return (f"no RULER task fits --lengths {','.join(map(str, lengths))} (--tasks {task_list}): each prompt "
            f"plus its answer needs more tokens than the length (at least: {shown}); {fix}")


def _atomic_json(path: Path, obj: Any) -> None:
    from mixtrain.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def format_table(result: dict) -> str:
    """Tasks x lengths; a skipped cell (prompt longer than the length) shows "-", and the
    averages are over the cells that ran (a note says so when any was skipped)."""
    lengths = [str(x) for x in result["lengths"]]
    tasks = result["tasks"]
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    head = ["task"] + [_k(int(x)) for x in lengths] + ["mean"]
    rows = [[t] + [cell(result["by_length"][L].get(t)) for L in lengths] + [cell(result["scores"].get(t))]
            for t in tasks]
    avg = [_mean([result["by_length"][L].get(t) for t in tasks]) for L in lengths]
    rows.append(["average"] + [cell(a) for a in avg] + [cell(result["average"])])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = f"RULER (offline) {result.get('name') or result.get('model') or ''} {result.get('layout') or ''}".rstrip()
    out = [title, line(head), "-" * len(line(head))] + [line(r) for r in rows]
    skipped = result.get("skipped") or []
    if skipped:
        total, gone = len(tasks) * len(lengths), []
        for L in lengths:
            names = [s["task"] for s in skipped if str(s["length"]) == L]
            if names:
                gone.append(f"{_k(int(L))}: " + (f"all {len(tasks)} tasks" if len(names) == len(tasks) and
                                                 len(tasks) > 1 else ", ".join(names)))
        ran = ", ".join(f"{_k(int(L))}: {sum(result['by_length'][L].get(t) is not None for t in tasks)} of "
                        f"{len(tasks)} tasks" for L in lengths)
        out.append("skipped, prompt longer than the length (-): " + "; ".join(gone))
        out.append(f"averages are over the {total - len(skipped)} of {total} (task, length) cells that ran ({ran})")
    return "\n".join(out)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def heatmap_grid(result: dict):
    """Scores as a tasks x lengths float array, NaN where a cell was skipped."""
    import numpy as np

    lengths = [str(x) for x in result["lengths"]]
    return np.array([[np.nan if result["by_length"][L].get(t) is None else float(result["by_length"][L][t])
                      for L in lengths] for t in result["tasks"]], dtype=float)


def heatmap(result: dict, path: str | Path) -> Path:
    """PNG heatmap of task x length scores; a skipped cell is blank, marked "-"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, lengths = result["tasks"], [str(x) for x in result["lengths"]]
    grid = heatmap_grid(result)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 0.9 + 0.38 * len(tasks)))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(int(x)) for x in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for r in range(len(tasks)):
        for c in range(len(lengths)):
            ax.text(c, r, "-" if np.isnan(grid[r, c]) else f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    name = " ".join(str(result[k]) for k in ("name", "layout") if result.get(k))
    n_skipped = len(result.get("skipped") or [])
    if n_skipped:  # "-": the prompt is longer than the length
        ax.set_title(f"RULER {name}\navg {result['average']:.2f} over {grid.size - n_skipped} of {grid.size} "
                     f"cells\n(-: skipped, prompt too long)", fontsize=8)
    else:
        ax.set_title(f"RULER {name} (avg {result['average']:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    from mixtrain.report import save_figure

    return save_figure(fig, path, dpi=110)


def log_to_wandb(result: dict, image: Optional[Path], force: Optional[bool] = None, prefix: str = "ruler") -> bool:
    """Log scores (and the heatmap) to W&B when a run is active, or start one (offline
    unless configured) when ``force``. Returns whether anything was logged."""
    if force is False:
        return False
    try:
        import wandb
    except ImportError:
        return False
    started = False
    if wandb.run is None:
        if not force:
            return False
        import os

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        wandb.init(project=os.environ.get("WANDB_PROJECT", "mixtrain"), job_type="eval", mode=mode,
                   name=f"eval-{result.get('name') or 'model'}",
                   dir=str(image.parent) if image else None, config={k: result.get(k) for k in ("name", "layout", "model")})
        started = True
    data = {f"{prefix}/{t}": s for t, s in result["scores"].items() if s is not None}  # not the skipped
    data[f"{prefix}/average"] = result["average"]
    for L, row in result["by_length"].items():
        for t, s in row.items():
            if s is not None:
                data[f"{prefix}/{L}/{t}"] = s
    table = wandb.Table(columns=["task"] + [str(x) for x in result["lengths"]],
                        data=[[t] + [result["by_length"][str(L)][t] for L in result["lengths"]] for t in result["tasks"]])
    data[f"{prefix}/table"] = table
    if image is not None and Path(image).is_file():
        data[f"{prefix}/heatmap"] = wandb.Image(str(image))
    wandb.log(data)
    if started:
        wandb.finish()
    return True
