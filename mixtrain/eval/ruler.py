"""RULER-style long-context evaluation, generated offline.

The 13 tasks of RULER (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER), with the
same templates, needle formats, answer prefixes and scoring, but nothing downloaded:

==================  =========================================================  =======
task                what the prompt holds                                      scoring
==================  =========================================================  =======
niah_single_1       1 needle (key word, value 7-digit number); noise haystack  all
niah_single_2       1 needle (word -> number); corpus-document haystack        all
niah_single_3       1 needle (word -> uuid); corpus-document haystack          all
niah_multikey_1     4 needles of different keys, 1 queried; documents          all
niah_multikey_2     1 needle; haystack made of distractor needles (words)      all
niah_multikey_3     1 needle; distractor-needle haystack, uuid keys and values all
niah_multivalue     4 values for one key; documents                            all
niah_multiquery     4 keys, all queried; documents                             all
vt                  a 4-hop chain VAR X = 12345, VAR Y = VAR X ...; noise      all
cwe                 numbered word list: the 10 most common words               all
fwe                 Zipf-distributed coded words: the 3 most frequent          all
qa_1                synthetic fact documents, one asked about (SQuAD-style)    any
qa_2                two linked documents, multi-hop question (HotpotQA-style)  any
==================  =========================================================  =======

"Documents" haystacks use any text you give (``haystack_docs``: the run's corpus by
default; RULER used Paul Graham essays). Every prompt is filled to the requested
length with the model's tokenizer: the haystack size is searched so that prompt +
``max_new_tokens`` fits ``length`` tokens (RULER's budget), the needles sit at
evenly spaced depths (sample ``i`` of ``n`` puts a single needle at depth
``(i + 0.5) / n``; ``k`` needles are spread ``1/k`` apart from there), and the answer
prefix ends the prompt. A prompt that cannot fit its length even without haystack
(:class:`PromptTooLong`) makes :func:`evaluate` skip that (task, length), found before any
decoding, and average over the cells that ran. Decoding is greedy; a prediction scores,
case-insensitively, the fraction of references it contains (``all``: NIAH, VT, CWE, FWE;
RULER's ``string_match_all``) or 1 if it contains any (``any``: QA; ``string_match_part``).

Differences from RULER, all deliberate for offline use: no in-context example for
vt/cwe; synthetic pronounceable words instead of the ``wonderwords`` lists; synthetic
fact passages instead of SQuAD/HotpotQA.

Where things live: the tasks, one file per family on a shared base, and the registry
(:func:`register_task` adds one) in :mod:`mixtrain.eval.tasks`; filling a prompt to a
length in :mod:`mixtrain.eval.tasks.fit`; this module runs them (check every cell,
decode, score, write); the table, heatmap and W&B log in :mod:`mixtrain.eval.ruler_output`.
The names other code used from here (``TASKS``, ``generate``, ``check_fits``, ...) are
still importable from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mixtrain.eval.ruler_output import format_table, heatmap, heatmap_grid, log_to_wandb, mean, write_json
from mixtrain.eval.tasks import (
    MIN_HAYSTACK_WORDS,
    TASK_NAMES,
    TASKS,
    PromptTooLong,
    RulerError,
    Sample,
    Task,
    check_fits,
    document_tasks,
    generate,
    haystack_words,
    parse_tasks,
    register_task,
    score,
    string_match_all,
    string_match_any,
)
from mixtrain.eval.tasks.haystack import essay_words
from mixtrain.eval.tasks.words import NOISE, random_uuid

__all__ = [
    "ESSAY_TASKS", "MIN_HAYSTACK_WORDS", "NOISE", "TASKS", "TASK_NAMES", "PromptTooLong", "RulerError", "Sample", "Task",
    "check_fits", "document_tasks", "evaluate", "format_table", "generate", "haystack_words", "heatmap",
    "heatmap_grid", "log_to_wandb", "parse_tasks", "predict", "random_uuid", "register_task", "score",
    "string_match_all", "string_match_any",
]


def __getattr__(name: str):
    if name == "ESSAY_TASKS":  # tasks whose haystack is document text, registered ones included
        return document_tasks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- running a model


def predict(model, tokenizer, samples: list[Sample], batch_size: int = 4, prefill_chunk: int = 1024) -> list[str]:
    """Greedy continuations of the samples' prompts (stop at EOS), decoded."""
    from mixtrain.infer.generate import Engine

    engine = Engine(model, prefill_chunk=prefill_chunk, pad_id=getattr(tokenizer, "pad_id", 0))
    eos = getattr(tokenizer, "eos_id", None)
    preds: list[str] = []
    order = sorted(range(len(samples)), key=lambda j: (samples[j].max_new_tokens, len(samples[j].input_ids)))
    out: dict[int, str] = {}
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s : s + batch_size]
        max_new = max(samples[j].max_new_tokens for j in idx)
        gen = engine.generate([samples[j].input_ids for j in idx], max_new_tokens=max_new,
                              temperature=0.0, stop_tokens=[eos] if eos is not None else ())
        for j, toks in zip(idx, gen):
            toks = toks[: samples[j].max_new_tokens]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            out[j] = tokenizer.decode(toks, skip_special_tokens=True) if _accepts_skip(tokenizer) else tokenizer.decode(toks)
    preds = [out[j] for j in range(len(samples))]
    engine.cache = None
    return preds


