"""``mixtrain bench data``: how fast, how big and how memory-hungry data preparation is,
and how fast the training data loader reads the result.

For each size N in ``--tokens`` (e.g. ``10M,40M``), in one run:

1. a tokenizer: ``--tokenizer`` (any ``data.tokenizer`` spec), else a byte-level BPE of
   ``--vocab-size`` trained once on ``--tokenizer-sample-chars`` (4M) characters of
   synthetic text of another seed, kept in ``<out>/tokenizer-*.json`` (reused later);
2. a synthetic corpus of about N tokens (:mod:`mixtrain.data.synth`, seed ``--seed``:
   the corpus of a smaller N is a prefix of a larger one), written as ``--format``
   shards; the characters per token are measured on its first 256 documents;
3. preparation with the real path (:func:`mixtrain.data.pretrain.prepare`, the one
   ``mixtrain data prepare`` runs) in a fresh child process, with ``--num-proc``
   worker processes. Measured: wall time; tokens/s and tokens/s per process; tokens
   per CPU-second (user+system time of the child and its workers: the per-core speed
   even when other programs share the cores, which wall-clock figures are not), next
   to the baseline measured in the same run: the tokenizer alone on the first 256
   documents in the bench's process (no reading, splitting or writing); peak
   memory three ways: the peak *sum* of RSS over the child and all its descendants
   (sampled every 50 ms with psutil; counts pages shared between processes once per
   process, so it is an upper bound), the peak sum of PSS (shared pages divided among
   their sharers, the honest total), and the largest single process's peak RSS
   (Linux ``VmHWM`` of the child and of each worker: a high-water mark, exact; not
   ``getrusage``, whose ``ru_maxrss`` of a child includes the memory of the process it
   was forked from);
4. bytes on disk: every file of the prepared dataset (measured by walking the folder),
   bytes per token, and whatever else the build left in its cache and in the HF
   datasets cache (temporary files: should be 0);
5. read throughput: tokens/s the training ``DataLoader`` of
   :class:`~mixtrain.data.pretrain.PretrainDataModule` delivers with the default
   settings (``data.num_workers``), micro-batches of ``--micro-batch`` x ``--seq-len``,
   for ``--read-seconds`` after one warm-up batch.

The corpus and the prepared data are deleted after each size unless ``--keep``.
Prints a table (RSS ratios against the smallest size, measured in the same run) and
writes ``<out>/bench_data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

SAMPLE_CHARS = 4_000_000  # synthetic text the default tokenizer is trained on
CALIBRATION_DOCS = 256


def parse_count(s: str) -> int:
    """``10M``, ``2.5e6``, ``140m``, ``500k``, ``1G`` -> int."""
    s = str(s).strip().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(s[-1:].lower(), 1)
    try:
        n = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {s!r} (e.g. 10M, 4e7, 500k)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {s!r}")
    return int(n)


def dir_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if os.path.isfile(os.path.join(d, f)))


# --------------------------------------------------------------------------- memory sampling


def vm_hwm(pid: int | str = "self") -> Optional[int]:
    """Peak resident bytes of a process since it started its program (Linux ``VmHWM``):
    exact, and unlike ``getrusage``'s ``ru_maxrss`` it does not carry over the memory of
    the parent it was forked from (Linux keeps the larger of the two across ``exec``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TreeMemorySampler(threading.Thread):
    """Peak sum of RSS and of PSS over a process and all its descendants (sampled), and
    each process's own peak (``VmHWM``, read at every sample: a high-water mark, so short
    spikes between samples are not missed)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.hwm: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self):
        import psutil

        while not self._halt.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    continue
                hwm = vm_hwm(p.pid)
                if hwm is not None:
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), hwm)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


# --------------------------------------------------------------------------- steps


def data_config(corpus_files: list[Path], cache: Path, tokenizer: str, num_proc: Optional[int],
                shard_mb: Optional[float], seed: int = 1234):
    from mixtrain.config import DataConfig

    kw: dict[str, Any] = {}
    if shard_mb is not None:
        kw["shard_mb"] = float(shard_mb)
    return DataConfig(source="files", paths=[str(p) for p in corpus_files], tokenizer=tokenizer, cache_dir=str(cache),
                      num_proc=num_proc, seed=seed, **kw)


def bench_tokenizer(out: Path, spec: Optional[str], vocab_size: int, seed: int, cache: Path,
                    sample_chars: int = SAMPLE_CHARS):
    """(spec, Tok): ``spec`` loaded, or a BPE trained once on synthetic text (cached in ``out``)."""
    from mixtrain.config import DataConfig
    from mixtrain.data.synth import SynthText
    from mixtrain.data.tokenizer import get_tokenizer, load_tokenizer_file, train_bpe

    if spec:
        return spec, get_tokenizer(DataConfig(tokenizer=spec, cache_dir=str(cache)))
    path = out / f"tokenizer-v{vocab_size}-s{seed}-c{sample_chars}.json"
    if not path.is_file():
        synth = SynthText(seed=seed + 1000)

        def sample():
            n = 0
            for doc in synth.documents():
                yield doc
                n += len(doc)
                if n >= sample_chars:
                    return

        train_bpe(sample(), vocab_size).save(path)
    return str(path), load_tokenizer_file(path)


def _prepare_child(arg: str) -> None:
    """Run in a fresh process: prepare the data of the JSON config ``arg``, print the result."""
    from mixtrain.config import DataConfig
    from mixtrain.data.pretrain import prepare

    a = json.loads(arg)
    cfg = DataConfig(**a["data"])
    import psutil

    rss_imports = psutil.Process().memory_info().rss  # the modules preparation imports, before any data
    before = resource.getrusage(resource.RUSAGE_SELF)  # CPU time only: ru_maxrss would include the bench's own memory
    t0 = time.perf_counter()
    p = prepare(cfg, a["seq_len"], None)
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = lambda r: r.ru_utime + r.ru_stime  # noqa: E731
    print("@@RESULT " + json.dumps({
        "wall_s": wall,
        "dir": str(p.dir),
        "meta": p.meta,
        "disk_bytes_api": p.disk_bytes(),
        "vm_hwm": vm_hwm(),
        "rss_after_imports": rss_imports,
        "cpu_s": cpu(me) - cpu(before) + cpu(kids),  # preparing only (not the imports before it)
    }), flush=True)


def run_prepare(cfg, seq_len: int, env_extra: dict[str, str]) -> dict:
    """Prepare in a child process, sampling its process tree's memory."""
    from dataclasses import asdict

    data = {k: v for k, v in asdict(cfg).items()}
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-c", "import sys; from mixtrain.data.bench import _prepare_child; _prepare_child(sys.argv[1])",
           json.dumps({"data": data, "seq_len": seq_len})]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeMemorySampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"preparation failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    line = next(l for l in stdout.splitlines() if l.startswith("@@RESULT "))
    r = json.loads(line[len("@@RESULT "):])
    r.update(process_wall_s=wall, peak_tree_rss=sampler.peak_rss, peak_tree_pss=sampler.peak_pss,
             peak_processes=sampler.peak_procs, memory_samples=sampler.samples,
             peak_rss_preparing_process=max(r["vm_hwm"] or 0, sampler.hwm.get(proc.pid, 0)),
             peak_rss_largest_worker=max([v for k, v in sampler.hwm.items() if k != proc.pid], default=0))
    r["peak_process_rss"] = max(r["peak_rss_preparing_process"], r["peak_rss_largest_worker"])
    return r


