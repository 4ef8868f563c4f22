"""Formatting: human units (bytes, counts, FLOPs), text tables, the layout report that
``mixtrain layout`` prints (:func:`layout_summary`, :func:`format_layout_summary`), and
:func:`save_figure` (atomic PNG writes for every plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from mixtrain import accounting as acc
from mixtrain.config import ModelConfig
from mixtrain.layouts import Layout

DEFAULT_CONTEXTS = (4096, 32768, 131072)
DEFAULT_KV_CONTEXT = 32768


def human_bytes(n: float) -> str:
    """Binary units: 512 B, 36.0 KiB, 1.13 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n:.0f} B" if n == int(n) else f"{n:.1f} B"
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def human_count(n: float) -> str:
    """Decimal units with 3 significant figures: 5.21B, 1.64B, 141M, 75.3K, 512."""
    n = float(n)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def human_flops(n: float) -> str:
    """FLOP counts: 9.29 GFLOP, 1.33 MFLOP."""
    n = float(n)
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}FLOP"
    return f"{n:.0f} FLOP"


def _context_label(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 and t >= 1024 else str(t)


def layout_summary(
    cfg: ModelConfig,
    layout: Layout,
    contexts: Iterable[int] = DEFAULT_CONTEXTS,
    context: Optional[int] = None,
) -> dict[str, Any]:
    """Everything a user needs to judge a layout, as a JSON-able dict.

    ``kv_bytes_per_token`` (and the other top-level KV numbers) are in bf16 at
    ``context`` if given, else at 32768. ``contexts`` lists one row per context
    (``context`` is added if missing). FLOPs are per token at ``cfg.max_seq_len``.
    """
    kv_context = int(context) if context is not None else DEFAULT_KV_CONTEXT
    ctxs = [int(t) for t in contexts]
    if context is not None and kv_context not in ctxs:
        ctxs.append(kv_context)
    std = acc.standard_layout(layout.n_layers)
    pc = acc.param_counts(cfg, layout)
    caches = acc.kv_cache_layers(cfg, layout)

    rows = []
    for t in ctxs:
        mine = acc.kv_bytes_per_sequence(cfg, layout, t)
        ref = acc.kv_bytes_per_sequence(cfg, std, t)
        rows.append(
            {
                "context": t,
                "kv_bytes_per_token": mine / t,
                "kv_bytes_per_sequence": mine,
                "standard_kv_bytes_per_token": ref / t,
                "standard_kv_bytes_per_sequence": ref,
                "ratio_vs_standard": ref / mine if mine else None,
                "stored_tokens": acc.kv_stored_tokens(layout, t),
            }
        )

    layers = [
        {
            "index": i,
            "kind": s.kind,
            "window": s.window if s.kind == "sliding" else None,
            "kv_source": s.kv_source,
            "attn_source": s.attn_source,
            "producer": s.kv_source == i,
        }
        for i, s in enumerate(layout.layers)
    ]
    kv_seq = acc.kv_bytes_per_sequence(cfg, layout, kv_context)
    std_seq = acc.kv_bytes_per_sequence(cfg, std, kv_context)
    seq_len = int(cfg.max_seq_len)
    return {
        "layout": layout.name,
        "model": cfg.name,
        "n_layers": layout.n_layers,
        "layers": layers,
        "kv_caches": len(caches),
        "kv_caches_global": sum(1 for c in caches if c.kind == "global"),
        "kv_caches_sliding": sum(1 for c in caches if c.kind == "sliding"),
        "kv_caches_v_only": sum(1 for c in caches if not c.has_k),
        "kv_dtype": "bf16",
        "kv_context": kv_context,
        "kv_bytes_per_token": kv_seq / kv_context,
        "kv_bytes_per_sequence": kv_seq,
        "standard_kv_bytes_per_token": std_seq / kv_context,
        "kv_ratio_vs_standard": std_seq / kv_seq if kv_seq else None,
        "contexts": rows,
        "params_total": pc.total,
        "params_active": pc.active,
        "params": pc.as_dict(),
        "flops_seq_len": seq_len,
        "train_flops_per_token": acc.train_flops_per_token(cfg, layout, seq_len),
        "forward_flops_per_token": acc.forward_flops_per_token(cfg, layout, seq_len),
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        return "  ".join([first, *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))]).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _ratio_text(ratio: Optional[float]) -> str:
    if ratio is None:
        return "n/a"
    if abs(ratio - 1.0) < 5e-4:
        return "same"
    if ratio > 1:
        return f"{ratio:.1f}x smaller"
    return f"{1 / ratio:.1f}x larger"


def format_layout_summary(summary: dict[str, Any], diagram_text: str = "") -> str:
    """The text ``mixtrain layout`` prints: diagram, KV table, parameter counts."""
    out: list[str] = []
    out.append(
        f"Layout {summary['layout']!r} on model {summary['model']!r}: "
        f"{summary['n_layers']} layers, {summary['kv_caches']} KV caches "
        f"({summary['kv_caches_global']} global, {summary['kv_caches_sliding']} sliding"
        + (f", {summary['kv_caches_v_only']} V-only" if summary.get("kv_caches_v_only") else "")
        + ")"
    )
    if diagram_text:
        out += ["", diagram_text.rstrip("\n")]

    out += ["", f"KV cache ({summary.get('kv_dtype', 'bf16')}, per sequence) vs the standard layout:"]
    rows = []
    for r in summary["contexts"]:
        rows.append(
            [
                _context_label(r["context"]),
                human_bytes(r["kv_bytes_per_token"]),
                human_bytes(r["kv_bytes_per_sequence"]),
                human_bytes(r["standard_kv_bytes_per_token"]),
                human_bytes(r["standard_kv_bytes_per_sequence"]),
                _ratio_text(r["ratio_vs_standard"]),
            ]
        )
    out += _table(["context", "bytes/token", "per sequence", "std bytes/token", "std per sequence", "vs standard"], rows)

    p = summary["params"]
    out += ["", "Parameters:"]
    out += _table(
        ["", "total", "active"],
        [
            ["with embeddings", human_count(p["total"]), human_count(p["active"])],
            ["without embeddings", human_count(p["total_non_embedding"]), human_count(p["active_non_embedding"])],
        ],
    )
    parts = ", ".join(
        f"{k} {human_count(p[k])}" for k in ("attention", "mlp", "router", "norms", "embedding") if p.get(k)
    )
    out.append(f"  parts: {parts}")
    out += [
        "",
        f"FLOPs per token at seq_len {summary['flops_seq_len']}: "
        f"train {human_flops(summary['train_flops_per_token'])}, "
        f"forward {human_flops(summary['forward_flops_per_token'])}",
    ]
    return "\n".join(out) + "\n"


def save_figure(fig, path: Any, dpi: int = 120) -> "Path":
    """Write a matplotlib figure atomically (a temporary file renamed into place) and
    close it: an interrupted run never leaves half a PNG."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", pad_inches=0.15)  # titles, labels, legends inside
    plt.close(fig)
    tmp.replace(path)
    return path
