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

Reading (:mod:`mixtrain.data.reading`, torch; its names are also importable from here):
:class:`PackedDataset` memory-maps the shards (nothing is read whole); every
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
from typing import Any, Optional

import numpy as np

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

    def dataset(self, split: str):
        """The :class:`~mixtrain.data.reading.PackedDataset` of ``split``."""
        from mixtrain.data.reading import PackedDataset

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


# The torch side (datasets, samplers, the DataModule) lives in mixtrain.data.reading;
# importing this module stays light (no torch, no Lightning) for preparation processes.
_READING = ("PackedDataset", "MixtureDataset", "PreparedMixture", "ResumableSampler", "MixtureSampler",
            "PretrainDataModule")


def __getattr__(name: str):
    if name in _READING:
        from mixtrain.data import reading

        return getattr(reading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
