"""Realistic synthetic text, offline and deterministic: a corpus of any size for
benchmarks (``mixtrain bench data``) and tests.

What it looks like (:class:`SynthText`):

- a vocabulary of ``vocab_words`` words: ~200 of the most frequent English words at
  the head, then made-up words built from English-like syllables and suffixes
  ("skear", "seasment", "droont", "graustity"), longer as they get rarer, some capitalised as
  names;
- word frequencies Zipfian (``p(rank) ~ 1/rank^zipf_s``, s = 1.07, close to English's),
  sampled by inverse CDF;
- prose documents: a title line, paragraphs of ~5 sentences on average (a break after
  one sentence end in five), sentences of lognormal length (mean ~17 words) with
  commas, ``?``/``!`` now and then, numbers and years; document lengths lognormal
  (median ~350 words, from 16 to 30,000);
- code-like documents (``code_fraction``, 10% by default): Python-ish modules with
  imports, functions, docstrings, indentation, operators and literals, identifiers
  drawn from the same Zipfian vocabulary.

Document ``i`` depends only on ``(seed, i)``: a corpus of N tokens is a prefix of a
larger one with the same seed. :func:`write_corpus` streams documents into shards
(``.jsonl``, ``.jsonl.zst`` or ``.parquet``) of about ``shard_chars`` characters each;
memory stays bounded (one block of 256 documents, plus a row group of at most ~32 MB of
text for Parquet).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

COMMON_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has will would who so if no out more when up what its "
    "about into them can only other time new some could these two may then first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three small large during without place around again "
    "however home several found part number often always something house both power water system program "
    "question during high every point hand far children given early within whole each public order"
).split()
_ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
           "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sk", "sl", "sm",
           "sn", "sp", "st", "str", "th", "tr", "wh", "qu")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ee", "ie", "oo", "ou", "y", "au", "oi")
_CODAS = ("", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rd", "st", "ck", "ll", "ss", "x", "rn", "mp")
_SUFFIXES = ("", "", "", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "able", "al", "ous", "ity")
_OPS = (" + ", " - ", " * ", " / ", " // ", " % ", " == ", " != ", " < ", " > ", " <= ", " >= ")


def make_vocabulary(n_words: int, seed: int = 0) -> list[str]:
    """``n_words`` distinct lowercase words, most frequent first: the common English
    words, then made-up words that get longer with rank."""
    rnd = random.Random(f"mixtrain-synth-vocab-{seed}")
    words = list(dict.fromkeys(COMMON_WORDS))[:n_words]
    seen = set(words)
    ch = rnd.choice
    while len(words) < n_words:
        frac = len(words) / n_words
        n_syl = 1 + (rnd.random() < 0.35 + 0.5 * frac) + (rnd.random() < 0.1 + 0.3 * frac)
        w = "".join(ch(_ONSETS) + ch(_NUCLEI) + ch(_CODAS) for _ in range(n_syl)) + ch(_SUFFIXES)
        if len(w) > 1 and w not in seen:
            seen.add(w)
            words.append(w)
    return words


@dataclass
class SynthText:
    """An endless, deterministic stream of synthetic documents (see the module docstring).

    Documents are made in blocks of ``BLOCK`` (vectorised over the block); block ``b``
    depends only on ``(seed, b)``."""

    seed: int = 0
    vocab_words: int = 50_000
    zipf_s: float = 1.07
    code_fraction: float = 0.1
    median_words: float = 350.0
    sigma_words: float = 1.0
    max_words: int = 30_000

    BLOCK = 256

    def __post_init__(self):
        words = make_vocabulary(self.vocab_words, self.seed)
        rng = np.random.default_rng([self.seed, 2])
        names = rng.random(len(words)) < 0.03  # some rarer words are names: always capitalised
        names[:len(COMMON_WORDS)] = False
        lower = [w.capitalize() if n else w for w, n in zip(words, names)]
        self._lower = np.array(lower, dtype=object)
        self._cap = np.array([w[:1].upper() + w[1:] for w in lower], dtype=object)
        self._ident = words
        p = 1.0 / np.arange(1, len(words) + 1) ** self.zipf_s
        self._cdf = np.cumsum(p / p.sum())
        self._cdf[-1] = 1.0
        self._block: tuple[int, list[str]] | None = None

    # ---- public
    def document(self, index: int) -> str:
        """Document ``index`` of this stream (depends only on ``seed`` and ``index``)."""
        b, i = divmod(index, self.BLOCK)
        if self._block is None or self._block[0] != b:
            self._block = (b, self._make_block(b))
        return self._block[1][i]

    def documents(self, start: int = 0, stop: Optional[int] = None) -> Iterator[str]:
        i = start
        while stop is None or i < stop:
            yield self.document(i)
            i += 1

    # ---- generation
    def _ranks(self, rng, n: int) -> np.ndarray:
        return np.searchsorted(self._cdf, rng.random(n), side="right")

    def _make_block(self, b: int) -> list[str]:
        rng = np.random.default_rng([self.seed, 3, b])
        rnd = random.Random(int(rng.integers(1 << 62)))
        n_words = np.clip(rng.lognormal(np.log(self.median_words), self.sigma_words, self.BLOCK), 16,
                          self.max_words).astype(np.int64)
        is_code = rng.random(self.BLOCK) < self.code_fraction
        prose = self._prose_block(rng, n_words[~is_code])
        out, k = [], 0
        for j in range(self.BLOCK):
            if is_code[j]:
                out.append(self._code(rnd, rng, int(n_words[j])))
            else:
                out.append(prose[k])
                k += 1
        return out

    def _prose_block(self, rng, n_words: np.ndarray) -> list[str]:
        n = int(n_words.sum())
        if n == 0:
            return []
        bounds = np.concatenate([[0], np.cumsum(n_words)])
        doc_end = np.zeros(n, dtype=bool)
        doc_end[bounds[1:] - 1] = True
        ranks = self._ranks(rng, n)
        # sentence ends: lognormal sentence lengths (mean ~18 words), and every document's end
        lengths = np.maximum(3, rng.lognormal(np.log(15), 0.55, size=n // 3 + 2).astype(np.int64))
        ends = np.cumsum(lengths)
        is_end = doc_end.copy()
        is_end[ends[ends < n] - 1] = True
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        starts[1:] = is_end[:-1]
        words = np.where(starts, self._cap[ranks], self._lower[ranks])
        # numbers and years now and then
        num = np.flatnonzero(rng.random(n) < 0.012)
        kind = rng.integers(0, 3, size=len(num))
        years, ints, reals = rng.integers(1700, 2030, len(num)), rng.integers(2, 1000, len(num)), rng.random(len(num)) * 100
        words[num] = [str(y) if k == 0 else str(i) if k == 1 else f"{r:.1f}" for k, y, i, r in zip(kind, years, ints, reals)]
        # separators: space, comma, sentence ends (. ? !), a paragraph break after ~1 sentence in 5
        seps = np.full(n, " ", dtype=object)
        seps[rng.random(n) < 0.06] = ", "
        end_idx = np.flatnonzero(is_end)
        r = rng.random(len(end_idx))
        para = rng.random(len(end_idx)) < 0.2
        seps[end_idx] = np.where(r < 0.92, np.where(para, ".\n\n", ". "),
                                 np.where(r < 0.97, np.where(para, "?\n\n", "? "), np.where(para, "!\n\n", "! ")))
        seps[doc_end] = "."
        flat = np.empty(2 * n, dtype=object)
        flat[0::2] = words
        flat[1::2] = seps
        flat = flat.tolist()
        title_len = rng.integers(2, 8, len(n_words))
        titles = self._cap[self._ranks(rng, int(title_len.sum()))].tolist()
        tb = np.concatenate([[0], np.cumsum(title_len)])
        return [" ".join(titles[tb[d]:tb[d + 1]]) + "\n\n" + "".join(flat[2 * bounds[d]:2 * bounds[d + 1]])
                for d in range(len(n_words))]

    def _code(self, rnd: random.Random, rng, n_target: int) -> str:
        pool = self._lower[self._ranks(rng, 4 * n_target + 64)].tolist()
        pool = [w.lower() for w in pool]
        it = iter(pool * 4)
        ri, rr = rnd.randrange, rnd.random

        def ident(k: int = 2) -> str:
            return "_".join(next(it) for _ in range(1 + ri(k)))

        def sentence() -> str:
            return " ".join(next(it) for _ in range(4 + ri(10))).capitalize() + "."

        def literal() -> str:
            r = rr()
            if r < 0.4:
                return str(ri(1000))
            if r < 0.6:
                return f"{rr():.3f}"
            if r < 0.9:
                return repr(" ".join(next(it) for _ in range(1 + ri(3))))
            return rnd.choice(("None", "True", "False"))

        def expr(args) -> str:
            out = ""
            for t in range(1 + ri(3)):
                term = rnd.choice(args) if args and rr() < 0.5 else (literal() if rr() < 0.5 else ident())
                out += (rnd.choice(_OPS[:6]) if t else "") + term
            return out

        lines = [f"import {ident(1)}", f"from {ident(1)}.{ident(1)} import {ident()}, {ident()}", ""]
        words = 0
        while words < n_target:
            start = len(lines)
            indent = ""
            if rr() < 0.15:
                lines += [f"class {ident().title().replace('_', '')}:", f'    """{sentence()}"""', ""]
                indent = "    "
            args = [ident() for _ in range(ri(4))]
            if indent:
                args = ["self", *args]
            var = ident()
            lines += [f"{indent}def {ident()}({', '.join(args)}):", f'{indent}    """{sentence()}"""',
                      f"{indent}    {var} = {expr(args)}"]
            for _ in range(1 + ri(6)):
                r = rr()
                if r < 0.3:
                    lines += [f"{indent}    for {ident(1)} in range({1 + ri(99)}):", f"{indent}        {var} += {expr(args)}"]
                elif r < 0.55:
                    lines += [f"{indent}    if {var}{rnd.choice(_OPS[6:])}{ri(50)}:", f"{indent}        return {expr(args)}"]
                elif r < 0.75:
                    lines += [f"{indent}    # {sentence().lower()}", f"{indent}    {ident()} = {ident(1)}.{ident()}({var}, {literal()})"]
                else:
                    lines.append(f"{indent}    {var} = [{ident(1)} for {ident(1)} in {var} if {ident(1)}]")
            lines += [f"{indent}    return {var}", ""]
            words += sum(len(s.split()) for s in lines[start:])
        return "\n".join(lines).rstrip() + "\n"


FORMATS = ("jsonl", "jsonl.zst", "parquet")


@dataclass
class CorpusInfo:
    """What :func:`write_corpus` wrote."""

    files: list[Path]
    documents: int
    chars: int
    bytes: int  # on disk, all shards


def write_corpus(out_dir: str | os.PathLike, chars: int, *, seed: int = 0, fmt: str = "jsonl",
                 shard_chars: int = 64_000_000, text_field: str = "text", synth: Optional[SynthText] = None,
                 start_doc: int = 0) -> CorpusInfo:
    """Write documents of ``SynthText(seed)`` until ``chars`` characters, in shards of
    about ``shard_chars`` characters named ``part-00000.<fmt>``. Each shard is written
    to a temporary name and renamed when complete. Streaming: memory is one document
    plus the writer's buffer (one row group of at most ~64 MB of text for Parquet)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    synth = synth or SynthText(seed=seed)
    files: list[Path] = []
    n_docs = total = 0
    doc_iter = synth.documents(start_doc)
    while total < chars:
        path = out / f"part-{len(files):05d}.{fmt}"
        tmp = path.with_name(path.name + ".tmp")
        shard = 0
        with _ShardWriter(tmp, fmt, text_field) as w:
            while shard < shard_chars and total < chars:
                doc = next(doc_iter)
                w.write(doc)
                shard += len(doc)
                total += len(doc)
                n_docs += 1
        os.replace(tmp, path)
        files.append(path)
    return CorpusInfo(files, n_docs, total, sum(f.stat().st_size for f in files))


