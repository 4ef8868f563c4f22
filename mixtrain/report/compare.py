"""``mixtrain compare``: find runs (or sweeps of runs), one record per run (config,
accounting, final metrics, eval scores, curves), a text table, compare.csv/.json,
loss_curves.png and quality_vs_kv.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from mixtrain import accounting as acc
from mixtrain.report.format import DEFAULT_KV_CONTEXT, _table, human_bytes, human_count, save_figure
from mixtrain.report.recall import RECALL_COLUMNS, plot_recall, run_recall
from mixtrain.rundir import RunDir
from mixtrain.report.logs import (
    _float,
    read_eval_scores,
    read_eval_skipped,
    read_harness_scores,
    read_metrics_csv,
    read_wandb_history,
)


def _job_order(d: "Path") -> tuple:
    """Sweep points in job order (``2-...`` before ``10-...``), then by path."""
    head = d.name.split("-", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, str(d))


def find_runs(paths: Iterable[Any]) -> list["Path"]:
    """Run directories among ``paths``: each a run directory (config.yaml plus
    checkpoints, logs or result.json), or a folder (a sweep) searched for them."""
    from pathlib import Path

    from mixtrain.errors import UserError

    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such run or sweep directory")
        if RunDir.is_run_dir(p):
            runs.append(p)
            continue
        marks = [*p.rglob("config.yaml"), *p.rglob("result.json")]
        found = sorted({c.parent for c in marks if RunDir.is_run_dir(c.parent)}, key=_job_order)
        # Not the copies inside a run (.hydra/, export/).
        found = [d for d in found if not any(o != d and o in d.parents for o in found)]
        if not found:
            raise UserError(f"{p}: no runs found (a run directory holds config.yaml and checkpoints/ or logs)")
        runs += found
    return list(dict.fromkeys(r.resolve() for r in runs))


def _median(values: list[float]) -> Optional[float]:
    import statistics

    return statistics.median(values) if values else None


def run_record(run_dir: "Path") -> dict[str, Any]:
    """One row of ``mixtrain compare``: the run's config, accounting and final metrics,
    plus its curves (``curves``: metric -> [(step, value)]) for plotting."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from mixtrain.config import MixtrainConfig
    from mixtrain.layouts import build_layout

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # a point that failed before it started
        res = json.loads((run_dir / "result.json").read_text())
        chosen = dict(o.split("=", 1) for o in res.get("overrides", []) if "=" in o)
        return {"run": run_dir.name, "run_dir": str(run_dir), "status": res.get("status", "unknown"),
                "error": res.get("error"), "layout": chosen.get("layout"), "model": chosen.get("model"),
                "tokens_per_step": 1, "eval": {}, "curves": {}}
    raw = OmegaConf.load(run_dir / "config.yaml")
    try:  # defaults for keys an older run's config lacks
        cfg = OmegaConf.merge(OmegaConf.structured(MixtrainConfig), raw)
    except Exception:  # noqa: BLE001 - keys a newer schema dropped
        cfg = raw
    rec: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "model": cfg.model.name}
    try:
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
        pc = acc.param_counts(cfg.model, layout)
        rec.update(
            layout=layout.name,
            params_total=pc.total,
            params_active=pc.active,
            kv_bytes_per_token_32k=acc.kv_bytes_per_token(cfg.model, layout, DEFAULT_KV_CONTEXT),
        )
    except Exception as e:  # noqa: BLE001 - a run whose layout no longer builds still compares
        rec.update(layout=str(cfg.layout.get("preset") or "custom"), layout_error=str(e))
    result: dict[str, Any] = {}
    if (run_dir / "result.json").is_file():
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except ValueError:
            result = {}
    rec["status"] = result.get("status", "unknown")
    if result.get("error"):
        rec["error"] = result["error"]

    csv_path = run_dir / "csv" / "metrics.csv"
    curves = read_metrics_csv(csv_path) if csv_path.is_file() else read_wandb_history(run_dir)
    train_loss, val_loss = curves.get("train/loss", []), curves.get("val/loss", [])
    rec["steps"] = max((s for c in curves.values() for s, _ in c), default=result.get("steps"))
    rec["final_train_loss"] = train_loss[-1][1] if train_loss else _float(result.get("train_loss"))
    rec["final_val_loss"] = val_loss[-1][1] if val_loss else _float(result.get("val_loss"))
    rec["best_val_loss"] = min(v for _, v in val_loss) if val_loss else rec["final_val_loss"]
    rec["tokens_per_s"] = _median([v for _, v in curves.get("perf/tokens_per_s", [])])
    rec["mfu"] = _median([v for _, v in curves.get("perf/mfu", [])])
    rec["tokens_per_step"] = int(cfg.train.global_batch_tokens)
    speed = result.get("throughput") if isinstance(result.get("throughput"), dict) else {}
    for key in ("step_time_median_s", "step_time_min_s", "step_time_max_s", "load_avg_1m_start",
                "load_avg_1m_end", "cpu_count"):
        rec[key] = speed.get(key)
    rec["eval"] = read_eval_scores(run_dir)
    rec["eval_skipped"] = read_eval_skipped(run_dir)
    rec["harness"] = read_harness_scores(run_dir)  # lm-evaluation-harness: task/metric -> value
    rec.update(run_recall(run_dir, result))  # data=recall runs: recall_within / recall_beyond
    rec["curves"] = {k: curves[k] for k in ("train/loss", "val/loss") if k in curves}
    return rec