def read_throughput(cfg, seq_len: int, micro_batch: int, seconds: float, vocab_size: int) -> dict:
    """Tokens/s the training DataLoader delivers (default workers), after one warm-up batch."""
    from mixtrain.data.pretrain import PretrainDataModule

    dm = PretrainDataModule(cfg, seq_len=seq_len, micro_batch_size=micro_batch, vocab_size=vocab_size)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    n_tok = n_batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(it)
        n_tok += batch["input_ids"].numel()
        n_batches += 1
    dt = time.perf_counter() - t0
    del it
    return {"tokens": n_tok, "batches": n_batches, "seconds": dt, "tokens_per_s": n_tok / dt,
            "num_workers": dm.num_workers, "micro_batch": micro_batch, "seq_len": seq_len}


def bench_size(n_tokens: int, args, tok_spec: str, tok, work: Path) -> dict:
    from mixtrain.data.synth import SynthText, write_corpus

    shutil.rmtree(work, ignore_errors=True)  # a --keep'd earlier run
    work.mkdir(parents=True)
    synth = SynthText(seed=args.seed)
    sample = [synth.document(i) for i in range(CALIBRATION_DOCS)]
    c0 = time.process_time()
    sample_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(sample))
    tokenizer_cpu_s = time.process_time() - c0
    chars_per_token = sum(map(len, sample)) / sample_tokens
    t0 = time.perf_counter()
    corpus = write_corpus(work / "corpus", int(n_tokens * chars_per_token), fmt=args.format,
                          shard_chars=int(args.corpus_shard_mb * 1e6), synth=synth)
    gen_s = time.perf_counter() - t0
    cache, hf_cache = work / "cache", work / "hf_datasets"
    cfg = data_config(corpus.files, cache, tok_spec, args.num_proc, args.shard_mb)
    load_before = os.getloadavg()[0]
    prep = run_prepare(cfg, args.seq_len, {"HF_DATASETS_CACHE": str(hf_cache), "TOKENIZERS_PARALLELISM": "false"})
    meta = prep["meta"]
    tokens = int(meta["tokens"])
    prepared = dir_bytes(Path(prep["dir"]))
    leftover = dir_bytes(cache) - prepared
    from mixtrain.data.shards import cpu_count

    procs = min(args.num_proc or cpu_count(), int(meta.get("units", 1)))
    read = read_throughput(cfg, args.seq_len, args.micro_batch, args.read_seconds, tok.vocab_size)
    row = {
        "target_tokens": n_tokens,
        "tokens": tokens,
        "documents": int(meta["documents"]),
        "corpus_files": len(corpus.files),
        "corpus_bytes": corpus.bytes,
        "corpus_chars": corpus.chars,
        "generate_s": gen_s,
        "units": meta.get("units"),
        "processes": procs,
        "prepare_wall_s": prep["wall_s"],
        "prepare_process_wall_s": prep["process_wall_s"],
        "tokens_per_s": tokens / prep["wall_s"],
        "tokens_per_s_per_process": tokens / prep["wall_s"] / procs,
        "cpu_s": prep["cpu_s"],
        # CPU time of the preparing process and its workers: per-core speed that does not
        # depend on other programs sharing the cores (wall-clock figures do)
        "tokens_per_cpu_s": tokens / prep["cpu_s"],
        # the baseline, measured in the same run: the tokenizer alone on the first documents,
        # in this process (no reading, splitting or writing)
        "tokenizer_alone_tokens_per_cpu_s": sample_tokens / max(tokenizer_cpu_s, 1e-9),
        "peak_tree_rss": prep["peak_tree_rss"],
        "peak_tree_pss": prep["peak_tree_pss"],
        "peak_process_rss": prep["peak_process_rss"],
        "peak_rss_preparing_process": prep["peak_rss_preparing_process"],
        "peak_rss_largest_worker": prep["peak_rss_largest_worker"],
        "peak_processes": prep["peak_processes"],
        "rss_after_imports": prep["rss_after_imports"],
        "memory_samples": prep["memory_samples"],
        "prepared_bytes": prepared,
        "prepared_bytes_api": prep["disk_bytes_api"],
        "bytes_per_token": prepared / tokens,
        "leftover_cache_bytes": leftover,
        "hf_datasets_cache_bytes": dir_bytes(hf_cache),
        "token_bytes": meta.get("bytes_per_token"),
        "read": read,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before / after preparing
        "prepared_dir": prep["dir"],
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def machine() -> dict:
    import psutil

    from mixtrain.data.shards import cpu_count

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform()}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def format_table(rows: list[dict], base: Optional[float] = None) -> str:
    base = base or (rows[0]["peak_tree_rss"] if rows else 1)
    head = ("| tokens | wall | tokens/s per process (procs) | tokens per CPU-s (tokenizer alone) | peak RSS tree (x smallest) | peak PSS tree | "
            "largest process | disk | bytes/token | left in cache | read tokens/s (workers) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {_count(r['tokens'])} | {r['prepare_wall_s']:.1f} s | {r['tokens_per_s_per_process'] / 1e6:.2f}M "
            f"({r['processes']}) | {r['tokens_per_cpu_s'] / 1e6:.2f}M ({r['tokenizer_alone_tokens_per_cpu_s'] / 1e6:.2f}M) | "
            f"{_gb(r['peak_tree_rss'])} ({r['peak_tree_rss'] / base:.2f}x) | "
            f"{_gb(r['peak_tree_pss'])} | {_gb(r['peak_process_rss'])} | {_gb(r['prepared_bytes'])} | "
            f"{r['bytes_per_token']:.3f} | {r['leftover_cache_bytes'] + r['hf_datasets_cache_bytes']} B | "
            f"{r['read']['tokens_per_s'] / 1e6:.2f}M ({r['read']['num_workers']}) |"
        )
    return "\n".join(lines)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_cache = out / "tokenizer_cache"
    tok_spec, tok = bench_tokenizer(out, args.tokenizer, args.vocab_size, args.seed, tok_cache,
                                    args.tokenizer_sample_chars)
    rows = []
    for n in args.tokens:
        print(f"bench data: {_count(n)} tokens ...", file=sys.stderr, flush=True)
        rows.append(bench_size(n, args, tok_spec, tok, out / f"work-{n}"))
        print(format_table(rows).splitlines()[-1], file=sys.stderr, flush=True)
    result = {
        "machine": machine(),
        "settings": {"tokens": args.tokens, "num_proc": args.num_proc, "shard_mb": args.shard_mb,
                     "format": args.format, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                     "read_seconds": args.read_seconds, "tokenizer": tok_spec, "vocab_size": tok.vocab_size,
                     "seed": args.seed},
        "rows": rows,
    }
    from mixtrain.files import atomic_write_text

    atomic_write_text(out / "bench_data.json", json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"mixtrain bench data: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, load average "
          f"{m['load_avg'][0]} (other processes share the cores when it exceeds {m['cores']}); tokenizer {tok_spec} "
          f"({tok.vocab_size} ids); --num-proc {args.num_proc or 'all'}; format {args.format}")
    print(format_table(rows))
    print(f"written: {out / 'bench_data.json'}")
    return result


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "data", help="prepare a synthetic corpus of N tokens: wall time, tokens/s, peak RSS, disk, read tokens/s",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=lambda s: [parse_count(x) for x in s.split(",")], default=[parse_count("10M")],
                   help="corpus size(s) in tokens, comma-separated, e.g. 10M,40M (default 10M)")
    p.add_argument("--num-proc", type=int, default=None, help="preparation processes (default: data.num_proc, every core)")
    p.add_argument("--shard-mb", type=float, default=None, help="data.shard_mb (default: the DataConfig default)")
    p.add_argument("--tokenizer", default=None,
                   help="a data.tokenizer spec (tokenizer.json, HF folder, tiktoken:NAME, x.tiktoken); default: a BPE "
                        "of --vocab-size trained once on synthetic text")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-sample-chars", type=parse_count, default=SAMPLE_CHARS,
                   help="characters of synthetic text (another seed) the default BPE is trained on (default 4M)")
    p.add_argument("--format", choices=["jsonl", "jsonl.zst", "parquet"], default="jsonl")
    p.add_argument("--corpus-shard-mb", type=float, default=256.0, help="size of one generated corpus file (MB of text)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--read-seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the corpus and the prepared data")
    p.add_argument("--out", default="bench_data", help="folder for bench_data.json and the cached tokenizer")
    p.set_defaults(func=lambda args: run(args) and 0)
    return p
