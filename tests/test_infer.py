"""The inference engine against the model's full forward: cached (chunked) prefill and
decode logits equal a full forward for every preset, with the ring buffers wrapping;
ragged batches equal each row alone; allocated KV bytes equal the accounting exactly;
sampling; the two commands."""

import argparse
import json
from dataclasses import replace

import pytest
import torch

from mixtrain.accounting import kv_bytes_per_sequence
from mixtrain.config import ModelConfig, MoEConfig
from mixtrain.infer import Engine, KVCache, generate, sample
from mixtrain.infer.cli import register_bench, register_generate
from mixtrain.layouts import build_layout, make_preset
from mixtrain.model import build_model

W = 8
ATOL = 1e-4

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96,
                  max_seq_len=64, sliding_window=W, attn_impl="sdpa", init_std=0.05)
CFG12 = replace(CFG, n_layers=12)
CFG24 = replace(CFG, n_layers=24, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=32)
CFG_MOE = replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))

GENERIC = ["standard", "swa", "ma", "ma_endslide", "ma_offset", "ma_pairs", "ma_offset_slideshare",
           "ma_pairs_slideshare", "cla2", "cla3", "characterai", "interleaved"]
DEPTH24 = ["ma_successive_1", "ma_successive_2", "ma_successive_3", "ma_successive_4",
           "ma_noshare_1", "ma_noshare_2", "ma_noshare_3"]
# shared attention: 2 borrows the probabilities of consumer 1, 4 those of global 3
SHARED = {"layers": ["s", "s<0", "s^1", "G", "G^3", "s<0"]}


def layout_for(name, n):
    if name == "shared":
        return build_layout(SHARED, n, W)
    return make_preset(name, n, W, every=3 if name == "interleaved" else None)


CASES = ([(CFG, p) for p in GENERIC] + [(CFG12, p) for p in ("ma", "ma_offset", "ma_pairs", "characterai")]
         + [(CFG24, p) for p in DEPTH24] + [(CFG, "shared"), (CFG_MOE, "ma_offset"), (CFG_MOE, "shared")])


def ids_for(T, B=1, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, ids, n_prompt, chunk):
    """Prefill ids[:, :n_prompt] in chunks, then feed the rest one token at a time.
    Returns logits [B, T, V] (prefill positions and every decoded position)."""
    e = Engine(model, prefill_chunk=chunk)
    out = [e.start(ids[:, :n_prompt].tolist(), max_context=ids.shape[1], all_logits=True)]
    for j in range(n_prompt, ids.shape[1]):
        out.append(e.step(ids[:, j])[:, None])
    return torch.cat(out, dim=1), e


@pytest.mark.parametrize("cfg,name", CASES, ids=[f"{c.n_layers}L{'-moe' if c.moe else ''}-{n}" for c, n in CASES])
def test_cached_decode_matches_full_forward(cfg, name):
    model = build_model(cfg, layout_for(name, cfg.n_layers), device="cpu", seed=1)
    T = 3 * W + 2  # > 2W: every ring buffer wraps during decode
    ids = ids_for(T, B=2)
    full = model(ids).logits
    got, e = cached_logits(model, ids, n_prompt=5, chunk=3)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    assert e.cache.length == T


def test_bf16_cache_close_to_full_forward():
    model = build_model(CFG, layout_for("ma_pairs", 6), device="cpu", seed=7).to(torch.bfloat16)
    model.reset_rope()  # .to(bf16) cast the model's RoPE tables; the engine keeps its own in fp32
    ids = ids_for(3 * W, B=2)
    got, e = cached_logits(model, ids, n_prompt=W + 1, chunk=4)
    assert e.cache.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), model(ids).logits.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, W, 2 * W + 3, 100])
