"""``mixtrain data ...``: train a tokenizer, build the packed cache.

The main ``mixtrain`` command calls :func:`register` with the subparsers of its
``mixtrain data`` parser (or :func:`register_group` with the top-level subparsers);
each subcommand sets ``func`` on its namespace, called as ``args.func(args)``.

    mixtrain data tokenizer --out tok.json [--vocab-size 8192] [--source files --paths a.txt 'docs/*.jsonl']
    mixtrain data prepare [--seq-len 256] [--vocab-size 512] [--paths ...] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["embedded", "files", "hub"], default=None,
                   help="where the text comes from (default: files when --paths is given, else embedded)")
    p.add_argument("--paths", nargs="+", default=None, help="local files or globs (.txt/.md, .jsonl/.json, .parquet)")
    p.add_argument("--text-field", default="text", help="field of JSONL/Parquet records holding the text")
    p.add_argument("--hub-name", default=None, help="HF hub data set (needs network)")
    p.add_argument("--cache-dir", default=None, help="default: $MIXTRAIN_CACHE or ~/.cache/mixtrain")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default 512, the tiny model's)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--num-proc", type=int, default=1)


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


def cmd_prepare(args: argparse.Namespace) -> int:
    from mixtrain.data.pretrain import prepare

    cfg = _config(args)
    t0 = time.time()
    p = prepare(cfg, args.seq_len, model_vocab_size=args.vocab_size)
    m = p.meta
    tr, va = m["splits"]["train"], m["splits"]["val"]
    if args.json:
        print(json.dumps({**m, "cache": str(p.dir)}, indent=2))
        return 0
    print(f"source      {cfg.source}  ({m['corpus']})")
    print(f"documents   {m['documents']}  (train {tr['documents']}, val {va['documents']})")
    print(f"tokens      {m['tokens']}  (train {tr['tokens']}, val {va['tokens']}; vocab {m['vocab_size']})")
    print(f"sequences   train {tr['sequences']}, val {va['sequences']}  of seq_len {m['seq_len']}")
    print(f"tokenizer   {m['tokenizer']}")
    print(f"cache       {p.dir}")
    print(f"time        {time.time() - t0:.1f}s")
    return 0


def register(subparsers) -> None:
    """Add the ``tokenizer`` and ``prepare`` subcommands to the subparsers of the
    ``mixtrain data`` parser (each sets ``func``; call ``args.func(args)``)."""
    tk = subparsers.add_parser("tokenizer", help="train a byte-level BPE and save its tokenizer.json")
    tk.add_argument("--out", required=True, help="where to write tokenizer.json")
    _add_common(tk)
    tk.set_defaults(func=cmd_tokenizer)

    pr = subparsers.add_parser("prepare", help="build the corpus, tokenizer and packed sequences; print counts")
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--tokenizer", default=None, help="'train' (default), a tokenizer.json path or an HF name")
    pr.add_argument("--val-fraction", type=float, default=None)
    pr.add_argument("--seed", type=int, default=None)
    pr.add_argument("--json", action="store_true", help="print the cache metadata as JSON")
    _add_common(pr)
    pr.set_defaults(func=cmd_prepare)


def register_group(subparsers) -> argparse.ArgumentParser:
    """Add a ``data`` command (with ``tokenizer`` and ``prepare`` under it) to a top-level
    parser's subparsers."""
    data = subparsers.add_parser("data", help="prepare corpora: train a tokenizer, build the packed cache")
    register(data.add_subparsers(dest="data_command", required=True))
    return data
