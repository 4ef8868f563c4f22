"""The offline RULER suite: every task's generator fills prompts to the requested token
length with its needles at evenly spaced depths, and its scorer gives 1 for the
reference answer and 0 for a wrong one; the runner writes what `mixtrain compare` reads."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from mixtrain.data.tokenizer import train_bpe
from mixtrain.errors import UserError
from mixtrain.eval import ruler

LENGTH = 1024


@pytest.fixture(scope="module")
def tok_and_docs():
    from helpers import WORDS  # the same cheap synthetic corpus as test_longqa

    import random

    rng = random.Random(0)
    docs = []
    for i in range(20):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(200)]
        docs.append(" ".join(sents))
    hexes = [ruler.random_uuid(rng) for _ in range(300)]  # so that uuids tokenise as in a real vocabulary
    tok = train_bpe(docs + [ruler.NOISE, " ".join(hexes)], 400)
    return tok, docs


@pytest.fixture(scope="module")
def generated(tok_and_docs):
    tok, docs = tok_and_docs
    return {t: ruler.generate(t, tok, LENGTH, 3, seed=5, haystack_docs=docs) for t in ruler.TASK_NAMES}


def test_all_thirteen_tasks_are_there():
    assert ruler.TASK_NAMES == (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    )
    assert {t: ruler.TASKS[t].metric for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_1", "qa_2")} == {
        "niah_single_1": "all", "vt": "all", "cwe": "all", "fwe": "all", "qa_1": "any", "qa_2": "any"}


@pytest.mark.parametrize("task", ruler.TASK_NAMES)
def test_generator_fills_the_length_and_scorer_matches_references(task, generated, tok_and_docs):
    tok, _ = tok_and_docs
    samples = generated[task]
    assert len(samples) == 3
    for s in samples:
        budget = LENGTH - s.max_new_tokens
        assert s.input_ids == tok.encode(s.prompt)
        # Filled to the requested length: prompt + generation fits, within one haystack unit of it
        # (a distractor needle of two uuids is ~80 tokens with this 400-token vocabulary).
        tolerance = 96 if task == "niah_multikey_3" else 48
        assert budget - tolerance <= len(s.input_ids) <= budget, (len(s.input_ids), budget)
        for ref in s.references:
            assert ref in s.prompt  # the needle(s) are in the context
        # Hand-made answers: the references score 1, a wrong answer 0.
        perfect = " " + ", ".join(s.references) + "."
        assert ruler.score(task, perfect, s.references) == 1.0
        assert ruler.score(task, perfect.upper(), s.references) == 1.0  # case-insensitive
        assert ruler.score(task, " 0000000 nothing-here", s.references) == 0.0
    assert len({s.prompt for s in samples}) == 3  # different needles per sample
    again = ruler.generate(task, tok, LENGTH, 3, seed=5, haystack_docs=tok_and_docs[1])
    assert [s.prompt for s in again] == [s.prompt for s in samples]  # deterministic in the seed


NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


def needles(prompt: str) -> list[tuple[str, str]]:
    return [(k, v) for _, k, v in NEEDLE.findall(prompt)]


def test_niah_needles_depths_and_distractors(generated):
    for task, n_needles in [("niah_single_1", 1), ("niah_single_2", 1), ("niah_single_3", 1),
                            ("niah_multikey_1", 4), ("niah_multivalue", 4), ("niah_multiquery", 4)]:
        for s in generated[task]:
            found = needles(s.prompt)
            assert len(found) == n_needles, task
            start, end = s.prompt.index("\n") + 1, s.prompt.rindex("\nWhat ")  # the haystack
            pos = sorted((s.prompt.index(f"is: {v}.") - start) / (end - start) for _, v in found)
            assert pos == pytest.approx(s.depths, abs=0.08), task  # at the evenly spaced depths
    # Single needle: sample i of 3 sits at depth (i + 0.5) / 3.
    assert [s.depths for s in generated["niah_single_1"]] == [[1 / 6], [0.5], [5 / 6]]
    assert "The grass is green." in generated["niah_single_1"][0].prompt
    for s in generated["niah_multikey_1"]:  # 4 keys, one asked for: 3 distractor needles
        keys = [k for k, _ in needles(s.prompt)]
        asked = [k for k in keys if f"for {k} mentioned" in s.prompt]
        assert len(set(keys)) == 4 and len(asked) == 1
        assert dict(needles(s.prompt))[asked[0]] == s.references[0]
    for s in generated["niah_multivalue"]:  # one key, 4 values, all references
        assert len({k for k, _ in needles(s.prompt)}) == 1 and sorted(v for _, v in needles(s.prompt)) == sorted(s.references)
    for s in generated["niah_multiquery"]:
        assert len(s.references) == 4 and s.prompt.count(", and ") == 2  # question and answer prefix list 4 keys
    for task in ("niah_multikey_2", "niah_multikey_3"):  # haystack of distractor needles
        for s in generated[task]:
            found = needles(s.prompt)
            assert len(found) >= 5  # the needle among >= 4 distractors (more at real lengths)
            values = [v for _, v in found]
            assert values.count(s.references[0]) == 1
            key = next(k for k, v in found if v == s.references[0])
            assert [k for k, _ in found].count(key) == 1 and f"for {key} mentioned" in s.prompt
    uuid = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(uuid.match(s.references[0]) for s in generated["niah_single_3"] + generated["niah_multikey_3"])
    assert all(s.prompt.endswith(" mentioned in the provided text is") for s in generated["niah_single_2"])


def test_evidence_of_the_other_tasks_sits_at_the_sample_depths(generated):
    """Depth = position among the haystack's units: the needle among distractor needles
    (multikey_2/3), each gold document among the distractor documents (qa), each hop of
    the variable chain in the noise (vt)."""
    for task in ("niah_multikey_2", "niah_multikey_3"):
        for s in generated[task]:
            lines = s.prompt[s.prompt.index("\n") + 1:s.prompt.rindex("\nWhat ")].split("\n")
            (at,) = [j for j, line in enumerate(lines) if s.references[0] in line]
            assert at == round(s.depths[0] * (len(lines) - 1)), (task, at, len(lines), s.depths)
    for task in ("qa_1", "qa_2"):
        for s in generated[task]:
            docs = re.split(r"\n\nDocument \d+:\n", s.prompt)[1:]
            if task == "qa_1":
                gold = [j for j, d in enumerate(docs) if f"city of {s.references[0]}." in d]
            else:
                who = re.search(r"company that (.+) works for\?", s.prompt).group(1)
                company = re.search(rf"{who} works for (.+?)\.", s.prompt).group(1)
                gold = [j for j, d in enumerate(docs) if d.startswith(f"{who} works for ")
                        or d.startswith(f"{company} has its headquarters")]
            h = len(docs) - len(gold)  # distractor documents
            # Gold document k goes in at round(depth * h); the k gold documents before it shift it by k.
            assert gold == [round(d * h) + k for k, d in enumerate(s.depths)], (task, gold, h, s.depths)
    for s in generated["vt"]:
        start, end = s.prompt.index("\n\n") + 2, s.prompt.rindex("\nQuestion:")
        hops = [(s.prompt.index(f"VAR {name} =") - start) / (end - start) for name in s.references]
        assert hops == pytest.approx(s.depths, abs=0.05)


def test_vt_cwe_fwe_qa_structure(generated):
    for s in generated["vt"]:
        value = re.search(r"assigned the value (\d{5})", s.prompt).group(1)
        chain = [s.references[0]]
        assert f"VAR {chain[0]} = {value}." in s.prompt
        for a, b in zip(s.references, s.references[1:]):
            assert s.prompt.index(f"VAR {b} = VAR {a}.") > s.prompt.index(f"VAR {a} =")  # hops in order
        assert len(s.references) == 5
    for s in generated["cwe"]:
        body = s.prompt.split("\n")[1]
        counts = Counter(re.findall(r"\d+\. (\w+)", body))
        top = [w for w, _ in counts.most_common(10)]
        assert sorted(top) == sorted(s.references)
        assert min(counts[w] for w in s.references) > max(c for w, c in counts.items() if w not in s.references)
    for s in generated["fwe"]:
        body = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(body.split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "...." and ranked[1:4] == s.references
        assert counts[ranked[3]] > counts[ranked[4]]
    for s in generated["qa_1"]:
        assert s.prompt.count("Document ") > 5 and s.prompt.count(f"city of {s.references[0]}.") == 1
    for s in generated["qa_2"]:
        who = re.search(r"company that (.+) works for\?", s.prompt).group(1)
        company = re.search(rf"{who} works for (.+?)\.", s.prompt).group(1)
        assert f"{company} has its headquarters in the city of {s.references[0]}." in s.prompt
        assert s.prompt.count(f"{who} works for") == 2  # the document and the question, nowhere else


def test_string_match_hand_made_cases():
    assert ruler.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.string_match_all("Only 1234567.", ["1234567", "7654321"]) == 0.5
    assert ruler.string_match_all("nothing", ["1234567"]) == 0.0
    assert ruler.string_match_all("VAR ABCDE", ["abcde"]) == 1.0
    assert ruler.string_match_any("It is Paris.", ["London", "paris"]) == 1.0
    assert ruler.string_match_any("It is Rome.", ["London", "Paris"]) == 0.0
    assert ruler.score("qa_1", "Paris", ["paris"]) == 1.0 and ruler.score("cwe", "a b", ["a", "c"]) == 0.5


def test_errors_say_what_to_do(tok_and_docs):
    tok, docs = tok_and_docs
    with pytest.raises(UserError, match=r"unknown RULER task\(s\) \['niah'\]; valid tasks: all, niah_single_1"):
        ruler.parse_tasks("niah,vt")
    with pytest.raises(ruler.PromptTooLong) as e:
        ruler.generate("niah_multikey_1", tok, 256, 1, haystack_docs=docs)
    n = e.value.needed
    assert isinstance(e.value, UserError) and (e.value.task, e.value.length) == ("niah_multikey_1", 256) and n > 256
    assert str(e.value) == (f"niah_multikey_1: the prompt needs {n - 128} tokens without any haystack, plus 128 to "
                            f"generate: {n} in all, more than the length 256; use a longer length (about {n} or more)")
    assert ruler.check_fits("niah_multikey_1", tok, 256, 1, haystack_docs=docs).needed == n  # the same, cheaply
    with pytest.raises(UserError, match="haystack needs text"):
        ruler.generate("niah_single_2", tok, 1024, 1, haystack_docs=None)


def test_32k_prompts(tok_and_docs):
    tok, docs = tok_and_docs
    for task in ("niah_single_2", "niah_multikey_3", "cwe"):
        (s,) = ruler.generate(task, tok, 32768, 1, haystack_docs=docs)
        assert 32768 - s.max_new_tokens - 200 <= len(s.input_ids) <= 32768 - s.max_new_tokens


def test_evaluate_writes_what_compare_reads(tmp_path, tok_and_docs, monkeypatch):
    tok, docs = tok_and_docs

    def oracle(model, tokenizer, samples, batch_size=4, prefill_chunk=1024):  # perfect on vt, wrong on niah
        return [" " + " ".join(s.references) if s.task == "vt" else " I do not know" for s in samples]

    monkeypatch.setattr(ruler, "predict", oracle)
    lines = []
    res = ruler.evaluate(None, tok, "niah_single_1,vt", [512, 1024], 2, tmp_path, haystack_docs=docs,
                         names={"name": "run-x", "layout": "ma_offset"}, log=lines.append)
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert saved["scores"] == {"niah_single_1": 0.0, "vt": 1.0} and saved["average"] == 0.5
    assert saved["by_length"] == {"512": {"niah_single_1": 0.0, "vt": 1.0}, "1024": {"niah_single_1": 0.0, "vt": 1.0}}
    assert saved["name"] == "run-x" and saved["layout"] == "ma_offset" and res["average"] == 0.5
    assert (tmp_path / "ruler_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (tmp_path / "ruler_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["score"] for r in rows} == {0.0, 1.0}
    table = lines[-1]
    assert "niah_single_1" in table and "1K" in table and "average" in table


def test_loss_by_position_prefers_real_long_documents(tmp_path):
    """One held-out document long enough, the rest short: the one real document is used
    (a stream of unrelated documents cannot show use of long context); only without any
    long document does it fall back to the concatenated stream."""
    import warnings
    from types import SimpleNamespace

    from mixtrain.config import DataConfig
    from mixtrain.eval.perplexity import held_out_sequences

    (tmp_path / "long.txt").write_text("abcdefghij" * 30)
    for i in range(5):
        (tmp_path / f"short{i}.txt").write_text(f"short document {i}")
    tok = SimpleNamespace(eos_id=0, encode_batch=lambda texts: [[1 + ord(ch) % 90 for ch in t] for t in texts])
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqs, source, n = held_out_sequences(cfg, tok, length=200, max_sequences=4)
    assert (source, n, tuple(seqs.shape)) == ("documents", 1, (1, 201))
    assert seqs[0].tolist() == [1 + ord(ch) % 90 for ch in ("abcdefghij" * 30)[:201]]
    assert any("only 1 held-out documents" in str(w.message) for w in caught)
    _, source, _ = held_out_sequences(cfg, tok, length=320, max_sequences=4)  # longer than any document
    assert source == "concatenated"


def test_cells_that_cannot_fit_are_skipped_and_the_rest_written(tmp_path, tok_and_docs, monkeypatch):
    """niah_multikey_1's prompt cannot fit 512 tokens: that one (task, length) cell is
    skipped with its reason, found before any decoding; the other 5 run and are written;
    the averages are over those 5; the table, the heatmap and `mixtrain compare` show it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mixtrain import report
    from mixtrain.config import compose

    tok, docs = tok_and_docs
    why = ruler.check_fits("niah_multikey_1", tok, 512, 2, haystack_docs=docs)
    assert why is not None and 512 < why.needed <= 1024
    assert ruler.check_fits("niah_multikey_1", tok, 1024, 2, haystack_docs=docs) is None
    decoded, lines = [], []

    def oracle(model, tokenizer, samples, batch_size=4, prefill_chunk=1024):  # wrong on niah_single_1 only
        decoded.append((samples[0].task, samples[0].length))
        lines.append(f"decoded {samples[0].task}")
        return [" I do not know" if s.task == "niah_single_1" else " " + " ".join(s.references) for s in samples]

    monkeypatch.setattr(ruler, "predict", oracle)
    run = tmp_path / "run-7"
    run.mkdir()
    OmegaConf.save(compose(["model=tiny", "layout=ma_offset"]), run / "config.yaml")
    (run / "result.json").write_text(json.dumps({"status": "completed", "steps": 1, "val_loss": 3.0}))
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=1024))
    res = ruler.evaluate(model, tok, "niah_single_1,vt,niah_multikey_1", [512, 1024], 2, run / "eval",
                         haystack_docs=docs, names={"name": "run-7", "layout": "ma_offset"}, log=lines.append)
    assert lines[0] == (
        f"  skipped niah_multikey_1 at length 512: the prompt needs {why.needed - 128} tokens without any haystack, "
        f"plus 128 to generate: {why.needed} in all, more than the length 512; it needs --lengths of about "
        f"{why.needed} or more")
    assert lines[1] == "decoded niah_single_1"  # the skip was known before any decoding
    assert decoded == [("niah_single_1", 512), ("vt", 512), ("niah_single_1", 1024), ("vt", 1024),
                       ("niah_multikey_1", 1024)]

    saved = json.loads((run / "eval" / "ruler.json").read_text())
    assert saved["by_length"] == {"512": {"niah_single_1": 0.0, "vt": 1.0, "niah_multikey_1": None},
                                  "1024": {"niah_single_1": 0.0, "vt": 1.0, "niah_multikey_1": 1.0}}
    assert saved["scores"] == {"niah_single_1": 0.0, "vt": 1.0, "niah_multikey_1": 1.0}  # over the lengths run
    assert saved["average"] == 0.6 == res["average"]  # 3 of the 5 cells that ran (not 2/3, the mean of the tasks)
    assert saved["cells"] == {"ran": 5, "skipped": 1}
    assert saved["skipped"] == [{"task": "niah_multikey_1", "length": 512, "reason": why.detail,
                                 "min_length": why.needed}]
    rows = [json.loads(x) for x in (run / "eval" / "ruler_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 2 and ("niah_multikey_1", 512) not in {(r["task"], r["length"]) for r in rows}
    grid = ruler.heatmap_grid(saved)
    assert grid.shape == (3, 2) and math.isnan(grid[2, 0]) and grid[2, 1] == 1.0 and grid[1].tolist() == [1.0, 1.0]
    assert (run / "eval" / "ruler_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = lines[-1].splitlines()
    assert table[3].split() == ["niah_single_1", "0.00", "0.00", "0.00"]
    assert table[5].split() == ["niah_multikey_1", "-", "1.00", "1.00"]
    assert table[6].split() == ["average", "0.50", "0.67", "0.60"]
    assert table[7:] == ["skipped, prompt longer than the length (-): 512: niah_multikey_1",
                         "averages are over the 5 of 6 (task, length) cells that ran (512: 2 of 3 tasks, 1K: 3 of 3 tasks)"]

    got = report.compare([run], out=tmp_path / "cmp")
    (rec,) = got["records"]
    assert rec["eval"] == {"niah_single_1": 0.0, "vt": 1.0, "niah_multikey_1": 1.0, "average": 0.6}
    assert rec["eval_skipped"] == ["niah_multikey_1@512"]
    assert got["table"].splitlines()[-2:] == [
        "eval cells skipped (prompt longer than the length; its eval average is over the cells that ran):",
        "  run-7: niah_multikey_1@512"]
    assert (tmp_path / "cmp" / "quality_vs_kv.png").is_file()
    # A later evaluation where a task no longer fits anywhere: no stale score for it in compare.
    saved["scores"]["vt"] = saved["by_length"]["512"]["vt"] = saved["by_length"]["1024"]["vt"] = None
    (run / "eval" / "ruler.json").write_text(json.dumps(saved))
    assert report.read_eval_scores(run) == {"niah_single_1": 0.0, "niah_multikey_1": 1.0, "average": 0.6}


def test_nothing_fits_fails_before_decoding_and_says_what_to_do(tok_and_docs, monkeypatch):
    from types import SimpleNamespace

    tok, docs = tok_and_docs
    monkeypatch.setattr(ruler, "predict", lambda *a, **k: pytest.fail("decoded although nothing fits"))
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=512))
    cwe, mq = (ruler.check_fits(t, tok, 512, 1, haystack_docs=docs).needed for t in ("cwe", "niah_multiquery"))
    assert cwe > 512 and mq > 512
    with pytest.raises(UserError) as e:
        ruler.evaluate(model, tok, "cwe,niah_multiquery", [512], 1, None, haystack_docs=docs, log=lambda _: None)
    assert str(e.value) == (
        f"no RULER task fits --lengths 512 (--tasks cwe,niah_multiquery): each prompt plus its answer needs more "
        f"tokens than the length (at least: cwe {cwe}, niah_multiquery {mq}); none of them fits the model's "
        f"max_seq_len=512: extend its context first (stage=extend), then evaluate at the longer length")
    cwe, vt = (ruler.check_fits(t, tok, 256, 1).needed for t in ("cwe", "vt"))
    assert 256 < vt <= 512 < cwe
    with pytest.raises(UserError) as e:
        ruler.evaluate(model, tok, "cwe,vt", [128, 256], 1, None, log=lambda _: None)
    assert str(e.value) == (
        f"no RULER task fits --lengths 128,256 (--tasks cwe,vt): each prompt plus its answer needs more tokens "
        f"than the length (at least: cwe {cwe}, vt {vt}); these need no more than the model's max_seq_len=512: "
        f"try --lengths 512 --tasks vt")


def test_haystack_files_are_checked_with_what_to_do(tmp_path, capsys, monkeypatch):
    """`mixtrain eval --haystack FILE`: a missing file, a directory, non-UTF-8 bytes or too
    few words fail with the flag and the path named, before the model is loaded."""
    from mixtrain.cli import main
    from mixtrain.eval.cli import read_haystack_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 100)
    (tmp_path / "short.txt").write_text("Only seven words are in this file.\n")
    (tmp_path / "essay.txt").write_text("A sentence of six words here. " * 40)
    cases = {
        "missing.txt": f"--haystack: file 'missing.txt' does not exist (cwd: {tmp_path}); fix the path",
        "docs": "--haystack: 'docs' is a directory, not a file; give text files, e.g. --haystack docs/*.txt",
        "latin1.txt": "--haystack: 'latin1.txt' is not UTF-8 text: undecodable byte at offset 3 (invalid continuation "
                      "byte); convert it (e.g. `iconv -f latin1 -t utf-8`) or pass another file",
        "short.txt": "--haystack: 'short.txt' holds 7 words; the document haystacks need at least 200 words; give "
                     "more text (longer or more files)",
    }
    (tmp_path / "docs").mkdir()
    for name, message in cases.items():
        with pytest.raises(UserError) as e:
            read_haystack_files([name])
        assert str(e.value) == message
        # The command: the message, no traceback, before loading the model (which does not exist).
        assert main(["eval", "--model", "no-such-run", "--tasks", "niah_single_2", "--haystack", name]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(UserError, match=r"^--haystack: the 2 files hold 14 words; the document haystacks need at "
                                        r"least 200 words"):
        read_haystack_files(["short.txt", "short.txt"])
    assert read_haystack_files(["essay.txt", "short.txt"])[1] == "Only seven words are in this file.\n"


def test_quality_vs_kv_points_are_labelled_by_run(tmp_path, monkeypatch):
    """Several runs of one layout (a stage chain, seeds) get their own labels: the run
    name, with the layout when the name does not hold it."""
    from mixtrain import report

    figures = []
    import importlib

    compare_module = importlib.import_module("mixtrain.report.compare")  # report.compare is the function
    monkeypatch.setattr(compare_module, "save_figure", lambda fig, path, dpi=120: figures.append(fig))
    records = [{"run": name, "layout": "ma_offset", "kv_bytes_per_token_32k": 1024.0, "final_val_loss": loss,
                "eval": {"average": 0.1 * i}} for i, (name, loss) in enumerate([("chain-1", 4.0), ("chain-2", 3.5),
                                                                               ("ma_offset-seed1", 3.9)])]
    report.plot_quality_vs_kv(records, tmp_path / "q.png")
    (fig,) = figures
    labels = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert labels == [["chain-1 (ma_offset)", "chain-2 (ma_offset)", "ma_offset-seed1"]] * 2  # loss and eval panels
