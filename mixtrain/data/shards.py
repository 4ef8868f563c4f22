"""Token shards: the on-disk format of prepared pretraining data, and how it is built.

Preparation streams every input record by record through the tokenizer and appends the
tokens to per-unit shard files, so its memory does not grow with the corpus; units are
built in parallel (``data.num_proc`` processes), skipped when already finished (a killed
build resumes), and can be split across machines (``node_rank``/``num_nodes``).

Layout of one prepared dataset (``FORMAT`` 2), keyed by corpus, tokenizer, split settings::

    <cache_dir>/packed/<key>/
      plan.json               the units (pieces of the input), for information
      tokenizer.json
      parts/u000007.train.bin   tokens of unit 7's training documents (each + EOS), uint16/uint32 LE
      parts/u000007.train.ends  int64 LE: end offset (exclusive) of each of those documents
      parts/u000007.val.bin / .val.ends
      parts/u000007.json      the unit's marker (counts, sizes): written after its data
      index.json              written last, once every unit has its marker

A *unit* is a piece of the input of at most ``data.shard_mb`` MB (and at most 1/64 of the
input, at least 1 MB, so small corpora use every core): several small text files,
a byte range of a JSONL file (lines belong to the range holding their first byte), a run
of parquet row groups, one compressed file (``.zst``/``.gz`` cannot be split), or one
shard of a hub data set. The split of a unit's documents into train/val is decided
document by document: document ``k`` of unit ``u`` is a validation document when
``floor((k+1)f + p_u) > floor(k f + p_u)`` (``f`` = ``data.val_fraction``, ``p_u`` a
phase drawn from ``data.seed`` and ``u``): every ``1/f``-th document, ``round(n f)`` of
``n`` give or take one, and the first document of the corpus always (so any corpus of
two or more documents has a validation document).

Every file is written under a temporary name unique across hosts
(``.tmp-<host>-<pid>-<uuid>``) and renamed into place; readers only trust a unit with a
marker whose byte counts match, so a half-written shard is never read. Temporary files
of dead processes on this host (and of any host after ``STALE_SECONDS``) are removed by
the next build; finished files are never deleted (a damaged unit is rebuilt and renamed
over, which leaves a reader holding the old file its copy).

Document boundaries cost 8 bytes per *document* (``.ends``), not per token.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import socket
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from mixtrain.data.corpus import (
    DataError,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    _not_text,
    _text_type_error,
    as_data_config,
    embedded_corpus_path,
    resolve_paths,
)

FORMAT = 2
SPLITS = ("train", "val")
COMPRESSED_SUFFIXES = (".zst", ".zstd", ".gz")
STALE_SECONDS = 6 * 3600
ENCODE_BATCH_CHARS = 1 << 20  # characters per tokenizer call (bounds memory per worker)
HUB_UNIT_ROWS = 200_000


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65,536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# --------------------------------------------------------------------------- file names


def tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` unique across hosts, processes and calls."""
    return path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{path.name}")


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_TMP_RE = re.compile(r"^\.tmp-(.+)-(\d+)-([0-9a-f]{12})-")


def clean_stale_temporaries(folder: Path) -> list[str]:
    """Remove temporary files left by dead processes: on this host when their pid is gone,
    from any host when older than ``STALE_SECONDS``. Returns the names removed."""
    removed = []
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for p in folder.iterdir():
        m = _TMP_RE.match(p.name)
        if not m:
            continue
        h, pid = m.group(1), int(m.group(2))
        try:
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            continue
        dead_here = h == host and pid > 0 and not _alive(pid)
        if dead_here or age > STALE_SECONDS:
            try:
                p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A piece of the input built into one set of shard files."""

    kind: str  # text | jsonl | jsonarray | compressed | parquet | hub_stream | hub_rows
    paths: tuple[str, ...] = ()
    start: int = 0  # byte offset (jsonl), first row group (parquet), shard/row (hub)
    end: int = -1  # exclusive
    count: int = 0  # hub: number of shards / rows in total

    def describe(self) -> str:
        if self.kind == "text":
            return f"{len(self.paths)} text file(s) from {self.paths[0]}"
        if self.kind == "jsonl":
            return f"{self.paths[0]} bytes [{self.start}, {self.end})"
        if self.kind == "parquet":
            return f"{self.paths[0]} row groups [{self.start}, {self.end})"
        if self.kind.startswith("hub"):
            return f"hub {self.kind[4:]} [{self.start}, {self.end}) of {self.count}"
        return self.paths[0]


def _file_kind(path: Path) -> tuple[str, str]:
    """(format, compression) of a local input file; a clear error for an unknown suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = ""
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        comp = suffixes.pop()
    suf = suffixes[-1] if suffixes else ""
    if suf in TEXT_SUFFIXES:
        return "text", comp
    if suf in JSON_SUFFIXES:
        return "json", comp
    if suf in PARQUET_SUFFIXES and not comp:
        return "parquet", comp
    raise DataError(
        f"data.paths: don't know how to read {str(path)!r} (suffix {''.join(path.suffixes[-2:]) or path.suffix!r}); use "
        f"{'/'.join(TEXT_SUFFIXES)} (one document per file), {'/'.join(JSON_SUFFIXES)} "
        f"(field data.text_field; also compressed as .zst or .gz) or .parquet"
    )


