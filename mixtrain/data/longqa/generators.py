"""Offline QA generators: one question-answer pair for a chunk of text, no model needed.

``data.qa_generator``: ``fact`` plants "The secret code of the <adjective noun> is
<7 digits>." at a random sentence boundary and asks for it; ``span`` quotes 8
consecutive words and asks for the next 5; ``mixed`` picks one per chunk;
``module:function`` is your own ``f(chunk_text, rng) -> (context, question, answer)``
(three strings, or None to skip the chunk), checked by :func:`checked_output`.
"""

from __future__ import annotations

import importlib
import random
import re
from typing import Any, Callable, Optional

from mixtrain.data.corpus import DataError, short_repr

GENERATORS = ("fact", "span", "mixed")
SPAN_QUOTE_WORDS, SPAN_ANSWER_WORDS = 8, 5
GENERATOR_SIGNATURE = "f(chunk_text: str, rng: random.Random) -> (context, question, answer)"


class LongQAError(DataError):
    """Bad long-QA data or settings (raised by every part of :mod:`mixtrain.data.longqa`)."""


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


def checked_output(generator: str, got: Any, chunk: int, doc: int) -> Optional[tuple[str, str, str]]:
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
