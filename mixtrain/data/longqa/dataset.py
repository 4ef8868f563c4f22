"""The long-QA examples as a torch Dataset and a Lightning DataModule.

Loss on the answers only: ``labels`` is -100 everywhere except at the positions whose
next token is an answer token or the EOS that ends an answer. One example is exactly
one training sequence (never packed with another), padded to ``seq_len`` with the pad
id (labels -100). ``doc_ids`` is 0 for the whole example, so
``data.intra_doc_attention`` never hides the context from the questions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mixtrain.data.longqa.build import prepare_longqa
from mixtrain.data.longqa.generators import LongQAError
from mixtrain.data.pretrain import PretrainDataModule


class LongQADataset(torch.utils.data.Dataset):
    """Item ``i``: one example as ``input_ids``/``labels``/``doc_ids`` of length ``seq_len``
    (padded with ``pad_id``; labels -100 except where the next token is an answer token)."""

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int):
        self.dir, self.split, self.seq_len = Path(directory), split, int(seq_len)
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta["seq_len"] != self.seq_len:
            raise LongQAError(f"{self.dir} was built for seq_len={meta['seq_len']}, not {seq_len}")
        self.pad_id = int(meta["pad_id"])
        self.n = meta["splits"][split]["examples"]
        self._tokens = self._mask = self._offsets = None

    def _open(self):
        if self._tokens is None:
            self._tokens = np.load(self.dir / f"{self.split}.tokens.npy", mmap_mode="r")
            self._mask = np.load(self.dir / f"{self.split}.answer.npy", mmap_mode="r")
            self._offsets = np.load(self.dir / f"{self.split}.offsets.npy")

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_mask": None, "_offsets": None}

    def __len__(self) -> int:
        return self.n

    def qa(self) -> list[dict]:
        """The QA records of every example (from ``{split}.qa.jsonl``)."""
        with open(self.dir / f"{self.split}.qa.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"example {i} out of range for {self.n} {self.split} examples")
        i %= self.n
        self._open()
        s, e = int(self._offsets[i]), int(self._offsets[i + 1])
        stream = torch.from_numpy(self._tokens[s:e].astype(np.int64))
        mask = torch.from_numpy(self._mask[s:e].astype(np.bool_))
        T, n = self.seq_len, e - s - 1
        input_ids = torch.full((T,), self.pad_id, dtype=torch.long)
        labels = torch.full((T,), -100, dtype=torch.long)
        input_ids[:n] = stream[:-1]
        labels[:n] = torch.where(mask[1:], stream[1:], torch.full_like(stream[1:], -100))
        return {"input_ids": input_ids, "labels": labels, "doc_ids": torch.zeros(T, dtype=torch.long)}


class LongQADataModule(PretrainDataModule):
    """Long-QA examples for Lightning, with the interface of :class:`PretrainDataModule`
    (same resumable sampler, loaders, state dict and progress accounting)."""

    def _prepare(self):
        return prepare_longqa(self.cfg, self.seq_len, self.vocab_size)

    def _dataset(self, split: str):
        return LongQADataset(self.prepared.dir, split, self.seq_len)

    def _has_split(self, split: str) -> bool:
        return bool(self.prepared.num_examples(split))

    def _too_few_val(self, world: int):
        return None  # too few held-out examples to shard: validate on none
