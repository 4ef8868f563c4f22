"""``mixtrain eval --tasks recall``: associative recall of a trained model, by distance.

Held-out recall sequences (:mod:`mixtrain.data.recall`; their own seed stream, disjoint
from training and validation) are scored by one forward pass each: a query is correct
when the model's most likely next token at the query's key is the value that followed
that key in its pair. Accuracy is split by query-to-pair distance d: *within* the
sliding window (d <= W, the pair is visible to a sliding layer) and *beyond* it (d > W:
only a global layer that can match the key by content and read what followed it
finds the value), and reported per distance bucket (multiples of W).

A model trained with ``data=recall`` is probed with its own task settings (pairs,
vocabularies, window), at every ``--lengths`` (longer than training tests whether the
retrieval holds at distances never seen). A model trained on text knows nothing of the
task's ids: fine-tune it first (``mixtrain train data=recall train.init_from=<export>
...``, the same settings as ``experiment=recall``) and evaluate that run.

Writes ``<out>/recall.json``: ``by_length`` {length: {recall_within, recall_beyond,
recall, queries_within, queries_beyond, buckets: [{lo, hi, accuracy, queries}]}},
``recall_within``/``recall_beyond``/``recall`` (over all lengths), the task settings,
and the model/layout names; ``mixtrain compare`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mixtrain.data.recall import STREAMS, RecallSpec, recall_counts, recall_metrics, shortcut_counts
from mixtrain.errors import UserError

EVAL_PLACEMENT = "mixed"  # both kinds of distance in every evaluation


def spec_for_model(cfg: Any, length: int) -> RecallSpec:
    """The task as the model was trained on it (``data.kind=recall``), else the
    default settings against the model's sliding window; checked against its vocabulary."""
    from mixtrain.data.recall import RecallError, spec_from_config

    vocab, window = int(cfg.model.vocab_size), int(cfg.model.sliding_window)
    data = cfg.get("data") if hasattr(cfg, "get") else None
    try:
        if data is not None and data.get("kind") == "recall":
            spec = spec_from_config(data, length, vocab)
        else:
            spec = RecallSpec(seq_len=int(length), window=window).check(vocab)
        return spec.with_(placement=EVAL_PLACEMENT).check(vocab)
    except RecallError as e:
        raise UserError(f"--tasks recall at length {length}: {e}") from None