COMPARE_COLUMNS = [
    ("run", "run"), ("layout", "layout"), ("model", "model"), ("status", "status"),
    ("params_total", "params"), ("params_active", "active"), ("kv_bytes_per_token_32k", "KV B/tok@32K"),
    ("final_train_loss", "train loss"), ("final_val_loss", "val loss"), ("best_val_loss", "best val"),
    ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
]


def compare_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat rows (for CSV/JSON) with one column per eval task present in any run, and one per
    lm-evaluation-harness task/metric (``harness/<task>/<metric>``)."""
    tasks = sorted({t for r in records for t in r.get("eval", {}) if t != "average"})
    has_avg = any("average" in r.get("eval", {}) for r in records)
    harness = sorted({t for r in records for t in r.get("harness", {})})
    recall = [k for k, _ in RECALL_COLUMNS] if any(r.get("recall_beyond") is not None for r in records) else []
    keys = ([k for k, _ in COMPARE_COLUMNS] + recall + [f"eval/{t}" for t in tasks]
            + (["eval/average"] if has_avg else []) + [f"harness/{t}" for t in harness])
    rows = []
    for r in records:
        row = {k: r.get(k) for k, _ in COMPARE_COLUMNS + RECALL_COLUMNS if k in keys}
        for t in tasks + (["average"] if has_avg else []):
            row[f"eval/{t}"] = r.get("eval", {}).get(t)
        for t in harness:
            row[f"harness/{t}"] = r.get("harness", {}).get(t)
        rows.append(row)
    return keys, rows


def format_compare(records: list[dict[str, Any]]) -> str:
    keys, rows = compare_rows(records)
    headers = dict(COMPARE_COLUMNS + RECALL_COLUMNS)

    def cell(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if k in ("params_total", "params_active"):
            return human_count(v)
        if k == "kv_bytes_per_token_32k":
            return human_bytes(v)
        if k == "tokens_per_s":
            return human_count(v)
        if k == "mfu":
            return f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    timed = [r for r in records if r.get("tokens_per_s") is not None]
    if len(timed) > 1:  # separate runs: the figures are not like-for-like
        headers = {**headers, "tokens_per_s": "tokens/s*", "mfu": "MFU*"}
    lines = _table([headers.get(k, k) for k in keys], [[cell(k, row[k]) for k in keys] for row in rows])
    if len(timed) > 1:
        lines += ["", "* throughput of separate runs, not like-for-like: each was measured under its own machine "
                      "load (below); for speed ratios between layouts use `mixtrain bench train` (one process, "
                      "same conditions)."]
        lines += [f"  {r['run']}: {throughput_spread(r)}" for r in timed]
    notes = [f"  {r['run']}: {r['error']}" for r in records if r.get("error")]
    skips = [f"  {r['run']}: {', '.join(r['eval_skipped'])}" for r in records if r.get("eval_skipped")]
    return "\n".join(
        lines
        + (["", "failed:", *notes] if notes else [])
        + (["", "eval cells skipped (prompt longer than the length; its eval average is over the cells that ran):",
            *skips] if skips else [])
    ) + "\n"


def throughput_spread(r: dict[str, Any]) -> str:
    """``step 0.21 s median (0.19-0.35), load 3.1 -> 4.0 on 2 CPUs`` (what is known)."""
    parts = []
    if r.get("step_time_median_s") is not None:
        parts.append(f"step {r['step_time_median_s']:.3g} s median ({r['step_time_min_s']:.3g}-{r['step_time_max_s']:.3g})")
    if r.get("load_avg_1m_start") is not None:
        parts.append(f"load average {r['load_avg_1m_start']:g} -> {r['load_avg_1m_end']:g}"
                     + (f" on {r['cpu_count']} CPUs" if r.get("cpu_count") else ""))
    return ", ".join(parts) or "no step-time record (an older run)"


def plot_loss_curves(records: list[dict[str, Any]], path: Any, x: str = "tokens") -> None:
    """Validation (solid) and training (faint) loss against tokens or steps, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    # Wide enough for the curves, with one legend row per run beside them (not over them).
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    handles = []
    for i, r in enumerate(records):
        c, m = colors[i % len(colors)], markers[i % len(markers)]
        scale = r["tokens_per_step"] if x == "tokens" else 1
        # steps are 0-based: the loss after optimizer step s has seen (s + 1) batches
        pts = r["curves"].get("train/loss", [])
        if pts:
            ax.plot([(s + 1) * scale for s, _ in pts], [v for _, v in pts], color=c, lw=1, alpha=0.4)
        pts = r["curves"].get("val/loss", [])
        if pts:  # hollow markers of different shapes: validation points at the same place stay visible
            ax.plot([(s + 1) * scale for s, _ in pts], [v for _, v in pts], color=c, lw=2, marker=m, ms=8,
                    mfc="none", mew=1.5)
        handles.append(Line2D([], [], color=c, lw=2, marker=m, mfc="none", ms=7, label=run_label(r)))
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves (validation: markers and solid line, training: faint line)", fontsize=10)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    save_figure(fig, path)


