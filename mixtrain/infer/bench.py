"""``mixtrain bench infer``: KV memory, batch capacity and throughput per layout, measured
in one run on one device (random weights).

For each layout (the first is the baseline every ratio refers to):

- ``kv_bytes_per_token``: storage of a real :class:`~mixtrain.infer.cache.KVCache` for
  one sequence at ``context``, divided by ``context``; ``accounting_bytes_per_token``
  from :func:`mixtrain.accounting.kv_bytes_per_sequence`; their ratio (exactly 1).
- ``max_batch_arithmetic``: sequences of ``context`` tokens whose KV cache fits the
  budget by the accounting (``--memory-budget`` is for the KV cache alone; with
  ``--include-weights``, the default on GPU, it is the whole memory: the weights and an
  estimate of the decode activations, ``activation_bytes_per_seq`` per row (fp32 logits
  [B, V] plus a few [B, d_model] / [B, ffn] buffers and the attention scores), come out
  of it first).
- ``max_batch``: on GPU the batch *verified* to fit (``max_batch_verified``): a cache
  of that batch is allocated and one decode step at full context is run, backing off
  by 10% on an out-of-memory error (or, with ``--include-weights``, on a peak above
  the budget). On CPU nothing is verified: ``max_batch`` is the arithmetic fit
  (``fit_method`` "KV budget"). ``tokens_fit`` = max_batch x context.
- ``prefill_tok_s``: chunked prefill of ``prefill_batch`` prompts of ``prefill_len``.
- ``decode_tok_s``: decode steps at ``decode_batch = min(max_batch, --max-batch)`` rows
  whose cache already holds ``context - decode_steps`` tokens. The cache is filled
  synthetically (its values do not change the time: every step reads every slot), so
  paper-scale numbers do not need minutes of prefill per layout.
- ``peak_mem_bytes``: ``torch.cuda.max_memory_allocated`` during the decode
  measurement on GPU; on CPU the cache plus the weights.
- ``attn_bytes_per_step`` / ``attn_bw_GBs``: KV bytes that the attention of all layers
  reads in one decode step (every layer reads its, possibly shared, cache; a Shared
  Attention layer reads V only) and that divided by the time of the attention calls
  alone; ``step_bw_GBs`` uses the whole step's time.

Outputs: a table on stdout, ``bench_infer.json`` and ``kv_memory.png`` (KV bytes per
sequence against context per layout: accounting lines, measured points).
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mixtrain.accounting import kv_bytes_per_sequence, param_counts
from mixtrain.devices import DTYPES, resolve_device, resolve_dtype, synchronize, time_per_call
from mixtrain.errors import UserError
from mixtrain.report import human_bytes, save_figure

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'1GiB', '512MiB', '80GB', '1.5e9' -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read a memory size from {text!r}: use e.g. 1GiB, 512MiB, 80GB or 2e9")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:  # "1.2.3"
        raise UserError(f"cannot read a memory size from {text!r}: use e.g. 1GiB, 512MiB, 80GB or 2e9") from None


def build_random_model(overrides: Sequence[str], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Compose a recipe (as ``mixtrain train`` would) and build its model with random
    weights on ``device`` in ``dtype``. Returns (model, composed cfg)."""
    from mixtrain.config import compose
    from mixtrain.layouts import build_layout
    from mixtrain.model import build_model

    cfg = compose(list(overrides))
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    model = build_model(cfg.model, layout, device=device, seed=seed).to(dtype)
    model.reset_rope()  # RoPE tables stay fp32
    return model.eval(), cfg


def attention_bytes_per_step(cache, batch: int, length: int) -> int:
    """KV bytes the attention of every layer reads in one decode step at ``length`` cached
    columns (consumers read their producer's cache; Shared Attention layers read V only)."""
    layout = cache.layout
    elem = cache.v[next(iter(cache.v))].element_size()
    per_tok = cache.v[next(iter(cache.v))].shape[1] * cache.v[next(iter(cache.v))].shape[3] * elem
    total = 0
    for i, spec in enumerate(layout.layers):
        p = spec.kv_source
        S = min(length, cache.capacity[p])
        total += S * per_tok * (1 if spec.attn_source is not None else 2)
    return total * batch


