"""Loss by token position on held-out long documents, and validation perplexity.

*Does the model use context beyond its sliding window?* A model that does keeps
lowering its loss as the position grows past the window W; one that only sees the
last W tokens flattens out after W. :func:`position_loss` reports the mean
next-token loss in ``buckets`` equal slices of the context (1/16 each by default).

The held-out documents are the validation documents of the run's corpus (the same
deterministic split as training). Documents of at least ``length + 1`` tokens are
used as they are; when there are too few, the held-out stream (documents joined by
EOS, as in training) is cut into ``length + 1``-token pieces, and the result says so
(``"source": "concatenated"``).

Everything runs through the inference engine's chunked prefill, so a 32K context
never materialises a full score matrix or more than ``chunk`` positions of logits.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


@torch.inference_mode()
def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1, chunk: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy at every position: inputs/targets [N, T] -> [N, T] (float32;
    NaN where the target is -100)."""
    from mixtrain.infer.generate import Engine

    engine = Engine(model, prefill_chunk=chunk)
    N, T = inputs.shape
    out = torch.full((N, T), float("nan"))
    for s in range(0, N, batch_size):
        x = inputs[s : s + batch_size].to(engine.device)
        y = targets[s : s + batch_size].to(engine.device)
        B = x.shape[0]
        if engine.cache is None or engine.cache.batch != B or engine.cache.max_context < T:
            engine.new_cache(B, T)
        engine.cache.reset([0] * B)
        for c in range(0, T, chunk):
            logits = engine.forward(x[:, c : c + chunk], all_logits=True).float()
            tgt = y[:, c : c + chunk]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none")
            ce = ce.view(B, -1).masked_fill(tgt == -100, float("nan"))
            out[s : s + B, c : c + chunk] = ce.cpu()
    engine.cache = None
    return out


def bucket_means(losses: torch.Tensor, buckets: int) -> tuple[list[int], list[float]]:
    """Mean loss (ignoring NaN) in ``buckets`` equal slices of the positions."""
    T = losses.shape[-1]
    edges = [round(i * T / buckets) for i in range(buckets + 1)]
    means = []
    for a, b in zip(edges[:-1], edges[1:]):
        part = losses[..., a:b]
        means.append(float(torch.nanmean(part)) if b > a else float("nan"))
    return edges, means


def held_out_sequences(data_cfg: Any, tokenizer, length: int, max_sequences: int,
                       max_scan_docs: int = 20000) -> tuple[torch.Tensor, str, int]:
    """[N, length + 1] token sequences from the validation documents, and their source
    ("documents": whole documents of at least length + 1 tokens, longest first;
    "concatenated": the held-out stream cut into pieces). At most ``max_scan_docs``
    validation documents are read (large corpora)."""
    import datasets

    from mixtrain.data.corpus import as_data_config, load_documents
    from mixtrain.data.pretrain import held_out_mask

    c = as_data_config(data_cfg)
    docs = load_documents(c)
    if isinstance(docs, datasets.IterableDataset):  # streaming: the first documents stand in
        texts = [row["text"] for _, row in zip(range(max_scan_docs), docs)]
    else:
        n = len(docs)
        val = held_out_mask(c, n, tokenizer) if c.val_fraction > 0 and n > 1 else None  # the shards' val documents
        rows = [i for i in range(n) if val is None or val[i]][:max_scan_docs]
        texts = docs.select(rows)["text"] if rows else []
    need = length + 1
    ids: list[list[int]] = []
    for s in range(0, len(texts), 256):
        ids += tokenizer.encode_batch(list(texts[s : s + 256]))
    long_docs = [x[:need] for x in sorted(ids, key=len, reverse=True) if len(x) >= need][:max_sequences]
    if long_docs:
        # Real long documents answer "is context beyond the window used?"; a stream of
        # unrelated documents does not, so it is only the fallback when there are none.
        if len(long_docs) < max_sequences:
            import warnings

            warnings.warn(f"only {len(long_docs)} held-out documents have {need} tokens or more; "
                          f"loss by position uses those (asked for {max_sequences})")
        return torch.tensor(long_docs, dtype=torch.long), "documents", len(long_docs)
    stream = [t for x in ids for t in x + [tokenizer.eos_id]]
    pieces = [stream[i : i + need] for i in range(0, len(stream) - need + 1, need)][:max_sequences]
    if not pieces:
        from mixtrain.errors import UserError

        raise UserError(
            f"the held-out documents have {len(stream)} tokens, fewer than one sequence of {need}; evaluate "
            f"loss by position at a shorter --ppl-length or raise data.val_fraction"
        )
    return torch.tensor(pieces, dtype=torch.long), "concatenated", len(pieces)


