"""Reports: tables and plots of what a model and layout cost, and comparisons of runs.

Layout report: :func:`layout_summary` (a JSON-able dict, also logged to W&B) and
:func:`format_layout_summary` (the text ``mixtrain layout`` prints).

Comparison (``mixtrain compare``): :func:`compare` reads run directories or sweeps
(config.yaml, csv/metrics.csv or the offline W&B log, result.json, eval/*.json) and
writes a table, compare.csv/.json, loss_curves.png and quality_vs_kv.png.
:class:`SweepOutcome` is the Hydra callback that reports failed sweep points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from . import accounting as acc
from .config import ModelConfig
from .layouts import Layout

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


# ---------------------------------------------------------------------------
# Sweeps: which points failed (a Hydra callback), and `mixtrain compare`
# ---------------------------------------------------------------------------

from .train.sweep import SweepOutcome  # noqa: E402,F401 - its old home; the callback lives beside training


def _is_run_dir(d: "Path") -> bool:
    from .rundir import RunDir

    return RunDir.is_run_dir(d)


def _job_order(d: "Path") -> tuple:
    """Sweep points in job order (``2-...`` before ``10-...``), then by path."""
    head = d.name.split("-", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, str(d))


def find_runs(paths: Iterable[Any]) -> list["Path"]:
    """Run directories among ``paths``: each a run directory (config.yaml plus
    checkpoints, logs or result.json), or a folder (a sweep) searched for them."""
    from pathlib import Path

    from .errors import UserError

    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such run or sweep directory")
        if _is_run_dir(p):
            runs.append(p)
            continue
        marks = [*p.rglob("config.yaml"), *p.rglob("result.json")]
        found = sorted({c.parent for c in marks if _is_run_dir(c.parent)}, key=_job_order)
        # Not the copies inside a run (.hydra/, export/).
        found = [d for d in found if not any(o != d and o in d.parents for o in found)]
        if not found:
            raise UserError(f"{p}: no runs found (a run directory holds config.yaml and checkpoints/ or logs)")
        runs += found
    return list(dict.fromkeys(r.resolve() for r in runs))


def _float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None  # NaN -> None


class _History:
    """A run's logged metrics, merged over its attempts (a resumed run logs the steps
    from its resume point again): for each (step, metric) the value written last wins,
    and when the log goes back to an earlier step (a new attempt), what the abandoned
    attempt logged at or after that step is dropped, so every curve is one monotone
    line of the values the finished run stands on."""

    def __init__(self) -> None:
        self.values: dict[str, dict[int, float]] = {}
        self.top = -1  # the highest step logged so far

    def restart(self, step: int) -> None:
        """A new attempt starts at ``step``: forget what was logged at or after it."""
        for per_step in self.values.values():
            for s in [s for s in per_step if s >= step]:
                del per_step[s]
        self.top = max((s for v in self.values.values() for s in v), default=-1)

    def add(self, step: int, items: dict[str, float], new_attempt: bool = False) -> None:
        if new_attempt or step < self.top:
            self.restart(step)
        for k, v in items.items():
            self.values.setdefault(k, {})[step] = v
        self.top = max(self.top, step)

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        return {k: sorted(v.items()) for k, v in self.values.items() if v}


def read_metrics_csv(path: "Path") -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of a Lightning metrics.csv as (step, value) pairs, in step
    order. A resumed run may have appended the rows of its resume range again after
    those of the abandoned attempt: the rows written last are kept (see :class:`_History`)."""
    import csv

    history = _History()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _float(row.get("step"))
            if step is None:
                continue
            items = {}
            for k, v in row.items():
                if k in ("step", "epoch") or k is None or v in (None, ""):
                    continue
                f_v = _float(v)
                if f_v is not None:
                    items[k] = f_v
            history.add(int(step), items)
    return history.curves()


def wandb_record_bytes(path: "Path") -> Iterable[bytes]:
    """The serialized records of an offline W&B transaction log (``run-*.wandb``): a
    7-byte file header, then LevelDB-style log blocks of 32 KiB holding
    [crc32 (4) | length (2, LE) | type (1) | data] chunks (type 1 full, 2 first,
    3 middle, 4 last). Raises ValueError when the file is not such a log."""
    import struct
    from pathlib import Path

    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield data
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            yield pending + data
            pending = b""


