"""`mixtrain export --format hf`: every shipped layout preset, a custom layout and tiny MoE
models load in transformers and compute what mixtrain computes.

Each case builds a tiny random model (window 8, sequences of 40 tokens), writes it as a
mixtrain export, exports it to HF and checks, against the mixtrain model:
- logits (fp32) within 1e-5, through AutoModelForCausalLM (trust_remote_code where needed);
- HF greedy generate() == mixtrain's inference engine (what `mixtrain generate` runs) for
  40 new tokens after a ragged (left-padded) batch of prompts: 32+ tokens past the window;
plus: the cache generate() allocates for MA layouts is the accounting's byte count, a bf16
export loads and runs, the tokenizer loads with AutoTokenizer, the remote code loads
without mixtrain, and bad sources fail clearly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mixtrain.accounting import kv_bytes_per_sequence, kv_cache_layers, standard_layout  # noqa: E402
from mixtrain.cli import main  # noqa: E402
from mixtrain.config import compose  # noqa: E402
from mixtrain.errors import UserError  # noqa: E402
from mixtrain.hf.export import export_hf  # noqa: E402
from mixtrain.infer.generate import Engine  # noqa: E402
from mixtrain.layouts import LayoutError, build_layout  # noqa: E402
from mixtrain.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "recipes" / "layout").glob("*.yaml"))
WINDOW, SEQ, NEW = 8, 40, 40
TINY = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "ffn_hidden": 48, "vocab_size": 300,
        "sliding_window": WINDOW, "max_seq_len": 128, "init_std": 0.1}
CUSTOM = ["G", "s4", "s4<1", "s", "s^3", "G<0", "s<3"]  # two windows, KV sharing, Shared Attention

# Stock classes: what each layout must become (everything else is remote code).
STOCK = {"standard": "LlamaForCausalLM", "swa": "MistralForCausalLM", "interleaved": "MinistralForCausalLM",
         "moe_renorm": "MixtralForCausalLM", "moe_renorm_swa": "MixtralForCausalLM", "moe": "Qwen2MoeForCausalLM",
         "moe_interleaved": "Qwen2MoeForCausalLM"}
# Run on every `pytest -q`; the other presets are marked slow (CI runs them too).
FAST = {"standard", "swa", "interleaved", "ma_offset", "cla2", "custom", "moe", "moe_ma_offset"}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from mixtrain.data.tokenizer import train_bpe

    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello mixtrain",
             "sliding windows and shared caches"] * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, 280).save(path)
    return path


def _depth(layout_cfg) -> int:
    """The depth a layout recipe is written for: its own length, else the first that fits."""
    if layout_cfg.get("layers"):
        return len(layout_cfg["layers"])
    for n in (6, 12, 13, 24):
        try:
            build_layout(layout_cfg, n, WINDOW)
            return n
        except LayoutError:
            continue
    raise AssertionError(f"no depth fits {layout_cfg}")


def case_config(case: str):
    """The resolved mixtrain config of a test case (a preset name or one of the extras)."""
    moe = case.startswith("moe")
    cfg = compose(["model=tiny_moe" if moe else "model=tiny"] + (
        [f"layout={case}"] if case in PRESETS else []))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for k, v in TINY.items():
        cfg.model[k] = v
    if case == "custom":
        cfg.layout = {"layers": CUSTOM}
        cfg.model.kv_norm = True
    if case in ("cla2", "cla3"):
        cfg.model.kv_norm = True  # Cross-Layer Attention with its KV-path norm
    if moe:
        cfg.model.moe.expert_hidden = 16
        cfg.model.moe.renormalize = case.startswith("moe_renorm")
        cfg.layout = {"preset": {"moe": "standard", "moe_renorm": "standard", "moe_renorm_swa": "swa",
                                 "moe_ma_offset": "ma_offset", "moe_interleaved": "interleaved"}[case],
                      "every": 3 if case == "moe_interleaved" else None}
    cfg.model.n_layers = _depth(cfg.layout)
    return cfg


def write_mixtrain_export(folder: Path, cfg, tokenizer: Path, seed: int = 0):
    """A mixtrain export (model.safetensors + config.yaml + tokenizer.json); returns the model."""
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    model = build_model(cfg.model, layout, device="cpu", seed=seed).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    OmegaConf.save(cfg, folder / "config.yaml")
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return model


def load_hf(folder: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kw).eval()


def ragged_prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (12, 9)]


def hf_generate(hf, prompts: list[list[int]], new: int, pad_id: int = 1, **kw):
    """Left-padded batch through generate() (greedy); returns (new ids per row cut after EOS, output)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                      return_dict_in_generate=True, **kw)
    eos = hf.generation_config.eos_token_id
    rows = []
    for row in out.sequences[:, P:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows, out


def _case(name: str):
    return pytest.param(name, marks=() if name in FAST else pytest.mark.slow, id=name)


CASES = [_case(p) for p in PRESETS] + [_case(c) for c in ("custom", "moe", "moe_renorm", "moe_renorm_swa",
                                                           "moe_ma_offset", "moe_interleaved")]


@pytest.mark.parametrize("case", CASES)
def test_hf_logits_and_generate_equal_mixtrain(case, tmp_path, tokenizer_file):
    cfg = case_config(case)
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, target = export_hf(tmp_path / "mx", tmp_path / "hf")
    expected = STOCK.get(case, "MixtrainForCausalLM")
    assert target.architecture == expected, target.reason
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [expected]
    assert ("auto_map" in config) == target.remote_code
    hf = load_hf(out, dtype=torch.float32)
    assert type(hf).__name__ == expected

    ids = torch.randint(0, cfg.model.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, hf(ids).logits
    assert (ref - got).abs().max().item() <= 1e-5

    # No stop token here, so every row runs 32+ tokens past the window (the CLI test stops at EOS).
    prompts = ragged_prompts(cfg.model.vocab_size)
    engine = Engine(model).generate(prompts, NEW)
    hf.generation_config.eos_token_id = None
    rows, _ = hf_generate(hf, prompts, NEW)
    assert rows == engine and [len(r) for r in rows] == [NEW, NEW]


def test_remote_code_loads_without_mixtrain(tmp_path, tokenizer_file):
    """The folder alone (transformers + torch) is enough: mixtrain cannot be imported."""
    cfg = case_config("custom")
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, _ = export_hf(tmp_path / "mx", tmp_path / "hf")
    ids = torch.arange(2, 2 + SEQ)[None]
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "ref.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mixtrain" or name.startswith("mixtrain."):
            raise ImportError("mixtrain is blocked in this test")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
assert tok.eos_token_id == 0
with torch.no_grad():
    got = m(torch.arange(2, 2 + {SEQ})[None]).logits
ref = torch.load({str(tmp_path / 'ref.pt')!r})
print("MAXDIFF", (got - ref).abs().max().item(), "MIXTRAIN_LOADED", "mixtrain" in sys.modules)
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("MAXDIFF")]
    assert lines, res.stdout[-2000:] + res.stderr[-2000:]
    line = lines[0].split()
    assert float(line[1]) <= 1e-5 and line[3] == "False"


@pytest.mark.parametrize("case", ["ma_offset", "ma_pairs_slideshare", "shared_attention_example"])
def test_generate_cache_is_as_small_as_accounting(case, tmp_path, tokenizer_file):
    """The cache generate() allocates holds producers only: its bytes are the accounting's."""
    cfg = case_config(case)
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, target = export_hf(tmp_path / "mx", tmp_path / "hf")
    assert target.remote_code
    hf = load_hf(out, dtype=torch.float32)
    prompts = [list(range(2, 14)), list(range(20, 32))]  # equal lengths: every row has T columns
    hf.generation_config.eos_token_id = None  # exactly NEW tokens
    _, res = hf_generate(hf, prompts, NEW)
    cache = res.past_key_values
    T = res.sequences.shape[1] - 1  # the last new token is never fed back
    assert T == 12 + NEW - 1 and cache.get_seq_length() == T
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)
    layout = model.layout
    assert len(cache.layers) == len(kv_cache_layers(cfg.model, layout))
    assert held == kv_bytes_per_sequence(cfg.model, layout, T, dtype_bytes=4) * len(prompts) == cache.allocated_bytes()
    standard = kv_bytes_per_sequence(cfg.model, standard_layout(cfg.model.n_layers), T, dtype_bytes=4) * len(prompts)
    assert held < standard  # what a stock class's DynamicCache would hold for the same depth


