"""Where training text comes from: the embedded default corpus, local files, the hub.

Every source ends as an HF ``datasets`` object with one column, ``text``, one row per
document.

- ``embedded`` (the default, no download): the docstrings and comments of the
  installed Python standard library, one document per module, in sorted path order,
  capped at ``embedded_max_chars`` characters and written once to
  ``<cache_dir>/corpus/embedded-<hash>.jsonl``.
- ``files``: local ``.txt``/``.md`` (one document per file), ``.jsonl``/``.json``
  (one document per record, field ``text_field``) and ``.parquet`` (column
  ``text_field``); globs are expanded. Files are checked first, so a bad file fails
  with its name and what to do, not deep inside ``datasets``.
- ``hub``: ``datasets.load_dataset(hub_name, hub_config, split=hub_split,
  streaming=streaming)``; needs network (or an HF cache), never the default.
"""

from __future__ import annotations

import ast
import codecs
import glob
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

from mixtrain.config import DataConfig
from mixtrain.errors import UserError
from mixtrain.files import atomic_write_text

EMBEDDED_FORMAT = 1  # bump when the extraction below changes
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SOURCES = ("embedded", "files", "hub")
# Folders of the standard library that are tests, vendored or generated code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


class DataError(UserError, ValueError):
    """Bad data configuration or input; the message says which key or file, and what to do."""


# --------------------------------------------------------------------------- config


