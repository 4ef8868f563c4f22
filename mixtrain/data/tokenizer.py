"""Tokenizers: a byte-level BPE trained on the corpus (cached), an HF ``tokenizer.json``
or tokenizer folder, a tiktoken encoding, or an HF hub name.

``data.tokenizer``:

- ``"train"`` (default): train a byte-level BPE (HF ``tokenizers``: ByteLevel
  pre-tokenizer and decoder, no normaliser, so ``decode(encode(s)) == s`` for any
  string) with ``<|endoftext|>`` (id 0, the EOS appended after every document) and
  ``<|pad|>`` (id 1) as special tokens. Cached at
  ``<cache_dir>/tokenizers/bpe-<hash of corpus identity + vocab size>.json``.
- a path to a ``tokenizer.json`` file, or to an HF tokenizer folder (its
  ``tokenizer.json`` plus ``tokenizer_config.json`` / ``special_tokens_map.json``,
  which name the EOS and pad tokens), e.g. one written by ``save_pretrained``;
- a tiktoken encoding: ``tiktoken:cl100k_base`` (any name ``tiktoken`` knows; its BPE
  file must already be on this machine: ``<cache_dir>/tokenizers/cl100k_base.tiktoken``
  or tiktoken's own cache, ``$TIKTOKEN_CACHE_DIR``), or a path to a ``.tiktoken`` file
  (``/models/cl100k_base.tiktoken``, ``tiktoken:/path/to/file``). A file named after
  an encoding (or with ``data.tiktoken_encoding`` set) takes that encoding's split
  pattern and special tokens and is checked against its published SHA-256; a file of
  your own takes ``cl100k_base``'s pattern and no special tokens (set
  ``data.eos_token``). Nothing is downloaded: tiktoken encodings are converted once
  into an equivalent HF ``tokenizers`` BPE (same ids for every text, checked against
  ``tiktoken`` in the tests) cached as ``<cache_dir>/tokenizers/tiktoken-*.json``;
- otherwise an HF hub name (``Tokenizer.from_pretrained``; needs network, then cached).

EOS / pad: ``data.eos_token`` / ``data.pad_token`` when set (a token the tokenizer
lacks is added as a special token); else the folder's ``tokenizer_config.json`` /
``special_tokens_map.json``; else the first known EOS spelling the vocabulary has
(``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``, ...). No EOS at all is an
error. The pad token defaults to the tokenizer's own (``<|pad|>``, ``<pad>``, ...),
else the EOS. Special-token strings inside documents are encoded as text.

Vocabulary size: a tokenizer needs ``max id + 1`` embedding rows (``Tok.vocab_size``;
``cl100k_base``: 100,277, its special tokens sit above a gap). The model's
``model.vocab_size`` must be at least that. Rounding it up to a multiple of 64 or 128
(the paper's 100,352 = 784 x 128 for a ~100K BPE) is a *model* setting: the extra rows
are never produced by the tokenizer and cost nothing but parameters.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from mixtrain.data.corpus import DataError, as_data_config, cache_root, corpus_identity, short_hash
from mixtrain.files import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FORMAT = 1
TIKTOKEN_PREFIX = "tiktoken:"
# The split pattern a .tiktoken file of one's own is used with (no encoding named).
DEFAULT_TIKTOKEN_ENCODING = "cl100k_base"
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class Tok:
    """A small wrapper over ``tokenizers.Tokenizer`` with the ids the data pipeline needs.

    ``eos_token`` / ``pad_token``: the tokens to use (added as special tokens when the
    vocabulary lacks them); None picks them from the vocabulary (see the module
    docstring). Special-token strings inside document text are encoded as ordinary
    text, so the only EOS ids in a token stream are the ones the packer appends."""

    def __init__(self, tokenizer, path: Optional[Path] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, source: str = "the tokenizer"):
        from tokenizers import AddedToken

        self.tk = tokenizer
        self.path = Path(path) if path is not None else None
        self.explicit = (eos_token, pad_token) != (None, None)
        for t in (eos_token, pad_token):
            if t is not None and tokenizer.token_to_id(t) is None:
                tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        if eos_token is not None:
            self.eos_id = tokenizer.token_to_id(eos_token)
        else:
            self.eos_id = _find_special(tokenizer, _EOS_CANDIDATES, "EOS", source)
        if pad_token is not None:
            self.pad_id = tokenizer.token_to_id(pad_token)
        else:
            pad = next((tokenizer.token_to_id(t) for t in _PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
            self.pad_id = self.eos_id if pad is None else pad
        self.tk.encode_special_tokens = True  # "<|endoftext|>" in a document is just text
        self.tk.no_padding()
        self.tk.no_truncation()
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        """Embedding rows the ids need: the largest id + 1 (ids may have gaps)."""
        return self._vocab_size

    @property
    def eos_token(self) -> str:
        return self.tk.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str:
        return self.tk.id_to_token(self.pad_id)

    # A tiktoken encoding also keeps tiktoken's own encoder (the same ids as the HF
    # conversion, ~3x faster): (name, pattern, ranks) or None.
    tiktoken_def: Optional[tuple] = None
    _tiktoken = None

    def use_tiktoken(self, name: str, pat_str: str, ranks: dict[bytes, int]) -> "Tok":
        """Encode with tiktoken itself (``encode_ordinary``: the ids the HF conversion gives)."""
        import tiktoken

        self.tiktoken_def = (name, pat_str, ranks)
        self._tiktoken = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
        return self

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is not None:  # one thread: preparation runs one process per core
            return [self._tiktoken.encode_ordinary(t) for t in texts]
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.tk.to_str()

    def fingerprint(self) -> str:
        """Hash of the serialised tokenizer (keys the token caches), and of the EOS/pad
        choice when it was configured rather than found."""
        h = hashlib.sha256(self.tk.to_str().encode())
        if self.explicit:
            h.update(f"|eos={self.eos_id}|pad={self.pad_id}".encode())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer.json. A file named ``tokenizer.json`` also gets a
        ``tokenizer_config.json`` beside it naming the EOS and pad tokens (an HF tokenizer
        folder: reloading it, or ``transformers.AutoTokenizer``, keeps the same choice)."""
        path = Path(path)
        atomic_write_text(path, self.tk.to_str(pretty=True))
        if path.name == "tokenizer.json":
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "clean_up_tokenization_spaces": False,
            }
            atomic_write_text(path.with_name("tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
        return path

    def __getstate__(self):
        eos, pad = (self.eos_token, self.pad_token) if self.explicit else (None, None)
        return {"json": self.tk.to_str(), "path": self.path, "eos": eos, "pad": pad, "tiktoken": self.tiktoken_def}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]), state["path"], state.get("eos"), state.get("pad"))
        if state.get("tiktoken"):
            self.use_tiktoken(*state["tiktoken"])

    def __repr__(self) -> str:
        return f"Tok(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}, path={self.path})"


