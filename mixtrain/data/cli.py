"""``mixtrain data ...``: train a tokenizer, build the packed cache.

The main ``mixtrain`` command calls :func:`register` with the subparsers of its
``mixtrain data`` parser (or :func:`register_group` with the top-level subparsers);
each subcommand sets ``func`` on its namespace, called as ``args.func(args)``.

    mixtrain data tokenizer --out tok.json [--vocab-size 8192] [--source files --paths a.txt 'docs/*.jsonl']
    mixtrain data prepare [OVERRIDES ...] [--node-rank R --num-nodes N] [--seq-len ...] [--paths ...]

``prepare`` composes the same recipe as ``mixtrain train`` from the same overrides
(``model=paper_moe data=files data.paths=[...]``), so it prepares exactly what training
reads; the flags are shortcuts applied on top. Under a SLURM array (or ``srun`` with
several tasks) each task builds its part of the units (``--node-rank``/``--num-nodes``
default to the array index/count, else ``SLURM_PROCID``/``SLURM_NTASKS``), and the
part that finishes last writes the index.
"""

from __future__ import annotations

import argparse
import json
import time


def _add_common(p: argparse.ArgumentParser, prepare: bool = False) -> None:
    p.add_argument("--source", choices=["embedded", "files", "hub"], default=None,
                   help="where the text comes from (default: files when --paths is given, else embedded)")
    p.add_argument("--paths", nargs="+", default=None, help="local files or globs (.txt/.md, .jsonl/.json, .parquet)")
    p.add_argument("--text-field", default=None if prepare else "text", help="field of JSONL/Parquet records holding the text")
    p.add_argument("--hub-name", default=None, help="HF hub data set (needs network)")
    p.add_argument("--cache-dir", default=None, help="default: $MIXTRAIN_CACHE or ~/.cache/mixtrain")
    p.add_argument("--vocab-size", type=int, default=None if prepare else 512,
                   help="BPE vocabulary size (prepare: default the model's, tokenizer: 512)")
    p.add_argument("--max-documents", type=int, default=None,
                   help="read at most this many documents (data.max_documents; default: all)")
    p.add_argument("--num-proc", type=int, default=None if prepare else 1,
                   help="tokenising processes (prepare: default data.num_proc, null = every core)")


def _config(args: argparse.Namespace):
    from omegaconf import OmegaConf

    from mixtrain.config import DataConfig
    from mixtrain.data.corpus import as_data_config

    base = OmegaConf.structured(DataConfig)
    over = {
        "source": args.source or ("files" if args.paths else ("hub" if args.hub_name else "embedded")),
        "paths": args.paths,
        "text_field": args.text_field,
        "hub_name": args.hub_name,
        "vocab_size": args.vocab_size,
        "max_documents": args.max_documents,
        "num_proc": args.num_proc,
    }
    for key in ("tokenizer", "val_fraction", "seed"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    if args.cache_dir:
        over["cache_dir"] = args.cache_dir
    return as_data_config(OmegaConf.merge(base, over))


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from mixtrain.data.tokenizer import get_tokenizer

    cfg = _config(args)
    t0 = time.time()
    tok = get_tokenizer(cfg, model_vocab_size=None)
    out = tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens (eos_id={tok.eos_id}, pad_id={tok.pad_id}) "
          f"trained on data.source={cfg.source} -> {out} ({time.time() - t0:.1f}s)")
    return 0


