"""Documents -> tokens -> packed fixed-length sequences, and the order they are read in.

Pipeline (every step cached under ``data.cache_dir``, every cache built atomically):

1. ``load_documents`` (corpus.py) and ``get_tokenizer`` (tokenizer.py).
2. Tokenise with ``Dataset.map(batched=True, num_proc=data.num_proc)``, appending EOS
   to every document: ``<cache_dir>/tokenized/<hash(corpus, tokenizer)>/tokens.arrow``
   (reused when only ``seq_len`` changes).
3. Split by document (deterministic in ``data.seed``; at least one validation
   document when ``val_fraction > 0``), concatenate each split's documents in corpus
   order and store the stream flat: ``<cache_dir>/packed/<hash>/{train,val}.tokens.npy``
   (uint16/uint32) and ``{train,val}.docs.npy`` (int32 document index per token) plus
   ``meta.json``; written to a temporary directory and renamed into place.

Sequence ``i`` of a split is the stream slice ``[i*T, (i+1)*T + 1)`` (T = seq_len):
``input_ids = slice[:-1]``, ``labels = slice[1:]``, so consecutive sequences overlap by
one token and every stream token but the first is a label exactly once. ``doc_ids``
numbers the documents inside each sequence from 0 (``0,0,0,1,1,2,...``); a document's
EOS belongs to it, so ids change right after each EOS. Labels are *not* masked at
document boundaries (standard packing): at an EOS position the label is the first
token of the next document. A model that wants strictly per-document training can
mask ``labels`` where ``doc_ids`` changes at the next position.
"""

from __future__ import annotations

import json
import sys
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mixtrain.data.corpus import DataError, as_data_config, cache_root, corpus_identity, load_documents, short_hash
from mixtrain.data.tokenizer import Tok, get_tokenizer

PACK_FORMAT = 1
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- tokenise


class _Encoder:
    """Picklable batched map function (``num_proc`` > 1 ships it to worker processes)."""

    def __init__(self, tok: Tok):
        self.tok = tok

    def __call__(self, batch: dict) -> dict:
        eos = self.tok.eos_id
        return {"input_ids": [ids + [eos] for ids in self.tok.encode_batch(batch["text"])]}


def tokenize_documents(docs, tok: Tok, cache_file: Path, num_proc: int = 1):
    """Tokenise a ``Dataset`` of ``text`` into ``input_ids`` (EOS appended), cached in ``cache_file``."""
    import datasets

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    n = len(docs)
    return docs.map(
        _Encoder(tok),
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc and num_proc > 1 and n >= 2 * num_proc else None,
        remove_columns=docs.column_names,
        features=features,
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        new_fingerprint=cache_file.parent.name,
        desc="tokenize",
    )


def _flat_tokens(tokenized) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of the ``input_ids`` list column, without Python-level loops."""
    col = tokenized.data.column("input_ids")
    values, lengths = [], []
    for chunk in col.chunks:
        values.append(chunk.flatten().to_numpy(zero_copy_only=False))
        lengths.append(chunk.value_lengths().to_numpy(zero_copy_only=False))
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(values), np.concatenate(lengths).astype(np.int64)


# --------------------------------------------------------------------------- split and pack


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents (deterministic in ``seed``)."""
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


@dataclass
class Prepared:
    """A built packed cache: its folder, metadata and tokenizer."""

    dir: Path
    meta: dict
    tokenizer: Tok

    def num_sequences(self, split: str) -> int:
        return self.meta["splits"][split]["sequences"]


def packed_dir(cfg: Any, tok: Tok, seq_len: int) -> Path:
    c = as_data_config(cfg)
    key = short_hash(corpus_identity(c), tok.fingerprint(), seq_len, c.val_fraction, c.seed, PACK_FORMAT)
    return cache_root(c) / "packed" / key


def _too_small(split, n_tok, n_docs, seq_len, total_docs, total_tok, val_fraction) -> DataError:
    return DataError(
        f"the {split} split has {n_tok} tokens in {n_docs} document(s), fewer than one sequence of "
        f"seq_len+1={seq_len + 1} tokens: the corpus ({total_docs} documents, {total_tok} tokens) is too small "
        f"for seq_len={seq_len} with data.val_fraction={val_fraction}. Add data, lower the sequence length"
        + (" or raise data.val_fraction" if split == "val" else " or lower data.val_fraction")
    )


def _build_packed(c, tok: Tok, seq_len: int, out: Path, docs=None) -> dict:
    import datasets

    t0 = time.time()
    if docs is None:
        docs = load_documents(c)
    if isinstance(docs, datasets.IterableDataset):
        if not c.max_documents:
            raise DataError(
                "data.streaming=true: set data.max_documents (how many streamed documents to pack into the cache)"
            )
        docs = datasets.Dataset.from_dict({"text": [row["text"] for row in docs]})
    tok_key = short_hash(corpus_identity(c), tok.fingerprint(), PACK_FORMAT)
    tokenized = tokenize_documents(docs, tok, cache_root(c) / "tokenized" / tok_key / "tokens.arrow", c.num_proc)
    values, lengths = _flat_tokens(tokenized)
    n_docs, n_tok = len(lengths), int(lengths.sum())
    if n_docs == 0:
        raise DataError(f"data.source={c.source}: no documents to pack")
    val_mask = split_documents(n_docs, c.val_fraction, c.seed)
    doc_of_token = np.repeat(np.arange(n_docs), lengths)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict = {
        "format": PACK_FORMAT,
        "seq_len": seq_len,
        "corpus_id": short_hash(corpus_identity(c)),
        "source": c.source,
        "corpus": _describe(c),
        "tokenizer": str(tok.path) if tok.path else None,
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "documents": n_docs,
        "tokens": n_tok,
        "val_fraction": c.val_fraction,
        "seed": c.seed,
        "splits": {},
    }
    for split, mask in (("train", ~val_mask), ("val", val_mask)):
        sel = mask[doc_of_token]
        stream = values[sel]
        local_doc = (np.cumsum(mask) - 1).astype(np.int32)[doc_of_token[sel]]
        n_split_docs = int(mask.sum())
        n_seq = (len(stream) - 1) // seq_len if len(stream) > 0 else 0
        if n_seq == 0 and (split == "train" or n_split_docs > 0):
            shutil.rmtree(tmp, ignore_errors=True)
            raise _too_small(split, len(stream), n_split_docs, seq_len, n_docs, n_tok, c.val_fraction)
        keep = n_seq * seq_len + 1 if n_seq else 0
        np.save(tmp / f"{split}.tokens.npy", stream[:keep].astype(dtype))
        np.save(tmp / f"{split}.docs.npy", local_doc[:keep])
        meta["splits"][split] = {
            "documents": n_split_docs,
            "tokens": int(len(stream)),
            "sequences": int(n_seq),
            "tokens_dropped": int(len(stream) - keep),
        }
    return commit_build(tmp, out, tok, meta, t0)