def buckets_for(window: int, length: int) -> list[tuple[int, int]]:
    """Distance buckets (lo, hi], inclusive of hi: (0, W], (W, 2W], (2W, 4W], ... up to length."""
    edges = [0, window]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def score_length(model, spec: RecallSpec, samples: int, seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of ``model`` on ``samples`` sequences of ``spec`` (eval seed stream ``seed``)."""
    device = next(model.parameters()).device
    counts = torch.zeros(4, dtype=torch.float64)
    buckets = buckets_for(spec.window, spec.seq_len)
    per_bucket = torch.zeros(len(buckets), 2, dtype=torch.float64)  # correct, total
    stream = STREAMS["eval"] + int(seed)  # streams 0 and 1 are training and validation
    for start in range(0, samples, batch_size):
        items = [spec.example(stream, i) for i in range(start, min(samples, start + batch_size))]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        logits = model(batch["input_ids"]).logits.float()
        counts += recall_counts(logits, batch["labels"], batch["recall_distance"], spec.window).cpu()
        mask = batch["labels"] != -100
        correct = (logits.argmax(-1) == batch["labels"]) & mask
        dist = batch["recall_distance"]
        for b, (lo, hi) in enumerate(buckets):
            inside = mask & (dist > lo) & (dist <= hi)
            per_bucket[b] += torch.stack([(correct & inside).sum(), inside.sum()]).double().cpu()
    out = recall_metrics(counts.tolist())
    shortcut = recall_metrics(shortcut_counts(spec, stream, range(samples)).tolist())
    out["shortcut_within"], out["shortcut_beyond"] = shortcut["recall_within"], shortcut["recall_beyond"]
    out["buckets"] = [
        {"lo": lo, "hi": hi, "queries": int(n), "accuracy": (float(c) / float(n)) if n else None}
        for (lo, hi), (c, n) in zip(buckets, per_bucket.tolist())
    ]
    out["_counts"] = counts.tolist()
    return out


def evaluate(model, cfg: Any, out_dir: str | Path, lengths: Sequence[int], samples: int = 64, seed: int = 0,
             batch_size: int = 16, names: Optional[dict] = None) -> dict[str, Any]:
    """Score ``model`` at every length, write ``recall.json``, print a table; return the result."""
    from mixtrain.files import atomic_write_text

    if seed < 0:
        raise UserError(f"--seed {seed}: the recall task needs a seed >= 0")
    model.eval()
    by_length, total = {}, torch.zeros(4, dtype=torch.float64)
    spec = None
    for length in lengths:
        spec = spec_for_model(cfg, int(length))
        got = score_length(model, spec, samples, seed, batch_size)
        total += torch.tensor(got.pop("_counts"), dtype=torch.float64)
        by_length[str(int(length))] = got
    result = {
        "task": "recall",
        **(names or {}),
        **recall_metrics(total.tolist()),
        "settings": {"pairs": spec.pairs, "keys": spec.keys, "values": spec.values, "filler": spec.filler,
                     "window": spec.window, "placement": spec.placement, "gap": spec.min_gap, "block": spec.block,
                     "queries": spec.n_queries, "seed": spec.seed,
                     "eval_stream": STREAMS["eval"] + int(seed), "samples": int(samples)},
        "chance": 1.0 / spec.pairs,
        "by_length": by_length,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recall.json", json.dumps(result, indent=2))
    print(format_table(result))
    return result


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(result: dict) -> str:
    w = result["settings"]["window"]
    lines = [f"recall ({result['settings']['pairs']} pairs, window {w}; a model that knows the values but not "
             f"which key each belongs to scores {result['chance']:.3f}; 'by position' is what answering the most "
             f"recent pair (beyond: the most recent beyond W) scores on the same sequences)",
             f"{'length':>8}  {'within (d<=W)':>13}  {'beyond (d>W)':>12}  {'by position w/b':>15}  by distance"]
    for length, r in result["by_length"].items():
        dist = "  ".join(f"{b['lo'] + 1}-{b['hi']}:{_pct(b['accuracy'])}" for b in r["buckets"] if b["queries"])
        base = f"{_pct(r.get('shortcut_within'))}/{_pct(r.get('shortcut_beyond'))}"
        lines.append(f"{length:>8}  {_pct(r['recall_within']):>13}  {_pct(r['recall_beyond']):>12}  {base:>15}  {dist}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- mixtrain eval


def split_task_spec(spec: str) -> tuple[str, bool]:
    """``--tasks`` without ``recall`` (what RULER parses: "none" when nothing is left) and
    whether ``recall`` was asked for. ``all`` means RULER's tasks: the recall task needs a
    model trained on it, so it runs only when named."""
    if spec in (None, "all", "none"):
        return spec, False
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    rest = [t for t in names if t != "recall"]
    return (",".join(rest) if rest else "none"), len(rest) < len(names)


def default_lengths(cfg: Any) -> list[int]:
    """The training length, and twice it when the model's RoPE tables reach that far
    (longer distances than training ever showed)."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    max_len = int(cfg.model.max_seq_len)
    base = int(train.seq_len) if train is not None and train.get("seq_len") else min(max_len, 128)
    return [x for x in (base, 2 * base) if x <= max_len] or [max_len]


def run_cli(model, cfg: Any, lengths: Optional[Sequence[int]], samples: int, out_dir: str | Path, seed: int = 0,
            batch_size: int = 16, names: Optional[dict] = None) -> dict[str, Any]:
    """What ``mixtrain eval --tasks recall`` runs (``lengths`` None: :func:`default_lengths`)."""
    return evaluate(model, cfg, out_dir, list(lengths) if lengths else default_lengths(cfg), samples, seed,
                    batch_size, names)