def run_label(r: dict[str, Any]) -> str:
    """A run's name in plots, with its layout when the name does not already say it
    (several runs of one layout, a stage chain or seeds, stay apart)."""
    layout = r.get("layout")
    return f"{r['run']} ({layout})" if layout and str(layout) not in r["run"] else r["run"]


def plot_quality_vs_kv(records: list[dict[str, Any]], path: Any) -> None:
    """Final validation loss (and the eval average, where present) against KV-cache bytes
    per token at 32K, log x: the CLA paper's accuracy/memory Pareto view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in records if r.get("kv_bytes_per_token_32k") and r.get("final_val_loss") is not None]
    evals = [r for r in records if r.get("kv_bytes_per_token_32k") and "average" in r.get("eval", {})]
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 6.5, 4.5), squeeze=False)
    panels = [(axes[0][0], pts, lambda r: r["final_val_loss"], "final validation loss (lower is better)")]
    if evals:
        panels.append((axes[0][1], evals, lambda r: r["eval"]["average"], "eval average (higher is better)"))
    for ax, rs, y, ylabel in panels:
        # Labels of neighbouring points (in x order) sit at three heights, so labels of points
        # at one loss side by side do not run into each other; points at one place stack.
        span = (max(y(r) for r in rs) - min(y(r) for r in rs)) if rs else 0
        order = sorted(rs, key=lambda r: r["kv_bytes_per_token_32k"])
        seen: dict[tuple, int] = {}
        for i, r in enumerate(order):
            at = (r["kv_bytes_per_token_32k"], y(r))
            key = (round(at[0], 3), round(at[1], 4))
            k = seen[key] = seen.get(key, -1) + 1
            level = (i % 3) if span < 1e-9 or len(rs) > 3 else 0
            ax.scatter(*at, s=40)
            ax.annotate(run_label(r), at, textcoords="offset points", xytext=(5, 5 + 11 * (k + level)), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.15)  # room for the labels right of and above the points
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV cache bytes per token at 32K context (bf16, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title("Quality against KV memory" + (": validation loss" if ax is axes[0][0] else ": eval average"),
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def compare(paths: Iterable[Any], out: Any = None, x: str = "tokens", plots: bool = True) -> dict[str, Any]:
    """Read runs (or sweeps of runs), write compare.csv, compare.json and the plots to
    ``out`` (default: the sweep directory when one folder of runs is given, else the
    current directory). Returns the records, the text table and the written paths."""
    import csv
    import json
    from pathlib import Path

    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    records = [run_record(r) for r in runs]
    if out is None:
        out = paths[0] if len(paths) == 1 and not RunDir.is_run_dir(paths[0]) else Path.cwd()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys, rows = compare_rows(records)
    files = {"csv": out / "compare.csv", "json": out / "compare.json"}
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    files["json"].write_text(json.dumps({"runs": records}, indent=2, default=str))
    if plots:
        files["loss_curves"] = out / "loss_curves.png"
        files["quality_vs_kv"] = out / "quality_vs_kv.png"
        plot_loss_curves(records, files["loss_curves"], x=x)
        plot_quality_vs_kv(records, files["quality_vs_kv"])
        if any(r.get("recall_beyond") is not None for r in records):  # one bar pair per layout
            files["recall"] = plot_recall(records, out / "recall.png")
    return {"records": records, "table": format_compare(records), "files": files}


def _compare_main(args: Any) -> int:
    res = compare(args.runs, out=args.out, x=args.x, plots=not args.no_plots)
    print(res["table"], end="")
    print("\nwrote " + ", ".join(str(p) for p in res["files"].values()))
    return 0  # failed points are listed in the table; comparing them is not an error


def register_compare(subparsers: Any) -> None:
    """``mixtrain compare RUNS...`` (see :func:`compare`)."""
    p = subparsers.add_parser(
        "compare",
        help="tables and plots across runs or a sweep",
        description="Compare runs: a table (final train/val loss, tokens/s, MFU, KV bytes per token at 32K, "
        "parameters, eval scores) on stdout, compare.csv/compare.json, loss_curves.png and quality_vs_kv.png.",
    )
    p.add_argument("runs", nargs="+", help="sweep directories, run directories, or a mix")
    p.add_argument("--out", default=None, help="output folder (default: the sweep directory, else the current one)")
    p.add_argument("--x", choices=("tokens", "step"), default="tokens", help="x axis of the loss curves")
    p.add_argument("--no-plots", action="store_true", help="write only the table files")
    p.set_defaults(func=_compare_main)
