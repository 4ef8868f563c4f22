"""``mixtrain compare`` for runs of the associative-recall probe (``data=recall``): their
recall within and beyond the sliding window (a column pair) and a bar chart per layout
(``recall.png``). Reads ``<run>/eval/recall.json`` (``mixtrain eval --tasks recall``) or
the last validation in ``result.json``; no torch needed. With the eval, also the layers
that retrieve by content (``retrieves at``: from the eval's attention map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

RECALL_COLUMNS = [("recall_within", "recall d<=W"), ("recall_beyond", "recall d>W"),
                  ("recall_retrieving_layers", "retrieves at")]


def run_recall(run_dir: str | Path, result: Optional[dict] = None) -> dict[str, Any]:
    """A run's recall accuracies for ``mixtrain compare``: ``mixtrain eval --tasks recall``'s
    ``eval/recall.json`` when there is one (its first length: the training length), else the
    last validation (``result.json`` metrics ``val/recall_*``); plus ``recall_chance``
    (1 / pairs) from the run's config. Empty for a run without the task."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {}
    path = run_dir / "eval" / "recall.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            first = next(iter(data["by_length"].values()))
            out = {"recall_within": first.get("recall_within"), "recall_beyond": first.get("recall_beyond"),
                   "recall_chance": data.get("chance"), "recall_source": "eval"}
            heads = (data.get("attention") or {}).get("retrieving_heads")
            if heads is not None:  # the layers with a head that retrieves by content (eval's attention map)
                out["recall_retrieving_layers"] = " ".join(f"L{l}" for l in sorted({l for l, _ in heads})) or "none"
        except (ValueError, KeyError, StopIteration, AttributeError):
            out = {}
    if not out:
        if result is None and (run_dir / "result.json").is_file():
            try:
                result = json.loads((run_dir / "result.json").read_text())
            except ValueError:
                result = None
        metrics = (result or {}).get("metrics") or {}
        if "val/recall_beyond" not in metrics and (run_dir / "csv" / "metrics.csv").is_file():
            from mixtrain.report.logs import read_metrics_csv  # a run still training: its last validation

            curves = read_metrics_csv(run_dir / "csv" / "metrics.csv")
            metrics = {k: curves[k][-1][1] for k in ("val/recall_within", "val/recall_beyond") if curves.get(k)}
        if "val/recall_beyond" in metrics or "val/recall_within" in metrics:
            out = {"recall_within": metrics.get("val/recall_within"), "recall_beyond": metrics.get("val/recall_beyond"),
                   "recall_source": "validation"}
    if out:  # the layout recipe the run chose (layout=ma_pairs_6 names a custom layout better than "custom")
        try:
            chosen = [o.split("=", 1)[1] for o in (run_dir / ".hydra" / "overrides.yaml").read_text().split()
                      if o.startswith("layout=")]
            out["recall_label"] = chosen[-1] if chosen else None
        except OSError:
            out["recall_label"] = None
    if out and out.get("recall_chance") is None:
        try:
            from omegaconf import OmegaConf

            pairs = OmegaConf.load(run_dir / "config.yaml").data.get("recall_pairs")
            out["recall_chance"] = 1.0 / pairs if pairs else None
        except Exception:  # noqa: BLE001 - no readable config: no chance line
            out["recall_chance"] = None
    return out


def plot_recall(records: list[dict[str, Any]], path: str | Path) -> Optional[Path]:
    """Bars per run (labelled by layout): recall within the window and beyond it, with the
    level of a model that knows the values but not which key each belongs to (1 / pairs)."""
    rs = [r for r in records if r.get("recall_beyond") is not None or r.get("recall_within") is not None]
    if not rs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixtrain.report.format import save_figure

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rs) + 2), 4.5))
    xs = range(len(rs))
    w = 0.38
    within = [r.get("recall_within") or 0.0 for r in rs]
    beyond = [r.get("recall_beyond") or 0.0 for r in rs]
    ax.bar([x - w / 2 for x in xs], within, w, label="within the window (d <= W)", color="#9ecae1")
    b = ax.bar([x + w / 2 for x in xs], beyond, w, label="beyond the window (d > W)", color="#08519c")
    for rect, v in zip(b, beyond):
        ax.annotate(f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    chances = {r.get("recall_chance") for r in rs if r.get("recall_chance")}
    for c in sorted(chances):  # named in the legend: a label on the line would sit under a bar
        ax.axhline(c, color="gray", ls="--", lw=1, label=f"1 / pairs = {c:.3f} (values known, keys not)")
    labels = [str(r.get("recall_label") or r.get("layout") or r.get("run")) for r in rs]
    if len(set(labels)) < len(labels):
        labels = [f"{r.get('run')}\n({r.get('layout')})" for r in rs]
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("recall accuracy")
    ax.set_title("Associative recall by query-to-pair distance", pad=28)
    # Above the axes, so no bar (1.00 is common) and no value label is hidden under it.
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