class _ShardWriter:
    def __init__(self, path: Path, fmt: str, field: str, row_group_chars: int = 32_000_000):
        self.path, self.fmt, self.field, self.row_group_chars = path, fmt, field, row_group_chars
        self._rows: list[str] = []
        self._chars = 0

    def __enter__(self):
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._pa = pa
            self._w = pq.ParquetWriter(str(self.path), pa.schema([(self.field, pa.string())]), compression="zstd")
        elif self.fmt == "jsonl.zst":
            import zstandard

            self._f = open(self.path, "wb")
            self._w = zstandard.ZstdCompressor(level=3).stream_writer(self._f)
        else:
            self._w = open(self.path, "wb", buffering=1 << 20)
        return self

    def write(self, text: str) -> None:
        if self.fmt == "parquet":
            self._rows.append(text)
            self._chars += len(text)
            if self._chars >= self.row_group_chars:
                self._flush()
        else:
            self._w.write((json.dumps({self.field: text}, ensure_ascii=False) + "\n").encode("utf-8"))

    def _flush(self):
        if self._rows:
            self._w.write_table(self._pa.table({self.field: self._rows}))
            self._rows, self._chars = [], 0

    def __exit__(self, *exc):
        if self.fmt == "parquet":
            self._flush()
            self._w.close()
        elif self.fmt == "jsonl.zst":
            self._w.close()  # closes the underlying file too
        else:
            self._w.close()
        return False
