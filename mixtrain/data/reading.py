"""Reading prepared token shards: the torch datasets, the orders they are read in, and
the Lightning DataModule (see :mod:`mixtrain.data.pretrain` for the layout).

- :class:`PackedDataset`: one split's fixed-length sequences, memory-mapped from the shards.
- :class:`ResumableSampler` (one source) and :class:`MixtureSampler` (``data.sources``):
  endless, deterministic, rank-distinct orders whose position is the whole resume state.
- :class:`PretrainDataModule`: prepares before ``fit`` and serves the loaders.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mixtrain.data import shards
from mixtrain.data.corpus import DataError, as_data_config
from mixtrain.data.pretrain import PACK_FORMAT, SPLITS, Prepared, _wait_for, prepare_all
from mixtrain.data.tokenizer import Tok


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
