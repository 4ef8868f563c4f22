"""lm-evaluation-harness, offline: task YAMLs over local JSONL files the test writes (one
multiple-choice, one generate-until task). The same model scored by lm-eval's own ``hf``
model (a Hugging Face Llama folder) and by ``mixtrain eval --harness`` (mixtrain's
inference engine on that model imported into mixtrain) gives the same scores, sample by
sample; unknown tasks and tasks whose data needs a download are errors naming the task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from mixtrain.errors import UserError  # noqa: E402

EOS = "<|endoftext|>"
WORDS = ("the cat sat on the mat . a dog ran to the park and the bird sang . one two three four five six seven "
         "eight nine ten . red green blue yellow . what is the colour of the sky ? it is blue . apples are red .").split()


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    tk.save(str(path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=EOS)
    fast.save_pretrained(path)


def task_yamls(d: Path, mc_answers: list[int], gen_answers: list[str]) -> Path:
    """One multiple-choice and one generate-until task over JSONL files in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    mc = [{"question": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}", "choices": ["red", "blue", "the park", "seven"],
           "answer": a} for i, a in enumerate(mc_answers)]
    gen = [{"prompt": f"{WORDS[2 * i]} {WORDS[2 * i + 3]} is", "answer": a} for i, a in enumerate(gen_answers)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    # long enough for several rolling windows of the 128-token model
    ppl = [{"text": " ".join(WORDS[i:] + WORDS[:i]) * 3} for i in range(0, 8, 4)]
    (d / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
    (d / "mt_ppl.yaml").write_text(f"""task: mt_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "mt_mc.yaml").write_text(f"""task: mt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "mt_gen.yaml").write_text(f"""task: mt_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return d


def mixtrain_export(hf_dir: Path, out: Path, layout: str) -> Path:
    """The HF model imported into mixtrain under ``layout`` (train.init_from's mapping), saved
    as a mixtrain export (model.safetensors + config.yaml + tokenizer.json)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from mixtrain.config import compose
    from mixtrain.hf.importer import convert
    from mixtrain.layouts import build_layout

    out.mkdir()
    cfg = compose(["model=from_hf", f"model.hf_path={hf_dir}", f"layout={layout}", "logger=csv",
                   f"run.root={out.parent}", f"run.name={out.name}"])
    state, _ = convert(hf_dir, cfg.model, build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window))
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), out / "config.yaml")
    shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF Llama with its tokenizer; per layout (standard, ma_offset) the same weights as a
    mixtrain export and that export's `mixtrain export --format hf` folder."""
    from mixtrain.hf.export import export_hf

    root = tmp_path_factory.mktemp("harness")
    hf_dir = root / "hf"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights: sharper, more distinct predictions than a fresh init
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(hf_dir)
    write_tokenizer(hf_dir)
    assert transformers.AutoTokenizer.from_pretrained(hf_dir).eos_token_id == 0
    out = {"hf": hf_dir}
    for layout in ("standard", "ma_offset"):
        exp = mixtrain_export(hf_dir, root / layout, layout)
        hf_export, target = export_hf(exp, root / f"{layout}-hf")
        assert target.remote_code == (layout != "standard")
        out[layout] = (exp, hf_export)
    return out


def hf_results(hf_dir: Path, tasks_dir: Path, remote_code: bool = False) -> dict:
    """lm-eval's own `hf` model on an HF folder (= lm_eval --model hf --model_args pretrained=DIR)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # our two tasks only: quick
    args = f"pretrained={hf_dir},dtype=float32" + (",trust_remote_code=True" if remote_code else "")
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["mt_mc", "mt_gen", "mt_ppl"], task_manager=tm,
                                   device="cpu", batch_size=3, log_samples=True, bootstrap_iters=0)


def mixtrain_eval(exp: Path, tasks_dir: Path, *extra: str) -> dict:
    from mixtrain.eval.cli import main

    assert main(["--model", str(exp), "--harness", "mt_mc,mt_gen,mt_ppl", "--harness-include", str(tasks_dir),
                 "--batch-size", "3", "--device", "cpu", *extra]) == 0
    return json.loads((exp / "eval" / "harness.json").read_text())


def assert_same(ref: dict, mine: dict, exp: Path) -> None:
    """Same scores, and sample by sample the same log-likelihoods (fp32) and generated text."""
    assert set(mine["harness"]) == {"mt_mc", "mt_gen", "mt_ppl"}
    for task, metrics in mine["harness"].items():
        for m, v in metrics.items():
            want = ref["results"][task][f"{m},none"]
            assert v == (want if task != "mt_ppl" else pytest.approx(want, rel=1e-5)), (task, m)
    samples = [json.loads(line) for line in (exp / "eval" / "harness_samples.jsonl").read_text().splitlines()]
    by_doc = {(s["task"], s["doc_id"]): s for s in samples}
    assert len(by_doc) == sum(len(v) for v in ref["samples"].values())
    for s in ref["samples"]["mt_mc"]:
        got = [float(r[0]) for r in by_doc[("mt_mc", s["doc_id"])]["filtered_resps"]]
        want = [float(r[0]) for r in s["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
    for s in ref["samples"]["mt_gen"]:
        assert by_doc[("mt_gen", s["doc_id"])]["filtered_resps"][0] == s["filtered_resps"][0]
    for s in ref["samples"]["mt_ppl"]:  # 148 words, over 128 tokens: summed over several rolling windows
        got = float(by_doc[("mt_ppl", s["doc_id"])]["filtered_resps"][0])
        assert abs(got - float(s["filtered_resps"][0])) < 1e-3, (got, s["filtered_resps"])


@pytest.mark.slow
def test_hf_export_and_mixtrain_engine_give_the_same_scores(models, tmp_path):
    n = 8
    std, std_hf = models["standard"]
    first = hf_results(std_hf, task_yamls(tmp_path / "t0", [0] * n, ["?"] * n))
    # Answers: the model's own choice / generation for even documents, something else for odd
    # ones, so both scores are 0.5 when a path reproduces the model's predictions.
    lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in first["samples"]["mt_mc"]}
    gens = {s["doc_id"]: s["filtered_resps"][0] for s in first["samples"]["mt_gen"]}
    mc_answers = [max(range(4), key=lambda c: lls[i][c]) for i in range(n)]
    mc_answers = [a if i % 2 == 0 else (a + 1) % 4 for i, a in enumerate(mc_answers)]
    gen_answers = [gens[i] if i % 2 == 0 else gens[i] + " nope" for i in range(n)]
    assert len(set(gens.values())) > 1  # the model says different things
    tasks_dir = task_yamls(tmp_path / "t1", mc_answers, gen_answers)

    # standard layout: the export is a stock LlamaForCausalLM
    ref, mine = hf_results(std_hf, tasks_dir), mixtrain_eval(std, tasks_dir)
    assert ref["results"]["mt_mc"]["acc,none"] == 0.5 and ref["results"]["mt_gen"]["exact_match,none"] == 0.5
    assert mine["harness"]["mt_mc"]["acc"] == 0.5 and mine["harness"]["mt_gen"]["exact_match"] == 0.5
    assert_same(ref, mine, std)
    assert mine["layout"] == "standard" and mine["n_samples"] == {"mt_mc": n, "mt_gen": n, "mt_ppl": 2}
    # mixtrain compare shows them
    from mixtrain.report.compare import compare_rows, format_compare, run_record

    rec = run_record(std)
    keys, rows = compare_rows([rec])
    assert rows[0]["harness/mt_mc/acc"] == 0.5 and rows[0]["harness/mt_gen/exact_match"] == 0.5
    assert "harness/mt_mc/acc_norm" in keys and "harness/mt_gen/exact_match" in format_compare([rec])
    # ma_offset: remote code (trust_remote_code=True) against mixtrain's engine with shared KV
    ma, ma_hf = models["ma_offset"]
    ref, mine = hf_results(ma_hf, tasks_dir, remote_code=True), mixtrain_eval(ma, tasks_dir, "--wandb")
    assert_same(ref, mine, ma)
    assert mine["layout"] == "ma_offset"
    # --wandb: the scores are in the (offline) W&B run (an export without a training run: its own, under eval/)
    from mixtrain.report.logs import wandb_records, wandb_run_files

    logged = {}
    for rec in wandb_records(wandb_run_files(ma / "eval")[-1]):
        if rec.WhichOneof("record_type") == "history":
            logged.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    assert logged["harness/mt_mc/acc"] == mine["harness"]["mt_mc"]["acc"]
    assert logged["harness/mt_gen/exact_match"] == mine["harness"]["mt_gen"]["exact_match"]


@pytest.mark.slow  # lm-eval indexes its ~15,000 built-in tasks to know which names exist
def test_unknown_task_and_offline_download_are_named(models, tmp_path):
    exp, _ = models["standard"]
    from mixtrain.eval.cli import main

    with pytest.raises(UserError, match=r"lm-eval does not know the task 'hellaswagg' \(did you mean hellaswag"):
        main(["--model", str(exp), "--harness", "hellaswagg"])
    # a built-in task whose data set lives on the hub: this test machine is offline (conftest)
    with pytest.raises(UserError, match=r"task 'arc_easy' cannot load its data .*offline"):
        main(["--model", str(exp), "--harness", "arc_easy"])
