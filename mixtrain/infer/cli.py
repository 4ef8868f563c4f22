"""``mixtrain generate`` and ``mixtrain bench infer``.

The main ``mixtrain`` command calls :func:`register_generate` and :func:`register_bench`
with its subparsers; each (sub)command sets ``func`` on its namespace, called as
``args.func(args)``. A user mistake (an unknown recipe, a layout that does not fit the
model, a bad device) prints one ``mixtrain <command>: error: ...`` message and returns 2.

    mixtrain generate --model RUN_OR_EXPORT --prompt "Once upon" [--tokenizer tok.json]
                      [--max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 0]
    mixtrain generate --recipe "model=tiny layout=ma_offset" --prompt-ids 1,2,3
    mixtrain bench infer model=paper_moe --layouts standard,ma,ma_offset,ma_pairs --context 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mixtrain.devices import DTYPES
from mixtrain.errors import UserError

DEFAULT_LAYOUTS = "standard,ma,ma_offset,ma_pairs"
DTYPE_CHOICES = ["auto", *DTYPES]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not positive (give 1 or more)")
    return n


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return x


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return x


def _fail(command: str, msg: str) -> int:
    print(f"mixtrain {command}: error: {msg}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- generate


def register_generate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a trained/exported model (or a random-weight recipe model)",
        description="Batched generation with the MixAttention-aware KV cache (producers only; "
        "sliding layers keep their last W tokens). Give --model (export folder, checkpoint or run "
        "directory) or --recipe (random weights, for benchmarking).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="exported folder, checkpoint or run directory")
    src.add_argument("--recipe", help='Hydra overrides in one string, e.g. "model=tiny layout=ma_offset" (random weights)')
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch); needs a tokenizer")
    p.add_argument("--prompt-ids", action="append", default=None, help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model folder's tokenizer.json)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1] (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", default=None, help="comma-separated stop token ids (default: the tokenizer's EOS)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)
    return p


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--prompt-ids/--stop-ids take comma-separated integers, got {text!r}") from None


def _find_tokenizer(args):
    from mixtrain.data.tokenizer import load_tokenizer_file

    if args.tokenizer:
        return load_tokenizer_file(args.tokenizer)
    if args.model:
        from mixtrain.rundir import RunDir

        root = Path(args.model)
        # The model folder's own, its run directory's (a checkpoint under <run>/checkpoints/), an export's.
        for cand in (root / "tokenizer.json", RunDir.of_path(root).tokenizer_file, root / "export" / "tokenizer.json",
                     root.parent / "tokenizer.json"):
            if cand.is_file():
                return load_tokenizer_file(cand)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except UserError as e:  # a bad recipe, layout, model path, device or token list
        return _fail("generate", str(e))


def _generate(args: argparse.Namespace) -> int:
    from mixtrain.devices import resolve_device, resolve_dtype
    from mixtrain.infer.generate import Engine
    from mixtrain.report import human_bytes

    if args.model is not None:  # a missing path or a run without a checkpoint, before the tokenizer lookup
        from mixtrain.train.export import resolve_checkpoint

        resolve_checkpoint(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        tok = _find_tokenizer(args)
    except Exception as e:  # DataError etc.: a bad tokenizer path
        raise UserError(str(e)) from e
    prompts: list[list[int]] = [_ids(t) for t in (args.prompt_ids or [])]
    prompt_texts: list = [None] * len(prompts)  # echoed before each continuation
    if args.prompt:
        if tok is None:
            raise UserError("--prompt needs a tokenizer: pass --tokenizer tokenizer.json (or use a model folder "
                            "holding tokenizer.json), or give token ids with --prompt-ids 1,2,3")
        prompts += [tok.encode(t) for t in args.prompt]
        prompt_texts += list(args.prompt)
    if not prompts or any(not p for p in prompts):
        raise UserError("give at least one non-empty --prompt or --prompt-ids")
    if args.recipe is not None:
        from mixtrain.infer.bench import build_random_model

        model, _ = build_random_model(args.recipe.split(), device, dtype, seed=args.seed)
    else:
        from mixtrain.train.export import load_model

        model, _ = load_model(args.model, device=device, dtype=dtype)
    V = int(model.cfg.vocab_size)
    bad = [i for p in prompts for i in p if not 0 <= i < V]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the model's vocabulary (0..{V - 1})")
    stop = _ids(args.stop_ids) if args.stop_ids else ([tok.eos_id] if tok is not None else [])

    engine = Engine(model, prefill_chunk=args.prefill_chunk)
    t0 = time.perf_counter()
    out = engine.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop_tokens=stop, seed=args.seed)
    dt = time.perf_counter() - t0
    n_new = sum(len(o) for o in out)
    rows = []
    for p, o in zip(prompts, out):
        row = {"prompt_ids": p, "new_ids": o}
        if tok is not None:
            row["text"] = tok.decode(o)
        rows.append(row)
    kv_bytes = engine.cache.allocated_bytes() if engine.cache is not None else 0
    info = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "seconds": dt, "new_tokens": n_new,
            "kv_cache_bytes": kv_bytes, "layout": model.layout.name}
    if args.json:
        print(json.dumps({"outputs": rows, **info}))
    else:
        for b, (r, text) in enumerate(zip(rows, prompt_texts)):
            if len(rows) > 1:
                print(f"--- prompt {b + 1} of {len(rows)} ---")
            if "text" in r and text is not None:  # the prompt, then what the model wrote after it
                print(text + r["text"])
            elif "text" in r:
                print(f"prompt ids: {','.join(map(str, r['prompt_ids']))}\n{r['text']}")
            else:
                print(f"prompt ids: {','.join(map(str, r['prompt_ids']))}\nnew ids:    {' '.join(map(str, r['new_ids']))}")
        print(f"# {n_new} new tokens in {dt:.2f}s on {device} ({info['dtype']}), layout {info['layout']}, "
              f"KV cache {human_bytes(kv_bytes)}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- bench


def register_bench(subparsers) -> argparse.ArgumentParser:
    """``bench`` with its sub-benchmarks (``infer`` for now); returns the ``bench`` parser.
    Other sub-benchmarks register on ``parser.bench_subparsers``."""
    p = subparsers.add_parser("bench", help="benchmarks", description="Benchmarks (random weights).")
    sub = p.add_subparsers(dest="bench_command", required=True)
    p.bench_subparsers = sub
    register_bench_infer(sub)
    return p


def register_bench_infer(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser(
        "infer",
        help="KV memory, batch capacity and prefill/decode throughput per layout",
        description="For one model config and several layouts, measured in one run on one device with "
        "random weights: KV bytes allocated per token (vs the accounting), the largest batch that fits a "
        "memory budget at --context (on GPU verified by allocating the cache and running a decode step; "
        "on CPU by arithmetic), prefill and decode tokens/s, peak memory. Writes a table, "
        "bench_infer.json and kv_memory.png.",
    )
    q.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper_moe")
    q.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated; the first is the baseline (default {DEFAULT_LAYOUTS})")
    q.add_argument("--context", type=positive_int, default=4096, help="context length of the capacity and decode measurements")
    q.add_argument("--memory-budget", default="auto",
                   help="bytes for the KV cache, e.g. 1GiB, 60GB (default auto: 90%% of the GPU, weights and an activation "
                        "estimate taken out, the fit verified by allocating it; 1GiB on CPU, arithmetic only)")
    q.add_argument("--include-weights", action="store_true",
                   help="--memory-budget is the whole memory: take the weights and an activation estimate out of it first")
    q.add_argument("--decode-steps", type=positive_int, default=16)
    q.add_argument("--max-batch", type=positive_int, default=None, help="cap of the decode batch (default 4096 on GPU, 8 on CPU)")
    q.add_argument("--prefill-len", type=positive_int, default=None, help="prompt length of the prefill measurement (default --context)")
    q.add_argument("--prefill-batch", type=positive_int, default=1)
    q.add_argument("--prefill-chunk", type=positive_int, default=None, help="default 2048 on GPU, 512 on CPU")
    q.add_argument("--device", default="auto")
    q.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on cuda, fp32 on cpu")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's); 1 gives steadier CPU timings on a busy machine")
    q.add_argument("--repeats", type=positive_int, default=3, help="timings are the best of this many runs")
    q.add_argument("--out", default="bench_infer", help="output folder (default ./bench_infer)")
    q.set_defaults(func=cmd_bench_infer)
    return q


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from mixtrain.infer.bench import format_table, run_bench

    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts:
        return _fail("bench infer", "--layouts is empty; give e.g. --layouts standard,ma_offset")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = run_bench(args.overrides, layouts, context=args.context, memory_budget=args.memory_budget,
                           include_weights=args.include_weights, decode_steps=args.decode_steps,
                           max_batch=args.max_batch, prefill_len=args.prefill_len, prefill_batch=args.prefill_batch,
                           prefill_chunk=args.prefill_chunk, device=args.device, dtype=args.dtype, out=args.out,
                           seed=args.seed, repeats=args.repeats)
    except UserError as e:  # a bad recipe or layout, device or memory size
        return _fail("bench infer", str(e))
    print(format_table(result))
    print("wrote " + ", ".join(result.get("files", [])))
    return 0