def wandb_records(path: "Path") -> Iterable[Any]:
    """The records (``wandb_internal_pb2.Record``) of an offline W&B transaction log,
    skipping a torn one (the end of a killed run). Needs the ``wandb`` package."""
    from wandb.proto import wandb_internal_pb2

    for data in wandb_record_bytes(path):
        rec = wandb_internal_pb2.Record()
        try:
            rec.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a torn record
            continue
        yield rec


def wandb_run_files(run_dir: "Path") -> list["Path"]:
    """The offline W&B logs under ``run_dir/wandb``, one per attempt of the run, oldest
    first (by the start time in the folder name ``offline-run-YYYYMMDD_HHMMSS-<id>``,
    then by modification time)."""
    import re

    def started(p: "Path") -> tuple:
        m = re.search(r"run-(\d{8}_\d{6})", p.parent.name)
        return (m.group(1) if m else "", p.stat().st_mtime, str(p))

    return sorted((run_dir / "wandb").glob("*run-*/run-*.wandb"), key=started)


def read_wandb_history(run_dir: "Path") -> dict[str, list[tuple[int, float]]]:
    """The logged history of a run's offline W&B logs under ``run_dir/wandb`` (for runs
    trained with the default W&B logger and no CSV): key -> [(trainer step, value)].
    A resumed run has one log per attempt; they are read oldest first and each attempt
    replaces what earlier ones logged from its first step on (see :class:`_History`)."""
    import json

    files = wandb_run_files(run_dir)
    if not files:
        return {}
    try:
        import wandb.proto.wandb_internal_pb2  # noqa: F401
    except ImportError:  # pragma: no cover
        return {}
    history = _History()
    for path in files:
        first = True
        try:
            records = list(wandb_records(path))
        except (OSError, ValueError):
            continue
        for rec in records:
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
            step = _float(json.loads(items["trainer/global_step"])) if "trainer/global_step" in items else None
            if step is None:
                continue
            values = {}
            for k, v in items.items():
                try:
                    f_v = _float(json.loads(v))
                except ValueError:
                    continue
                if f_v is not None and not k.startswith("_") and k != "trainer/global_step":
                    values[k] = f_v
            history.add(int(step), values, new_attempt=first)
            first = False
    return history.curves()


def _eval_files(run_dir: "Path") -> list[dict[str, Any]]:
    """The JSON objects of ``<run_dir>/eval/*.json``, oldest first; unreadable files skipped."""
    from .rundir import RunDir

    return RunDir(run_dir).eval_results()


def read_eval_scores(run_dir: "Path") -> dict[str, float]:
    """Scores from ``<run_dir>/eval/*.json`` (each with a ``scores`` mapping task -> score
    and maybe ``average``); later files win for the same task, and a task a later file
    skipped (score null: its prompt did not fit the length) has no score. Unreadable
    files are skipped."""
    scores: dict[str, float] = {}
    average: Optional[float] = None
    for data in _eval_files(run_dir):
        for task, v in (data.get("scores") or {}).items() if isinstance(data.get("scores"), dict) else []:
            f = _float(v.get("score") if isinstance(v, dict) else v)
            if f is not None:
                scores[str(task)] = f
            else:
                scores.pop(str(task), None)
        average = _float(data.get("average")) if data.get("average") is not None else average
    if scores or average is not None:
        scores["average"] = average if average is not None else sum(scores.values()) / len(scores)
    return scores


def read_eval_skipped(run_dir: "Path") -> list[str]:
    """The (task, length) cells the newest RULER results skipped (prompt longer than the
    length), as ``task@length``."""
    out: list[str] = []
    for data in _eval_files(run_dir):
        if isinstance(data.get("skipped"), list):
            out = [f"{s.get('task')}@{s.get('length')}" for s in data["skipped"] if isinstance(s, dict)]
    return out


def _median(values: list[float]) -> Optional[float]:
    import statistics

    return statistics.median(values) if values else None


