"""The long-context tasks of ``mixtrain eval``: RULER's 13 (Hsieh et al. 2024, arXiv
2404.06654; NVIDIA/RULER), generated offline, one file per family on a shared base,
and any task you register.

==================  ===================================================  ============
file                tasks                                                scoring
==================  ===================================================  ============
niah.py             niah_single_1..3, niah_multikey_1..3,                all
                    niah_multivalue, niah_multiquery
variable_tracking   vt                                                   all
aggregation.py      cwe, fwe                                             all
qa.py               qa_1, qa_2                                           any
==================  ===================================================  ============

Shared pieces: ``base.py`` (:class:`Sample`, scoring, errors, the :class:`Task`
record, the registry :data:`TASKS` and :func:`register_task`), ``fit.py`` (filling a
prompt to a length, :class:`LengthFitter`), ``haystack.py`` (document text, needle
depths and insertion), ``words.py`` (random keys, values and words).

To add a task, call :func:`register_task` once (see :mod:`mixtrain.eval.tasks.base`);
:mod:`mixtrain.eval.ruler` runs every registered task the same way.
"""

from __future__ import annotations

from mixtrain.eval.tasks.base import (
    TASK_NAMES,
    TASKS,
    PromptTooLong,
    RulerError,
    Sample,
    Task,
    check_fits,
    document_tasks,
    generate,
    parse_tasks,
    register_task,
    score,
    string_match_all,
    string_match_any,
)
from mixtrain.eval.tasks.fit import LengthFitter
from mixtrain.eval.tasks.haystack import MIN_HAYSTACK_WORDS, haystack_words

# The families register their tasks on import, in RULER's order.
from mixtrain.eval.tasks import niah, variable_tracking, aggregation, qa  # noqa: E402,F401,I001

assert tuple(TASKS)[: len(TASK_NAMES)] == TASK_NAMES

__all__ = [
    "MIN_HAYSTACK_WORDS", "TASKS", "TASK_NAMES", "LengthFitter", "PromptTooLong", "RulerError", "Sample", "Task",
    "check_fits", "document_tasks", "generate", "haystack_words", "parse_tasks", "register_task", "score",
    "string_match_all", "string_match_any",
]
