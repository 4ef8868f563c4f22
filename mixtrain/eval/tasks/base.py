"""The shared base of the RULER tasks: a :class:`Sample`, the two scorings, the
errors, the :class:`Task` record and the registry every task family adds to.

Adding a task is one call (a new family file, or your own code, at import time)::

    from mixtrain.eval.tasks import Sample, register_task

    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        ...  # n_samples Samples whose prompt + max_new_tokens fit `length` tokens
             # (LengthFitter does the filling; raise PromptTooLong when they cannot fit)

    register_task("recall", generate, metric="all", max_new_tokens=32)

The task is then known to ``mixtrain eval --tasks recall``, :func:`parse_tasks`,
:func:`generate`, :func:`check_fits` and :func:`mixtrain.eval.ruler.evaluate` (which
checks, decodes greedily, scores and writes it like the RULER tasks). ``--tasks all``
stays the 13 RULER tasks (:data:`TASK_NAMES`); name a registered task to run it
(``--tasks all,recall``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from mixtrain.errors import UserError

# The RULER suite, in its order: what "all" means.
TASK_NAMES = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "qa_1", "qa_2",
)

METRICS = ("all", "any")
DOCUMENTS = ("none", "optional", "required")


class RulerError(UserError, ValueError):
    """A bad task name, length or haystack; the message says what to change."""


class PromptTooLong(RulerError):
    """A task's prompt (with the smallest haystack) plus its generated tokens do not fit
    the length: ``detail`` says why, ``needed`` is the shortest length that fits (when
    known). :func:`evaluate` records such a (task, length) cell as skipped."""

    def __init__(self, task: str, length: int, detail: str, needed: Optional[int] = None):
        self.task, self.length, self.detail, self.needed = task, int(length), detail, needed
        advice = f"use a longer length (about {needed} or more)" if needed else "use a longer length"
        super().__init__(f"{task}: {detail}; {advice}")


MIN_HAYSTACK_WORDS = 200  # the document haystacks cycle through at least this much text


@dataclass
class Sample:
    """One prompt: ``prompt`` (ends with the answer prefix), its token ids, the
    references, and how many tokens to generate."""

    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    depths: list[float] = field(default_factory=list)

    def to_json(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        d.pop("input_ids")
        d["prompt_tokens"] = len(self.input_ids)
        if not with_prompt:
            d.pop("prompt")
        return d


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / max(1, len(references))


def string_match_any(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Task:
    """A task: ``generate(tokenizer, length, n_samples, seed, haystack_docs=None,
    max_new_tokens=None, probe=False) -> list[Sample]`` (``probe``: build each prompt
    with the smallest haystack only, to check that it fits), its scoring (``all``:
    fraction of the references found; ``any``: 1 if one is), the tokens to generate,
    and whether its haystack is document text (``documents``: ``required``, ``optional``
    filler, or ``none``)."""

    name: str
    generate: Callable[..., list[Sample]]
    metric: str  # "all" or "any"
    max_new_tokens: int
    documents: str = "none"

    def score(self, prediction: str, references: Sequence[str]) -> float:
        return (string_match_all if self.metric == "all" else string_match_any)(prediction, references)


TASKS: dict[str, Task] = {}


def register_task(name: str, generate: Callable[..., list[Sample]], *, metric: str = "all",
                  max_new_tokens: int = 32, documents: str = "none", replace: bool = False) -> Task:
    """Add a task to :data:`TASKS` (see the module doc); returns it. A name already
    registered is refused unless ``replace``."""
    if not name or not name.replace("_", "").isalnum() or name == "all":
        raise ValueError(f"task name {name!r}: use letters, digits and underscores (not 'all')")
    if name in TASKS and not replace:
        raise ValueError(f"a task named {name!r} is already registered (pass replace=True to replace it)")
    if metric not in METRICS:
        raise ValueError(f"task {name}: metric={metric!r}, expected one of {METRICS}")
    if documents not in DOCUMENTS:
        raise ValueError(f"task {name}: documents={documents!r}, expected one of {DOCUMENTS}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"task {name}: max_new_tokens must be >= 1 (got {max_new_tokens})")
    TASKS[name] = task = Task(name, generate, metric, int(max_new_tokens), documents)
    return task


def document_tasks() -> tuple[str, ...]:
    """The registered tasks whose haystack must be document text (``haystack_docs``)."""
    return tuple(n for n, t in TASKS.items() if t.documents == "required")


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``all`` / None, a comma-separated string, or a list -> task names (checked).
    ``all`` is the RULER suite (:data:`TASK_NAMES`); it may be combined with registered
    tasks (``all,recall``)."""
    if spec is None or spec == "all" or spec == ["all"]:
        return list(TASK_NAMES)
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    names = list(dict.fromkeys(n for t in names for n in (TASK_NAMES if t == "all" else (t,))))
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise RulerError(f"unknown RULER task(s) {unknown}; valid tasks: all, {', '.join(TASKS)}")
    return names


def generate(task: str, tokenizer, length: int, n_samples: int, seed: int = 0,
             haystack_docs: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None) -> list[Sample]:
    """``n_samples`` prompts of ``task`` filled to ``length`` tokens. Raises
    :class:`PromptTooLong` when they cannot fit ``length``."""
    t = TASKS[parse_tasks([task])[0]]
    return t.generate(tokenizer, length, n_samples, seed, haystack_docs, max_new_tokens or t.max_new_tokens)


def check_fits(task: str, tokenizer, length: int, n_samples: int, seed: int = 0,
               haystack_docs: Optional[Sequence[str]] = None,
               max_new_tokens: Optional[int] = None) -> Optional[PromptTooLong]:
    """Why ``task``'s prompts cannot fit ``length`` (a :class:`PromptTooLong`), or None
    when they can. Cheap: builds each sample's prompt with the smallest haystack only."""
    t = TASKS[parse_tasks([task])[0]]
    try:
        t.generate(tokenizer, length, n_samples, seed, haystack_docs, max_new_tokens or t.max_new_tokens, probe=True)
    except PromptTooLong as e:
        return e
    return None


def score(task: str, prediction: str, references: Sequence[str]) -> float:
    return TASKS[task].score(prediction, references)
