"""Reports: what a model and layout cost, and comparisons of runs.

- :mod:`mixtrain.report.format`: human units, text tables, the layout report
  (``mixtrain layout``), atomic figure writes;
- :mod:`mixtrain.report.logs`: readers of what runs logged (metrics.csv, offline W&B
  logs, eval results);
- :mod:`mixtrain.report.compare`: ``mixtrain compare`` (records, table, CSV/JSON, plots).

The names below stay importable from ``mixtrain.report``. The Hydra callback that
reports failed sweep points lives beside training (:mod:`mixtrain.train.sweep`).
"""

from mixtrain.report.compare import (  # noqa: F401
    COMPARE_COLUMNS,
    compare,
    compare_rows,
    find_runs,
    format_compare,
    plot_loss_curves,
    plot_quality_vs_kv,
    register_compare,
    run_label,
    run_record,
)
from mixtrain.report.format import (  # noqa: F401
    DEFAULT_CONTEXTS,
    DEFAULT_KV_CONTEXT,
    format_layout_summary,
    human_bytes,
    human_count,
    human_flops,
    layout_summary,
    save_figure,
)
from mixtrain.report.logs import (  # noqa: F401
    read_eval_scores,
    read_eval_skipped,
    read_metrics_csv,
    read_wandb_history,
    wandb_record_bytes,
    wandb_records,
    wandb_run_files,
)