def _find_special(tokenizer, candidates, what: str, source: str = "the tokenizer") -> int:
    for t in candidates:
        i = tokenizer.token_to_id(t)
        if i is not None:
            return i
    raise DataError(
        f"{source} has no {what} token (looked for {list(candidates)}): set data.eos_token to the token that "
        f"ends a document (it is added as a special token if the vocabulary lacks it), or use data.tokenizer=train"
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
        n = tok.vocab_size
        padded = -(-n // 128) * 128
        raise DataError(
            f"the tokenizer {source} needs {n} embedding rows (ids 0..{n - 1}) but the model's vocab_size is "
            f"{model_vocab_size}: set model.vocab_size to at least {n}. Padding it up to a multiple of 64 or 128 "
            f"(e.g. model.vocab_size={padded}) is a model setting for speed; the tokenizer never produces the "
            f"extra ids. Or use a smaller tokenizer (data.tokenizer=train data.vocab_size<={model_vocab_size})"
        )


def trained_tokenizer_path(cfg: Any, vocab_size: int) -> Path:
    c = as_data_config(cfg)
    key = short_hash(corpus_identity(c), vocab_size, TOKENIZER_FORMAT)
    return cache_root(c) / "tokenizers" / f"bpe-{key}.json"


# --------------------------------------------------------------------------- HF files and folders


def _special_from_config(folder: Path, key: str) -> Optional[str]:
    """``key`` (eos_token / pad_token) from an HF folder's tokenizer_config.json or
    special_tokens_map.json (a string or ``{"content": ...}``)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            value = json.loads(f.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"data.tokenizer: {str(f)!r} is not valid JSON ({e}); fix or remove it") from e
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def load_tokenizer_file(path: str | os.PathLike, eos_token: Optional[str] = None,
                        pad_token: Optional[str] = None) -> Tok:
    """A ``tokenizer.json`` file or an HF tokenizer folder. A file named
    ``tokenizer.json`` reads the EOS/pad tokens of the ``tokenizer_config.json`` /
    ``special_tokens_map.json`` beside it; ``eos_token``/``pad_token`` override them."""
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            present = sorted(x.name for x in p.iterdir())[:12]
            raise DataError(
                f"data.tokenizer: the folder {str(p)!r} has no tokenizer.json (it holds {present}). "
                f"A 'slow' HF tokenizer (tokenizer.model, vocab.json + merges.txt) can be converted once with "
                f"transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes tokenizer.json"
            )
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(
            f"data.tokenizer: tokenizer file {str(p)!r} does not exist; fix the path (a tokenizer.json, an HF "
            f"tokenizer folder or a .tiktoken file) or use data.tokenizer=train"
        )
    if p.name == "tokenizer.json":
        eos_token = eos_token or _special_from_config(p.parent, "eos_token")
        pad_token = pad_token or _special_from_config(p.parent, "pad_token")
    try:
        tk = Tokenizer.from_file(str(p))
    except Exception as e:
        raise DataError(f"data.tokenizer: {str(p)!r} is not a valid tokenizer.json ({e})") from e
    return Tok(tk, p, eos_token, pad_token, source=f"the tokenizer {str(p)!r}")


# --------------------------------------------------------------------------- tiktoken


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a ``.tiktoken`` file (lines ``<base64 token> <rank>``)."""
    ranks: dict[bytes, int] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.tokenizer: cannot read the tiktoken file {str(path)!r} ({e})") from e
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception:
            raise DataError(
                f"data.tokenizer: {str(path)!r} line {n} is not '<base64 token> <rank>' ({line[:60]!r}): "
                f"not a .tiktoken BPE file"
            ) from None
    if not ranks:
        raise DataError(f"data.tokenizer: the tiktoken file {str(path)!r} is empty")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"data.tokenizer: the tiktoken file {str(path)!r} lacks {len(missing)} of the 256 single bytes "
            f"(e.g. {bytes(missing[:3])!r}): a byte-level BPE needs every byte as a token"
        )
    return ranks


def _tiktoken_names() -> list[str]:
    import tiktoken

    return list(tiktoken.list_encoding_names())


def _tiktoken_offline_paths(url: str, c) -> list[Path]:
    """Where an encoding's BPE file may already be: our cache, then tiktoken's."""
    import tempfile

    base = url.rsplit("/", 1)[-1]
    paths = [cache_root(c) / "tokenizers" / base]
    for env in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(env):
            paths.append(Path(os.environ[env]) / hashlib.sha1(url.encode()).hexdigest())
            break
    else:
        paths.append(Path(tempfile.gettempdir()) / "data-gym-cache" / hashlib.sha1(url.encode()).hexdigest())
    return paths


def tiktoken_definition(name: str, c, file: Optional[Path] = None) -> dict:
    """tiktoken's definition of encoding ``name`` (``pat_str``, ``mergeable_ranks``,
    ``special_tokens``) without any download: the BPE file is ``file`` (checked against
    the encoding's published SHA-256) or found in the local caches."""
    from unittest import mock

    import tiktoken.registry

    names = _tiktoken_names()
    if name not in names:
        raise DataError(f"data.tiktoken_encoding / data.tokenizer: {name!r} is not a tiktoken encoding; tiktoken knows {names}")
    ctor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]
    tried: list[str] = []

    def load(url: str, expected_hash: Optional[str] = None) -> dict[bytes, int]:
        candidates = [file] if file is not None else _tiktoken_offline_paths(url, c)
        for p in candidates:
            tried.append(str(p))
            if p.is_file():
                if expected_hash and hashlib.sha256(p.read_bytes()).hexdigest() != expected_hash:
                    if file is None:
                        continue
                    raise DataError(
                        f"data.tokenizer: {str(p)!r} is not tiktoken's {name} file (its SHA-256 differs from the "
                        f"published {expected_hash[:16]}...), so {name}'s special-token ids would not fit it. "
                        f"For a BPE file of your own, give it a name that is not an encoding's "
                        f"(it then takes {DEFAULT_TIKTOKEN_ENCODING}'s split pattern) and set data.eos_token"
                    )
                return read_tiktoken_file(p)
        base = url.rsplit("/", 1)[-1]
        raise DataError(
            f"data.tokenizer: tiktoken's {name} BPE file is not on this machine (looked at {tried}) and nothing "
            f"is downloaded at run time. Copy {base} (from {url}, or from tiktoken's cache on a machine with network "
            f"after `python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"`) to "
            f"{cache_root(c) / 'tokenizers' / base}, or set data.tokenizer=/path/to/{base}"
        )

    def data_gym(*a, **k):
        raise DataError(
            f"data.tokenizer: tiktoken's {name} is stored as GPT-2 vocab.bpe/encoder.json, which is not supported "
            f"offline; use tiktoken:r50k_base (the same vocabulary) with its .tiktoken file"
        )

    with mock.patch.dict(ctor.__globals__, {"load_tiktoken_bpe": load, "data_gym_to_mergeable_bpe_ranks": data_gym}):
        return ctor()


def tiktoken_pattern(name: str) -> str:
    """The split pattern of tiktoken's encoding ``name`` (no BPE file read)."""
    from unittest import mock

    import tiktoken.registry

    _tiktoken_names()
    ctor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]
    with mock.patch.dict(ctor.__globals__, {"load_tiktoken_bpe": lambda *a, **k: {}}):
        return ctor()["pat_str"]


def tiktoken_to_hf(ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int]):
    """An HF ``tokenizers`` BPE that encodes every text to tiktoken's ids: byte-level BPE
    over ``ranks`` whose merges are every split of a token into two tokens, ordered by
    the merged token's rank (tiktoken merges the pair whose concatenation ranks lowest),
    whole pre-tokens looked up first (``ignore_merges``, as tiktoken does), split by
    ``pat_str``, special tokens at their tiktoken ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        if len(t) < 2:
            continue
        local = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        local.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges.extend((r, a, b) for a, b in local)
    merges.sort(key=lambda m: m[0])
    for tok, i in special_tokens.items():
        vocab[tok] = i
    model = models.BPE(vocab=vocab, merges=[(s(a), s(b)) for _, a, b in merges], ignore_merges=True,
                       fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(model)
    # Oniguruma (HF) reads "{1,3}+" as "{1,3}" repeated; tiktoken's regex means possessive.
    # As the last element of an alternative the two match the same text.
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat_str)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    if special_tokens:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tk


def load_tiktoken(spec: str, c) -> Tok:
    """A tiktoken encoding (``tiktoken:NAME``, ``tiktoken:PATH`` or a ``*.tiktoken`` path)
    as a :class:`Tok`, converted once and cached under ``<cache_dir>/tokenizers``."""
    from tokenizers import Tokenizer

    try:
        import tiktoken  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency
        raise DataError("data.tokenizer: tiktoken encodings need the tiktoken package (pip install tiktoken)") from e
    target = spec[len(TIKTOKEN_PREFIX):] if spec.startswith(TIKTOKEN_PREFIX) else spec
    names = _tiktoken_names()
    file: Optional[Path] = None
    if target in names and not Path(target).exists():
        name = target
    else:
        file = Path(os.path.expanduser(target))
        if not file.is_file():
            raise DataError(
                f"data.tokenizer={spec!r}: {str(file)!r} is neither a .tiktoken file on this machine nor a tiktoken "
                f"encoding name ({names})"
            )
        name = c.tiktoken_encoding or (file.stem if file.stem in names else None)
    if name is not None:
        d = tiktoken_definition(name, c, file)
        ranks, pat, specials = d["mergeable_ranks"], d["pat_str"], dict(d["special_tokens"])
        ident = name
    else:
        ranks = read_tiktoken_file(file)
        pat, specials = tiktoken_pattern(DEFAULT_TIKTOKEN_ENCODING), {}
        ident = file.stem
    digest = hashlib.sha256(
        json.dumps([sorted((base64.b64encode(k).decode(), v) for k, v in ranks.items()), pat, specials]).encode()
    ).hexdigest()[:16]
    out = cache_root(c) / "tokenizers" / f"tiktoken-{re.sub(r'[^A-Za-z0-9_.-]', '_', ident)}-{digest}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, tiktoken_to_hf(ranks, pat, specials).to_str())
    tk = Tokenizer.from_file(str(out))  # the same object (and fingerprint) every time
    tok = Tok(tk, out, c.eos_token, c.pad_token, source=f"the tiktoken encoding {spec!r}")
    return tok.use_tiktoken(ident, pat, ranks)


# --------------------------------------------------------------------------- entry point


def tokenizer_kind(spec: str) -> str:
    """``train``, ``tiktoken``, ``file`` (tokenizer.json or HF folder) or ``hub``."""
    if spec == "train":
        return "train"
    if spec.startswith(TIKTOKEN_PREFIX) or spec.endswith(".tiktoken"):
        return "tiktoken"
    p = Path(os.path.expanduser(spec))
    if spec.endswith(".json") or spec.startswith(("/", "./", "../", "~")) or p.exists():
        return "file"
    return "hub"


def get_tokenizer(cfg: Any, model_vocab_size: Optional[int] = None, documents=None) -> Tok:
    """The tokenizer ``cfg`` asks for, trained and cached if needed.

    ``model_vocab_size``: the model's vocabulary; the trained size is
    ``data.vocab_size`` or this, and a loaded tokenizer may not need more rows.
    ``documents``: the already loaded documents (else loaded here when training)."""
    from tokenizers import Tokenizer

    c = as_data_config(cfg)
    spec = c.tokenizer
    kind = tokenizer_kind(spec)
    if kind == "train":
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
            return load_tokenizer_file(path, c.eos_token, c.pad_token)
        if documents is None:
            from mixtrain.data.corpus import load_documents

            documents = load_documents(c)
        length = None if not hasattr(documents, "__len__") else len(documents)
        tok = train_bpe((t for batch in _iter_text_batches(documents) for t in batch), vocab, length=length)
        tok.save(path)
        return load_tokenizer_file(path, c.eos_token, c.pad_token)
    if kind == "tiktoken":
        tok = load_tiktoken(spec, c)
    elif kind == "file":
        tok = load_tokenizer_file(spec, c.eos_token, c.pad_token)
    else:
        # An HF hub name: cache a copy under cache_dir so later (offline) runs find it.
        local = cache_root(c) / "tokenizers" / f"hub-{short_hash(spec)}.json"
        if local.is_file():
            tok = load_tokenizer_file(local, c.eos_token, c.pad_token)
        else:
            try:
                hk = Tokenizer.from_pretrained(spec)
            except Exception as e:
                hint = f" (a tiktoken encoding is written data.tokenizer=tiktoken:{spec})" if _is_tiktoken_name(spec) else ""
                raise DataError(
                    f"data.tokenizer={spec!r}: could not fetch this HF tokenizer ({type(e).__name__}: {e}){hint}. "
                    f"Hub names need network access; offline, copy its tokenizer folder (tokenizer.json, "
                    f"tokenizer_config.json) here and set data.tokenizer=/path/to/folder, or use data.tokenizer=train"
                ) from e
            local.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(local, hk.to_str())
            tok = load_tokenizer_file(local, c.eos_token, c.pad_token)
    check_fits(tok, model_vocab_size, repr(spec))
    return tok


def _is_tiktoken_name(spec: str) -> bool:
    try:
        return spec in _tiktoken_names()
    except ImportError:  # pragma: no cover
        return False