def plan_units(c) -> list[Unit]:
    """The units of the corpus of ``c``, in corpus order (deterministic: a function of
    the input files and their sizes). A unit holds at most ``data.shard_mb`` MB of input,
    and no more than 1/``MIN_UNITS`` of it (but at least 1 MB), so that a corpus smaller
    than ``shard_mb`` x cores still spreads over every core."""
    if c.source == "embedded":
        p = embedded_corpus_path(c)
        return _json_units(p, _unit_bytes(c, p.stat().st_size))
    if c.source == "files":
        units: list[Unit] = []
        pending: list[str] = []
        pending_bytes = 0
        files = resolve_paths(c.paths)
        unit_bytes = _unit_bytes(c, sum(p.stat().st_size for p in files))
        for p in files:
            kind, comp = _file_kind(p)
            size = p.stat().st_size
            if size == 0:
                raise DataError(f"{str(p)!r} is empty; remove it from data.paths or fill it")
            if kind == "text" and not comp:
                if pending and pending_bytes + size > unit_bytes:
                    units.append(Unit("text", tuple(pending)))
                    pending, pending_bytes = [], 0
                pending.append(str(p))
                pending_bytes += size
                continue
            if pending:
                units.append(Unit("text", tuple(pending)))
                pending, pending_bytes = [], 0
            if comp:
                units.append(Unit("compressed", (str(p),)))
            elif kind == "json":
                units.extend(_json_units(p, unit_bytes))
            else:
                units.extend(_parquet_units(p, c.text_field, unit_bytes))
        if pending:
            units.append(Unit("text", tuple(pending)))
        return units
    if c.source == "hub":
        from mixtrain.data import corpus

        ds = corpus._load_hub(c)
        import datasets

        if isinstance(ds, datasets.IterableDataset):
            n = 1 if c.max_documents else max(1, int(ds.n_shards))
            return [Unit("hub_stream", (), i, i + 1, n) for i in range(n)]
        n = len(ds)
        return [Unit("hub_rows", (), a, min(n, a + HUB_UNIT_ROWS), n) for a in range(0, max(n, 1), HUB_UNIT_ROWS)]
    raise DataError(f"unknown data.source {c.source!r}; use one of ['embedded', 'files', 'hub']")


MIN_UNITS = 64