def as_data_config(cfg: Any) -> DataConfig:
    """A resolved :class:`DataConfig` from a DataConfig, a DictConfig or a dict."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    elif isinstance(cfg, DataConfig):
        container = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)}
    elif isinstance(cfg, dict):
        container = dict(cfg)
    else:
        raise TypeError(f"expected a DataConfig, DictConfig or dict, got {type(cfg).__name__}")
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(container) - known)
    if unknown:
        raise DataError(f"unknown data config key(s) {unknown}; known keys: {sorted(known)}")
    out = DataConfig(**container)
    if isinstance(out.cache_dir, str) and "${" in out.cache_dir:  # unresolved interpolation
        out.cache_dir = OmegaConf.create({"d": out.cache_dir}).d
    if out.paths is not None:
        out.paths = [str(p) for p in (out.paths if not isinstance(out.paths, str) else [out.paths])]
    return out


def cache_root(cfg: Any) -> Path:
    return Path(os.path.expanduser(as_data_config(cfg).cache_dir))


def short_hash(*parts: Any, n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


# --------------------------------------------------------------------------- embedded corpus


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    # Skipped folders are pruned, not walked (site-packages can be large, or change
    # under a running pip).
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_text(path: Path) -> str:
    """Docstrings and comment paragraphs of one module, in source order."""
    try:
        with tokenize.open(path) as f:
            src = f.read()
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return ""
    parts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                parts.append((node.body[0].lineno, doc.strip()))
    block: list[str] = []
    start = last = -10
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            txt = tok.string.lstrip("#").strip()
            if line != last + 1 and block:
                parts.append((start, " ".join(block)))
                block = []
            if txt and not txt.startswith("!") and "coding" not in txt[:24] and set(txt) - set("-=*#~_ "):
                if not block:
                    start = line
                block.append(txt)
            last = line
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        parts.append((start, " ".join(block)))
    parts.sort(key=lambda x: x[0])
    return "\n\n".join(t for _, t in parts)


def _iter_embedded_documents(max_chars: int) -> Iterator[str]:
    total = 0
    seen: set[str] = set()
    for path in _stdlib_files():
        text = _module_text(path)
        if len(text) < 200:  # too little prose to be a document
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        if total + len(text) > max_chars:
            cut = text[: max_chars - total]
            cut = cut[: cut.rfind("\n\n")] if "\n\n" in cut else cut
            if len(cut) >= 200:
                yield cut
            return
        total += len(text)
        yield text


def embedded_corpus_path(cfg: Any) -> Path:
    """Path of the embedded corpus (JSONL, ``{"text": ...}`` per line); built on first use.

    The name hashes the Python version and ``embedded_max_chars``; the build is atomic,
    so concurrent ranks at worst build it twice and never read a partial file.
    """
    c = as_data_config(cfg)
    if c.embedded_max_chars <= 0:
        raise DataError(f"data.embedded_max_chars must be > 0, got {c.embedded_max_chars}")
    key = short_hash(sys.implementation.name, tuple(sys.version_info[:3]), c.embedded_max_chars, EMBEDDED_FORMAT)
    path = cache_root(c) / "corpus" / f"embedded-{key}.jsonl"
    if not path.exists():
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in _iter_embedded_documents(c.embedded_max_chars)]
        if not lines:
            raise DataError(
                f"no documents could be extracted from the Python standard library at "
                f"{sysconfig.get_paths()['stdlib']}; use data.source=files with data.paths"
            )
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- local files


def resolve_paths(paths: list[str] | None) -> list[Path]:
    """Expand globs (sorted) and check that every entry names at least one file."""
    if not paths:
        raise DataError("data.source=files needs data.paths: a list of files or globs, e.g. data.paths=[corpus/*.txt]")
    out: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"data.paths: the glob {entry!r} matches no file (cwd: {os.getcwd()}); fix the pattern")
            out.extend(matches)
        else:
            p = Path(entry)
            if p.is_dir():
                raise DataError(f"data.paths: {entry!r} is a directory; give files or a glob such as '{entry}/*.txt'")
            if not p.is_file():
                raise DataError(f"data.paths: file {entry!r} does not exist (cwd: {os.getcwd()}); fix data.paths")
            out.append(p)
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _kind(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in TEXT_SUFFIXES:
        return "text"
    if suf in JSON_SUFFIXES:
        return "json"
    if suf in PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(
        f"data.paths: don't know how to read {str(path)!r} (suffix {suf!r}); use "
        f"{'/'.join(TEXT_SUFFIXES)} (one document per file), {'/'.join(JSON_SUFFIXES)} "
        f"(field data.text_field) or .parquet"
    )


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Raise a :class:`DataError` naming the file and byte offset of the first non-UTF-8 byte."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            final = not block
            pending = len(dec.getstate()[0])  # bytes of a split character held from the last block
            try:
                dec.decode(block, final=final)
            except UnicodeDecodeError as e:
                pos = offset - pending + e.start  # e.start counts from the held-over bytes
                raise DataError(
                    f"{str(path)!r} is not UTF-8 text: undecodable byte at offset {pos} "
                    f"({e.reason}); convert it (e.g. `iconv -f latin1 -t utf-8`) or remove it from data.paths"
                ) from None
            if final:
                return
            offset += len(block)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _not_text(value: Any) -> bool:
    """True for a text-field value that is neither a string nor null (null: an empty document)."""
    return value is not None and not isinstance(value, str)


def _text_type_error(where: str, field: str, value: Any) -> DataError:
    return DataError(
        f"{where}: data.text_field={field!r} holds a value of type {type(value).__name__} ({short_repr(value)}), "
        f"not a string; make it a string (null skips the record) or set data.text_field to the field holding the text"
    )


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSON array file (``row <n>``, from 0) or a
    JSONL file (``line <n>``, from 1; blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith("["):  # a JSON array: parse the whole file
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(path)!r}: invalid JSON ({e}); fix the file") from None
            yield from ((f"row {n}", r) for n, r in enumerate(records))
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{str(path)!r}: line {n} is not valid JSON ({e}); JSONL needs one object per line"
                ) from None
            yield f"line {n}", record


def _check_json_file(path: Path, field: str) -> None:
    """Check every record of a JSON/JSONL file: an object whose ``field`` is a string or
    null (and the first has ``field``); the message names the file, the record and what to do.

    Every file is checked in full: ``datasets`` silently re-encodes a value that is not a
    string (a number, a list, even a string next to those) as JSON text when it reads
    several files at once."""
    first = True
    for where, record in _json_records(path):
        if not isinstance(record, dict):
            raise DataError(
                f"{str(path)!r} {where}: records must be JSON objects with a {field!r} field, "
                f"got {type(record).__name__}"
            )
        if first and field not in record:
            raise DataError(
                f"{str(path)!r}: records have no field {field!r} (keys present: {sorted(record)}); "
                f"set data.text_field to the field holding the text"
            )
        first = False
        if _not_text(record.get(field)):
            raise _text_type_error(f"{str(path)!r} {where}", field, record[field])
    if first:
        raise DataError(f"{str(path)!r} contains no records; remove it from data.paths")


def _check_parquet_file(path: Path, field: str) -> None:
    """Check that a parquet file's column ``field`` (where present) holds strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 (pyarrow's errors do not name the file)
        raise DataError(
            f"{str(path)!r} is not a readable parquet file ({type(e).__name__}: {e}); fix it or remove it "
            f"from data.paths"
        ) from e
    if field not in schema.names:
        return  # reported with the columns present once loaded
    t = schema.field(field).type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or str(t) == "string_view":
        return
    for n, value in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
        if _not_text(value):
            raise _text_type_error(f"{str(path)!r} row {n}", field, value)


def _check_file(path: Path, kind: str, field: str) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"{str(path)!r} is empty; remove it from data.paths or fill it")
    if kind in ("text", "json"):
        check_utf8(path)
        if kind == "text":
            with open(path, encoding="utf-8") as f:
                if not f.read(1 << 16).strip() and not f.read().strip():
                    raise DataError(f"{str(path)!r} holds only whitespace: no document; remove it from data.paths")
        else:
            _check_json_file(path, field)
    elif kind == "parquet":
        _check_parquet_file(path, field)


