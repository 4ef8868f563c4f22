"""Evaluation: RULER-style long-context tasks generated offline (:mod:`mixtrain.eval.ruler`),
loss by token position and validation perplexity (:mod:`mixtrain.eval.perplexity`), and
the ``mixtrain eval`` command (:mod:`mixtrain.eval.cli`).

Results live in ``<run dir>/eval/``: ``ruler.json`` (``scores`` task -> score in [0, 1]
averaged over the lengths it ran at, ``by_length`` {length: {task: score, or null where
the prompt cannot fit that length}}, ``average`` over the cells that ran, ``cells``
{ran, skipped}, ``skipped`` [{task, length, reason, min_length}], the model and layout
names), ``ruler_samples.jsonl``, ``ruler_heatmap.png``, ``perplexity.json`` and
``position_loss.png``; ``mixtrain compare`` reads them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TASK_NAMES": "ruler",
    "TASKS": "ruler",
    "Sample": "ruler",
    "evaluate_ruler": ("ruler", "evaluate"),
    "evaluate_perplexity": ("perplexity", "evaluate"),
    "string_match_all": "ruler",
    "string_match_any": "ruler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        spec = _EXPORTS[name]
        module, attr = spec if isinstance(spec, tuple) else (spec, name)
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