def _attention_only_time(engine, steps: int) -> float:
    """Seconds per decode step spent in the attention kernels alone (same shapes, random q)."""
    from mixtrain.model.attention import apply_probs, explicit_attention, sdpa_attention

    cache, cfg, layout = engine.cache, engine.cfg, engine.layout
    B, L = cache.batch, cache.length
    q = torch.randn(B, int(cfg.n_heads), 1, int(cfg.head_dim), device=engine.device, dtype=engine.dtype)
    views = {}
    for c in cache.layers:
        S = min(L, cache.capacity[c.index])
        views[c.index] = (cache.k[c.index][:, :, :S] if c.has_k else None, cache.v[c.index][:, :, :S])
    ones = {S: torch.ones(1, 1, 1, S, dtype=torch.bool, device=engine.device) for S in {v[1].shape[2] for v in views.values()}}

    def run():
        probs = {}
        for i, spec in enumerate(layout.layers):
            K, V = views[spec.kv_source]
            if spec.attn_source is not None:
                apply_probs(probs[spec.attn_source], V)
            elif i in engine.prob_sources:
                _, probs[i] = explicit_attention(q, K, V, ones[V.shape[2]])
            else:
                sdpa_attention(q, K, V, None)  # the decode kernel (every cached key visible)

    return time_per_call(run, engine.device, steps=steps, warmup=1)


def activation_bytes_per_seq(model_cfg: Any, context: int, dtype_bytes: int) -> int:
    """Estimate of the memory one decode step needs per batch row besides the KV cache
    and the weights: the logits [V] in the model's dtype and in fp32 (sampling), a few
    [d_model] residual/norm/projection buffers, the MLP's hidden activations (top-k
    experts with MoE) and fp32 attention scores over ``context`` keys per query head."""
    V, C, H = int(model_cfg.vocab_size), int(model_cfg.d_model), int(model_cfg.n_heads)
    moe = model_cfg.moe
    hidden = int(moe.top_k) * int(moe.expert_hidden) + int(moe.n_experts) if moe else int(model_cfg.ffn_hidden)
    return V * (dtype_bytes + 4) + 8 * C * dtype_bytes + 3 * hidden * dtype_bytes + 2 * H * int(context) * 4


def verified_fit(fits: Callable[[int], bool], batch: int) -> int:
    """The largest batch, starting at ``batch`` and backing off by 10% steps (at least 1),
    for which ``fits(batch)`` is true; 0 when not even one row fits."""
    batch = int(batch)
    while batch >= 1:
        if fits(batch):
            return batch
        batch = min(batch - 1, int(batch * 0.9))
    return 0


