"""Documents -> token shards -> packed fixed-length sequences, and the order they are read in.

Preparation (``prepare``; ``mixtrain data prepare`` runs it with the same overrides as
``mixtrain train``, and ``mixtrain train`` runs it before ``fit`` when it is missing):

1. ``get_tokenizer`` (tokenizer.py): a trained BPE is trained once on the streamed corpus.
2. :mod:`mixtrain.data.shards` streams the corpus record by record through the tokenizer
   into token shards (uint16 for vocabularies up to 65,536, else uint32) with one int64
   end offset per document, ``data.num_proc`` processes in parallel, resumable after a
   kill, splittable across machines: ``<cache_dir>/packed/<key>/`` (the key hashes the
   corpus, the tokenizer, ``val_fraction``, ``seed`` and ``shard_mb``; ``seq_len`` is not
   part of it: packing is done when reading).

Each split is the concatenation, in corpus order, of its documents (each followed by
EOS). Sequence ``i`` of a split is the stream slice ``[i*T, (i+1)*T + 1)`` (T = seq_len):
``input_ids = slice[:-1]``, ``labels = slice[1:]``, so consecutive sequences overlap by
one token and every stream token but the first is a label exactly once. ``doc_ids``
numbers the documents inside each sequence from 0 (``0,0,0,1,1,2,...``); a document's
EOS belongs to it, so ids change right after each EOS (computed from the shards'
document end offsets). Labels are *not* masked at document boundaries (standard
packing).

Reading: :class:`PackedDataset` memory-maps the shards (nothing is read whole); every
rank reads only the sequences its :class:`ResumableSampler` (one source) or
:class:`MixtureSampler` (``data.sources``) gives it, disjoint across ranks, and the
sampler state in the checkpoint resumes the order exactly.

API (also used by ``mixtrain bench data``)::

    prep = prepare(cfg.data, seq_len, model_vocab_size)   # -> Prepared (builds once)
    prep.dir, prep.meta, prep.tokenizer, prep.num_sequences("train"), prep.disk_bytes()
    ds = prep.dataset("train")                            # PackedDataset: ds[i] -> dict of LongTensors
    dm = PretrainDataModule(cfg.data, seq_len=T, micro_batch_size=B, vocab_size=V)
    dm.prepare_before_fit(); dm.setup("fit"); loader = dm.train_dataloader()
    preps = prepare_all(cfg.data, seq_len, V)             # [(weight, Prepared)] (a mixture: one per source)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mixtrain.data import shards
from mixtrain.data.corpus import DataError, as_data_config, cache_root, corpus_identity, short_hash
from mixtrain.data.tokenizer import Tok, get_tokenizer

PACK_FORMAT = shards.FORMAT
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- split


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents of a list of ``n_docs`` documents (a random
    choice of ``round(n * val_fraction)``, at least one; deterministic in ``seed``). Used
    for small in-memory corpora (long-QA); pretraining shards use
    :func:`mixtrain.data.shards.split_mask`, decided document by document."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction == 0.0:
        return mask
    if n_docs < 2:
        raise DataError(
            f"the corpus has {n_docs} document(s); a validation split needs at least 2 "
            f"(add documents, e.g. split text files, or set data.val_fraction=0)"
        )
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    mask[perm[:n_val]] = True
    return mask


def held_out_mask(cfg: Any, n_docs: int, tok: Tok) -> np.ndarray:
    """Which of the corpus's ``n_docs`` documents (in corpus order, empty ones dropped, as
    ``load_documents`` gives them) are validation documents of its prepared shards: the
    per-unit rule of :mod:`mixtrain.data.shards`, with each unit's document count read
    from the prepared index (one unit when the corpus is not prepared yet)."""
    c = as_data_config(cfg)
    counts = [n_docs]
    index = shards.read_index(packed_dir(c, tok))
    if index is not None and sum(p[1] + p[3] for p in index["parts"]) == n_docs:
        counts = [p[1] + p[3] for p in index["parts"]]
    return np.concatenate([shards.split_mask(n, c.val_fraction, c.seed, u) for u, n in enumerate(counts)])


# --------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """A prepared dataset: its folder, metadata (for one ``seq_len``) and tokenizer."""

    dir: Path
    meta: dict
    tokenizer: Tok

    def num_sequences(self, split: str) -> int:
        return self.meta["splits"][split]["sequences"]

    def dataset(self, split: str) -> "PackedDataset":
        return PackedDataset(self.dir, split, self.meta["seq_len"])

    def disk_bytes(self) -> int:
        return shards.disk_bytes(self.dir)


def packed_dir(cfg: Any, tok: Tok, seq_len: Optional[int] = None) -> Path:
    """The folder of the prepared dataset of ``cfg`` and ``tok`` (``seq_len`` is not part of it)."""
    c = as_data_config(cfg)
    key = short_hash(corpus_identity(c), tok.fingerprint(), c.val_fraction, c.seed, float(c.shard_mb), PACK_FORMAT)
    return cache_root(c) / "packed" / key


def _too_small(split, n_tok, n_docs, seq_len, total_docs, total_tok, val_fraction) -> DataError:
    return DataError(
        f"the {split} split has {n_tok} tokens in {n_docs} document(s), fewer than one sequence of "
        f"seq_len+1={seq_len + 1} tokens: the corpus ({total_docs} documents, {total_tok} tokens) is too small "
        f"for seq_len={seq_len} with data.val_fraction={val_fraction}. Add data, lower the sequence length"
        + (" or raise data.val_fraction" if split == "val" else " or lower data.val_fraction")
    )


def commit_build(tmp: Path, out: Path, tok: Tok, meta: dict, t0: float) -> dict:
    """Finish a cache folder built under ``tmp``: add the tokenizer and meta.json, then
    rename it to ``out`` in one step (readers never see half a cache). Used by long-QA."""
    tok.save(tmp / "tokenizer.json")
    meta["build_seconds"] = round(time.time() - t0, 2)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:  # another process renamed its identical build into place first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "meta.json").is_file():
            raise
    return meta


def _describe(c) -> str:
    if c.source == "embedded":
        return f"Python {'.'.join(map(str, sys.version_info[:3]))} stdlib docstrings and comments, <= {c.embedded_max_chars} chars"
    if c.source == "files":
        return f"{len(c.paths or [])} path pattern(s): {', '.join(map(str, (c.paths or [])[:3]))}{' ...' if len(c.paths or []) > 3 else ''}"
    return f"hub {c.hub_name} ({c.hub_config}, {c.hub_split}{', streamed' if c.streaming else ''})"


def _meta_for(c, tok: Tok, index: dict, seq_len: int) -> dict:
    """The dataset's index seen for one ``seq_len`` (sequences per split); raises when a split is too small."""
    n_docs, n_tok = index["documents"], index["tokens"]
    if c.val_fraction > 0 and n_docs < 2:
        raise DataError(
            f"the corpus has {n_docs} document(s); a validation split needs at least 2 "
            f"(add documents, e.g. split text files, or set data.val_fraction=0)"
        )
    meta = {k: v for k, v in index.items() if k != "parts"}
    meta.update({
        "seq_len": seq_len,
        "corpus_id": short_hash(corpus_identity(c)),
        "source": c.source,
        "corpus": _describe(c),
        "tokenizer": str(tok.path) if tok.path else None,
        "bytes_per_token": np.dtype(index["dtype"]).itemsize,
        "splits": {},
    })
    for split in SPLITS:
        info = index["splits"][split]
        n_seq = (info["tokens"] - 1) // seq_len if info["tokens"] > 0 else 0
        if n_seq == 0 and (split == "train" or info["documents"] > 0):
            raise _too_small(split, info["tokens"], info["documents"], seq_len, n_docs, n_tok, c.val_fraction)
        keep = n_seq * seq_len + 1 if n_seq else 0
        meta["splits"][split] = {**info, "sequences": int(n_seq), "tokens_dropped": int(info["tokens"] - keep)}
    return meta


