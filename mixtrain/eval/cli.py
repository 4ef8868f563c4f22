"""``mixtrain eval``: RULER-style long-context tasks and loss by position for a trained model.

    mixtrain eval --model runs/chain-3 --tasks all --lengths 4096,8192,16384,32768 --samples 10
    mixtrain eval --model runs/x/export --tasks niah_single_1,vt --lengths 4096 --perplexity
    mixtrain eval --model runs/x --harness hellaswag,arc_easy       # lm-evaluation-harness

Writes ``<run dir>/eval/ruler.json`` (``scores`` task -> mean over lengths, ``by_length``,
``average``, model/layout names), ``ruler_samples.jsonl``, ``ruler_heatmap.png``, and with
``--perplexity`` ``perplexity.json`` + ``position_loss.png``; prints tables. A (task, length)
whose prompt cannot fit the length is skipped (null score, listed under ``skipped`` with the
reason) and the averages are over the cells that ran; when none fits, it is an error.
With ``--harness``, lm-eval's tasks run on mixtrain's inference engine
(:mod:`mixtrain.eval.harness`) into ``harness.json`` + ``harness_samples.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from mixtrain.rundir import RunDir

STANDARD_LENGTHS = (4096, 8192, 16384, 32768)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="RULER-style long-context tasks (13, generated offline) and loss by position",
        description="Evaluate a trained model: the 13 RULER tasks generated offline at the given lengths "
        "(greedy decoding, substring scoring), and optionally loss by token position on held-out long "
        "documents plus validation perplexity. Results go to <run dir>/eval/ as JSON and PNG.",
    )
    p.add_argument("--model", required=True, help="run directory, checkpoint, or exported model folder")
    p.add_argument("--tasks", default=None, help="'all' or a comma-separated list, e.g. niah_single_1,vt,qa_1 "
                   "(recall: the associative-recall probe of a model trained with data=recall); "
                   "'none' skips RULER (default: all, or none with --harness)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated context lengths in tokens (default: 4096,8192,16384,32768 up to the "
                   "model's max_seq_len, or max_seq_len itself when shorter); a task whose prompt cannot fit "
                   "a length is skipped there")
    p.add_argument("--samples", type=int, default=10, help="prompts per task and length (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation length")
    p.add_argument("--haystack", nargs="*", default=None,
                   help="text files for the document haystacks (default: the run's corpus)")
    p.add_argument("--perplexity", action="store_true", help="also loss by position and validation perplexity")
    p.add_argument("--ppl-length", type=int, default=None, help="context length for loss by position (default max_seq_len)")
    p.add_argument("--ppl-sequences", type=int, default=8, help="held-out sequences for loss by position")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/eval)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline unless an API key is configured)")
    h = p.add_argument_group("lm-evaluation-harness (pip install 'mixtrain[hf]')")
    h.add_argument("--harness", default=None, metavar="TASK[,TASK]",
                   help="lm-eval tasks or groups (e.g. hellaswag,arc_easy), run in-process on mixtrain's inference "
                   "engine; results in <out>/harness.json")
    h.add_argument("--harness-include", action="append", default=None, metavar="DIR",
                   help="a folder (or file) of your own lm-eval task YAMLs (repeatable)")
    h.add_argument("--harness-limit", type=float, default=None,
                   help="documents per task (a fraction if < 1); for quick checks, not for reporting")
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.set_defaults(func=run)
    return p


def find_tokenizer(source: str | Path, cfg: Any):
    """The run's tokenizer.json (next to the model, or in its run directory), else the
    tokenizer the run's data settings name."""
    from mixtrain.data.tokenizer import get_tokenizer, load_tokenizer_file

    src = Path(source)
    for cand in (src / "tokenizer.json", RunDir.of_path(src).tokenizer_file, src.parent / "tokenizer.json"):
        if cand.is_file():
            return load_tokenizer_file(cand)
    return get_tokenizer(cfg.data, int(cfg.model.vocab_size))


