"""Reading what a run logged: Lightning's metrics.csv, the offline W&B transaction log
(no W&B service needed), and ``mixtrain eval`` results; a resumed run's attempts are
merged so every curve is one monotone line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

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
    from mixtrain.rundir import RunDir

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


def read_harness_scores(run_dir: "Path") -> dict[str, float]:
    """lm-evaluation-harness scores from ``<run_dir>/eval/harness.json`` (``mixtrain eval
    --harness``) as ``task/metric`` -> value; empty when there is none or it is unreadable."""
    import json

    try:
        data = json.loads((Path(run_dir) / "eval" / "harness.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for task, metrics in (data.get("harness") or {}).items() if isinstance(data, dict) else []:
        for metric, v in (metrics or {}).items() if isinstance(metrics, dict) else []:
            if _float(v) is not None:
                out[f"{task}/{metric}"] = _float(v)
    return out


def read_eval_skipped(run_dir: "Path") -> list[str]:
    """The (task, length) cells the newest RULER results skipped (prompt longer than the
    length), as ``task@length``."""
    out: list[str] = []
    for data in _eval_files(run_dir):
        if isinstance(data.get("skipped"), list):
            out = [f"{s.get('task')}@{s.get('length')}" for s in data["skipped"] if isinstance(s, dict)]
    return out