def _hf_cache(cfg: DataConfig) -> str:
    return str(cache_root(cfg) / "hf_datasets")


def _is_string_feature(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")


def _load_files(cfg: DataConfig):
    import datasets

    paths = resolve_paths(cfg.paths)
    groups: dict[str, list[str]] = {}
    for p in paths:
        kind = _kind(p)
        _check_file(p, kind, cfg.text_field)
        groups.setdefault(kind, []).append(str(p))
    parts = []
    for kind in ("text", "json", "parquet"):  # fixed order: deterministic row order
        files = groups.get(kind)
        if not files:
            continue
        kwargs: dict[str, Any] = {"sample_by": "document", "keep_linebreaks": True} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=_hf_cache(cfg), **kwargs)
        except Exception as e:  # datasets' errors do not say which of many files failed
            raise DataError(f"could not read {kind} files {files}: {type(e).__name__}: {e}") from e
        field = "text" if kind == "text" else cfg.text_field
        if field not in ds.column_names:
            raise DataError(
                f"{kind} files {files}: no column {field!r} (columns present: {ds.column_names}); "
                f"set data.text_field"
            )
        ds = ds.select_columns([field])
        if not _is_string_feature(ds.features[field]):  # a backstop: _check_file names the record
            raise DataError(
                f"{kind} files {files}: column {field!r} has type {ds.features[field]}, not string; "
                f"make data.text_field a field that holds text"
            )
        if field != "text":
            ds = ds.rename_column(field, "text")
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds


def _load_hub(cfg: DataConfig):
    import datasets

    if not cfg.hub_name:
        raise DataError("data.source=hub needs data.hub_name (e.g. data.hub_name=roneneldan/TinyStories)")
    try:
        ds = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.streaming, cache_dir=_hf_cache(cfg)
        )
    except Exception as e:
        raise DataError(
            f"could not load hub data set {cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r}): "
            f"{type(e).__name__}: {e}. The hub source needs network access (or a populated HF cache with "
            f"HF_DATASETS_OFFLINE=1); offline, use data.source=files or the default data.source=embedded"
        ) from e
    cols = ds.column_names
    if cols is not None and cfg.text_field not in cols:
        raise DataError(
            f"hub data set {cfg.hub_name!r} has no column {cfg.text_field!r} (columns: {cols}); set data.text_field"
        )
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds


def load_documents(cfg: Any):
    """The documents of ``cfg`` as a ``datasets.Dataset`` (or ``IterableDataset`` when
    streaming from the hub) with a single ``text`` column, empty documents removed and
    at most ``max_documents`` rows."""
    import datasets

    c = as_data_config(cfg)
    if c.source == "embedded":
        path = embedded_corpus_path(c)
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=_hf_cache(c))
    elif c.source == "files":
        ds = _load_files(c)
    elif c.source == "hub":
        ds = _load_hub(c)
    else:
        raise DataError(f"unknown data.source {c.source!r}; use one of {list(SOURCES)}")
    where = f"hub data set {c.hub_name!r} (split {c.hub_split!r})" if c.source == "hub" else f"data.source={c.source}"

    def nonempty_text(batch: dict, rows: list[int]) -> list[bool]:
        for t, row in zip(batch["text"], rows):
            if _not_text(t):  # local files: named with file and line by _check_file
                raise _text_type_error(f"{where} row {row}", c.text_field, t)
        return [bool(t and t.strip()) for t in batch["text"]]

    if isinstance(ds, datasets.IterableDataset):
        ds = ds.filter(nonempty_text, batched=True, with_indices=True)
        return ds.take(c.max_documents) if c.max_documents else ds
    nonempty = ds.filter(nonempty_text, batched=True, with_indices=True, desc="drop empty documents")
    if len(nonempty) == 0:
        raise DataError(f"data.source={c.source}: no non-empty documents found ({len(ds)} rows, all empty)")
    if c.max_documents is not None and c.max_documents < len(nonempty):
        nonempty = nonempty.select(range(c.max_documents))
    return nonempty


def corpus_identity(cfg: Any) -> str:
    """A string that changes when the documents would change (cheap: no file reading).

    Local files are identified by resolved path, size and modification time."""
    c = as_data_config(cfg)
    if c.source == "embedded":
        ident: tuple = ("embedded", embedded_corpus_path(c).name)
    elif c.source == "files":
        stats = []
        for p in resolve_paths(c.paths):
            st = p.stat()
            stats.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
        ident = ("files", c.text_field, tuple(stats))
    elif c.source == "hub":
        ident = ("hub", c.hub_name, c.hub_config, c.hub_split, c.text_field)
    else:
        raise DataError(f"unknown data.source {c.source!r}; use one of {list(SOURCES)}")
    return repr(ident + (c.max_documents,))