@pytest.mark.parametrize("name", ["ma_pairs", "shared"])
def test_chunked_prefill_matches_full_forward(name, chunk):
    model = build_model(CFG, layout_for(name, 6), device="cpu", seed=2)
    ids = ids_for(4 * W + 1, B=2, seed=3)
    e = Engine(model, prefill_chunk=chunk)
    got = e.start(ids.tolist(), all_logits=True)
    torch.testing.assert_close(got, model(ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(e.last_logits, got[:, -1])


@pytest.mark.parametrize("cfg,name", [(CFG, "ma_offset"), (CFG, "shared"), (CFG_MOE, "ma")])
def test_ragged_batch_matches_rows_alone(cfg, name):
    model = build_model(cfg, layout_for(name, 6), device="cpu", seed=4)
    lens, new = [3, 2 * W + 5, W], 2 * W + 1
    rows = [ids_for(n + new, seed=10 + i) for i, n in enumerate(lens)]
    P = max(lens)
    e = Engine(model, prefill_chunk=5)
    pre = e.start([r[0, :n].tolist() for r, n in zip(rows, lens)], max_context=P + new, all_logits=True)
    steps = []
    for j in range(new):
        steps.append(e.step(torch.stack([r[0, n + j] for r, n in zip(rows, lens)])))
    for b, (r, n) in enumerate(zip(rows, lens)):
        full = model(r).logits[0]  # the row alone, no padding
        torch.testing.assert_close(pre[b, P - n:], full[:n], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), full[n:n + new], atol=ATOL, rtol=0)


def test_generate_ragged_equals_alone_and_greedy_is_argmax():
    model = build_model(CFG, layout_for("ma_offset", 6), device="cpu", seed=5)
    prompts = [ids_for(n, seed=20 + n)[0].tolist() for n in (4, 2 * W + 3, 1)]
    batch = generate(model, prompts, max_new_tokens=2 * W, prefill_chunk=4)
    for p, o in zip(prompts, batch):
        assert o == generate(model, [p], max_new_tokens=2 * W)[0]
        logits = model(torch.tensor([p + o])).logits[0]
        assert o == logits[len(p) - 1:-1].argmax(-1).tolist()  # every token is the argmax of the full forward


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("context", [5, W, 3 * W + 1])
@pytest.mark.parametrize("cfg,name", CASES, ids=[f"{c.n_layers}L{'-moe' if c.moe else ''}-{n}" for c, n in CASES])
def test_allocated_bytes_equal_accounting(cfg, name, context):
    layout = layout_for(name, cfg.n_layers)
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(cfg, layout, batch=3, max_context=context, dtype=dtype)
        assert cache.allocated_bytes() == 3 * kv_bytes_per_sequence(cfg, layout, context, nbytes)
    # buffers exist for producers only; V-only for shared-attention layers; sliding hold min(W, T)
    assert set(cache.v) == set(layout.producers)
    assert set(cache.k) == {i for i in layout.producers if layout.layers[i].attn_source is None}
    for i in layout.producers:
        spec = layout.layers[i]
        want = context if spec.kind == "global" else min(W, context)
        assert cache.v[i].shape == (3, cfg.n_kv_heads, want, cfg.head_dim)


def test_paper_scale_accounting_without_allocating():
    """paper_moe at 32K in bf16: per-sequence bytes of the ma_offset cache vs standard."""
    from mixtrain.config import compose

    mc = compose(["model=paper_moe"]).model
    std, off = make_preset("standard", 24, 1024), make_preset("ma_offset", 24, 1024)
    assert kv_bytes_per_sequence(mc, std, 32768, 2) == 32768 * 36864
    assert kv_bytes_per_sequence(mc, std, 32768, 2) / kv_bytes_per_sequence(mc, off, 32768, 2) > 15
    # the same numbers from a real cache of a few KV heads' worth: meta tensors allocate nothing
    cache = KVCache(mc, off, batch=1, max_context=32768, device="meta", dtype=torch.bfloat16)
    assert sum(t.numel() * 2 for d in (cache.k, cache.v) for t in d.values()) == kv_bytes_per_sequence(mc, off, 32768, 2)


# ----------------------------------------------------------------------------- sampling


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6, generator=g), logits.argmax(-1))
    a = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(7))
    b = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # nucleus: with top_p 0.5 only the tokens whose preceding mass is < 0.5 can appear
    probs = (logits / 0.8).softmax(-1)
    sp, idx = probs.sort(-1, descending=True)
    allowed = [set(idx[r][(sp[r].cumsum(0) - sp[r]) < 0.5].tolist()) for r in range(4)]
    draws = torch.stack([sample(logits, 0.8, 0.5, g) for _ in range(200)])
    for r in range(4):
        assert set(draws[:, r].tolist()) <= allowed[r]


