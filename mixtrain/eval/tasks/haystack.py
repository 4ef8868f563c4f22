"""Haystacks and needle placement shared by the task families: document text as words
(cycled when the haystack is longer than it), needles inserted at sentence ends near
their depths or between units, and the evenly spaced depths of a sample."""

from __future__ import annotations

import re
from typing import Optional, Sequence

from mixtrain.eval.tasks.base import RulerError

MIN_HAYSTACK_WORDS = 200  # the document haystacks cycle through at least this much text


def depths_for(index: int, n_samples: int, k: int) -> list[float]:
    """k evenly spaced depths in (0, 1), phase-shifted by the sample index."""
    phase = (index + 0.5) / max(1, n_samples)
    return sorted(((j + phase) / k) for j in range(k))


def haystack_words(haystack_docs: Optional[Sequence[str]]) -> list[str]:
    """The words of the document haystack text (whitespace-separated)."""
    text = " ".join(d for d in (haystack_docs or []) if d and d.strip())
    return re.sub(r"\s+", " ", text).strip().split(" ") if text.strip() else []


def essay_words(haystack_docs: Optional[Sequence[str]]) -> list[str]:
    words = haystack_words(haystack_docs)
    if len(words) < MIN_HAYSTACK_WORDS:
        raise RulerError(
            f"the document haystack needs text: pass haystack_docs with at least {MIN_HAYSTACK_WORDS} words "
            f"(e.g. the run's corpus; got {len(words)} words)"
        )
    return words


def take_words(words: list[str], start: int, n: int) -> list[str]:
    if n <= len(words) - start:
        return words[start : start + n]
    out = []
    pos = start
    while len(out) < n:  # cycle through the corpus when the haystack is longer than it
        take = words[pos : pos + n - len(out)]
        out += take
        pos = 0
    return out


def insert_in_words(words: list[str], needles: list[str], depths: list[float]) -> str:
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


def insert_in_units(units: list[str], needles: list[str], depths: list[float], sep: str) -> str:
    n = len(units)
    out = list(units)
    for pos, needle in sorted(((int(round(d * n)), nd) for d, nd in zip(depths, needles)), key=lambda x: -x[0]):
        out.insert(pos, needle)
    return sep.join(out)
