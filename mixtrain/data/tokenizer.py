"""Tokenizers: a byte-level BPE trained on the corpus (cached), a tokenizer.json, or an
HF hub name.

``data.tokenizer``:

- ``"train"``: train a byte-level BPE (HF ``tokenizers``: ByteLevel pre-tokenizer and
  decoder, no normaliser, so ``decode(encode(s)) == s`` for any string) with
  ``<|endoftext|>`` (id 0, the EOS appended after every document) and ``<|pad|>``
  (id 1) as special tokens. Cached at
  ``<cache_dir>/tokenizers/bpe-<hash of corpus identity + vocab size>.json``.
- a path to a ``tokenizer.json`` (anything ending in ``.json`` or an existing file);
- otherwise an HF hub name (``Tokenizer.from_pretrained``; needs network).

The loaded tokenizer must fit the model: its vocabulary (added tokens included) may
not exceed the model's ``vocab_size``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from mixtrain.data.corpus import DataError, as_data_config, cache_root, corpus_identity, short_hash
from mixtrain.files import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FORMAT = 1
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class Tok:
    """A small wrapper over ``tokenizers.Tokenizer`` with the ids the data pipeline needs.

    Special-token strings inside document text are encoded as ordinary text, so the
    only EOS ids in a token stream are the ones the packer appends."""

    def __init__(self, tokenizer, path: Optional[Path] = None):
        self.tk = tokenizer
        self.path = Path(path) if path is not None else None
        self.eos_id = _find_special(tokenizer, _EOS_CANDIDATES, "EOS")
        pad = next((tokenizer.token_to_id(t) for t in _PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        self.pad_id = self.eos_id if pad is None else pad
        self.tk.encode_special_tokens = True  # "<|endoftext|>" in a document is just text
        self.tk.no_padding()
        self.tk.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.tk.to_str()

    def fingerprint(self) -> str:
        """Hash of the serialised tokenizer (keys the token caches)."""
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, self.tk.to_str(pretty=True))
        return path

    def __getstate__(self):
        return {"json": self.tk.to_str(), "path": self.path}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]), state["path"])

    def __repr__(self) -> str:
        return f"Tok(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}, path={self.path})"


def _find_special(tokenizer, candidates, what: str) -> int:
    for t in candidates:
        i = tokenizer.token_to_id(t)
        if i is not None:
            return i
    raise DataError(
        f"the tokenizer has no {what} token (looked for {list(candidates)}); add one "
        f"(e.g. tokenizer.add_special_tokens(['{EOS_TOKEN}'])) or use data.tokenizer=train"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tok:
    """Train a byte-level BPE with ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, PAD_TOKEN]
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise DataError(
            f"a byte-level BPE needs vocab_size >= {minimum} (256 bytes + {len(specials)} special tokens), "
            f"got {vocab_size}; raise model.vocab_size or data.vocab_size"
        )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer, length=length)
    return Tok(tk)


def _iter_text_batches(docs, batch_size: int = 1000):
    import datasets

    if isinstance(docs, datasets.IterableDataset):
        batch = []
        for row in docs:
            batch.append(row["text"])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    else:
        for i in range(0, len(docs), batch_size):
            yield docs[i : i + batch_size]["text"]


def check_fits(tok: Tok, model_vocab_size: Optional[int], source: str) -> None:
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer {source} has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}; raise model.vocab_size to at least {tok.vocab_size} "
            f"(or train a smaller one: data.tokenizer=train data.vocab_size<={model_vocab_size})"
        )


def trained_tokenizer_path(cfg: Any, vocab_size: int) -> Path:
    c = as_data_config(cfg)
    key = short_hash(corpus_identity(c), vocab_size, TOKENIZER_FORMAT)
    return cache_root(c) / "tokenizers" / f"bpe-{key}.json"


def load_tokenizer_file(path: str | os.PathLike) -> Tok:
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise DataError(f"data.tokenizer: tokenizer file {str(p)!r} does not exist; fix the path or use data.tokenizer=train")
    try:
        return Tok(Tokenizer.from_file(str(p)), p)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data.tokenizer: {str(p)!r} is not a valid tokenizer.json ({e})") from e


def get_tokenizer(cfg: Any, model_vocab_size: Optional[int] = None, documents=None) -> Tok:
    """The tokenizer ``cfg`` asks for, trained and cached if needed.

    ``model_vocab_size``: the model's vocabulary; the trained size is
    ``data.vocab_size`` or this, and a loaded tokenizer may not be larger.
    ``documents``: the already loaded documents (else loaded here when training)."""
    from tokenizers import Tokenizer

    c = as_data_config(cfg)
    spec = c.tokenizer
    if spec == "train":
        vocab = c.vocab_size or model_vocab_size
        if vocab is None:
            raise DataError("data.tokenizer=train needs a vocabulary size: set data.vocab_size or pass the model's vocab_size")
        if model_vocab_size is not None and vocab > model_vocab_size:
            raise DataError(
                f"data.vocab_size={vocab} exceeds the model's vocab_size={model_vocab_size}; "
                f"lower data.vocab_size or raise model.vocab_size"
            )
        path = trained_tokenizer_path(c, vocab)
        if path.is_file():
            return load_tokenizer_file(path)
        if documents is None:
            from mixtrain.data.corpus import load_documents

            documents = load_documents(c)
        length = None if not hasattr(documents, "__len__") else len(documents)
        tok = train_bpe((t for batch in _iter_text_batches(documents) for t in batch), vocab, length=length)
        tok.save(path)
        tok.path = path
        return tok
    looks_like_path = spec.endswith(".json") or spec.startswith(("/", "./", "../", "~"))
    if looks_like_path or Path(os.path.expanduser(spec)).is_file():
        tok = load_tokenizer_file(spec)
        check_fits(tok, model_vocab_size, repr(spec))
        return tok
    # An HF hub name: cache a copy under cache_dir so later (offline) runs find it.
    local = cache_root(c) / "tokenizers" / f"hub-{short_hash(spec)}.json"
    if local.is_file():
        tok = load_tokenizer_file(local)
    else:
        try:
            hk = Tokenizer.from_pretrained(spec)
        except Exception as e:
            raise DataError(
                f"data.tokenizer={spec!r}: could not fetch this HF tokenizer ({type(e).__name__}: {e}). "
                f"Hub names need network access; offline, download its tokenizer.json elsewhere and set "
                f"data.tokenizer=/path/to/tokenizer.json, or use data.tokenizer=train"
            ) from e
        tok = Tok(hk)
        tok.save(local)
        tok.path = local
    check_fits(tok, model_vocab_size, repr(spec))
    return tok