def _trained_tokenizer_cached(c, model_vocab_size) -> bool:
    from mixtrain.data.tokenizer import trained_tokenizer_path

    vocab = c.vocab_size or model_vocab_size
    return vocab is not None and trained_tokenizer_path(c, vocab).is_file()


def _streamed_documents(c):
    """The corpus as an iterable data set of ``text`` rows, read record by record (for training a BPE)."""
    import datasets

    return datasets.IterableDataset.from_generator(_text_rows, gen_kwargs={"cfg": [c]})


def _text_rows(cfg):
    for c in cfg:
        for text in shards.iter_corpus_texts(c):
            yield {"text": text}


def load_tokenizer(cfg: Any, model_vocab_size: Optional[int] = None, *, wait: bool = False, log=None) -> Tok:
    """The tokenizer of ``cfg``; a trained one is trained on the corpus streamed record by
    record (or, with ``wait``, waited for: another process is training it)."""
    c = as_data_config(cfg)
    if c.tokenizer == "train" and not _trained_tokenizer_cached(c, model_vocab_size):
        if wait:
            _wait_for(lambda: _trained_tokenizer_cached(c, model_vocab_size), "the tokenizer being trained", log)
        else:
            return get_tokenizer(c, model_vocab_size, documents=_streamed_documents(c))
    return get_tokenizer(c, model_vocab_size)