def test_generate_sampling_and_stop_tokens():
    model = build_model(CFG, layout_for("ma", 6), device="cpu", seed=6)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, prompts, 10) == generate(model, prompts, 10)  # greedy is deterministic
    assert generate(model, prompts, 10, temperature=1.0, top_p=1e-9) == generate(model, prompts, 10)
    s1 = generate(model, prompts, 10, temperature=1.5, top_p=0.95, seed=3)
    assert s1 == generate(model, prompts, 10, temperature=1.5, top_p=0.95, seed=3)
    assert s1 != generate(model, prompts, 10, temperature=1.5, top_p=0.95, seed=4)
    greedy = generate(model, prompts, 10)
    stop = greedy[0][2]
    out = generate(model, prompts, 10, stop_tokens=[stop])
    assert out[0] == greedy[0][:greedy[0].index(stop) + 1]  # row 0 stops at (and keeps) the stop token
    assert out[1] == (greedy[1][:greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1])


# ----------------------------------------------------------------------------- commands


def _parse(register, argv):
    parser = argparse.ArgumentParser(prog="mixtrain")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_infer_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    args = _parse(register_bench, ["bench", "infer", "model=tiny", "model.n_layers=6", "--layouts", "standard,ma_offset,swa",
                                   "--context", "96", "--memory-budget", "1MiB", "--decode-steps", "3",
                                   "--max-batch", "2", "--prefill-len", "40", "--repeats", "1", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads((out / "bench_infer.json").read_text())
    assert (out / "kv_memory.png").stat().st_size > 1000
    rows = {r["layout"]: r for r in result["layouts"]}
    # By hand for model=tiny in fp32 (2 KV heads of dim 16: 2 x 2 x 16 x 4 = 256 bytes per
    # stored token of a producer), context 96, W=32: standard stores 6 x 96 tokens; ma_offset
    # (0:s 1:s<0 2:s 3:s<2 4:s<2 5:G) 96 + 2 x 32; swa 6 x 32. Within 1 MiB of KV:
    # 1048576 // bytes sequences.
    # Decode reads at 94 cached columns (context 96, 3 timed steps after 2 warm-up steps,
    # the middle one), batch 2: every layer reads its (possibly shared) cache, a sliding
    # one min(94, 32) columns: standard 6 x 94, ma_offset 5 x 32 + 94, swa 6 x 32 columns.
    by_hand = {  # (KV bytes per sequence, sequences that fit, attention bytes per decode step)
        "standard": (6 * 96 * 256, 7, 2 * 6 * 94 * 256),
        "ma_offset": ((96 + 2 * 32) * 256, 25, 2 * (5 * 32 + 94) * 256),
        "swa": (6 * 32 * 256, 21, 2 * 6 * 32 * 256),
    }
    assert sorted(rows) == sorted(by_hand)
    for name, r in rows.items():
        kv_bytes, fits, attn_bytes = by_hand[name]
        assert r["kv_bytes_per_sequence"] == r["accounting_bytes_per_sequence"] == kv_bytes  # allocated == counted
        assert r["kv_bytes_per_token"] == kv_bytes / 96
        assert r["max_batch"] == r["max_batch_arithmetic"] == fits  # CPU: the KV budget arithmetic
        assert r["max_batch_verified"] is None and r["fit_method"] == "KV budget"
        assert r["activation_bytes_per_seq"] == 0  # a KV-only budget reserves nothing
        assert r["decode_batch"] == 2 and r["decode_steps"] == 3 and r["decode_tok_s"] > 0
        assert r["attn_bytes_per_step"] == attn_bytes
    assert rows["ma_offset"]["tokens_fit_vs_base"] == 25 / 7 and rows["swa"]["tokens_fit_vs_base"] == 21 / 7
    assert rows["ma_offset"]["kv_reduction_vs_base"] == 6 * 96 / 160
    table = capsys.readouterr().out
    assert "ma_offset" in table and "fits (KV budget)" in table and "KV budget 1 MiB (KV cache only)" in table
    assert result["meta"]["fit_method"].startswith("KV budget")


def test_generate_command_from_recipe(capsys):
    args = _parse(register_generate, ["generate", "--recipe", "model=tiny layout=ma_offset", "--prompt-ids", "1,2,3",
                                      "--prompt-ids", "4,5", "--max-new-tokens", "6", "--json"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert [len(o["new_ids"]) for o in res["outputs"]] == [6, 6]
    assert res["layout"] == "ma_offset"
    bad = _parse(register_generate, ["generate", "--recipe", "model=tiny", "--prompt", "hello"])
    assert bad.func(bad) == 2  # text needs a tokenizer
    assert "tokenizer" in capsys.readouterr().err


def test_generate_command_from_export_with_tokenizer(tmp_path, capsys):
    """An export folder (model.safetensors + config.yaml + tokenizer.json): --prompt text is
    encoded, the output equals generate() on the same weights, and EOS stops a row."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from mixtrain.data.tokenizer import train_bpe
    from mixtrain.infer.bench import build_random_model

    model, cfg = build_random_model(["model=tiny", "layout=ma_offset"], torch.device("cpu"), torch.float32, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    OmegaConf.save(OmegaConf.create({"model": cfg.model, "layout": cfg.layout}), tmp_path / "config.yaml")
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    args = _parse(register_generate, ["generate", "--model", str(tmp_path), "--prompt", "the quick brown",
                                      "--max-new-tokens", "7", "--json"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)["outputs"][0]
    assert res["prompt_ids"] == tok.encode("the quick brown")
    want = generate(model, [res["prompt_ids"]], 7, stop_tokens=[tok.eos_id])[0]
    assert res["new_ids"] == want and res["text"] == tok.decode(want)


def test_verified_fit_backs_off_by_ten_percent():
    from mixtrain.infer.bench import verified_fit

    tried = []

    def fits(b):
        tried.append(b)
        return b <= 70

    assert verified_fit(fits, 100) == 64  # the first 10% step at or below what fits
    assert tried == [100, 90, 81, 72, 64]
    assert verified_fit(lambda b: b <= 3, 5) == 3  # small batches step down by one
    assert verified_fit(lambda b: False, 50) == 0


def test_bench_auto_budget_reserves_decode_activations():
    from mixtrain.config import compose
    from mixtrain.infer.bench import activation_bytes_per_seq

    mc = compose(["model=paper_moe"]).model
    est = activation_bytes_per_seq(mc, 32768, 2)
    assert est >= mc.vocab_size * 4 + 4 * mc.d_model * 2  # fp32 logits and a few [d_model] buffers


def cli(argv, capsys):
    """``mixtrain ARGV`` in-process: (exit code, stderr). argparse errors exit via SystemExit."""
    from mixtrain.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--recipe", "model=nope", "--prompt-ids", "1,2"], r"Could not find 'model/nope'"),
    (["generate", "--recipe", "layout=ma model.n_layers=7", "--prompt-ids", "1,2"],
     r"preset ma .* multiple of 6; the model has 7 layers"),
    (["generate", "--recipe", "model=tiny", "--prompt-ids", "1,2", "--max-new-tokens", "0"],
     r"argument --max-new-tokens: 0 is not positive"),
    (["generate", "--recipe", "model=tiny", "--prompt-ids", "1,x"], r"--prompt-ids/--stop-ids take comma-separated integers"),
    (["generate", "--recipe", "model=tiny", "--prompt-ids", "1", "--device", "gpu0"], r"device 'gpu0' is not a device name"),
    (["generate", "--recipe", "model=tiny", "--prompt-ids", "1", "--top-p", "0"], r"argument --top-p: 0 must be in \(0, 1\]"),
    (["generate", "--model", "/no/such/run", "--prompt-ids", "1"], r"/no/such/run"),
    (["bench", "infer", "model=nope"], r"Could not find 'model/nope'"),
    (["bench", "infer", "model=tiny", "--layouts", "standard,nope"], r"Could not find 'layout/nope'"),
    (["bench", "infer", "model=tiny", "model.n_layers=7", "--layouts", "ma"], r"the model has 7 layers"),
    (["bench", "infer", "model=tiny", "--memory-budget", "lots"], r"cannot read a memory size from 'lots'"),
    (["bench", "infer", "model=tiny", "--context", "0"], r"argument --context: 0 is not positive"),
    (["bench", "infer", "model=tiny", "--decode-steps", "-1"], r"argument --decode-steps: -1 is not positive"),
    (["bench", "infer", "model=tiny", "--max-batch", "x"], r"argument --max-batch: 'x' is not an integer"),
    (["bench", "infer", "model=tiny", "--layouts", ","], r"--layouts is empty"),
])
def test_user_mistakes_get_one_error_and_exit_2(argv, message, capsys, tmp_path):
    import re

    rc, err = cli([*argv, *(["--out", str(tmp_path)] if argv[0] == "bench" else [])], capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    command = "mixtrain " + ("bench infer" if argv[0] == "bench" else "generate")
    line = next(l for l in err.splitlines() if l.startswith(f"{command}: error:"))  # noqa: E741
    assert re.search(message, err), err
    assert re.search(message, line) or "Could not find" in line, line  # the reason is on the error line
    assert not (tmp_path / "bench_infer.json").exists()


def test_decode_fit_check_backs_off_on_out_of_memory():
    """The GPU capacity check, run on CPU with an allocator that fails above 5 rows: the
    cache is allocated and one decode step run per try, and freed after each."""
    from mixtrain.infer.bench import _decode_fits, verified_fit

    engine = Engine(build_model(CFG, layout_for("ma_offset", 6), device="cpu", seed=8))
    real = engine.new_cache

    def new_cache(batch, max_context):
        if batch > 5:
            raise torch.OutOfMemoryError("fake: out of memory")
        return real(batch, max_context)

    engine.new_cache = new_cache
    assert verified_fit(lambda b: _decode_fits(engine, b, 3 * W, torch.device("cpu"), None), 9) == 5
    assert engine.cache is None


@pytest.mark.parametrize("name", ["cla2", "shared"])
def test_cached_decode_with_cla_kv_norm(name):
    """CLA's separate KV-path norm: the engine projects K/V from its own norm."""
    cfg = replace(CFG, kv_norm=True)
    model = build_model(cfg, layout_for(name, cfg.n_layers), device="cpu", seed=3)
    with torch.no_grad():  # make the two norms differ, or the test could not tell them apart
        for block in model.layers:
            if block.kv_norm is not None:
                block.kv_norm.weight.uniform_(0.5, 2.0)
    ids = ids_for(3 * W + 2, B=2)
    got, _ = cached_logits(model, ids, n_prompt=5, chunk=3)
    torch.testing.assert_close(got, model(ids).logits, atol=ATOL, rtol=0)


def test_generate_and_export_name_a_missing_model_or_a_run_without_checkpoints(tmp_path, capsys):
    """A missing --model path is reported as missing (not as a missing tokenizer), and a run
    directory that has not written a checkpoint yet is reported as such by generate and export."""
    from mixtrain.cli import main

    missing = tmp_path / "runs" / "nonexist"
    for prompt in (["--prompt", "x"], ["--prompt-ids", "1,2"]):
        assert main(["generate", "--model", str(missing), *prompt]) == 2
        assert capsys.readouterr().err == (
            f"mixtrain generate: error: {missing} does not exist: give a run directory, a checkpoint, "
            "or an exported model folder\n")
    run = tmp_path / "runs" / "fresh"  # what `mixtrain train` leaves before its first checkpoint
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "csv").mkdir()  # config.yaml alone is also what an export folder holds (RunDir.is_run_dir)
    want = (f"{run} is a run directory with no checkpoint yet (nothing under checkpoints/): "
            "train it first, or pass a checkpoint path\n")
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err == "mixtrain export: error: " + want
    (run / "checkpoints").mkdir()
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err == "mixtrain export: error: " + want
    assert main(["generate", "--model", str(run), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == "mixtrain generate: error: " + want