def test_cli_export_run_dir_bf16_and_generate(tmp_path, tokenizer_file, capsys):
    """`mixtrain export --format hf RUN --dtype bf16` -> <run>/export-hf; it loads in bf16 and
    runs; the fp32 export's greedy generate() equals `mixtrain generate --model RUN`."""
    cfg = case_config("ma_offset")
    run = tmp_path / "run"
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    (run / "checkpoints").mkdir(parents=True)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mixtrain_config": OmegaConf.to_container(cfg)}, run / "checkpoints" / "step-5.ckpt")
    OmegaConf.save(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())

    assert main(["export", "--format", "hf", str(run), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert str(run / "export-hf") in printed and "trust_remote_code=True" in printed
    hf16 = load_hf(run / "export-hf", dtype="auto")
    assert {p.dtype for p in hf16.parameters()} == {torch.bfloat16}
    ids = torch.arange(2, 2 + SEQ)[None]
    with torch.no_grad():
        got, ref = hf16(ids).logits.float(), model(ids).logits
    assert torch.isfinite(got).all() and (got - ref).abs().max().item() < 0.1
    rows16, _ = hf_generate(hf16, [list(range(2, 14))], 8)
    assert len(rows16[0]) >= 1

    assert main(["export", "--format", "hf", str(run), "--out", str(tmp_path / "hf32")]) == 0
    capsys.readouterr()
    prompts = ragged_prompts(cfg.model.vocab_size, seed=3)
    argv = ["generate", "--model", str(run), "--max-new-tokens", str(NEW), "--json", "--device", "cpu"]
    for p in prompts:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0
    cli_rows = [r["new_ids"] for r in json.loads(capsys.readouterr().out)["outputs"]]
    rows, _ = hf_generate(load_hf(tmp_path / "hf32", dtype=torch.float32), prompts, NEW)
    assert rows == cli_rows


def test_tokenizer_goes_with_the_export(tmp_path, tokenizer_file):
    from transformers import AutoTokenizer

    from mixtrain.data.tokenizer import load_tokenizer_file

    cfg = case_config("standard")
    write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, _ = export_hf(tmp_path / "mx", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer_file(tokenizer_file)
    text = "the lazy fox says hello world"
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0, "<|pad|>", 1)
    assert tok.model_max_length == cfg.model.max_seq_len
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (0, 1) == (gen["eos_token_id"], gen["pad_token_id"])


def test_remote_code_flag_and_moe_aux_losses(tmp_path, tokenizer_file):
    """--remote-code on a stock layout gives the same logits; the remote class computes
    mixtrain's auxiliary losses (per-layer mean), where the stock class pools layers."""
    cfg = case_config("moe")
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, target = export_hf(tmp_path / "mx", tmp_path / "hf", remote_code=True)
    assert target.architecture == "MixtrainForCausalLM"
    hf = load_hf(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        got = hf(ids, labels=ids, output_router_logits=True)
    assert (ref.logits - got.logits).abs().max().item() <= 1e-5
    moe = cfg.model.moe
    expected = moe.lb_loss_weight * ref.aux["lb_loss"] + moe.z_loss_weight * ref.aux["z_loss"]
    assert got.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_export_errors_are_clear(tmp_path, tokenizer_file, capsys):
    assert main(["export", "--format", "hf", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    assert main(["export", "--format", "hf", str(run)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bare = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, bare)
    with pytest.raises(UserError, match="carries no mixtrain config"):
        export_hf(bare)
    with pytest.raises(SystemExit):
        main(["export", str(run), "--dtype", "bf16"])  # --dtype is for --format hf
    assert "only apply to --format hf" in capsys.readouterr().err
    cfg = case_config("standard")
    write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    with pytest.raises(UserError, match="--tokenizer"):
        export_hf(tmp_path / "mx", tokenizer=str(tmp_path / "missing.json"))


def test_stock_moe_aux_loss_weight_carries_over_for_one_layer(tmp_path, tokenizer_file):
    """Qwen2-MoE's pooled Switch loss counts experts per token (top_k x mixtrain's share):
    the export's router_aux_loss_coef = lb_loss_weight / top_k gives the same weighted loss
    for one MoE layer."""
    cfg = case_config("moe")
    cfg.model.n_layers = 1
    model = write_mixtrain_export(tmp_path / "mx", cfg, tokenizer_file)
    out, target = export_hf(tmp_path / "mx", tmp_path / "hf")
    assert target.architecture == "Qwen2MoeForCausalLM"
    hf = load_hf(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lb = model(ids).aux["lb_loss"].item()
        got = hf(ids, output_router_logits=True).aux_loss.item()
    assert got == pytest.approx(cfg.model.moe.top_k * lb, rel=1e-5)
    assert hf.config.router_aux_loss_coef * got == pytest.approx(cfg.model.moe.lb_loss_weight * lb, rel=1e-5)