def evaluate(model, cfg: Any, tokenizer, out_dir: Optional[str | Path] = None, *, length: Optional[int] = None,
             sequences: int = 8, buckets: int = 16, val_sequences: int = 32, batch_size: int = 1,
             chunk: int = 1024, names: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
    """Position loss on held-out long documents and validation perplexity at the run's
    ``train.seq_len``; writes ``perplexity.json`` and ``position_loss.png``."""
    from mixtrain.data.corpus import as_data_config
    from mixtrain.data.pretrain import PackedDataset, prepare

    t0 = time.time()
    max_len = int(cfg.model.max_seq_len)
    length = int(length or max_len)
    if length > max_len:
        from mixtrain.errors import UserError

        raise UserError(f"--ppl-length {length} is above the model's model.max_seq_len={max_len}")
    data_cfg = as_data_config(_pretrain_view(cfg.data, tokenizer))
    seqs, source, n_docs = held_out_sequences(data_cfg, tokenizer, length, sequences)
    losses = token_losses(model, seqs[:, :-1], seqs[:, 1:], batch_size=batch_size, chunk=chunk)
    edges, means = bucket_means(losses, buckets)
    window = int(cfg.model.sliding_window)

    seq_len = int(cfg.train.seq_len)
    val: dict[str, Any] = {"seq_len": seq_len}
    prepared = prepare(data_cfg, seq_len, int(cfg.model.vocab_size))  # the run's cache: built at training
    if prepared.num_sequences("val"):
        ds = PackedDataset(prepared.dir, "val", seq_len)
        k = min(len(ds), val_sequences)
        items = [ds[i] for i in range(k)]
        x = torch.stack([it["input_ids"] for it in items])
        y = torch.stack([it["labels"] for it in items])
        vl = token_losses(model, x, y, batch_size=batch_size, chunk=chunk)
        loss = float(torch.nanmean(vl))
        val.update({"loss": loss, "ppl": math.exp(min(loss, 50.0)), "sequences": k})
    result = {
        **(names or {}),
        "position": {
            "length": length,
            "source": source,
            "sequences": n_docs,
            "buckets": buckets,
            "bucket_edges": edges,
            "loss": means,
            "sliding_window": window,
            "first_minus_last": means[0] - means[-1],
        },
        "val": val,
        "seconds": round(time.time() - t0, 1),
    }
    log(format_table(result))
    if out_dir is not None:
        from mixtrain.files import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "perplexity.json", json.dumps(result, indent=2))
        plot(result, out / "position_loss.png")
    return result


def _pretrain_view(data_cfg: Any, tokenizer) -> dict:
    """The run's data settings as plain pretraining data with the run's own tokenizer."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    d["kind"] = "pretrain"
    if getattr(tokenizer, "path", None):
        d["tokenizer"] = str(tokenizer.path)
    return d


def format_table(result: dict) -> str:
    p = result["position"]
    how = "whole held-out documents" if p["source"] == "documents" else "pieces of the held-out stream"
    lines = [f"loss by position ({p['sequences']} sequence(s) of {p['length']} tokens from {how}; "
             f"sliding window {p['sliding_window']})"]
    for a, b, m in zip(p["bucket_edges"][:-1], p["bucket_edges"][1:], p["loss"]):
        lines.append(f"  {a:>7}-{b:<7} {m:.4f}")
    v = result["val"]
    if "loss" in v:
        lines.append(f"validation loss {v['loss']:.4f}  perplexity {v['ppl']:.2f}  ({v['sequences']} x {v['seq_len']} tokens)")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["position"]
    mids = [(a + b) / 2 for a, b in zip(p["bucket_edges"][:-1], p["bucket_edges"][1:])]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(mids, p["loss"], marker="o")
    if p["sliding_window"] < p["length"]:
        ax.axvline(p["sliding_window"], color="gray", ls="--", lw=1, label=f"sliding window {p['sliding_window']}")
        ax.legend()
    ax.set_xlabel("token position")
    ax.set_ylabel("mean next-token loss")
    name = " ".join(str(result[k]) for k in ("name", "layout") if result.get(k))
    ax.set_title(f"loss by position {name}", fontsize=9)
    fig.tight_layout()
    from mixtrain.report import save_figure

    return save_figure(fig, path, dpi=110)
