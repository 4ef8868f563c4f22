"""Data: corpora (embedded default, local files, hub), tokenizers, packed sequences.

- :mod:`mixtrain.data.corpus`: ``load_documents``, ``embedded_corpus_path``
- :mod:`mixtrain.data.tokenizer`: ``get_tokenizer``, ``train_bpe``, ``Tok``
- :mod:`mixtrain.data.shards`: the token-shard format and its parallel, resumable,
  multi-machine build (``build_dataset``, ``plan_units``, ``read_index``)
- :mod:`mixtrain.data.pretrain`: ``prepare``, ``prepare_all`` (mixtures), ``PackedDataset``,
  ``ResumableSampler``, ``MixtureSampler``, ``PretrainDataModule``
- :mod:`mixtrain.data.longqa`: ``prepare_longqa``, ``LongQADataModule`` (stage-3 long-context QA)
- :mod:`mixtrain.data.recall`: ``RecallSpec``, ``RecallDataModule`` (synthetic associative recall)
- :mod:`mixtrain.data.cli`: the ``mixtrain data`` subcommands

Imports are lazy so ``import mixtrain.data`` stays cheap (no torch/datasets import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "corpus",
    "as_data_config": "corpus",
    "embedded_corpus_path": "corpus",
    "load_documents": "corpus",
    "corpus_identity": "corpus",
    "Tok": "tokenizer",
    "get_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "prepare": "pretrain",
    "Prepared": "pretrain",
    "PackedDataset": "pretrain",
    "ResumableSampler": "pretrain",
    "MixtureSampler": "pretrain",
    "prepare_all": "pretrain",
    "PretrainDataModule": "pretrain",
    "LongQADataModule": "longqa",
    "prepare_longqa": "longqa",
    "RecallDataModule": "recall",
    "RecallSpec": "recall",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_datamodule(cfg, *, seq_len: int, micro_batch_size: int, vocab_size: int):
    """The LightningDataModule for ``data.kind``."""
    kind = cfg.get("kind", "pretrain") if hasattr(cfg, "get") else getattr(cfg, "kind", "pretrain")
    if kind == "pretrain":
        from mixtrain.data.pretrain import PretrainDataModule

        return PretrainDataModule(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, vocab_size=vocab_size)
    if kind == "longqa":
        from mixtrain.data.longqa import LongQADataModule

        return LongQADataModule(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, vocab_size=vocab_size)
    if kind == "recall":
        from mixtrain.data.recall import RecallDataModule

        return RecallDataModule(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, vocab_size=vocab_size)
    from mixtrain.errors import UserError

    raise UserError(f"data.kind={kind!r} is not known; use pretrain, longqa or recall")
