"""Multi-query associative recall (MQAR, Zoology: Arora et al., 2023), generated on the fly.

The probe of whether a layout can retrieve *by content* beyond its sliding window
(``data=recall``, ``experiment=recall``, ``mixtrain eval --tasks recall``).

One sequence of ``seq_len`` input tokens (``seq_len + 1`` generated, inputs = tokens[:-1])
is cut into 2-token slots. ``data.recall_pairs`` slots at random positions hold a
key-value pair ``k v``; ``recall_pairs`` later slots hold the queries ``k f`` (each key
of the sequence asked once, in random order; ``f`` a filler token); every other slot
holds two random filler tokens. The loss is on the answers only: ``labels`` is -100
everywhere except at a query's key position, whose label is the value that followed that
key in its pair (the long-QA stage's convention: only answer targets carry a loss).

The answer is *not* written after its query (Zoology's MQAR writes it, as teacher
forcing): with answers in the input, a model that only knows which values the sequence
holds can exclude the values already answered, so its i-th of n queries is right with
probability 1/(n - i) - H(n)/n = 0.34 on average for 8 pairs instead of 1/8 - which is
what ``ma`` learned in our first sweep. Without them, every value appears exactly once
and knowing the values without their keys is worth exactly 1 / recall_pairs.

Token ids (disjoint ranges, so a token's role is its identity)::

    0                                   <|endoftext|> (EOS / pad, never generated)
    1 .. F                              filler  f0 .. f{F-1}   (F = recall_filler)
    F+1 .. F+K                          keys    k0 .. k{K-1}   (K = recall_keys)
    F+K+1 .. F+K+V                      values  v0 .. v{V-1}   (V = recall_values)

Keys of one sequence are distinct, and so are its values: a model that knows which values
the sequence holds but not which belongs to which key scores 1 / recall_pairs.

Where the queries sit (``data.recall_placement``), with distance d = query position -
key position of its pair and W = ``data.recall_window`` (the sliding window):

- ``beyond``: the pairs are one block of adjacent slots at a random start
  (``data.recall_block=random``) or at the sequence's start (``first``, as Zoology's
  MQAR); the queries
  (one per key, in a random order) sit at random free slots more than
  G = max(W, ``data.recall_gap``) tokens after the block's last pair, so every query is
  beyond the window of *every* pair (query i sees keys j with i - W < j <= i; the value at
  key + 1 is visible iff d <= W). Nothing about a query's position says which pair it
  asks: answering by position (the most recent pair, the k-th pair for the k-th query,
  a fixed offset) scores exactly 1 / recall_pairs, and only matching the key by content
  and reading the token that followed it finds the value. With G above the reach of
  stacked sliding layers (n_layers x W), a layout without a global layer that can do that
  match cannot relay the pair to the query either;
- ``within``: pairs at random slots, every query at most W after its pair (a sliding layer
  sees the pair; answering the most recent pair is a strong shortcut there, which is why
  ``mixtrain eval --tasks recall`` prints the by-position score beside the accuracies);
- ``mixed``: each sequence is a ``beyond`` or a ``within`` one with probability 1/2.

``data.recall_queries`` (beyond sequences; default one per pair) asks each key several
times: query i asks pair i % pairs, the queries shuffled over the free slots after the
gap. Each answer is a training signal, so more queries per sequence mean more of them per
step for the same compute, while answering by position still scores 1 / recall_pairs
(exactly, when recall_pairs divides recall_queries). The answer is never written after a
query, so an earlier query of the same key gives nothing away.

Why the block: with pairs scattered at random and each query somewhere after its own pair,
"the most recent pair at least W back" is right 0.77 / 0.54 / 0.35 of the time for
2 / 4 / 8 pairs, and small models settle on that shortcut instead of learning retrieval.

Sequence ``i`` of a split is a pure function of (``data.seed``, split, ``i``): the
training split uses the seed stream ``[seed, 0, i]``, validation ``[seed, 1, i]`` and
``mixtrain eval --tasks recall`` ``[seed, 2, i]`` (disjoint streams). The training set
is indexed (``recall_train_sequences`` items) and ordered by the resumable sampler of the
pretraining data, so ``run.resume=auto`` continues with the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mixtrain.data.corpus import DataError, as_data_config

PLACEMENTS = ("beyond", "within", "mixed")
BLOCKS = ("random", "first")
STREAMS = {"train": 0, "val": 1, "eval": 2}
EOS_TOKEN = "<|endoftext|>"


class RecallError(DataError):
    pass


@dataclass(frozen=True)
class RecallSpec:
    """What one recall sequence looks like (from the ``data.recall_*`` settings)."""

    seq_len: int
    pairs: int = 8
    keys: int = 32
    values: int = 32
    filler: int = 16
    window: int = 16
    placement: str = "beyond"
    seed: int = 1234
    gap: Optional[int] = None  # beyond: the smallest query-to-pair distance (None: the window)
    block: str = "random"  # beyond: where the block of pairs starts ("random" or "first")
    queries: Optional[int] = None  # beyond: queries per sequence (None: one per pair)

    # ---- token ids
    @property
    def eos_id(self) -> int:
        return 0

    @property
    def key0(self) -> int:
        return 1 + self.filler

    @property
    def value0(self) -> int:
        return 1 + self.filler + self.keys

    @property
    def vocab_size(self) -> int:
        return 1 + self.filler + self.keys + self.values

    @property
    def slots(self) -> int:
        return (self.seq_len + 1) // 2  # slots whose both tokens are among the seq_len + 1

    def with_(self, **changes) -> "RecallSpec":
        from dataclasses import replace

        return replace(self, **changes)

    def check(self, model_vocab_size: Optional[int] = None) -> "RecallSpec":
        """Raise :class:`RecallError` (naming the setting) for a spec that cannot be generated."""
        for key in ("pairs", "keys", "values", "window"):
            if getattr(self, key) < 1:
                raise RecallError(f"data.recall_{key}={getattr(self, key)} must be at least 1")
        if self.filler < 1:
            raise RecallError(f"data.recall_filler={self.filler} must be at least 1 (filler tokens fill the free slots)")
        if self.placement not in PLACEMENTS:
            raise RecallError(f"data.recall_placement={self.placement!r} is not known; use one of {list(PLACEMENTS)}")
        if self.pairs > self.keys or self.pairs > self.values:
            raise RecallError(
                f"data.recall_pairs={self.pairs} needs at least as many distinct keys and values "
                f"(data.recall_keys={self.keys}, data.recall_values={self.values}): a sequence's keys and its "
                f"values are all different; raise them or lower data.recall_pairs"
            )
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise RecallError(
                f"the recall task needs {self.vocab_size} token ids (1 EOS + {self.filler} filler + {self.keys} keys + "
                f"{self.values} values) but model.vocab_size={model_vocab_size}; raise model.vocab_size or lower "
                f"data.recall_keys / recall_values / recall_filler"
            )
        if self.block not in BLOCKS:
            raise RecallError(f"data.recall_block={self.block!r} is not known; use one of {list(BLOCKS)}")
        if self.queries is not None and self.queries < self.pairs:
            raise RecallError(
                f"data.recall_queries={self.queries} must be at least data.recall_pairs={self.pairs} "
                f"(every key is asked at least once; null: one query per pair)"
            )
        if self.gap is not None and self.gap < 0:
            raise RecallError(f"data.recall_gap={self.gap} must be at least 0 (null: the window)")
        # The sequence must hold every pair and its query, with beyond-window room.
        need = 2 * self.pairs if self.placement == "within" else self.pairs + self.n_queries + self.min_gap // 2
        if self.slots < need:
            raise RecallError(
                f"seq_len={self.seq_len} has {self.slots} 2-token slots; {self.pairs} pairs, their {self.n_queries} queries "
                f"and a gap of {self.min_gap} tokens between the pairs and the beyond-window queries need at least "
                f"{need} (seq_len >= {2 * need - 1}); raise train.seq_len or lower data.recall_pairs / recall_gap / "
                f"recall_window"
            )
        return self

    # ---- generation
    def sample(self, stream: int, index: int) -> dict[str, np.ndarray]:
        """Sequence ``index`` of seed stream ``stream``: ``tokens`` [seq_len + 1] and, per
        query, ``query_pos`` (position of the query's key token), ``key_pos`` (position of
        its pair's key token), ``distance`` (query_pos - key_pos) and ``answer`` (value id);
        and ``pair_pos``, the key positions of all pairs."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(stream), int(index)])
        for _ in range(1000):
            got = self._try(rng)
            if got is not None:
                return got
        raise RecallError(  # pragma: no cover - check() leaves room; this needs a pathological spec
            f"could not place {self.pairs} pairs with their queries ({self.placement}) in seq_len={self.seq_len}; "
            f"raise train.seq_len or lower data.recall_pairs"
        )

    def _try(self, rng: np.random.Generator) -> Optional[dict[str, np.ndarray]]:
        placement = self.placement
        if placement == "mixed":  # each sequence either way (the draw is part of the sequence's stream)
            placement = "beyond" if rng.random() < 0.5 else "within"
        if placement == "beyond":
            pair_slot, query_slot = self._beyond_slots(rng)
        else:
            got = self._within_slots(rng)
            if got is None:
                return None
            pair_slot, query_slot = got
        n = self.pairs
        asks = np.arange(len(query_slot)) % n  # query i asks pair i % n (its slot is random)
        keys = rng.choice(self.keys, n, replace=False) + self.key0
        values = rng.choice(self.values, n, replace=False) + self.value0
        slots = rng.integers(1, 1 + self.filler, size=(self.seq_len // 2 + 1, 2))  # + a filler tail
        slots[pair_slot, 0], slots[pair_slot, 1] = keys, values
        slots[query_slot, 0] = keys[asks]  # the token after a query stays filler: see the module docstring
        tokens = slots.reshape(-1)[: self.seq_len + 1]
        order = np.argsort(query_slot)
        asked = pair_slot[asks][order]  # each query's pair slot, queries in position order
        return {
            "tokens": tokens.astype(np.int64),
            "query_pos": 2 * query_slot[order],
            "key_pos": 2 * asked,
            "distance": 2 * (query_slot[order] - asked),
            "answer": values[asks][order].astype(np.int64),
            "pair_pos": np.sort(2 * pair_slot),  # every pair's key position (its value follows)
        }

    @property
    def n_queries(self) -> int:
        """Queries of a beyond sequence (``data.recall_queries``, default one per pair)."""
        return self.pairs if self.queries is None else int(self.queries)

    @property
    def min_gap(self) -> int:
        """Smallest distance of a beyond-window query to *any* pair (``data.recall_gap``, at least W)."""
        return max(self.window, self.gap or 0)

    def _beyond_slots(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The pairs in one block of adjacent slots at a random start; the queries, one per
        key in a random order, at random free slots at least ``min_gap`` + 1 tokens after
        the block's last key. Nothing about a query's position tells which pair it asks."""
        S, n, q = self.slots, self.pairs, self.n_queries
        far = self.min_gap // 2 + 1  # slot gap whose distance 2 * far exceeds the gap
        # Drawn in both modes (check() leaves room: S >= far + n + q - 1), so "first" changes only the start.
        drawn = int(rng.integers(0, S - far - n - q + 2))
        start = 0 if self.block == "first" else drawn
        pair_slot = np.arange(start, start + n)
        first = start + n - 1 + far
        # Query i asks pair i % n (each key q / n times when n divides q) at a random one of
        # the free slots: the permutation decides which query sits where.
        query_slot = np.sort(rng.choice(np.arange(first, S), q, replace=False))[rng.permutation(q)]
        return pair_slot, query_slot

    def _within_slots(self, rng: np.random.Generator) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Pairs at random slots, each query at a random free slot at most W after its pair."""
        S, n, near = self.slots, self.pairs, self.window // 2
        used = np.zeros(S, bool)
        pair_slot = np.empty(n, np.int64)
        query_slot = np.empty(n, np.int64)
        for j in range(n):
            free = np.flatnonzero(~used[: S - 1])
            if free.size == 0:
                return None
            pair_slot[j] = rng.choice(free)
            used[pair_slot[j]] = True
        for j in rng.permutation(n):
            a = pair_slot[j]
            free = np.flatnonzero(~used[a + 1: min(S, a + near + 1)]) + a + 1
            if free.size == 0:
                return None
            query_slot[j] = rng.choice(free)
            used[query_slot[j]] = True
        return pair_slot, query_slot

    def example(self, stream: int, index: int) -> dict[str, torch.Tensor]:
        """The training example of :meth:`sample`: ``input_ids``, ``labels`` (-100 except at
        query positions), ``doc_ids`` (zeros) and ``recall_distance`` (the query-to-pair
        distance at query positions, 0 elsewhere), each [seq_len]."""
        s = self.sample(stream, index)
        tokens = torch.from_numpy(s["tokens"])
        T = self.seq_len
        labels = torch.full((T,), -100, dtype=torch.long)
        dist = torch.zeros(T, dtype=torch.long)
        q = torch.from_numpy(s["query_pos"])
        labels[q] = torch.from_numpy(s["answer"])
        dist[q] = torch.from_numpy(s["distance"])
        return {"input_ids": tokens[:-1].clone(), "labels": labels, "doc_ids": torch.zeros(T, dtype=torch.long),
                "recall_distance": dist}

    def token_names(self) -> list[str]:
        return ([EOS_TOKEN] + [f"f{i}" for i in range(self.filler)] + [f"k{i}" for i in range(self.keys)]
                + [f"v{i}" for i in range(self.values)])


def spec_from_config(cfg: Any, seq_len: int, model_vocab_size: Optional[int] = None) -> RecallSpec:
    """The :class:`RecallSpec` of a data config (``data.recall_*``), checked."""
    c = as_data_config(cfg)
    if c.recall_window is None:
        raise RecallError(
            "data.recall_window is not set: give the sliding window W of the layouts you probe "
            "(recipes/data/recall.yaml sets it to ${model.sliding_window})"
        )
    return RecallSpec(
        seq_len=int(seq_len), pairs=c.recall_pairs, keys=c.recall_keys, values=c.recall_values,
        filler=c.recall_filler, window=int(c.recall_window), placement=c.recall_placement, seed=c.seed,
        gap=None if c.recall_gap is None else int(c.recall_gap), block=c.recall_block,
        queries=None if c.recall_queries is None else int(c.recall_queries),
    ).check(model_vocab_size)


def recall_tokenizer(spec: RecallSpec):
    """A word-level tokenizer over the task's token names (``f3 k12 v7 ...``), so a run
    directory holds a tokenizer.json like every other run and ``mixtrain generate`` works."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from mixtrain.data.tokenizer import Tok

    vocab = {name: i for i, name in enumerate(spec.token_names())}
    tk = Tokenizer(WordLevel(vocab, unk_token=EOS_TOKEN))
    tk.pre_tokenizer = WhitespaceSplit()
    tk.add_special_tokens([EOS_TOKEN])
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return Tok(tk)


class RecallDataset(torch.utils.data.Dataset):
    """``n`` sequences of one seed stream, generated when indexed (nothing stored)."""

    def __init__(self, spec: RecallSpec, split: str, n: int):
        if split not in STREAMS:
            raise ValueError(f"split {split!r}: use one of {list(STREAMS)}")
        self.spec, self.split, self.n = spec, split, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"sequence {i} out of range for {self.n} {self.split} sequences")
        return self.spec.example(STREAMS[self.split], i % self.n)


# --------------------------------------------------------------------------- metrics


def recall_counts(logits: torch.Tensor, labels: torch.Tensor, distance: torch.Tensor, window: int) -> torch.Tensor:
    """[correct_within, total_within, correct_beyond, total_beyond] (float64) of a batch:
    a query is correct when the argmax of its logits is its answer; within means
    distance <= window (its pair's value inside the query's window), beyond otherwise."""
    mask = labels != -100
    correct = (logits.argmax(-1) == labels) & mask
    within = mask & (distance <= window)
    beyond = mask & (distance > window)
    return torch.stack([
        (correct & within).sum(), within.sum(), (correct & beyond).sum(), beyond.sum(),
    ]).double()


def recall_metrics(counts) -> dict[str, Optional[float]]:
    """Accuracies from summed :func:`recall_counts` (None for a split with no query)."""
    cw, nw, cb, nb = (float(x) for x in counts)
    return {
        "recall_within": cw / nw if nw else None,
        "recall_beyond": cb / nb if nb else None,
        "recall": (cw + cb) / (nw + nb) if nw + nb else None,
        "queries_within": int(nw),
        "queries_beyond": int(nb),
    }


def shortcut_counts(spec: RecallSpec, stream: int, indices) -> torch.Tensor:
    """What answering *by position* scores on the same sequences, counted like
    :func:`recall_counts`: a within-window query answers the value of the most recent
    pair, a beyond-window query the value of the most recent pair more than W back (the
    best a layout that cannot match keys by content can aim by recency). Reported beside
    the accuracies: a score at this level is not evidence of retrieval. On ``beyond``
    sequences (one block of pairs, queries in random order) it is 1 / recall_pairs."""
    counts = torch.zeros(4, dtype=torch.float64)
    for i in indices:
        s = spec.sample(stream, int(i))
        order = np.argsort(s["key_pos"])
        key_pos, value = s["key_pos"][order], s["answer"][order]
        for q, d, ans in zip(s["query_pos"], s["distance"], s["answer"]):
            within = d <= spec.window
            before = np.flatnonzero(key_pos < q if within else q - key_pos > spec.window)
            guess = value[before[-1]] if before.size else -1
            col = 0 if within else 2
            counts[col] += float(guess == ans)
            counts[col + 1] += 1
    return counts


try:
    import lightning.pytorch as _pl

    _Callback = _pl.Callback
except ImportError:  # pragma: no cover
    _Callback = object


class RecallValidation(_Callback):
    """Logs ``val/recall_within``, ``val/recall_beyond`` and ``val/recall`` (accuracy of the
    answers on the held-out recall sequences, split by query-to-pair distance) at every
    validation; they end up in ``result.json`` with the other final metrics."""

    def __init__(self, window: int):
        self.window = int(window)
        self._counts: Optional[torch.Tensor] = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._counts = torch.zeros(4, dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "recall_distance" not in batch:
            return
        logits = pl_module.model(batch["input_ids"]).logits
        self._counts += recall_counts(logits, batch["labels"], batch["recall_distance"], self.window)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._counts is None:
            return
        total = trainer.strategy.reduce(self._counts, reduce_op="sum")
        for key, value in recall_metrics(total.tolist()).items():
            if key.startswith("recall") and value is not None:
                pl_module.log(f"val/{key}", float(value), sync_dist=False)


# --------------------------------------------------------------------------- Lightning

from mixtrain.data.pretrain import PretrainDataModule  # noqa: E402


@dataclass
class PreparedRecall:
    spec: RecallSpec
    tokenizer: Any


class RecallDataModule(PretrainDataModule):
    """Recall sequences for Lightning, with the interface of :class:`PretrainDataModule`
    (the same resumable sampler over ``data.recall_train_sequences`` indices, loaders,
    state dict and progress accounting); validation is ``data.recall_val_sequences``
    sequences of their own seed stream, placed as ``data.recall_val_placement``."""

    def _prepare(self, build: bool = True):
        spec = spec_from_config(self.cfg, self.seq_len, self.vocab_size)
        return PreparedRecall(spec, recall_tokenizer(spec))

    def _dataset(self, split: str):
        spec = self.prepared.spec
        if split == "val":
            placement = self.cfg.recall_val_placement or spec.placement
            return RecallDataset(spec.with_(placement=placement).check(), "val", self.cfg.recall_val_sequences)
        return RecallDataset(spec, "train", self.cfg.recall_train_sequences)

    def _has_split(self, split: str) -> bool:
        return split == "train" or self.cfg.recall_val_sequences > 0

    def supervised_tokens_per_example(self) -> Optional[float]:
        return float(self.prepared.spec.pairs) if self.prepared else float(self.cfg.recall_pairs)


__all__ = [
    "PLACEMENTS", "RecallDataModule", "RecallDataset", "RecallError", "RecallSpec", "RecallValidation",
    "recall_counts", "recall_metrics", "recall_tokenizer", "shortcut_counts", "spec_from_config",
]