def _prepare_config(args: argparse.Namespace):
    """(data config, seq_len, model vocab size) composed as ``mixtrain train`` would, flags on top."""
    from omegaconf import OmegaConf

    from mixtrain.config import compose
    from mixtrain.data.corpus import as_data_config

    cfg = compose(list(args.overrides or []))
    over: dict = {}
    if args.paths:
        over.update(source=args.source or "files", paths=args.paths)
    elif args.hub_name:
        over.update(source="hub", hub_name=args.hub_name)
    elif args.source:
        over["source"] = args.source
    for key in ("text_field", "vocab_size", "max_documents", "num_proc", "tokenizer", "val_fraction", "seed", "cache_dir"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    data = OmegaConf.merge(cfg.data, over) if over else cfg.data
    seq_len = int(args.seq_len or cfg.train.seq_len)
    return as_data_config(data), seq_len, int(cfg.model.vocab_size)


def _part_of_job(args) -> tuple[int, int]:
    """(node rank, number of parts): the flags, a SLURM array, ``srun`` tasks, else (0, 1)."""
    import os

    env = os.environ
    if args.num_nodes is not None:
        return int(args.node_rank or 0), int(args.num_nodes)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return int(args.node_rank or 0), 1


def cmd_prepare(args: argparse.Namespace) -> int:
    from mixtrain.data.pretrain import prepare, source_configs
    from mixtrain.data.shards import cpu_count

    cfg, seq_len, model_vocab = _prepare_config(args)
    node_rank, num_nodes = _part_of_job(args)
    wait = args.wait if args.wait is not None else num_nodes == 1
    report = []
    tok_spec = None
    for n, (weight, sc) in enumerate(source_configs(cfg)):
        if tok_spec:
            sc.tokenizer = tok_spec
        t0 = time.time()
        p = prepare(sc, seq_len, model_vocab, node_rank=node_rank, num_nodes=num_nodes, wait=wait)
        if p is None:
            print(f"part {node_rank} of {num_nodes} of source {n} built; the index is written by the part that finishes last")
            continue
        if n == 0 and cfg.sources:
            tok_spec = str(p.tokenizer.path) if p.tokenizer.path else sc.tokenizer
        report.append((n, weight, sc, p, time.time() - t0))
    if args.json:
        print(json.dumps([{**p.meta, "cache": str(p.dir), "weight": w, "disk_bytes": p.disk_bytes()}
                          for _, w, _, p, _ in report], indent=2))
        return 0
    for n, weight, sc, p, seconds in report:
        m = p.meta
        tr, va = m["splits"]["train"], m["splits"]["val"]
        if cfg.sources:
            print(f"== source {n} (weight {weight:.3f})")
        print(f"source      {sc.source}  ({m['corpus']})")
        print(f"documents   {m['documents']}  (train {tr['documents']}, val {va['documents']})")
        print(f"tokens      {m['tokens']}  (train {tr['tokens']}, val {va['tokens']}; vocab {m['vocab_size']})")
        print(f"sequences   train {tr['sequences']}, val {va['sequences']}  of seq_len {m['seq_len']}")
        print(f"tokenizer   {m['tokenizer']}")
        disk = p.disk_bytes()
        print(f"cache       {p.dir}  ({disk / 1e6:.1f} MB, {disk / max(m['tokens'], 1):.2f} bytes/token, "
              f"{m['units']} unit(s))")
        built = m.get("unit_seconds") or 0
        rate = f", {m['tokens'] / built / 1e6:.2f}M tokens/s per process" if built else ""
        print(f"time        {seconds:.1f}s  (built in {m['build_seconds']}s on up to "
              f"{sc.num_proc or cpu_count()} process(es){rate})")
    return 0


def register(subparsers) -> None:
    """Add the ``tokenizer`` and ``prepare`` subcommands to the subparsers of the
    ``mixtrain data`` parser (each sets ``func``; call ``args.func(args)``)."""
    tk = subparsers.add_parser("tokenizer", help="train a byte-level BPE and save its tokenizer.json")
    tk.add_argument("--out", required=True, help="where to write tokenizer.json")
    _add_common(tk)
    tk.set_defaults(func=cmd_tokenizer)

    pr = subparsers.add_parser(
        "prepare", help="build the tokenizer and token shards training will read; print counts",
        description="Takes the same overrides as `mixtrain train` (e.g. model=paper_moe data=files "
        "'data.paths=[corpus/*.jsonl]' train.seq_len=4096); the flags are shortcuts applied on top.")
    pr.add_argument("overrides", nargs="*", help="Hydra overrides, as for mixtrain train")
    pr.add_argument("--seq-len", type=int, default=None, help="default: train.seq_len of the recipe")
    pr.add_argument("--tokenizer", default=None,
                    help="'train' (default: BPE trained on the corpus), a tokenizer.json path, an HF tokenizer "
                         "folder, tiktoken:NAME or a .tiktoken file (data.tokenizer)")
    pr.add_argument("--val-fraction", type=float, default=None,
                    help="share of documents held out for validation, in [0, 1) (data.val_fraction)")
    pr.add_argument("--seed", type=int, default=None, help="seed of the train/validation split (data.seed)")
    pr.add_argument("--json", action="store_true", help="print the metadata as JSON")
    pr.add_argument("--node-rank", type=int, default=None, help="this machine's part (several machines, one dataset)")
    pr.add_argument("--num-nodes", type=int, default=None, help="how many machines share the preparation")
    pr.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                    help="wait for the other parts and the index (default: only with one part)")
    _add_common(pr, prepare=True)
    pr.set_defaults(func=cmd_prepare)


def register_group(subparsers) -> argparse.ArgumentParser:
    """Add a ``data`` command (with ``tokenizer`` and ``prepare`` under it) to a top-level
    parser's subparsers."""
    data = subparsers.add_parser("data", help="prepare corpora: train a tokenizer, build the packed cache")
    register(data.add_subparsers(dest="data_command", required=True))
    return data