def _wait_for(ready, what: str, log=None, every: float = 2.0) -> None:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0, last = time.time(), 0.0
    while not ready():
        if time.time() - last > 60:
            log(f"waiting for {what} (another process prepares it; {time.time() - t0:.0f}s so far)")
            last = time.time()
        time.sleep(every)


def prepare(cfg: Any, seq_len: int, model_vocab_size: Optional[int] = None, *, node_rank: int = 0,
            num_nodes: int = 1, wait: bool = True, build: bool = True, log=None) -> Optional[Prepared]:
    """Build (once) and return the tokenizer and token shards of ``cfg`` for ``seq_len``.

    ``node_rank``/``num_nodes``: build only this part of the units (several machines
    writing one dataset; the last part to finish writes the index). ``wait``: wait for
    the other parts (else return None when they are missing). ``build=False``: only
    return an already complete dataset (None otherwise)."""
    c = as_data_config(cfg)
    if c.sources:
        raise DataError("data.sources is a mixture: use prepare_all() (or mixtrain data prepare), one dataset per source")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= c.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {c.val_fraction}")
    if float(c.shard_mb) <= 0:
        raise DataError(f"data.shard_mb must be > 0, got {c.shard_mb}")
    if not build and c.tokenizer == "train" and not _trained_tokenizer_cached(c, model_vocab_size):
        return None
    tok = load_tokenizer(c, model_vocab_size, wait=node_rank > 0, log=log)
    out = packed_dir(c, tok)
    index = shards.read_index(out)
    if index is None:
        if not build:
            return None
        index = shards.build_dataset(c, tok, out, node_rank=node_rank, num_nodes=num_nodes, num_proc=c.num_proc,
                                     wait=wait, log=log)
        if index is None:
            return None
    return Prepared(out, _meta_for(c, tok, index, seq_len), tok)


def source_configs(cfg: Any) -> list[tuple[float, Any]]:
    """[(weight, DataConfig)] of a mixture (``data.sources``), or [(1.0, cfg)] for one source.

    Each source is the top-level data config updated with its own keys; ``paths``
    without ``source`` means ``source: files``; the tokenizer is shared (a trained one
    is trained on the first source)."""
    c = as_data_config(cfg)
    if not c.sources:
        return [(1.0, c)]
    known = {f.name for f in fields(c)} - {"sources"}
    base = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "sources"}
    out = []
    for n, src in enumerate(c.sources):
        if not isinstance(src, dict):
            raise DataError(f"data.sources[{n}] must be a mapping such as {{paths: [corpus/*.jsonl], weight: 0.5}}, got {src!r}")
        src = dict(src)
        weight = src.pop("weight", None)
        if weight is None or not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"data.sources[{n}] needs a positive weight (e.g. weight: 0.3), got {weight!r}")
        unknown = sorted(set(src) - known)
        if unknown:
            raise DataError(f"data.sources[{n}]: unknown key(s) {unknown}; a source takes data keys such as "
                            f"paths, source, hub_name, text_field, max_documents, and weight")
        if "paths" in src and "source" not in src:
            src["source"] = "files"
        out.append((float(weight), as_data_config({**base, **src})))
    total = sum(w for w, _ in out)
    return [(w / total, sc) for w, sc in out]


def prepare_all(cfg: Any, seq_len: int, model_vocab_size: Optional[int] = None, **kw) -> Optional[list[tuple[float, Prepared]]]:
    """[(weight, Prepared)], one per source (see :func:`source_configs`); None as :func:`prepare`."""
    srcs = source_configs(cfg)
    out = []
    tok_spec = None
    for n, (w, sc) in enumerate(srcs):
        if n and tok_spec is not None:
            sc.tokenizer = tok_spec
        p = prepare(sc, seq_len, model_vocab_size, **kw)
        if p is None:
            return None
        if n == 0 and len(srcs) > 1:
            tok_spec = str(p.tokenizer.path) if p.tokenizer.path else sc.tokenizer
        out.append((w, p))
    return out