def _unit_bytes(c, total_bytes: int) -> int:
    cap = max(1, int(float(c.shard_mb) * (1 << 20)))
    return min(cap, max(1 << 20, total_bytes // MIN_UNITS))


def _json_units(p: Path, unit_bytes: int) -> list[Unit]:
    with open(p, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith(b"["):
        return [Unit("jsonarray", (str(p),))]
    size = p.stat().st_size
    return [Unit("jsonl", (str(p),), a, min(size, a + unit_bytes)) for a in range(0, size, unit_bytes)]


def _parquet_units(p: Path, field: str, unit_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 (pyarrow's errors do not name the file)
        raise DataError(
            f"{str(p)!r} is not a readable parquet file ({type(e).__name__}: {e}); fix it or remove it from data.paths"
        ) from e
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"parquet file {str(p)!r}: no column {field!r} (columns present: {names}); set data.text_field")
    units, start, acc = [], 0, 0
    md = pf.metadata
    for g in range(md.num_row_groups):
        acc += md.row_group(g).total_byte_size
        if acc >= unit_bytes:
            units.append(Unit("parquet", (str(p),), start, g + 1))
            start, acc = g + 1, 0
    if start < md.num_row_groups or not units:
        units.append(Unit("parquet", (str(p),), start, md.num_row_groups))
    return units


# --------------------------------------------------------------------------- reading records


def _utf8_error(path: str, pos: int, e: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path!r} is not UTF-8 text: undecodable byte at offset {pos} "
        f"({e.reason}); convert it (e.g. `iconv -f latin1 -t utf-8`) or remove it from data.paths"
    )


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (counted only for a message)."""
    n = 1
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _json_record_text(path: str, where, record: Any, field: str, first: bool) -> Optional[str]:
    """The text of one JSON record, checked; ``where`` (a string, or a function giving it
    for an error message only) names the record."""
    if not isinstance(record, dict):
        where = where() if callable(where) else where
        raise DataError(
            f"{path!r} {where}: records must be JSON objects with a {field!r} field, got {type(record).__name__}"
        )
    if first and field not in record:
        raise DataError(
            f"{path!r}: records have no field {field!r} (keys present: {sorted(record)}); "
            f"set data.text_field to the field holding the text"
        )
    value = record.get(field)
    if _not_text(value):
        where = where() if callable(where) else where
        raise _text_type_error(f"{path!r} {where}", field, value)
    return value


def _iter_jsonl_range(path: str, start: int, end: int, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                pos = start + len(f.readline())
        else:
            f.seek(0)
        first = start == 0
        any_record = False
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, line_start + e.start, e) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                n = _line_number(path, line_start)
                raise DataError(f"{path!r}: line {n} is not valid JSON ({e}); JSONL needs one object per line") from None
            value = _json_record_text(path, lambda: f"line {_line_number(path, line_start)}", record, field, first)
            first, any_record = False, True
            if value:
                yield value
        if start == 0 and not any_record and pos >= os.path.getsize(path):
            raise DataError(f"{path!r} contains no records; remove it from data.paths")


def _iter_json_stream(path: str, stream: io.BufferedIOBase, field: str) -> Iterator[str]:
    """JSONL from a decompressed stream (line numbers counted as read)."""
    dec_offset = 0
    first = True
    for n, line in enumerate(stream, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path!r} is not UTF-8 text: undecodable byte at offset {dec_offset + e.start} of the decompressed "
                f"data ({e.reason}); convert it or remove it from data.paths"
            ) from None
        dec_offset += len(line)
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path!r}: line {n} is not valid JSON ({e}); JSONL needs one object per line") from None
        value = _json_record_text(path, f"line {n}", record, field, first)
        first = False
        if value:
            yield value
    if first:
        raise DataError(f"{path!r} contains no records; remove it from data.paths")


def _open_compressed(path: str) -> io.BufferedIOBase:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    import zstandard

    raw = open(path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), buffer_size=1 << 20)


def _iter_text_file(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e.start, e) from None
    if not text.strip():
        raise DataError(f"{path!r} holds only whitespace: no document; remove it from data.paths")
    yield text


def _iter_compressed(path: str, field: str) -> Iterator[str]:
    kind, _ = _file_kind(Path(path))
    try:
        with _open_compressed(path) as stream:
            if kind == "json":
                yield from _iter_json_stream(path, stream, field)
            else:  # a compressed text file: one document
                data = stream.read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path!r} is not UTF-8 text once decompressed (offset {e.start}); convert it") from None
                if text.strip():
                    yield text
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (a corrupt archive: name the file)
        raise DataError(f"{path!r}: cannot decompress ({type(e).__name__}: {e}); fix or remove it from data.paths") from e


def _iter_parquet(path: str, g0: int, g1: int, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(g0))
    for g in range(g0, g1):
        for batch in pf.iter_batches(batch_size=4096, row_groups=[g], columns=[field]):
            for value in batch.column(0).to_pylist():
                if _not_text(value):
                    raise _text_type_error(f"{path!r} row {row}", field, value)
                row += 1
                if value:
                    yield value


def _iter_hub(c, unit: Unit) -> Iterator[str]:
    from mixtrain.data import corpus

    ds = corpus._load_hub(c)
    where = f"hub data set {c.hub_name!r} (split {c.hub_split!r})"
    if unit.kind == "hub_stream":
        if unit.count > 1:
            ds = ds.shard(num_shards=unit.count, index=unit.start)
        rows: Iterator = (r["text"] for r in ds)
    else:
        rows = (t for b in ds.select(range(unit.start, unit.end)).iter(batch_size=1024) for t in b["text"])
    for n, value in enumerate(rows):
        if _not_text(value):
            raise _text_type_error(f"{where} row {n}", c.text_field, value)
        if value:
            yield value


def iter_unit_texts(c, unit: Unit) -> Iterator[str]:
    """The documents (non-empty strings) of one unit, checked as they are read."""
    field = c.text_field
    if unit.kind == "text":
        for p in unit.paths:
            yield from _iter_text_file(p)
    elif unit.kind == "jsonl":
        field = "text" if c.source == "embedded" else field
        yield from _iter_jsonl_range(unit.paths[0], unit.start, unit.end, field)
    elif unit.kind == "jsonarray":
        from mixtrain.data.corpus import _json_records

        first = True
        for where, record in _json_records(Path(unit.paths[0])):
            value = _json_record_text(unit.paths[0], where, record, field, first)
            first = False
            if value:
                yield value
        if first:
            raise DataError(f"{unit.paths[0]!r} contains no records; remove it from data.paths")
    elif unit.kind == "compressed":
        yield from _iter_compressed(unit.paths[0], field)
    elif unit.kind == "parquet":
        yield from _iter_parquet(unit.paths[0], unit.start, unit.end, field)
    elif unit.kind.startswith("hub"):
        yield from _iter_hub(c, unit)
    else:  # pragma: no cover
        raise ValueError(unit.kind)


def iter_corpus_texts(c) -> Iterator[str]:
    """Every document of the corpus, in corpus order, streamed (for training a tokenizer)."""
    n = 0
    for unit in plan_units(c):
        for text in iter_unit_texts(c, unit):
            if text.strip():
                yield text
                n += 1
                if c.max_documents and n >= c.max_documents:
                    return


# --------------------------------------------------------------------------- split


def unit_phase(seed: int, unit_index: int, val_fraction: float) -> float:
    u = float(np.random.default_rng([int(seed) & 0xFFFFFFFF, unit_index]).random())
    return (1.0 - val_fraction) + val_fraction * u if unit_index == 0 else u


def is_val(k: int, val_fraction: float, phase: float) -> bool:
    """Document ``k`` of a unit with ``phase`` is a validation document (see the module docstring)."""
    return val_fraction > 0 and math.floor((k + 1) * val_fraction + phase) > math.floor(k * val_fraction + phase)


def split_mask(n_docs: int, val_fraction: float, seed: int, unit_index: int = 0) -> np.ndarray:
    """Validation mask of the first ``n_docs`` documents of unit ``unit_index``."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    ph = unit_phase(seed, unit_index, val_fraction)
    return np.array([is_val(k, val_fraction, ph) for k in range(n_docs)], dtype=bool)


# --------------------------------------------------------------------------- building a unit


@dataclass
class BuildSpec:
    """Everything a worker needs to build units (picklable)."""

    cfg: Any
    tok: Any
    out: str
    dtype: str


def unit_paths(out: Path, u: int) -> dict[str, Path]:
    parts = out / "parts"
    base = f"u{u:06d}"
    return {
        "marker": parts / f"{base}.json",
        **{f"{s}.bin": parts / f"{base}.{s}.bin" for s in SPLITS},
        **{f"{s}.ends": parts / f"{base}.{s}.ends" for s in SPLITS},
    }


def read_marker(out: Path, u: int, itemsize: int) -> Optional[dict]:
    """The marker of a finished, intact unit; None when absent; a damaged one warns and gives None."""
    paths = unit_paths(out, u)
    try:
        marker = json.loads(paths["marker"].read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        warnings.warn(f"unit {u} of {out} has an unreadable marker ({e}); rebuilding it")
        return None
    try:
        for s in SPLITS:
            want = marker[s]["tokens"] * itemsize, marker[s]["documents"] * 8
            got = paths[f"{s}.bin"].stat().st_size, paths[f"{s}.ends"].stat().st_size
            if want != got:
                raise ValueError(f"{paths[s + '.bin'].name} / .ends hold {got} bytes, the marker says {want}")
    except (OSError, KeyError, ValueError) as e:
        warnings.warn(f"the prepared data {out} is damaged (unit {u}: {e}); rebuilding that unit")
        return None
    return marker


def build_unit(spec: BuildSpec, u: int, unit: Unit, max_docs: Optional[int] = None) -> dict:
    """Tokenise unit ``u`` into its shard files (temporary names, renamed when complete),
    then write its marker. Memory: one encode batch."""
    c, tok = as_data_config(spec.cfg), spec.tok
    out = Path(spec.out)
    paths = unit_paths(out, u)
    dtype = np.dtype(spec.dtype)
    eos = int(tok.eos_id)
    f = float(c.val_fraction)
    phase = unit_phase(c.seed, u, f)
    tmps = {k: tmp_name(p) for k, p in paths.items() if k != "marker"}
    handles = {k: open(p, "wb", buffering=1 << 20) for k, p in tmps.items()}
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    t0 = time.time()
    k = 0
    try:
        batch: list[str] = []
        size = 0

        def flush(batch: list[str]) -> None:
            nonlocal k
            ids = tok.encode_batch(batch)
            for s in SPLITS:
                sel = [x for j, x in enumerate(ids) if is_val(k + j, f, phase) == (s == "val")]
                if not sel:
                    continue
                lens = np.fromiter((len(x) + 1 for x in sel), dtype=np.int64, count=len(sel))
                flat = np.fromiter(chain.from_iterable(x + [eos] for x in sel), dtype=np.int64, count=int(lens.sum()))
                if flat.size and int(flat.max()) >= 1 << (8 * dtype.itemsize):
                    raise DataError(f"token id {int(flat.max())} does not fit {dtype}: the tokenizer is larger than its vocab_size says")
                flat.astype(dtype).tofile(handles[f"{s}.bin"])
                ends = counts[s]["tokens"] + np.cumsum(lens)
                ends.astype("<i8").tofile(handles[f"{s}.ends"])
                counts[s]["tokens"] += int(lens.sum())
                counts[s]["documents"] += len(sel)
            k += len(batch)

        for text in iter_unit_texts(c, unit):
            if not text.strip():
                continue
            batch.append(text)
            size += len(text)
            if max_docs is not None and k + len(batch) >= max_docs:
                break
            if size >= ENCODE_BATCH_CHARS or len(batch) >= 4096:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
        for h in handles.values():
            h.flush()
            os.fsync(h.fileno())
            h.close()
        for key, tmp in tmps.items():
            os.replace(tmp, paths[key])
    except BaseException:
        for h in handles.values():
            h.close()
        for tmp in tmps.values():
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        raise
    marker = {
        "unit": u,
        "input": unit.describe(),
        **counts,
        "documents": k,
        "seconds": round(time.time() - t0, 3),
        "host": socket.gethostname(),
    }
    atomic_write_json(paths["marker"], marker)
    return marker


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    os.environ["RAYON_NUM_THREADS"] = "1"


def _build_unit_star(args) -> dict:
    spec, u, unit = args
    return build_unit(spec, u, unit)


# --------------------------------------------------------------------------- building a dataset


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def build_dataset(c, tok, out: Path, *, node_rank: int = 0, num_nodes: int = 1, num_proc: Optional[int] = None,
                  wait: bool = True, log=None) -> Optional[dict]:
    """Build the units of ``out`` that belong to ``node_rank`` (of ``num_nodes``) and are not
    finished yet, then write ``index.json`` once every unit is finished (by whichever part
    finishes last; with ``wait`` this part waits for the others). Returns the index, or
    None when other parts are still missing and ``wait`` is false."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not 0 <= node_rank < num_nodes:
        raise DataError(f"node rank {node_rank} is not in [0, num_nodes={num_nodes})")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    for folder in (out, out / "parts"):
        removed = clean_stale_temporaries(folder)
        if removed:
            log(f"removed {len(removed)} temporary file(s) of interrupted builds in {folder}")
    units = plan_units(c)
    if not units:
        raise DataError(f"data.source={c.source}: no input to prepare")
    plan = {"format": FORMAT, "units": [asdict(x) for x in units]}
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        atomic_write_json(plan_path, plan)
    if not (out / "tokenizer.json").is_file():
        tok.save(out / "tokenizer.json")
    dtype = token_dtype(tok.vocab_size)
    spec = BuildSpec(c, tok, str(out), dtype.str)
    mine = [u for u in range(len(units)) if u % num_nodes == node_rank]
    todo = [u for u in mine if read_marker(out, u, dtype.itemsize) is None]
    done_before = len(mine) - len(todo)
    if done_before and todo:
        log(f"resuming: {done_before} of {len(mine)} unit(s) already built, {len(todo)} to go")
    procs = num_proc or cpu_count()
    if c.max_documents:
        left = int(c.max_documents)  # a global cap: units in order, one process
        for u in range(len(units)):
            m = read_marker(out, u, dtype.itemsize)
            if m is None:
                m = build_unit(spec, u, units[u], max_docs=left) if left > 0 else _empty_unit(spec, u, units[u])
            left -= m["documents"]
    elif procs <= 1 or len(todo) <= 1:
        for u in todo:
            build_unit(spec, u, units[u])
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(min(procs, len(todo)), initializer=_worker_init, maxtasksperchild=16) as pool:
            for _ in pool.imap_unordered(_build_unit_star, [(spec, u, units[u]) for u in todo]):
                pass
    while True:
        markers = [read_marker(out, u, dtype.itemsize) for u in range(len(units))]
        missing = [u for u, m in enumerate(markers) if m is None]
        if not missing:
            break
        if not wait:
            log(f"part {node_rank} of {num_nodes} done; {len(missing)} unit(s) of other parts still missing: "
                f"the part that finishes last writes {out / 'index.json'}")
            return None
        time.sleep(5)
    index = {
        "format": FORMAT,
        "dtype": dtype.str,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer_fingerprint": tok.fingerprint(),
        "val_fraction": c.val_fraction,
        "seed": c.seed,
        "units": len(units),
        "parts": [[m[s][k] for s in SPLITS for k in ("tokens", "documents")] for m in markers],
        "documents": sum(m["train"]["documents"] + m["val"]["documents"] for m in markers),
        "tokens": sum(m["train"]["tokens"] + m["val"]["tokens"] for m in markers),
        "splits": {s: {k: sum(m[s][k] for m in markers) for k in ("tokens", "documents")} for s in SPLITS},
        "build_seconds": round(time.time() - t0, 2),
        "unit_seconds": round(sum(m.get("seconds", 0) for m in markers), 2),
    }
    atomic_write_json(out / "index.json", index)
    return index


def _empty_unit(spec: BuildSpec, u: int, unit: Unit) -> dict:
    return build_unit(spec, u, unit, max_docs=0)


def read_index(out: Path) -> Optional[dict]:
    """The index of a complete dataset whose shards are intact, else None (damaged units warn)."""
    try:
        index = json.loads((out / "index.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if index.get("format") != FORMAT:
        return None
    itemsize = np.dtype(index["dtype"]).itemsize
    for u, (tt, td, vt, vd) in enumerate(index["parts"]):
        p = unit_paths(out, u)
        try:
            ok = (p["train.bin"].stat().st_size == tt * itemsize and p["val.bin"].stat().st_size == vt * itemsize
                  and p["train.ends"].stat().st_size == td * 8 and p["val.ends"].stat().st_size == vd * 8)
        except OSError:
            ok = False
        if not ok:
            warnings.warn(f"the prepared data {out} is damaged (unit {u}'s shard files do not match index.json); "
                          f"rebuilding that unit")
            try:
                os.replace(p["marker"], tmp_name(p["marker"]))  # not trusted any more; the tmp is cleaned later
            except OSError:
                pass
            return None
    return index


def disk_bytes(out: Path) -> int:
    """Bytes of a prepared dataset on disk (shards, ends, markers, index, tokenizer)."""
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
