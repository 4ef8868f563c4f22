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
the model/layout names, and ``attention`` (:func:`attention_map` at the first length:
which layer retrieves, which one only spreads over the values, where the previous-token
heads are); ``mixtrain compare`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mixtrain.data.recall import STREAMS, RecallSpec, recall_counts, recall_metrics, shortcut_counts
from mixtrain.errors import UserError

EVAL_PLACEMENT = "mixed"  # both kinds of distance in every evaluation
ATTENTION_SAMPLES = 64  # sequences behind the attention map (explicit attention in every layer)
ATTENTION_BATCH_BYTES = 1 << 30  # at most this much of one layer's probabilities at a time (one sequence if more)


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


RETRIEVES_AT = 0.3  # a head "retrieves" with at least this much on the answer's value ...
BAG_RATIO = 2.0  # ... and this many times what it puts on another pair's value, on average


def layer_role(index: int, spec) -> str:
    """``global``, ``sliding 8``, plus where its K/V or probabilities come from."""
    kind = "global" if spec.kind == "global" else f"sliding {spec.window}"
    if spec.attn_source is not None:
        return f"{kind}, probabilities of L{spec.attn_source}"
    return kind if spec.kv_source == index else f"{kind}, K/V of L{spec.kv_source}"


@torch.no_grad()
def attention_map(model, spec: RecallSpec, samples: int = 64, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """Where each layer's heads look on ``beyond`` sequences of ``spec`` (every query more
    than W after every pair): per layer and head, the mean attention of a query on the
    value that answers it (``answer``), on the other pairs' values together
    (``other_values``), and of each pair's value on its own key, the token before it
    (``previous_token``). Retrieval beyond the window needs both: a head before the
    retrieving layer that writes each key into the value after it (previous token), and a
    global head whose keys, computed after that, match the query (answer >> other values).
    A global layer that reads layer 0's K/V can only spread over the values (answer =
    other values / (pairs - 1): the bag of values). ``previous_token_uniform`` per layer:
    what attending evenly to every visible token would put on the previous token."""
    beyond = spec.with_(placement="beyond").check()
    stream = STREAMS["eval"] + int(seed)  # the same stream as the accuracy (different sequences: other placement)
    device = next(model.parameters()).device
    layers = model.layout.layers
    H = model.cfg.n_heads
    sums = torch.zeros(len(layers), 3, H, dtype=torch.float64)  # answer, other values, previous token
    uniform = torch.zeros(len(layers), dtype=torch.float64)  # previous token under uniform attention
    n_queries = n_values = 0
    per_seq = 4 * H * beyond.seq_len ** 2  # bytes of one sequence's probabilities in one layer
    batch_size = max(1, min(batch_size, ATTENTION_BATCH_BYTES // per_seq))
    for start in range(0, samples, batch_size):
        seqs = [beyond.sample(stream, i) for i in range(start, min(samples, start + batch_size))]
        ids = torch.stack([torch.from_numpy(s["tokens"][:-1]) for s in seqs]).to(device)
        q = [torch.from_numpy(s["query_pos"]).to(device) for s in seqs]
        answer = [torch.from_numpy(s["key_pos"]).to(device) + 1 for s in seqs]
        values = [torch.from_numpy(s["pair_pos"]).to(device) + 1 for s in seqs]

        def reduce(i: int, p: torch.Tensor) -> None:  # one layer's [B, H, T, T], then dropped
            for b in range(len(seqs)):
                rows = p[b][:, q[b]].float()  # [H, queries, T]
                on_answer = rows[:, torch.arange(len(q[b]), device=rows.device), answer[b]]  # [H, queries]
                sums[i, 0] += on_answer.sum(1).double().cpu()
                sums[i, 1] += (rows[:, :, values[b]].sum(-1) - on_answer).sum(1).double().cpu()
                sums[i, 2] += p[b][:, values[b], values[b] - 1].float().sum(1).double().cpu()

        model.attention_probabilities(ids, each=reduce)
        for i, layer in enumerate(layers):  # what even attention over the visible tokens puts on the previous one
            for v in values:
                seen = v + 1 if layer.kind == "global" else (v + 1).clamp(max=layer.window)
                uniform[i] += float((1.0 / seen.double()).sum())
        n_queries += sum(len(x) for x in q)
        n_values += sum(len(x) for x in values)
    mean = sums / torch.tensor([n_queries, n_queries, n_values], dtype=torch.float64).view(1, 3, 1)
    out_layers = []
    for i, spec_i in enumerate(layers):
        out_layers.append({"layer": i, "attention": layer_role(i, spec_i),
                           "answer": [round(x, 4) for x in mean[i, 0].tolist()],
                           "other_values": [round(x, 4) for x in mean[i, 1].tolist()],
                           "previous_token": [round(x, 4) for x in mean[i, 2].tolist()],
                           "previous_token_uniform": round(float(uniform[i]) / n_values, 4)})
    amap = {"length": beyond.seq_len, "sequences": int(samples), "pairs": beyond.pairs, "layers": out_layers}
    amap["retrieving_heads"] = [[layer, head] for layer, head in retrieving_heads(amap)]
    return amap


def retrieving_heads(amap: dict[str, Any]) -> list[tuple[int, int]]:
    """(layer, head) of the heads that retrieve by content: at least ``RETRIEVES_AT`` on the
    answer and ``BAG_RATIO`` times the mean on another pair's value."""
    others = max(1, amap["pairs"] - 1)
    return [(l["layer"], h) for l in amap["layers"] for h, (a, o) in enumerate(zip(l["answer"], l["other_values"]))
            if a >= RETRIEVES_AT and a >= BAG_RATIO * o / others]


def format_attention(amap: dict[str, Any]) -> str:
    """The attention map as a table (per layer: its best head on the answer, what that head
    puts on the other values, the strongest previous-token head) and a verdict line."""
    lines = [f"where the heads look ({amap['sequences']} sequences of length {amap['length']}, every query beyond "
             f"the window; per layer the head with most attention on the answer, and the strongest head from each "
             f"pair's value to its key; 'if even' is what attending evenly to every visible token puts there)",
             f"{'layer':>5}  {'attention':<28} {'on the answer':>14} {'on other values':>16} {'previous token':>15}"
             f"  {'if even':>9}"]
    for l in amap["layers"]:
        h = max(range(len(l["answer"])), key=lambda j: l["answer"][j])
        g = max(range(len(l["previous_token"])), key=lambda j: l["previous_token"][j])
        lines.append(f"{'L' + str(l['layer']):>5}  {l['attention']:<28} {l['answer'][h]:>9.2f} (h{h}) "
                     f"{l['other_values'][h]:>16.2f} {l['previous_token'][g]:>10.2f} (h{g})  {l['previous_token_uniform']:>9.2f}")
    heads = retrieving_heads(amap)
    bag = sorted({l["layer"] for l in amap["layers"] for a, o in zip(l["answer"], l["other_values"])
                  if a + o >= RETRIEVES_AT} - {l for l, _ in heads})
    if bag:
        lines.append("spread over the pairs' values (the bag of values, no key matching): "
                     + ", ".join(f"L{l}" for l in bag))
    if heads:
        layers = sorted({l for l, _ in heads})
        lines.append("retrieves by content: " + ", ".join(
            f"L{l} (heads {', '.join(str(h) for k, h in heads if k == l)})" for l in layers))
    else:
        lines.append(f"no head retrieves by content (none puts >= {RETRIEVES_AT} on the answer and {BAG_RATIO:g}x "
                     f"what it puts on another pair's value)")
    return "\n".join(lines)


def evaluate(model, cfg: Any, out_dir: str | Path, lengths: Sequence[int], samples: int = 64, seed: int = 0,
             batch_size: int = 16, names: Optional[dict] = None) -> dict[str, Any]:
    """Score ``model`` at every length, write ``recall.json``, print a table; return the result."""
    from mixtrain.files import atomic_write_text

    if seed < 0:
        raise UserError(f"--seed {seed}: the recall task needs a seed >= 0")
    model.eval()
    by_length, total = {}, torch.zeros(4, dtype=torch.float64)
    spec = amap = None
    for length in lengths:
        spec = spec_for_model(cfg, int(length))
        got = score_length(model, spec, samples, seed, batch_size)
        total += torch.tensor(got.pop("_counts"), dtype=torch.float64)
        by_length[str(int(length))] = got
        if amap is None:  # at the first length (the training length by default)
            amap = attention_map(model, spec, min(samples, ATTENTION_SAMPLES), seed, max(1, batch_size // 2))
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
        "attention": amap,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recall.json", json.dumps(result, indent=2))
    print(format_table(result))
    print(format_attention(amap))
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