def commit_build(tmp: Path, out: Path, tok: Tok, meta: dict, t0: float) -> dict:
    """Finish a cache folder built under ``tmp``: add the tokenizer and meta.json, then
    rename it to ``out`` in one step (readers never see half a cache)."""
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
    return f"hub {c.hub_name} ({c.hub_config}, {c.hub_split})"


def prepare(cfg: Any, seq_len: int, model_vocab_size: Optional[int] = None) -> Prepared:
    """Build (once) and return the corpus, tokenizer and packed cache for ``seq_len``."""
    c = as_data_config(cfg)
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    docs = None
    if c.tokenizer == "train" and not _trained_tokenizer_cached(c, model_vocab_size):
        docs = load_documents(c)
    tok = get_tokenizer(c, model_vocab_size, documents=docs)
    out = packed_dir(c, tok, seq_len)
    meta = _intact_cache_meta(out, seq_len)
    if meta is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = _build_packed(c, tok, seq_len, out, docs)
    return Prepared(out, meta, tok)


def _intact_cache_meta(out: Path, seq_len: int) -> Optional[dict]:
    """The meta of a complete packed cache, or None when there is none. A damaged one
    (a truncated or unreadable array, a torn meta.json: a disk error, a copy cut short)
    is removed, so the caller rebuilds it from the corpus: it is only a cache."""
    if not (out / "meta.json").is_file():
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
        for split, info in meta["splits"].items():
            n = info["sequences"] * seq_len + 1 if info["sequences"] else 0
            for kind in ("tokens", "docs"):
                if len(np.load(out / f"{split}.{kind}.npy", mmap_mode="r")) != n:
                    raise ValueError(f"{split}.{kind}.npy does not hold {n} entries")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        import warnings

        warnings.warn(f"the packed data cache {out} is damaged ({e}); rebuilding it")
        shutil.rmtree(out, ignore_errors=True)
        return None


def _trained_tokenizer_cached(c, model_vocab_size) -> bool:
    from mixtrain.data.tokenizer import trained_tokenizer_path

    vocab = c.vocab_size or model_vocab_size
    return vocab is not None and trained_tokenizer_path(c, vocab).is_file()


# --------------------------------------------------------------------------- torch dataset


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length packed sequences of one split, read from memory-mapped arrays.

    Item ``i``: ``input_ids``, ``labels``, ``doc_ids``, each a LongTensor of length
    ``seq_len`` (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dir, self.split, self.seq_len = Path(directory), split, seq_len
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta["seq_len"] != seq_len:
            raise DataError(f"{self.dir} was packed for seq_len={meta['seq_len']}, not {seq_len}")
        self.n = meta["splits"][split]["sequences"]
        self._tokens = self._docs = None

    def _open(self):
        if self._tokens is None:
            self._tokens = np.load(self.dir / f"{self.split}.tokens.npy", mmap_mode="r")
            self._docs = np.load(self.dir / f"{self.split}.docs.npy", mmap_mode="r")

    def __getstate__(self):  # DataLoader workers re-open the memmaps themselves
        return {**self.__dict__, "_tokens": None, "_docs": None}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"sequence {i} out of range for {self.n} {self.split} sequences")
        i %= self.n
        self._open()
        s, T = i * self.seq_len, self.seq_len
        chunk = torch.from_numpy(self._tokens[s : s + T + 1].astype(np.int64))
        docs = torch.from_numpy(self._docs[s : s + T].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "doc_ids": docs - docs[0]}


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

    ``prepare_data`` (rank 0 of each node) builds the corpus, tokenizer and packed cache;
    ``setup`` loads them on every rank and makes the :class:`ResumableSampler` (the
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

    # ---- build / load (the long-QA module overrides these four)
    def _prepare(self):
        return prepare(self.cfg, self.seq_len, self.vocab_size)  # cached after the first build

    def _dataset(self, split: str):
        return PackedDataset(self.prepared.dir, split, self.seq_len)

    def _has_split(self, split: str) -> bool:
        return bool(self.prepared.num_sequences(split))

    def _too_few_val(self, world: int):
        raise DataError(
            f"{len(self.val_set)} validation sequences cannot give each of {world} ranks one: raise "
            f"data.val_fraction, add data, lower seq_len={self.seq_len}, or set data.val_fraction=0"
        )

    def prepare_data(self) -> None:
        self._prepare()

    def supervised_tokens_per_example(self) -> Optional[float]:
        """Mean number of tokens with a loss per training example; None when that is
        every token of every example (packed pretraining), so batches need no weighting."""
        return None

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
