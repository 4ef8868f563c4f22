"""lm-evaluation-harness tasks through mixtrain's inference engine.

    mixtrain eval --model runs/x --harness hellaswag,arc_easy [--harness-include my_tasks/]

:class:`MixtrainLM` is an ``lm_eval`` language model whose requests run on
:class:`mixtrain.infer.generate.Engine` (KV cache with producer layers only, so a
layout's memory saving applies): ``loglikelihood`` (multiple choice) and
``loglikelihood_rolling`` (perplexity) prefill each batch in chunks and read the
continuation's log-probabilities; ``generate_until`` decodes with the cache until a
stop string or EOS. Tokenisation and truncation follow lm-eval's own ``hf`` model
(``TemplateLM``: the context's trailing spaces move to the continuation; the whole
text is encoded and split), so an HF export scored with ``lm_eval --model hf`` and the
same model scored here agree.

:func:`evaluate` runs lm-eval's Python API in-process (``simple_evaluate``) and writes
``<out>/harness.json``: ``harness`` {task: {metric: value}} (stderr in
``harness_stderr``), ``versions``, ``n_samples``, the model and layout names, and
``harness_samples.jsonl`` (per document: arguments, responses, filtered responses,
target). ``mixtrain compare`` shows ``harness/<task>/<metric>`` columns.

lm-eval is an optional dependency (``pip install 'mixtrain[hf]'``), imported lazily.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

from mixtrain.errors import UserError

HINT = "lm-evaluation-harness is not installed: pip install 'mixtrain[hf]' (or pip install lm-eval)"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError as e:
        raise UserError(f"{HINT} ({e})") from None
    return TemplateLM


def make_lm(model, tokenizer, batch_size: int = 8, max_length: Optional[int] = None, prefill_chunk: int = 512,
            max_gen_toks: int = 256):
    """The lm-eval LM of a mixtrain model (see :class:`MixtrainLM`'s doc)."""
    TemplateLM = _lm_eval()

    class MixtrainLM(TemplateLM):
        """lm-eval requests on mixtrain's inference engine (``Engine``: KV cache, layout-aware).

        tokenizer: a ``tokenizers.Tokenizer`` (or mixtrain's Tok wrapper), whose EOS ends
        generations and stands before an empty context (lm-eval's ``prefix_token_id``)."""

        backend = "causal"

        def __init__(self):
            super().__init__()
            from mixtrain.infer.generate import Engine

            self.tk = getattr(tokenizer, "tk", tokenizer)
            eos = getattr(tokenizer, "eos_id", None)
            if eos is None:
                for t in ("<|endoftext|>", "</s>", "<eos>", "<|eos|>"):
                    if self.tk.token_to_id(t) is not None:
                        eos = self.tk.token_to_id(t)
                        break
            if eos is None:
                raise UserError("the tokenizer has no EOS token (<|endoftext|>, </s>, <eos>): generations could not end")
            self._eot = int(eos)
            self.engine = Engine(model, prefill_chunk=prefill_chunk, pad_id=getattr(tokenizer, "pad_id", None) or 0)
            self._device = self.engine.device
            self._max_length = int(max_length or model.cfg.max_seq_len)
            self.batch_size = int(batch_size)
            self.max_gen_toks = int(max_gen_toks)

        # -- tokenizer ------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return "mixtrain"

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            # as lm-eval's hf model: the tokenizer's own post-processing unless told otherwise
            return self.tk.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens).ids

        def tok_decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
            return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

        # -- scoring ------------------------------------------------------------------
        def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
            """rows: (input tokens, n) -> (sum of log p of the last n targets, greedy?), where
            the targets are the input shifted by one plus the row's final target, i.e. each
            row is ``tokens[:-1]`` fed and ``tokens[-n:]`` scored (lm-eval's convention)."""
            import torch

            out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            eng = self.engine
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                seqs = [rows[i][0] for i in idx]
                inps = [q[:-1] for q in seqs]
                B, P = len(inps), max(len(q) for q in inps)
                if eng.cache is None or eng.cache.batch != B or eng.cache.max_context < P:
                    eng.new_cache(B, P)
                pad = [P - len(q) for q in inps]
                eng.cache.reset(pad)
                ids = torch.full((B, P), eng.pad_id, dtype=torch.long)
                for b, q in enumerate(inps):
                    ids[b, pad[b]:] = torch.as_tensor(q, dtype=torch.long)
                ids = ids.to(eng.device)
                # the columns whose logits predict each row's scored tokens
                want = [(P - rows[i][1], P) for i in idx]
                got: list[list] = [[] for _ in idx]
                for c in range(0, P, eng.prefill_chunk):
                    logits = eng.forward(ids[:, c:c + eng.prefill_chunk], all_logits=True)  # [B, t, V]
                    t = logits.shape[1]
                    for b, (lo, hi) in enumerate(want):
                        a, z = max(lo, c), min(hi, c + t)
                        if a < z:
                            got[b].append(logits[b, a - c:z - c].float())
                for b, i in enumerate(idx):
                    lg = torch.cat(got[b]).log_softmax(-1)  # [n, V]
                    target = torch.as_tensor(seqs[b][-rows[i][1]:], device=lg.device)
                    lp = lg.gather(-1, target[:, None]).squeeze(-1)
                    out[i] = (float(lp.sum()), bool((lg.argmax(-1) == target).all()))
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            rows = []
            for _, context_enc, continuation_enc in requests:
                # as lm-eval's hf model: keep the last max_length + 1 tokens, feed all but the last
                whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
                rows.append((whole, min(len(continuation_enc), len(whole) - 1)))
            results = self._score(rows)
            for (key, _, _), res in zip(requests, results):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            out = []
            for (string,) in [r.args for r in requests]:
                windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)))
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                total = sum(s for s, _ in scores)
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                out.append(total)
            return out

        # -- generation ---------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            import torch
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

            from mixtrain.infer.generate import sample

            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            args = [r.args for r in requests]
            out: list[Optional[str]] = [None] * len(args)
            groups: dict[str, list[int]] = {}
            for i, (_, kw) in enumerate(args):
                groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
            eng = self.engine
            for members in groups.values():
                kwargs = normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise UserError(f"a task asks for {max_gen} new tokens, as many as the model's context "
                                    f"({self.max_length}); lower the task's max_gen_toks")
                encoded = {i: self.tok_encode(args[i][0])[-max_ctx:] for i in members}
                members = sorted(members, key=lambda i: -len(encoded[i]))
                for s in range(0, len(members), self.batch_size):
                    idx = members[s:s + self.batch_size]
                    prompts = [encoded[i] or [self.prefix_token_id] for i in idx]
                    P = max(len(p) for p in prompts)
                    eng.start(prompts, max_context=P + max_gen)
                    gen = torch.Generator(device=eng.device).manual_seed(1234) if temperature > 0 else None
                    new: list[list[int]] = [[] for _ in idx]
                    done = [False] * len(idx)
                    logits = eng.last_logits
                    for n in range(max_gen):
                        tok = sample(logits, temperature, 1.0, gen)
                        for b, x in enumerate(tok.tolist()):
                            if done[b]:
                                continue
                            new[b].append(x)
                            text = self.tok_decode(new[b])
                            done[b] = x == self.eot_token_id or any(u and u in text for u in until)
                        if all(done) or n == max_gen - 1:
                            break
                        logits = eng.step(tok)
                    for b, i in enumerate(idx):
                        text = postprocess_generated_text(self.tok_decode(new[b]), until, None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
            return out  # type: ignore[return-value]

    return MixtrainLM()


# ----------------------------------------------------------------------------- tasks


def parse_harness_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--harness {spec!r}: give one or more lm-eval task names, comma-separated (e.g. hellaswag,arc_easy)")
    return tasks


def task_manager(include: Optional[list[str]] = None, tasks: Optional[list[str]] = None):
    """lm-eval's TaskManager over the YAML folders/files in ``include`` alone when they define
    every one of ``tasks`` (quick), else over lm-eval's own ~15,000 tasks too (indexing them
    takes a while; kept for the process)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = []
    for p in include or []:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"--harness-include {p}: no such folder or file (lm-eval task YAMLs)")
        paths.append(str(path.resolve()))
    if paths and tasks:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return _full_task_manager(tuple(paths))


@lru_cache(maxsize=4)
def _full_task_manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


def check_tasks(tasks: list[str], tm, limit: Optional[float] = None) -> None:
    """Every task is known to lm-eval and its data can be loaded here: otherwise a UserError
    naming the task (unknown: with the closest names; data: what failed, e.g. a hub data set
    without network)."""
    import difflib

    from lm_eval.tasks import get_task_dict

    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            raise UserError(
                f"--harness: lm-eval does not know the task {t!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; list them with `lm_eval ls tasks`, or add your own task YAMLs with --harness-include DIR"
            )
    for t in tasks:
        try:
            get_task_dict([t], tm)
        except Exception as e:  # noqa: BLE001 - a data set that cannot be had: name the task and the cause
            msg = f"{type(e).__name__}: {e}".strip()
            offline = any(w in msg.lower() for w in ("offline", "connect", "resolve", "network", "internet", "couldn't reach"))
            raise UserError(
                f"--harness: task {t!r} cannot load its data ({msg[:400]})"
                + (". It needs a download from the Hugging Face hub and this machine is offline (or "
                   "HF_DATASETS_OFFLINE=1): fetch it once with network access so it is cached, or point the "
                   "task at local files (a task YAML with dataset_path: json and data_files, via --harness-include)"
                   if offline else "")
            ) from None


# ----------------------------------------------------------------------------- run


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results -> {harness: {task: {metric: value}}, harness_stderr: ..., versions, n_samples}."""
    scores: dict[str, dict[str, Any]] = {}
    stderr: dict[str, dict[str, Any]] = {}
    for task, res in (results.get("results") or {}).items():
        for key, v in res.items():
            if "," not in key or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue  # "metric,filter" keys only (not alias, sample_len, ...)
            metric, _, flt = key.partition(",")
            name = metric if flt in ("", "none") else f"{metric}[{flt}]"
            if metric.endswith("_stderr"):
                stderr.setdefault(task, {})[name.replace("_stderr", "", 1)] = _clean(float(v))
            else:
                scores.setdefault(task, {})[name] = _clean(float(v))
    n = {t: (v.get("effective") if isinstance(v, dict) else v) for t, v in (results.get("n-samples") or {}).items()}
    return {"harness": scores, "harness_stderr": stderr, "versions": results.get("versions", {}),
            "n_shot": results.get("n-shot", {}), "n_samples": n}


def run_harness(lm, tasks: list[str], tm, limit: Optional[float] = None, num_fewshot: Optional[int] = None,
                seed: int = 0) -> dict[str, Any]:
    """lm-eval's simple_evaluate, in-process, on ``lm`` (check the tasks first: :func:`check_tasks`)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed,
                                   verbosity="WARNING")


def write_results(results: dict[str, Any], out_dir: Path, names: dict[str, Any]) -> dict[str, Any]:
    """``<out_dir>/harness.json`` and ``harness_samples.jsonl`` (atomic writes)."""
    from mixtrain.files import atomic_write_text

    summary = {**names, **summarize(results)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "harness.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            lines.append(json.dumps({"task": task, "doc_id": s.get("doc_id"), "target": s.get("target"),
                                     "arguments": s.get("arguments"), "resps": s.get("resps"),
                                     "filtered_resps": s.get("filtered_resps"),
                                     **{k: s[k] for k in s if k in summary["harness"].get(task, {})}},
                                    default=str))
    atomic_write_text(out_dir / "harness_samples.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    rows = [f"{'task':<28} {'metric':<20} {'value':>8} {'stderr':>8}"]
    for task, metrics in summary["harness"].items():
        for m, v in metrics.items():
            se = summary["harness_stderr"].get(task, {}).get(m)
            rows.append(f"{task:<28} {m:<20} {('-' if v is None else f'{v:.4f}'):>8} "
                        f"{('-' if se is None else f'{se:.4f}'):>8}")
    return "\n".join(rows)


def wandb_data(summary: dict[str, Any]) -> dict[str, float]:
    return {f"harness/{t}/{m}": v for t, ms in summary["harness"].items() for m, v in ms.items() if v is not None}
