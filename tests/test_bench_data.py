"""The synthetic corpus generator and ``mixtrain bench data``: figures checked against
counts made independently here (files measured on disk, the corpus re-tokenised)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from mixtrain.data.synth import COMMON_WORDS, SynthText, write_corpus


def read_docs(files) -> list[str]:
    import pyarrow.parquet as pq
    import zstandard

    docs = []
    for f in files:
        name = str(f)
        if name.endswith(".parquet"):
            docs += pq.read_table(name).column("text").to_pylist()
            continue
        raw = open(name, "rb").read()
        if name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
        docs += [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines()]
    return docs


def test_synthetic_text_is_deterministic_zipfian_and_varied(tmp_path):
    s = SynthText(seed=3)
    docs = [s.document(i) for i in range(1200)]
    again = SynthText(seed=3)
    assert [again.document(i) for i in (1199, 5, 700)] == [docs[1199], docs[5], docs[700]]  # any order
    assert SynthText(seed=4).document(5) != docs[5]
    code = [d for d in docs if d.startswith("import ")]
    assert 0.07 < len(code) / len(docs) < 0.13  # code_fraction 0.1
    assert all("def " in d and "    return " in d for d in code)
    prose = [d for d in docs if not d.startswith("import ")]
    lengths = np.array([len(d.split()) for d in prose])
    assert lengths.min() < 60 and lengths.max() > 3000 and 250 < np.median(lengths) < 500  # lognormal, median ~350
    assert sum(d.count("\n\n") > 2 for d in prose) > 0.6 * len(prose)  # paragraphs
    # Zipf: the rank-frequency slope of prose words is close to -zipf_s (1.07)
    counts = Counter(w.strip(".,?!").lower() for d in prose for w in d.split())
    freq = np.array(sorted(counts.values(), reverse=True), dtype=float)
    r = np.arange(1, len(freq) + 1)
    sel = (r >= 3) & (r <= 2000)
    slope = np.polyfit(np.log(r[sel]), np.log(freq[sel]), 1)[0]
    assert -1.25 < slope < -0.9, slope
    assert counts.most_common(1)[0][0] == COMMON_WORDS[0]
    assert len(counts) > 15_000  # a large vocabulary, not a toy one


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_write_corpus_streams_shards_of_the_stream(tmp_path, fmt):
    info = write_corpus(tmp_path / fmt, 300_000, seed=1, fmt=fmt, shard_chars=100_000)
    assert len(info.files) >= 3 and all(f.name.endswith("." + fmt) for f in info.files)
    assert not list((tmp_path / fmt).glob("*.tmp"))
    docs = read_docs(info.files)
    s = SynthText(seed=1)
    assert docs == [s.document(i) for i in range(len(docs))] and len(docs) == info.documents
    assert info.chars == sum(map(len, docs)) and 300_000 <= info.chars < 300_000 + max(map(len, docs))
    assert info.bytes == sum(os.path.getsize(f) for f in info.files)
    smaller = write_corpus(tmp_path / "small", 100_000, seed=1, fmt=fmt)
    assert read_docs(smaller.files) == docs[: smaller.documents]  # a smaller corpus is a prefix


def test_bench_data_figures_match_independent_counts(tmp_path, capsys):
    from mixtrain.cli import main
    from mixtrain.data.tokenizer import load_tokenizer_file

    out = tmp_path / "bench"
    rc = main(["bench", "data", "--tokens", "100k", "--num-proc", "2", "--shard-mb", "0.1", "--vocab-size", "512",
               "--tokenizer-sample-chars", "200k", "--seq-len", "128", "--read-seconds", "0.5", "--out", str(out), "--keep"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "bench_data.json").read_text())
    assert result["machine"]["cores"] >= 1 and len(result["rows"]) == 1 and len(result["machine"]["load_avg"]) == 3
    tok = load_tokenizer_file(result["settings"]["tokenizer"])
    for row, target in zip(result["rows"], (100_000,)):
        work = out / f"work-{target}"
        files = sorted((work / "corpus").glob("part-*.jsonl"))
        docs = read_docs(files)
        # token and document counts: the corpus re-tokenised here, one EOS per document
        assert row["documents"] == len(docs)
        assert row["tokens"] == sum(len(ids) + 1 for ids in tok.encode_batch(docs))
        assert abs(row["tokens"] / target - 1) < 0.3  # ~100 documents: the estimate is rough this small
        assert row["corpus_bytes"] == sum(os.path.getsize(f) for f in files)
        # bytes on disk: every file of the prepared folder, measured here; nothing else left behind
        prepared = [os.path.join(d, f) for d, _, fs in os.walk(row["prepared_dir"]) for f in fs]
        size = sum(os.path.getsize(p) for p in prepared)
        assert row["prepared_bytes"] == size == row["prepared_bytes_api"]
        assert row["bytes_per_token"] == pytest.approx(size / row["tokens"])
        all_cache = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work / "cache") for f in fs)
        assert row["leftover_cache_bytes"] == all_cache - size == 0
        assert not any(".tmp" in p for p in prepared)
        assert row["token_bytes"] == 2 and 2.0 < row["bytes_per_token"] < 2.5  # uint16 + per-document offsets
        # two preparation processes were used (>= 2 units), memory was sampled over the tree
        assert row["units"] >= 2 and row["processes"] == 2 and row["peak_processes"] >= 3
        assert row["memory_samples"] > 3 and 50e6 < row["peak_tree_pss"] <= row["peak_tree_rss"]
        # each process's own peak (VmHWM), not the bench's memory inherited through fork
        assert row["rss_after_imports"] <= row["peak_rss_preparing_process"] < 1e9
        assert 10e6 < row["peak_rss_largest_worker"] and row["peak_process_rss"] == max(
            row["peak_rss_preparing_process"], row["peak_rss_largest_worker"])
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["prepare_wall_s"])
        assert 0 < row["cpu_s"] <= row["prepare_wall_s"] * result["machine"]["cores"] * 1.05 + 0.5
        assert row["tokens_per_cpu_s"] == pytest.approx(row["tokens"] / row["cpu_s"])
        assert row["tokenizer_alone_tokens_per_cpu_s"] > 0
        read = row["read"]
        assert read["tokens"] == read["batches"] * 8 * 128 > 0 and read["num_workers"] == 0
        assert read["tokens_per_s"] == pytest.approx(read["tokens"] / read["seconds"])
    assert f"| {row['tokens'] / 1e6:.1f}M |" in printed
    assert "bytes/token" in printed and str(out / "bench_data.json") in printed