def _free(engine, device: torch.device) -> None:
    engine.cache = None
    engine.last_logits = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_fits(engine, batch: int, context: int, device: torch.device, limit_bytes: Optional[int]) -> bool:
    """Allocate a cache of ``batch`` rows of ``context`` columns and run one decode step
    reading all of them (plus the fp32 logits of sampling). False on an out-of-memory
    error, or when the peak memory exceeds ``limit_bytes`` (if given)."""
    _free(engine, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        cache = engine.new_cache(batch, context)
        cache.fill_synthetic(context - 1)
        tok = torch.zeros(batch, dtype=torch.long, device=device)
        engine.step(tok).float().argmax(-1)
        synchronize(device)
    except torch.OutOfMemoryError:
        ok = False
    finally:
        cache = tok = None
        _free(engine, device)
    if ok and limit_bytes is not None and device.type == "cuda":
        ok = torch.cuda.max_memory_allocated(device) <= limit_bytes
    return ok


def bench_layout(overrides: Sequence[str], layout_name: str, *, context: int, budget: int, include_weights: bool,
                 decode_steps: int, max_batch: int, prefill_len: int, prefill_batch: int, prefill_chunk: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    from mixtrain.infer.generate import Engine

    model, cfg = build_random_model(list(overrides) + [f"layout={layout_name}"], device, dtype, seed)
    layout = model.layout
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pc = param_counts(cfg.model, layout)
    acc_seq = kv_bytes_per_sequence(cfg.model, layout, context, dtype_bytes)
    engine = Engine(model, prefill_chunk=prefill_chunk)
    row: dict[str, Any] = {
        "layout": layout_name,
        "caches": layout.summary(),
        "params_total": pc.total,
        "params_active": pc.active,
        "weight_bytes": weight_bytes,
        "context": context,
    }

    # 1. allocated KV bytes of one sequence at `context`, against the accounting
    cache = engine.new_cache(1, context)
    alloc = cache.allocated_bytes()
    engine.cache = cache = None
    row.update(kv_bytes_per_sequence=alloc, accounting_bytes_per_sequence=acc_seq,
               kv_bytes_per_token=alloc / context, accounting_bytes_per_token=acc_seq / context,
               kv_vs_accounting=alloc / acc_seq)

    # 2. capacity within the budget: arithmetic, then (GPU) verified by allocating it
    kv_budget = budget - (weight_bytes if include_weights else 0)
    act_seq = activation_bytes_per_seq(cfg.model, context, dtype_bytes) if include_weights else 0
    fit = max(0, kv_budget // (acc_seq + act_seq))
    verified = None
    if device.type == "cuda" and fit >= 1:
        limit = budget if include_weights else None
        verified = verified_fit(lambda b: _decode_fits(engine, b, context, device, limit), fit)
    fits = int(fit if verified is None else verified)
    row.update(kv_budget_bytes=kv_budget, activation_bytes_per_seq=act_seq, max_batch_arithmetic=int(fit),
               max_batch_verified=verified, max_batch=fits, tokens_fit=fits * context,
               fit_method="KV budget" if verified is None else "verified")

    # 3. prefill throughput
    g = torch.Generator().manual_seed(seed)
    V = int(cfg.model.vocab_size)
    prompts = torch.randint(0, V, (prefill_batch, prefill_len), generator=g).tolist()
    warm = [p[: min(prefill_len, prefill_chunk)] for p in prompts]
    engine.start(warm, max_context=prefill_len)  # warm-up (kernels, allocator)
    dt = min(time_per_call(lambda: engine.start(prompts, max_context=prefill_len), device) for _ in range(repeats))
    row.update(prefill_len=prefill_len, prefill_batch=prefill_batch, prefill_s=dt,
               prefill_tok_s=prefill_batch * prefill_len / dt)
    _free(engine, device)

    # 4. decode at the largest batch (capped) with a cache holding context - decode_steps tokens
    batch = int(min(fits, max_batch))
    row["decode_batch"] = batch
    if batch < 1:
        row.update(decode_tok_s=None, decode_step_s=None, peak_mem_bytes=None, attn_bytes_per_step=None,
                   attn_bw_GBs=None, step_bw_GBs=None, note="no sequence of this context fits the budget")
    else:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = 2
        start = max(1, context - decode_steps - warmup)
        cache = engine.new_cache(batch, context)
        cache.fill_synthetic(start)
        tok = torch.randint(0, V, (batch,), generator=g).to(device)
        for _ in range(min(warmup, context - start)):
            engine.step(tok)
        first = cache.length
        steps = min(decode_steps, context - first)
        L_mid = first + steps // 2

        def decode():
            cache.fill_synthetic(first)
            for _ in range(steps):
                engine.step(tok)

        dt = min(time_per_call(decode, device) for _ in range(repeats))
        step_s = dt / max(steps, 1)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cache.allocated_bytes() + weight_bytes
        attn_bytes = attention_bytes_per_step(cache, batch, L_mid)
        cache.fill_synthetic(L_mid)
        attn_s = min(_attention_only_time(engine, max(2, min(steps, 8))) for _ in range(repeats))
        row.update(decode_steps=steps, decode_step_s=step_s, decode_tok_s=batch / step_s,
                   peak_mem_bytes=int(peak), decode_cache_bytes=cache.allocated_bytes(),
                   attn_bytes_per_step=attn_bytes, attn_step_s=attn_s,
                   attn_bw_GBs=attn_bytes / attn_s / 1e9, step_bw_GBs=attn_bytes / step_s / 1e9)
    engine.cache = None
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against the first row (the baseline), measured in the same run."""
    base = rows[0]
    for r in rows:
        r["kv_reduction_vs_base"] = base["kv_bytes_per_sequence"] / r["kv_bytes_per_sequence"]
        r["tokens_fit_vs_base"] = (r["tokens_fit"] / base["tokens_fit"]) if base["tokens_fit"] else None
        r["prefill_vs_base"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        ok = r.get("decode_tok_s") and base.get("decode_tok_s")
        r["decode_vs_base"] = r["decode_tok_s"] / base["decode_tok_s"] if ok else None


def format_table(result: dict[str, Any]) -> str:
    rows = result["layouts"]
    verified = any(r.get("max_batch_verified") is not None for r in rows)
    fit_cols = ([("fits (arith)", lambda r: str(r["max_batch_arithmetic"])),
                 ("fits (verified)", lambda r: "-" if r.get("max_batch_verified") is None else str(r["max_batch_verified"]))]
                if verified else [("fits (KV budget)", lambda r: str(r["max_batch"]))])
    cols = [
        ("layout", lambda r: r["layout"]),
        ("KV B/tok", lambda r: f"{r['kv_bytes_per_token']:.1f}"),
        ("acct B/tok", lambda r: f"{r['accounting_bytes_per_token']:.1f}"),
        ("alloc/acct", lambda r: f"{r['kv_vs_accounting']:.4f}"),
        ("KV/seq", lambda r: human_bytes(r["kv_bytes_per_sequence"])),
        *fit_cols,
        ("tokens fit", lambda r: f"{r['tokens_fit']:,}"),
        ("x base", lambda r: "-" if r["tokens_fit_vs_base"] is None else f"{r['tokens_fit_vs_base']:.2f}"),
        ("prefill tok/s", lambda r: f"{r['prefill_tok_s']:,.0f}"),
        ("dec batch", lambda r: str(r["decode_batch"])),
        ("decode tok/s", lambda r: "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:,.0f}"),
        ("x base", lambda r: "-" if r["decode_vs_base"] is None else f"{r['decode_vs_base']:.2f}"),
        ("peak mem", lambda r: "-" if r["peak_mem_bytes"] is None else human_bytes(r["peak_mem_bytes"])),
        ("attn GB/s", lambda r: "-" if r.get("attn_bw_GBs") is None else f"{r['attn_bw_GBs']:.1f}"),
    ]
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = result["meta"]
    if m["include_weights"]:
        budget = (f"memory budget {human_bytes(m['memory_budget_bytes'])} (weights and an activation estimate "
                  f"of {human_bytes(rows[0]['activation_bytes_per_seq'])}/sequence taken out)")
    else:
        budget = f"KV budget {human_bytes(m['kv_budget_bytes'])} (KV cache only)"
    fit = ("fits: arithmetic, then verified by allocating the cache and running a decode step"
           if verified else "fits: KV budget arithmetic (not verified on this device)")
    head = (f"bench infer: model={m['model']} on {m['device_name']} ({m['dtype']}), context {m['context']:,}, "
            f"{budget}; {fit}; "
            f"prefill {m['prefill_batch']} x {m['prefill_len']:,} tokens; decode {m['decode_steps']} steps at "
            f"min(fits, {m['max_batch_cap']}) with the cache pre-filled; best of {m['repeats']}; ratios vs {rows[0]['layout']}")
    return head + "\n" + "\n".join(lines)


def plot_kv_memory(result: dict[str, Any], path: Path, model_cfg_by_layout: dict[str, tuple]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["meta"]
    ctx = m["context"]
    hi = max(ctx * 4, 8192)
    xs = sorted({int(round(2 ** e)) for e in [x / 4 for x in range(4 * 6, int(4 * math.log2(hi)) + 1)]} | {ctx})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = ["-", "--", "-.", ":"]
    for n, r in enumerate(result["layouts"]):
        mc, layout = model_cfg_by_layout[r["layout"]]
        ys = [kv_bytes_per_sequence(mc, layout, x, m["dtype_bytes"]) for x in xs]
        (line,) = ax.plot(xs, ys, ls=styles[n % len(styles)], lw=1.6, label=f"{r['layout']} ({layout.summary().replace(' KV caches', '')})")
        ax.plot([ctx], [r["kv_bytes_per_sequence"]], "o", color=line.get_color())
    ax.axvline(ctx, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache bytes per sequence ({m['dtype']})")
    ax.set_title(f"KV memory per sequence, model={m['model']} (lines: accounting, dots: allocated)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def run_bench(overrides: Sequence[str], layouts: Sequence[str], *, context: int, memory_budget: str | int = "auto",
              include_weights: bool = False, decode_steps: int = 16, max_batch: Optional[int] = None,
              prefill_len: Optional[int] = None, prefill_batch: int = 1, prefill_chunk: Optional[int] = None,
              device: str = "auto", dtype: str = "auto", out: Optional[str | Path] = None, seed: int = 0,
              repeats: int = 3, quiet: bool = False) -> dict[str, Any]:
    """Benchmark every layout; write ``bench_infer.json`` and ``kv_memory.png`` into ``out``.
    User mistakes (unknown recipe or layout, bad device or memory size) raise UserError
    before anything is measured."""
    from mixtrain.config import compose
    from mixtrain.layouts import build_layout

    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    dtype = next(k for k, v in DTYPES.items() if v == tdtype)
    dtype_bytes = torch.empty((), dtype=tdtype).element_size()
    shapes = {}
    for name in layouts:  # every recipe composes and builds before any measurement
        cfg = compose(list(overrides) + [f"layout={name}"])
        shapes[name] = (cfg.model, build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window))
    if str(memory_budget) == "auto":
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            budget = int(total * 0.9)  # the weights and an activation estimate come out of it
            include_weights = True
        else:
            budget = 2**30
    else:
        budget = parse_bytes(memory_budget)
    if max_batch is None:
        max_batch = 4096 if dev.type == "cuda" else 8
    prefill_len = min(prefill_len or context, context)
    prefill_chunk = prefill_chunk or (2048 if dev.type == "cuda" else 512)

    rows = []
    for name in layouts:
        t0 = time.perf_counter()
        r = bench_layout(overrides, name, context=context, budget=budget, include_weights=include_weights,
                         decode_steps=decode_steps, max_batch=max_batch, prefill_len=prefill_len,
                         prefill_batch=prefill_batch, prefill_chunk=prefill_chunk, device=dev, dtype=tdtype, seed=seed,
                         repeats=repeats)
        r["bench_s"] = time.perf_counter() - t0
        gc.collect()  # free this layout's model and cache before the next one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(r)
        if not quiet:
            print(f"  {name}: done in {r['bench_s']:.1f}s", flush=True)
    add_ratios(rows)
    model_name = str(shapes[layouts[0]][0].name)
    result = {
        "meta": {
            "model": model_name, "overrides": list(overrides), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": dtype, "dtype_bytes": dtype_bytes, "context": context, "memory_budget_bytes": budget,
            "kv_budget_bytes": rows[0]["kv_budget_bytes"], "include_weights": include_weights,
            "fit_method": ("verified: cache allocated and one decode step run, backing off 10% on OOM"
                           if dev.type == "cuda" else "KV budget: arithmetic (budget // accounted bytes per sequence)"),
            "decode_steps": decode_steps, "max_batch_cap": max_batch, "prefill_len": prefill_len,
            "prefill_batch": prefill_batch, "prefill_chunk": prefill_chunk, "repeats": repeats, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "baseline": layouts[0],
        },
        "layouts": rows,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_infer.json").write_text(json.dumps(result, indent=2))
        plot_kv_memory(result, out / "kv_memory.png", shapes)
        result["files"] = [str(out / "bench_infer.json"), str(out / "kv_memory.png")]
    return result