def read_haystack_files(files: list[str]) -> list[str]:
    """The text of the ``--haystack`` files: each must be an existing UTF-8 text file, and
    together they must hold enough words for the document haystacks."""
    import os

    from mixtrain.errors import UserError
    from mixtrain.eval.ruler import MIN_HAYSTACK_WORDS, haystack_words

    docs = []
    for f in files:
        p = Path(os.path.expanduser(str(f)))
        if p.is_dir():
            raise UserError(f"--haystack: {str(f)!r} is a directory, not a file; give text files, e.g. "
                            f"--haystack {str(f).rstrip('/')}/*.txt")
        if not p.is_file():
            raise UserError(f"--haystack: file {str(f)!r} does not exist (cwd: {os.getcwd()}); fix the path")
        raw = p.read_bytes()
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"--haystack: {str(f)!r} is not UTF-8 text: undecodable byte at offset {e.start} ({e.reason}); "
                f"convert it (e.g. `iconv -f latin1 -t utf-8`) or pass another file"
            ) from None
    n = len(haystack_words(docs))
    if n < MIN_HAYSTACK_WORDS:
        which = repr(str(files[0])) if len(files) == 1 else f"the {len(files)} files"
        raise UserError(f"--haystack: {which} hold{'s' if len(files) == 1 else ''} {n} words; the document "
                        f"haystacks need at least {MIN_HAYSTACK_WORDS} words; give more text (longer or more files)")
    return docs


def haystack_documents(cfg: Any, files: Optional[list[str]] = None, max_chars: int = 2_000_000) -> list[str]:
    """Text for the document haystacks: given files (checked: see
    :func:`read_haystack_files`), else the run's corpus, else the embedded corpus (always
    available offline)."""
    if files:
        return read_haystack_files(files)
    from mixtrain.data.corpus import DataError, as_data_config, load_documents
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg.data, resolve=True)
    d["kind"] = "pretrain"
    try:
        docs = load_documents(as_data_config(d))
    except (DataError, OSError, ValueError):
        docs = load_documents(as_data_config({"source": "embedded", "cache_dir": d.get("cache_dir")}))
    out, n = [], 0
    for row in docs:
        out.append(row["text"])
        n += len(row["text"])
        if n >= max_chars:
            break
    return out


def default_lengths(max_seq_len: int) -> list[int]:
    got = [x for x in STANDARD_LENGTHS if x <= max_seq_len]
    return got or [int(max_seq_len)]