def _accepts_skip(tokenizer) -> bool:
    import inspect

    try:
        return "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return False


def evaluate(model, tokenizer, tasks: Sequence[str] | str = "all", lengths: Sequence[int] = (4096,),
             samples: int = 10, out_dir: Optional[str | Path] = None, *, seed: int = 0,
             haystack_docs: Optional[Sequence[str]] = None, batch_size: int = 4,
             max_new_tokens: Optional[int] = None, names: Optional[dict[str, Any]] = None,
             wandb_log: Optional[bool] = None, log: Callable[[str], None] = print) -> dict:
    """Generate, decode greedily and score every (task, length); write ``ruler.json``,
    ``ruler_samples.jsonl`` and ``ruler_heatmap.png`` under ``out_dir``; print a table.

    Every (task, length) cell is checked before any decoding: a cell whose prompt cannot
    fit its length is skipped (score None; listed in ``skipped`` with the reason) and the
    others run. Raises a :class:`RulerError` when no cell fits.

    Returns ``{"scores": {task: mean over the lengths it ran at, or None},
    "by_length": {length: {task: score or None}}, "average": mean over the cells that ran,
    "cells": {"ran": n, "skipped": k}, "skipped": [{"task", "length", "reason",
    "min_length"}], ...}`` (lengths as strings in JSON)."""
    task_names = parse_tasks(tasks)
    lengths = [int(x) for x in lengths]
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    max_len = int(max_len) if max_len is not None else None
    for L in lengths:
        if max_len is not None and L > max_len:
            raise RulerError(f"length {L} is above the model's model.max_seq_len={max_len}; evaluate at <= {max_len} "
                              f"(extend the context first: stage=extend)")
    if any(TASKS[t].documents == "required" for t in task_names):
        essay_words(haystack_docs)  # fail early, before any decoding
    skipped: dict[tuple[int, str], PromptTooLong] = {}
    for L in lengths:  # every cell up front: generating prompts is cheap, decoding is not
        for t in task_names:
            why = check_fits(t, tokenizer, L, samples, seed, haystack_docs, max_new_tokens)
            if why is not None:
                skipped[(L, t)] = why
    if len(skipped) == len(lengths) * len(task_names):
        raise RulerError(_nothing_fits(skipped, lengths, task_names, max_len))
    for (L, t), why in skipped.items():
        log(_skip_line(t, L, why, max_len))
    by_length: dict[str, dict[str, Optional[float]]] = {str(L): {} for L in lengths}
    records: list[dict] = []
    t0 = time.time()
    for L in lengths:
        for t in task_names:
            if (L, t) in skipped:
                by_length[str(L)][t] = None
                continue
            t1 = time.time()
            try:
                ss = generate(t, tokenizer, L, samples, seed, haystack_docs, max_new_tokens)
            except PromptTooLong as why:  # a filled prompt the up-front check could not foresee
                skipped[(L, t)] = why
                by_length[str(L)][t] = None
                log(_skip_line(t, L, why, max_len))
                continue
            preds = predict(model, tokenizer, ss, batch_size=batch_size)
            scores = [TASKS[t].score(p, s.references) for p, s in zip(preds, ss)]
            by_length[str(L)][t] = sum(scores) / max(1, len(scores))
            for s, p, sc in zip(ss, preds, scores):
                records.append({**s.to_json(), "prediction": p, "score": sc})
            log(f"  {t:<16} {L:>7}  {by_length[str(L)][t]:.3f}  ({len(ss)} samples, {time.time() - t1:.1f}s)")
    ran = [v for row in by_length.values() for v in row.values() if v is not None]
    if not ran:
        raise RulerError(_nothing_fits(skipped, lengths, task_names, max_len))
    scores = {t: mean([by_length[str(L)][t] for L in lengths]) for t in task_names}
    result = {
        **(names or {}),
        "suite": "ruler-offline",
        "tasks": task_names,
        "lengths": lengths,
        "samples": samples,
        "seed": seed,
        "scores": scores,
        "by_length": by_length,
        "average": sum(ran) / len(ran),
        "cells": {"ran": len(ran), "skipped": len(skipped)},
        "skipped": [{"task": t, "length": L, "reason": why.detail, "min_length": why.needed}
                    for L in lengths for t in task_names for why in [skipped.get((L, t))] if why is not None],
        "seconds": round(time.time() - t0, 1),
    }
    log(format_table(result))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ruler.json", result)
        with open(out / "ruler_samples.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        heatmap(result, out / "ruler_heatmap.png")
        result["files"] = [str(out / "ruler.json"), str(out / "ruler_samples.jsonl"), str(out / "ruler_heatmap.png")]
    log_to_wandb(result, Path(out_dir) / "ruler_heatmap.png" if out_dir else None, force=wandb_log)
    return result


def _skip_line(task: str, length: int, why: PromptTooLong, max_len: Optional[int]) -> str:
    if why.needed is None:
        advice = "it needs a longer length"
    elif max_len is not None and why.needed > max_len:
        advice = (f"it needs a length of about {why.needed}, above the model's max_seq_len={max_len} "
                  f"(extend the context first: stage=extend)")
    else:
        advice = f"it needs --lengths of about {why.needed} or more"
    return f"  skipped {task} at length {length}: {why.detail}; {advice}"


def _nothing_fits(skipped: dict, lengths: list[int], tasks: list[str], max_len: Optional[int]) -> str:
    longest = max(lengths)
    need = {t: skipped[(longest, t)].needed if (longest, t) in skipped else None for t in tasks}
    shown = ", ".join(f"{t} {n}" if n else f"{t} more" for t, n in need.items())
    known = [n for n in need.values() if n]
    if max_len is not None:
        fitting = [t for t, n in need.items() if n and n <= max_len]
        if fitting:
            fix = (f"these need no more than the model's max_seq_len={max_len}: try --lengths {max_len} "
                   f"--tasks {','.join(fitting)}")
        else:
            fix = (f"none of them fits the model's max_seq_len={max_len}: extend its context first "
                   f"(stage=extend), then evaluate at the longer length")
    else:
        fix = f"use --lengths of about {max(known)} or more" if known else "use longer --lengths"
    task_list = "all" if tuple(tasks) == TASK_NAMES else ",".join(tasks)
    return (f"no RULER task fits --lengths {','.join(map(str, lengths))} (--tasks {task_list}): each prompt "
            f"plus its answer needs more tokens than the length (at least: {shown}); {fix}")