def run_record(run_dir: "Path") -> dict[str, Any]:
    """One row of ``mixtrain compare``: the run's config, accounting and final metrics,
    plus its curves (``curves``: metric -> [(step, value)]) for plotting."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from .config import MixtrainConfig
    from .layouts import build_layout

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
    rec["eval"] = read_eval_scores(run_dir)
    rec["eval_skipped"] = read_eval_skipped(run_dir)
    rec["curves"] = {k: curves[k] for k in ("train/loss", "val/loss") if k in curves}
    return rec


COMPARE_COLUMNS = [
    ("run", "run"), ("layout", "layout"), ("model", "model"), ("status", "status"),
    ("params_total", "params"), ("params_active", "active"), ("kv_bytes_per_token_32k", "KV B/tok@32K"),
    ("final_train_loss", "train loss"), ("final_val_loss", "val loss"), ("best_val_loss", "best val"),
    ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
]


def compare_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat rows (for CSV/JSON) with one column per eval task present in any run."""
    tasks = sorted({t for r in records for t in r.get("eval", {}) if t != "average"})
    has_avg = any("average" in r.get("eval", {}) for r in records)
    keys = [k for k, _ in COMPARE_COLUMNS] + [f"eval/{t}" for t in tasks] + (["eval/average"] if has_avg else [])
    rows = []
    for r in records:
        row = {k: r.get(k) for k, _ in COMPARE_COLUMNS}
        for t in tasks + (["average"] if has_avg else []):
            row[f"eval/{t}"] = r.get("eval", {}).get(t)
        rows.append(row)
    return keys, rows


def format_compare(records: list[dict[str, Any]]) -> str:
    keys, rows = compare_rows(records)
    headers = dict(COMPARE_COLUMNS)

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

    lines = _table([headers.get(k, k) for k in keys], [[cell(k, row[k]) for k in keys] for row in rows])
    notes = [f"  {r['run']}: {r['error']}" for r in records if r.get("error")]
    skips = [f"  {r['run']}: {', '.join(r['eval_skipped'])}" for r in records if r.get("eval_skipped")]
    return "\n".join(
        lines
        + (["", "failed:", *notes] if notes else [])
        + (["", "eval cells skipped (prompt longer than the length; its eval average is over the cells that ran):",
            *skips] if skips else [])
    ) + "\n"


def plot_loss_curves(records: list[dict[str, Any]], path: Any, x: str = "tokens") -> None:
    """Validation (solid) and training (faint) loss against tokens or steps, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(records):
        c = colors[i % len(colors)]
        scale = r["tokens_per_step"] if x == "tokens" else 1
        label = run_label(r)
        for key, style in (("val/loss", dict(lw=2, marker="o", ms=3)), ("train/loss", dict(lw=1, alpha=0.35))):
            pts = r["curves"].get(key, [])
            if pts:
                # steps are 0-based: the loss after optimizer step s has seen (s + 1) batches
                ax.plot([(s + 1) * scale for s, _ in pts], [v for _, v in pts], color=c,
                        label=f"{label} {key.split('/')[0]}", **style)
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves (val: solid, train: faint)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def run_label(r: dict[str, Any]) -> str:
    """A run's name in plots, with its layout when the name does not already say it
    (several runs of one layout, a stage chain or seeds, stay apart)."""
    layout = r.get("layout")
    return f"{r['run']} ({layout})" if layout and str(layout) not in r["run"] else r["run"]


def save_figure(fig, path: Any, dpi: int = 120) -> "Path":
    """Write a matplotlib figure atomically (a temporary file renamed into place) and
    close it: an interrupted run never leaves half a PNG."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_quality_vs_kv(records: list[dict[str, Any]], path: Any) -> None:
    """Final validation loss (and the eval average, where present) against KV-cache bytes
    per token at 32K, log x: the CLA paper's accuracy/memory Pareto view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in records if r.get("kv_bytes_per_token_32k") and r.get("final_val_loss") is not None]
    evals = [r for r in records if r.get("kv_bytes_per_token_32k") and "average" in r.get("eval", {})]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(13 if evals else 7, 5), squeeze=False)
    panels = [(axes[0][0], pts, lambda r: r["final_val_loss"], "final validation loss (lower is better)")]
    if evals:
        panels.append((axes[0][1], evals, lambda r: r["eval"]["average"], "eval average (higher is better)"))
    for ax, rs, y, ylabel in panels:
        seen: dict[tuple, int] = {}
        for r in rs:
            at = (r["kv_bytes_per_token_32k"], y(r))
            key = (round(at[0], 3), round(at[1], 4))
            k = seen[key] = seen.get(key, -1) + 1  # labels of points at the same place are stacked
            ax.scatter(*at, s=40)
            ax.annotate(run_label(r), at, textcoords="offset points", xytext=(5, 5 + 10 * k), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("KV cache bytes per token at 32K context (bf16, log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_title("Quality against KV memory")
    fig.tight_layout()
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
        out = paths[0] if len(paths) == 1 and not _is_run_dir(paths[0]) else Path.cwd()
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