# --------------------------------------------------------------------------- torch dataset


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length packed sequences of one split, read from memory-mapped token shards.

    Item ``i``: ``input_ids``, ``labels``, ``doc_ids``, each a LongTensor of length
    ``seq_len`` (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dir, self.split, self.seq_len = Path(directory), split, int(seq_len)
        index = json.loads((self.dir / "index.json").read_text())
        if index.get("format") != PACK_FORMAT:
            raise DataError(f"{self.dir} holds prepared data of format {index.get('format')}, not {PACK_FORMAT}; "
                            f"prepare it again (mixtrain data prepare)")
        col = 0 if split == "train" else 2
        counts = np.array([p[col] for p in index["parts"]], dtype=np.int64)
        self.units = np.flatnonzero(counts)
        self.starts = np.concatenate([[0], np.cumsum(counts[self.units])])
        total = int(self.starts[-1])
        self.n = (total - 1) // self.seq_len if total > 0 else 0
        self.dtype = np.dtype(index["dtype"])
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _open(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        m = self._maps.get(j)
        if m is None:
            p = shards.unit_paths(self.dir, int(self.units[j]))
            toks = np.memmap(p[f"{self.split}.bin"], dtype=self.dtype, mode="r")
            ends = np.memmap(p[f"{self.split}.ends"], dtype="<i8", mode="r")
            m = self._maps[j] = (toks, ends)
        return m

    def __getstate__(self):  # DataLoader workers re-open the memmaps themselves
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[start, stop)`` of the split stream and, per position, the number of
        document ends at or before it (counting from ``start``)."""
        j = int(np.searchsorted(self.starts, start, side="right")) - 1
        toks, docs, base = [], [], 0
        pos = start
        while pos < stop:
            t, e = self._open(j)
            a = pos - int(self.starts[j])
            b = min(stop - int(self.starts[j]), len(t))
            toks.append(np.asarray(t[a:b]))
            d = np.searchsorted(e, np.arange(a, b), side="right")
            docs.append(d - d[0] + base)
            base = int(docs[-1][-1]) + 1  # a shard always ends with a whole document
            pos += b - a
            j += 1
        return np.concatenate(toks), np.concatenate(docs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"sequence {i} out of range for {self.n} {self.split} sequences")
        i %= self.n
        T = self.seq_len
        toks, docs = self.read(i * T, i * T + T + 1)
        chunk = torch.from_numpy(toks.astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "doc_ids": torch.from_numpy(docs[:T].astype(np.int64))}


class MixtureDataset(torch.utils.data.ConcatDataset):
    """The sources of a mixture one after another (indices from :class:`MixtureSampler`)."""


@dataclass
class PreparedMixture:
    """The prepared sources of a mixture: [(weight, Prepared)], one tokenizer."""

    sources: list

    @property
    def tokenizer(self) -> Tok:
        return self.sources[0][1].tokenizer

    def num_sequences(self, split: str) -> int:
        return sum(p.num_sequences(split) for _, p in self.sources)


# --------------------------------------------------------------------------- order


class ResumableSampler(torch.utils.data.Sampler[int]):
    """An endless, deterministic, rank-distinct order over ``num_samples`` items.

    Epoch ``e`` is ``torch.randperm(num_samples)`` seeded with ``seed + e`` (or
    ``arange`` without shuffle), cut to a multiple of ``world_size``; rank ``r`` takes
    positions ``r, r + world_size, ...``: ``num_samples // world_size`` items per
    epoch, disjoint across ranks. Iteration never ends (training length is a token
    budget) and starts at ``consumed``, the number of items this rank has *used*.

    ``consumed`` is advanced by the trainer (:meth:`advance`), not by iteration,
    because a DataLoader prefetches ahead of what was trained on; after
    ``load_state_dict`` the next iterator continues exactly where training stopped.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples, self.seed, self.rank, self.world_size, self.shuffle = (
            int(num_samples), int(seed), int(rank), int(world_size), bool(shuffle)
        )
        self.per_rank = self.num_samples // self.world_size
        if self.per_rank == 0:
            raise DataError(
                f"{num_samples} training sequences cannot give each of {world_size} ranks one; "
                f"add data or lower the sequence length"
            )
        self.consumed = 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch`` (cached for the current epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            order = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
            self._cache = (epoch, order)
        return self._cache[1]

    @property
    def epoch(self) -> int:
        return self.consumed // self.per_rank

    def __iter__(self) -> Iterator[int]:
        pos = self.consumed
        while True:
            epoch, offset = divmod(pos, self.per_rank)
            for i in self.epoch_indices(epoch)[offset:].tolist():
                yield i
            pos = (epoch + 1) * self.per_rank

    def advance(self, n: int) -> None:
        self.consumed += int(n)

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, sd: dict) -> None:
        if "sizes" in sd:
            raise DataError("the checkpoint's data order is for a mixture (data.sources), this run has one data source; "
                            "resume with the same data settings")
        if sd["world_size"] != self.world_size:
            raise DataError(
                f"the checkpoint's data order was made for world_size={sd['world_size']}, this run has "
                f"world_size={self.world_size}: each rank's position in its shard cannot be carried over. "
                f"Resume with {sd['world_size']} processes (devices x nodes), or start the data order afresh"
            )
        for key, mine in (("num_samples", self.num_samples), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in sd and sd[key] != mine:
                raise DataError(
                    f"the checkpoint's data order has {key}={sd[key]} but this run has {key}={mine}: "
                    f"the data, seq_len or data.seed changed since the checkpoint; resume with the same data settings"
                )
        self.consumed = int(sd["consumed"])


class MixtureSampler(torch.utils.data.Sampler[int]):
    """An endless, deterministic, rank-distinct order over a mixture of sources.

    ``sizes[i]`` sequences of source ``i`` (indices ``offset_i .. offset_i + sizes[i]``
    of a :class:`MixtureDataset`), drawn in proportion ``weights``. The global stream
    of positions ``j = 0, 1, ...`` cycles through a fixed pattern of ``CYCLE`` slots in
    which source ``i`` holds ``round(CYCLE * w_i)`` slots, spread evenly (smooth
    weighted round robin), so any run of consecutive positions (a global batch) holds
    each source's share within about one sequence. Source ``i``'s ``k``-th draw is item
    ``k mod n_i`` of a permutation of its sequences seeded with ``seed``, ``i`` and the
    epoch ``k // n_i``. Rank ``r`` takes positions ``r, r + world_size, ...``; like
    :class:`ResumableSampler`, ``consumed`` counts what this rank trained on and is
    the whole state."""

    CYCLE = 1000

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source")
        for i, n in enumerate(sizes):
            if n < 1:
                raise DataError(f"data.sources[{i}] has no training sequence; add data or lower the sequence length")
        self.sizes, self.seed, self.rank, self.world_size = [int(n) for n in sizes], int(seed), int(rank), int(world_size)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = (w / w.sum()).tolist()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])[:-1].tolist()
        self.slots = self._apportion(self.weights, self.CYCLE)
        self.pattern, self.nth = self._pattern(self.slots)
        self.consumed = 0
        self._perm: dict[int, tuple[int, torch.Tensor]] = {}

    @staticmethod
    def _apportion(weights: list[float], total: int) -> list[int]:
        """Integer slots per source summing to ``total`` (largest remainder, at least 1 each)."""
        raw = np.asarray(weights) * total
        slots = np.maximum(np.floor(raw).astype(int), 1)
        for i in np.argsort(-(raw - np.floor(raw)), kind="stable"):
            if slots.sum() >= total:
                break
            slots[i] += 1
        while slots.sum() > total:
            slots[int(np.argmax(slots))] -= 1
        return slots.tolist()

    @staticmethod
    def _pattern(slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
        total = sum(slots)
        current = np.zeros(len(slots), dtype=np.int64)
        pattern = np.zeros(total, dtype=np.int64)
        nth = np.zeros(total, dtype=np.int64)
        seen = [0] * len(slots)
        for j in range(total):
            current += slots
            i = int(np.argmax(current))
            current[i] -= total
            pattern[j], nth[j] = i, seen[i]
            seen[i] += 1
        return pattern, nth

    def source_of(self, j: int) -> tuple[int, int]:
        """(source, its draw number) of global position ``j``."""
        cycle, r = divmod(int(j), len(self.pattern))
        i = int(self.pattern[r])
        return i, cycle * self.slots[i] + int(self.nth[r])

    def _item(self, i: int, k: int) -> int:
        epoch, off = divmod(k, self.sizes[i])
        cached = self._perm.get(i)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * (i + 1) + epoch)
            cached = self._perm[i] = (epoch, torch.randperm(self.sizes[i], generator=g))
        return self.offsets[i] + int(cached[1][off])

    def __iter__(self) -> Iterator[int]:
        p = self.consumed
        while True:
            yield self._item(*self.source_of(p * self.world_size + self.rank))
            p += 1

    def advance(self, n: int) -> None:
        self.consumed += int(n)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "world_size": self.world_size,
                "sizes": list(self.sizes), "weights": list(self.weights)}

    def load_state_dict(self, sd: dict) -> None:
        if "sizes" not in sd:
            raise DataError("the checkpoint's data order is for one data source, this run has data.sources (a mixture); "
                            "resume with the same data settings")
        if sd["world_size"] != self.world_size:
            raise DataError(
                f"the checkpoint's data order was made for world_size={sd['world_size']}, this run has "
                f"world_size={self.world_size}: each rank's position in its shard cannot be carried over. "
                f"Resume with {sd['world_size']} processes (devices x nodes), or start the data order afresh"
            )
        for key, mine in (("sizes", self.sizes), ("seed", self.seed)):
            if sd[key] != mine:
                raise DataError(f"the checkpoint's data order has {key}={sd[key]} but this run has {key}={mine}: "
                                f"the data, seq_len or data.seed changed since the checkpoint; resume with the same data settings")
        if not np.allclose(sd["weights"], self.weights):
            raise DataError(f"the checkpoint's mixture has weights {sd['weights']} but this run has {self.weights}; "
                            f"resume with the same data.sources weights")
        self.consumed = int(sd["consumed"])

    def tokens_per_source(self, seq_len: int, consumed_all_ranks: int) -> list[int]:
        """Tokens drawn from each source in the first ``consumed_all_ranks`` global positions."""
        cycles, r = divmod(int(consumed_all_ranks), len(self.pattern))
        counts = np.asarray(self.slots) * cycles + np.bincount(self.pattern[:r], minlength=len(self.slots))
        return (counts * seq_len).tolist()


