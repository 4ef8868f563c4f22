"""The task registry of ``mixtrain eval``: a task registered with one call is filled to
the length, checked, run, scored and written exactly like the RULER tasks."""

from __future__ import annotations

import json

import pytest

from mixtrain.data.tokenizer import train_bpe
from mixtrain.eval import ruler
from mixtrain.eval.tasks import TASK_NAMES, TASKS, LengthFitter, PromptTooLong, Sample, parse_tasks, register_task


def echo_generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
    """A toy task: a code word after `h` filler sentences; the answer is the code word."""
    fitter = LengthFitter(tokenizer, length, max_new_tokens, probe, "echo")
    out = []
    for i in range(n_samples):
        word = f"zq{seed}x{i}"
        _, prompt, ids = fitter.fit("echo", lambda h: "The sky is blue. " * h + f"Repeat the code {word}. Code:")
        out.append(Sample("echo", length, i, prompt, ids, [word], max_new_tokens))
    return out


@pytest.fixture
def echo_task():
    task = register_task("echo", echo_generate, metric="all", max_new_tokens=8)
    yield task
    TASKS.pop("echo", None)


def test_a_registered_task_runs_like_the_ruler_tasks(tmp_path, monkeypatch, echo_task):
    tok = train_bpe(["The sky is blue. Repeat the code zq0x1. Code: " * 50], 300)
    assert TASKS["echo"] is echo_task and parse_tasks("echo") == ["echo"]
    assert parse_tasks("all,echo") == [*TASK_NAMES, "echo"] and parse_tasks("all") == list(TASK_NAMES)
    with pytest.raises(ValueError, match="a task named 'echo' is already registered"):
        register_task("echo", echo_generate)
    with pytest.raises(ValueError, match=r"task odd: metric='most', expected one of \('all', 'any'\)"):
        register_task("odd", echo_generate, metric="most")
    assert "odd" not in TASKS

    # Filled to the length like the RULER tasks: prompt + answer fit, one filler sentence short of it.
    (s,) = ruler.generate("echo", tok, 256, 1, seed=3)
    one_more = tok.encode("The sky is blue. " + s.prompt)
    assert len(s.input_ids) + 8 <= 256 < len(one_more) + 8 and s.references == ["zq3x0"]
    too_long = ruler.check_fits("echo", tok, 12, 1)
    assert isinstance(too_long, PromptTooLong) and too_long.needed == len(tok.encode("Repeat the code zq0x0. Code:")) + 8

    def oracle(model, tokenizer, samples, batch_size=4, prefill_chunk=1024):  # right on echo, wrong on vt
        return [" " + s.references[0] if s.task == "echo" else " no idea" for s in samples]

    monkeypatch.setattr(ruler, "predict", oracle)
    res = ruler.evaluate(None, tok, "vt,echo", [1024], 2, tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert saved["scores"] == {"vt": 0.0, "echo": 1.0} == res["scores"] and saved["average"] == 0.5
    rows = [json.loads(x) for x in (tmp_path / "ruler_samples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows].count("echo") == 2


def test_a_task_needing_documents_is_checked_for_them(echo_task):
    register_task("echo", echo_generate, documents="required", replace=True)
    assert "echo" in ruler.ESSAY_TASKS and "niah_single_2" in ruler.ESSAY_TASKS
    with pytest.raises(ruler.RulerError, match="the document haystack needs text"):
        ruler.evaluate(None, None, "echo", [256], 1, log=lambda line: None)
