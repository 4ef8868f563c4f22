"""What ``mixtrain eval`` writes and shows of a RULER result: the tasks x lengths table,
the heatmap (PNG) and the W&B log. A skipped cell (prompt longer than the length) is
"-" in the table, blank in the heatmap, absent from W&B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence


def write_json(path: Path, obj: Any) -> None:
    """JSON, written atomically."""
    from mixtrain.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None (None if there are none)."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def format_table(result: dict) -> str:
    """Tasks x lengths; a skipped cell (prompt longer than the length) shows "-", and the
    averages are over the cells that ran (a note says so when any was skipped)."""
    lengths = [str(x) for x in result["lengths"]]
    tasks = result["tasks"]
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    head = ["task"] + [_k(int(x)) for x in lengths] + ["mean"]
    rows = [[t] + [cell(result["by_length"][L].get(t)) for L in lengths] + [cell(result["scores"].get(t))]
            for t in tasks]
    avg = [mean([result["by_length"][L].get(t) for t in tasks]) for L in lengths]
    rows.append(["average"] + [cell(a) for a in avg] + [cell(result["average"])])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = f"RULER (offline) {result.get('name') or result.get('model') or ''} {result.get('layout') or ''}".rstrip()
    out = [title, line(head), "-" * len(line(head))] + [line(r) for r in rows]
    skipped = result.get("skipped") or []
    if skipped:
        total, gone = len(tasks) * len(lengths), []
        for L in lengths:
            names = [s["task"] for s in skipped if str(s["length"]) == L]
            if names:
                gone.append(f"{_k(int(L))}: " + (f"all {len(tasks)} tasks" if len(names) == len(tasks) and
                                                 len(tasks) > 1 else ", ".join(names)))
        ran = ", ".join(f"{_k(int(L))}: {sum(result['by_length'][L].get(t) is not None for t in tasks)} of "
                        f"{len(tasks)} tasks" for L in lengths)
        out.append("skipped, prompt longer than the length (-): " + "; ".join(gone))
        out.append(f"averages are over the {total - len(skipped)} of {total} (task, length) cells that ran ({ran})")
    return "\n".join(out)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def heatmap_grid(result: dict):
    """Scores as a tasks x lengths float array, NaN where a cell was skipped."""
    import numpy as np

    lengths = [str(x) for x in result["lengths"]]
    return np.array([[np.nan if result["by_length"][L].get(t) is None else float(result["by_length"][L][t])
                      for L in lengths] for t in result["tasks"]], dtype=float)


def heatmap(result: dict, path: str | Path) -> Path:
    """PNG heatmap of task x length scores; a skipped cell is blank, marked "-"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, lengths = result["tasks"], [str(x) for x in result["lengths"]]
    grid = heatmap_grid(result)
    # Cells at least ~1 inch wide (one column is not a sliver); the title on its own lines.
    fig, ax = plt.subplots(figsize=(2.6 + 1.0 * max(2, len(lengths)), 1.4 + 0.38 * len(tasks)))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(int(x)) for x in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for r in range(len(tasks)):
        for c in range(len(lengths)):
            ax.text(c, r, "-" if np.isnan(grid[r, c]) else f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    name = " ".join(str(result[k]) for k in ("name", "layout") if result.get(k))
    n_skipped = len(result.get("skipped") or [])
    if n_skipped:  # "-": the prompt is longer than the length
        ax.set_title(f"RULER {name}\navg {result['average']:.2f} over {grid.size - n_skipped} of {grid.size} "
                     f"cells\n(-: skipped, prompt too long)", fontsize=8)
    else:
        ax.set_title(f"RULER {name}\navg {result['average']:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, shrink=0.6, label="score")
    fig.tight_layout()
    from mixtrain.report import save_figure

    return save_figure(fig, path, dpi=110)


def log_to_wandb(result: dict, image: Optional[Path], force: Optional[bool] = None, prefix: str = "ruler") -> bool:
    """Log scores (and the heatmap) to W&B when a run is active, or start one (offline
    unless configured) when ``force``. Returns whether anything was logged."""
    if force is False:
        return False
    try:
        import wandb
    except ImportError:
        return False
    started = False
    if wandb.run is None:
        if not force:
            return False
        import os

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        wandb.init(project=os.environ.get("WANDB_PROJECT", "mixtrain"), job_type="eval", mode=mode,
                   name=f"eval-{result.get('name') or 'model'}",
                   dir=str(image.parent) if image else None, config={k: result.get(k) for k in ("name", "layout", "model")})
        started = True
    data = {f"{prefix}/{t}": s for t, s in result["scores"].items() if s is not None}  # not the skipped
    data[f"{prefix}/average"] = result["average"]
    for L, row in result["by_length"].items():
        for t, s in row.items():
            if s is not None:
                data[f"{prefix}/{L}/{t}"] = s
    table = wandb.Table(columns=["task"] + [str(x) for x in result["lengths"]],
                        data=[[t] + [result["by_length"][str(L)][t] for L in result["lengths"]] for t in result["tasks"]])
    data[f"{prefix}/table"] = table
    if image is not None and Path(image).is_file():
        data[f"{prefix}/heatmap"] = wandb.Image(str(image))
    wandb.log(data)
    if started:
        wandb.finish()
    return True