def run(args) -> int:
    import torch

    from mixtrain.config import layout_name
    from mixtrain.devices import resolve_device
    from mixtrain.errors import UserError
    from mixtrain.eval import perplexity, ruler
    from mixtrain.train.export import load_model

    harness_tasks = harness_setup(args)  # lm-eval tasks known and their data loadable, before loading the model
    spec = args.tasks if args.tasks is not None else ("none" if harness_tasks else "all")
    from mixtrain.eval import recall as recall_task

    spec, want_recall = recall_task.split_task_spec(spec)  # "recall": mixtrain/eval/recall.py
    tasks = [] if spec == "none" else ruler.parse_tasks(spec)  # fail before loading anything
    for flag in ("samples", "batch_size", "ppl_sequences"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("max_new_tokens", "ppl_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    needs_docs = any(ruler.TASKS[t].documents != "none" for t in tasks)  # required, or optional filler (qa_*)
    given_docs = read_haystack_files(args.haystack) if args.haystack and needs_docs else None  # before loading
    src = Path(args.model)
    run_dir = RunDir.of_path(src).path
    out_dir = Path(args.out) if args.out else (run_dir if (run_dir / "checkpoints").is_dir() else
                                               (src if src.is_dir() else src.parent)) / "eval"
    from mixtrain.files import check_writable

    check_writable(out_dir, "eval output folder" + (" (--out)" if args.out else f" (beside {src})"),
                   "Pass --out <a writable folder>")
    device = resolve_device(args.device or "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model, cfg = load_model(args.model, device=device, dtype=dtype)
    max_len = int(cfg.model.max_seq_len)
    try:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else default_lengths(max_len)
    except ValueError:
        raise UserError(f"--lengths {args.lengths!r}: give comma-separated integers, e.g. 4096,8192") from None
    too_long = [x for x in lengths if x > max_len]
    if too_long:
        raise UserError(
            f"--lengths {too_long} above the model's model.max_seq_len={max_len} (RoPE theta {cfg.model.rope_theta:g}); "
            f"evaluate at <= {max_len}, or extend the context first (stage=extend)"
        )
    tok = find_tokenizer(args.model, cfg)
    names = {
        "model": str(src),
        "name": str(cfg.run.name) if "run" in cfg else src.name,
        "model_name": str(cfg.model.name),
        "layout": layout_name(cfg.layout),
        "max_seq_len": max_len,
        "rope_theta": float(cfg.model.rope_theta),
        "sliding_window": int(cfg.model.sliding_window),
    }
    print(f"evaluating {src} ({names['layout']}, {names['model_name']}) on {device}; results in {out_dir}")
    wandb_run = open_training_wandb_run(src, cfg, out_dir) if args.wandb else None
    try:
        if tasks:
            docs = given_docs if given_docs is not None else haystack_documents(cfg) if needs_docs else None
            n_words = len(ruler.haystack_words(docs)) if docs is not None else 0
            if given_docs is None and any(t in ruler.ESSAY_TASKS for t in tasks) and n_words < ruler.MIN_HAYSTACK_WORDS:
                raise UserError(f"the run's corpus gives {n_words} words for the document haystacks, fewer than "
                                f"{ruler.MIN_HAYSTACK_WORDS}; pass text files with --haystack FILE...")
            ruler.evaluate(model, tok, tasks, lengths, args.samples, out_dir, seed=args.seed, haystack_docs=docs,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, names=names,
                           wandb_log=True if args.wandb else None)
        if want_recall:  # associative recall by distance (a model trained with data=recall)
            recall_task.run_cli(model, cfg, [int(x) for x in args.lengths.split(",")] if args.lengths else None,
                                args.samples, out_dir, seed=args.seed, batch_size=args.batch_size, names=names)
        if harness_tasks:
            run_harness_tasks(args, model, tok, harness_tasks, max_len, out_dir, names, wandb_run is not None)
        if args.perplexity:
            result = perplexity.evaluate(model, cfg, tok, out_dir, length=args.ppl_length,
                                         sequences=args.ppl_sequences, names=names)
            if wandb_run is not None:
                import wandb

                pos = result["position"]
                data = {f"eval/position_loss/{a}-{b}": v for a, b, v in zip(pos["bucket_edges"][:-1], pos["bucket_edges"][1:], pos["loss"])}
                data.update({f"eval/val_{k}": v for k, v in result["val"].items() if isinstance(v, (int, float))})
                data["eval/position_loss/first_minus_last"] = pos["first_minus_last"]
                if (out_dir / "position_loss.png").is_file():
                    data["eval/position_loss_plot"] = wandb.Image(str(out_dir / "position_loss.png"))
                wandb.log(data)
    finally:
        if wandb_run is not None:
            from mixtrain.train.loggers import finish_wandb

            finish_wandb()
    print(f"wrote {out_dir}")
    return 0


def harness_setup(args) -> list[str]:
    """The --harness tasks, checked (known to lm-eval, data loadable: mixtrain.eval.harness)."""
    from mixtrain.errors import UserError

    if not args.harness:
        if args.harness_include or args.harness_limit is not None or args.num_fewshot is not None:
            raise UserError("--harness-include, --harness-limit and --num-fewshot go with --harness TASK[,TASK]")
        return []
    from mixtrain.eval import harness

    if args.harness_limit is not None and args.harness_limit <= 0:
        raise UserError("--harness-limit must be positive (a count, or a fraction below 1)")
    tasks = harness.parse_harness_tasks(args.harness)
    args._harness_tm = harness.task_manager(args.harness_include, tasks)
    harness.check_tasks(tasks, args._harness_tm)
    return tasks


def run_harness_tasks(args, model, tok, tasks, max_len, out_dir, names, log_wandb: bool) -> dict:
    """lm-eval on mixtrain's engine; writes harness.json, prints the table, logs to W&B."""
    from mixtrain.eval import harness

    lm = harness.make_lm(model, tok, batch_size=args.batch_size, max_length=max_len)
    limit = args.harness_limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    results = harness.run_harness(lm, tasks, args._harness_tm, limit=limit, num_fewshot=args.num_fewshot,
                                  seed=args.seed)
    summary = harness.write_results(results, out_dir, {**names, "limit": limit, "num_fewshot": args.num_fewshot})
    print(harness.format_table(summary))
    if log_wandb:
        import wandb

        wandb.log(harness.wandb_data(summary))
    return summary


def open_training_wandb_run(src: Path, cfg, out_dir: Path):
    """The training run's own W&B run (its id is kept in ``<run dir>/wandb_id``), so
    evaluation results sit next to its loss curves; a new run when there is none.
    Offline unless an API key is configured."""
    import wandb

    from mixtrain.train.loggers import wandb_mode

    run_dir = RunDir.of_path(src).path
    run_id = RunDir(run_dir).saved_wandb_id()
    logger = cfg.get("logger") or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=logger.get("project", "mixtrain"), entity=logger.get("entity"), id=run_id,
                      resume="allow" if run_id else None, mode=wandb_mode(),
                      dir=str(run_dir if run_id else out_dir), job_type="eval" if not run_id else None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtrain")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