class _Shard(torch.utils.data.Sampler[int]):
    """Rank ``rank`` of ``world_size`` of ``range(n)``, in order, equal lengths (remainder dropped)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range((n // world_size) * world_size))[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# --------------------------------------------------------------------------- Lightning


try:
    import lightning.pytorch as _pl

    _Base = _pl.LightningDataModule
except ImportError:  # pragma: no cover
    _Base = object


class PretrainDataModule(_Base):
    """Packed pretraining data for Lightning.

    :meth:`prepare_before_fit` (``mixtrain train`` calls it before ``fit``) or
    ``prepare_data`` (rank 0 of each node) builds the tokenizer and token shards;
    ``setup`` opens them on every rank and makes the :class:`ResumableSampler` (or
    :class:`MixtureSampler` for ``data.sources``; the
    Trainer must use ``use_distributed_sampler=False``). Batches are dicts of LongTensors
    ``input_ids``, ``labels``, ``doc_ids`` of shape ``[micro_batch_size, seq_len]``.
    The training loader never ends: bound training with ``max_steps``. Call
    :meth:`on_batch_consumed` once per trained micro-batch, before a checkpoint can be
    saved for that step (e.g. in ``on_train_batch_start``), so ``state_dict`` resumes at
    the next unseen batch.
    """

    def __init__(self, cfg: Any, seq_len: int, micro_batch_size: int, vocab_size: int, num_workers: Optional[int] = None):
        super().__init__()
        self.cfg = as_data_config(cfg)
        self.seq_len, self.micro_batch_size, self.vocab_size = int(seq_len), int(micro_batch_size), int(vocab_size)
        self.num_workers = int(num_workers if num_workers is not None else self.cfg.num_workers)
        self.prepared: Optional[Prepared] = None
        self.train_set: Optional[PackedDataset] = None
        self.val_set: Optional[PackedDataset] = None
        self.sampler: Optional[ResumableSampler] = None
        self._pending_state: Optional[dict] = None

    # ---- build / load (the long-QA and recall modules override these four)
    def _prepare(self, build: bool = True):
        srcs = prepare_all(self.cfg, self.seq_len, self.vocab_size, build=build)  # cached after the first build
        if srcs is None:
            return None
        return srcs[0][1] if len(srcs) == 1 and not self.cfg.sources else PreparedMixture(srcs)

    def _dataset(self, split: str):
        if isinstance(self.prepared, PreparedMixture):
            return MixtureDataset([p.dataset(split) for _, p in self.prepared.sources])
        return PackedDataset(self.prepared.dir, split, self.seq_len)

    def _has_split(self, split: str) -> bool:
        return bool(self.prepared.num_sequences(split))

    def prepare_before_fit(self) -> None:
        """Prepare the data before ``Trainer.fit`` (no collective, so no timeout however long
        the build): the first process of each node (``LOCAL_RANK``/``SLURM_LOCALID`` 0 or
        unset) builds, the others wait for the finished dataset's index file."""
        if type(self)._prepare is not PretrainDataModule._prepare:
            return  # long-QA, recall: small, prepared in prepare_data
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)
        if local == 0:
            self.prepared = self._prepare()
            if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0:
                print(self.describe(), file=sys.stderr)
            return
        holder: list = []
        _wait_for(lambda: holder.append(self._prepare(build=False)) or holder[-1] is not None,
                  "the prepared data (local rank 0 builds it)")
        self.prepared = holder[-1]

    def _too_few_val(self, world: int):
        raise DataError(
            f"{len(self.val_set)} validation sequences cannot give each of {world} ranks one: raise "
            f"data.val_fraction, add data, lower seq_len={self.seq_len}, or set data.val_fraction=0"
        )

    def describe(self) -> str:
        """One line per source: its tokens (train/val), sequences, share of the draws and folder."""
        srcs = self.prepared.sources if isinstance(self.prepared, PreparedMixture) else [(1.0, self.prepared)]
        lines = []
        for n, (w, p) in enumerate(srcs):
            tr, va = p.meta["splits"]["train"], p.meta["splits"]["val"]
            head = f"data source {n} (weight {w:.3f})" if len(srcs) > 1 else "data"
            lines.append(f"{head}: {p.meta['corpus']}: {tr['tokens']:,} train / {va['tokens']:,} val tokens, "
                         f"{tr['sequences']:,} train sequences of {self.seq_len}; {p.dir}")
        return "\n".join(lines)

    def prepare_data(self) -> None:
        if self.prepared is None:
            self.prepared = self._prepare()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        if self.prepared is None:
            self.prepared = self._prepare()
        self.train_set = self._dataset("train")
        self.val_set = self._dataset("val") if self._has_split("val") else None
        rank, world = self._rank_world()
        if self.sampler is None or (self.sampler.rank, self.sampler.world_size) != (rank, world):
            consumed = self.sampler.consumed if self.sampler is not None else 0
            if isinstance(self.train_set, MixtureDataset):
                sizes = [len(d) for d in self.train_set.datasets]
                weights = [w for w, _ in self.prepared.sources]
                self.sampler = MixtureSampler(sizes, weights, self.cfg.seed, rank, world)
            else:
                self.sampler = ResumableSampler(len(self.train_set), self.cfg.seed, rank, world, shuffle=True)
            self.sampler.consumed = consumed
        if self.val_set is not None and len(self.val_set) < world:
            self.val_set = self._too_few_val(world)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state["sampler"])
            self._pending_state = None

    # ---- loaders
    def train_dataloader(self):
        if self.sampler is None:
            self.setup("fit")
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.micro_batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self):
        if self.sampler is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        rank, world = self._rank_world()
        return torch.utils.data.DataLoader(
            self.val_set,
            batch_size=self.micro_batch_size,
            sampler=_Shard(len(self.val_set), rank, world),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    # ---- progress and resume
    @property
    def tokenizer(self) -> Tok:
        if self.prepared is None:
            self.prepared = self._prepare()
        return self.prepared.tokenizer

    @property
    def samples_consumed(self) -> int:
        """Training sequences this rank has consumed (all ranks: times world_size)."""
        return self.sampler.consumed if self.sampler is not None else 0

    def on_batch_consumed(self, n_samples: int) -> None:
        self.sampler.advance(n_samples)

    def state_dict(self) -> dict:
        if self.sampler is not None:
            return {"sampler": self.sampler.state_dict()}
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
        else:
            self._pending_state = dict(state_dict)
