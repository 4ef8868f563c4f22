"""train.init_from=<Hugging Face folder>: tiny HF models built and saved by the test (no
download) load into mixtrain with the HF model's logits, train under a MixAttention
layout, and anything mixtrain cannot express is refused up front, named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixtrain.config import compose  # noqa: E402
from mixtrain.errors import UserError  # noqa: E402
from mixtrain.hf.importer import convert, derive, load_hf_model, prepare_run  # noqa: E402
from mixtrain.layouts import build_layout  # noqa: E402

DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def mixtrain_logits(path, layout=None, x=None):
    model, _ = load_hf_model(path, layout)
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**DIMS, attn_implementation="sdpa")
    return save(transformers.LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("hf") / "llama")


def test_llama_standard_layout_gives_the_hf_logits(llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa").eval()
    x = torch.randint(0, 512, (2, 120), generator=torch.Generator().manual_seed(1))
    diff = (hf_logits(hf, x) - mixtrain_logits(llama_dir, None, x)).abs().max().item()
    assert diff <= 1e-5, diff
    # the derived recipe is the HF config's
    cfg = compose(["model=from_hf", f"model.hf_path={llama_dir}"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_kv_heads, cfg.model.head_dim, cfg.model.ffn_hidden,
            cfg.model.vocab_size, cfg.model.max_seq_len, cfg.model.norm_eps, cfg.model.moe) == (64, 6, 2, 16, 96, 512, 256, 1e-5, None)


def test_mistral_sliding_window_equals_swa_layout(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(**DIMS, sliding_window=16, attn_implementation="eager")
    path = save(transformers.MistralForCausalLM(cfg).eval(), tmp_path / "mistral")
    fields, notes = derive(path)
    assert fields["sliding_window"] == 16 and "layout=swa" in notes[0]
    x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    diff = (hf_logits(hf, x) - mixtrain_logits(path, {"preset": "swa"}, x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_moe_imports_mixtral_and_qwen2moe_without_shared_expert(tmp_path):
    torch.manual_seed(2)
    dims = {**DIMS, "num_hidden_layers": 2}
    mix = transformers.MixtralForCausalLM(transformers.MixtralConfig(**dims, num_local_experts=4, num_experts_per_tok=2)).eval()
    qcfg = transformers.Qwen2MoeConfig(**dims, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32, norm_topk_prob=False)
    qwen = transformers.Qwen2MoeForCausalLM(qcfg).eval()
    with torch.no_grad():  # what mixtrain can express: no attention biases, no shared expert
        for name, p in qwen.named_parameters():
            if name.endswith("_proj.bias") or "shared_expert" in name:
                p.zero_()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    for model, name in ((mix, "mixtral"), (qwen, "qwen2moe")):
        path = save(model, tmp_path / name)
        diff = (hf_logits(model, x) - mixtrain_logits(path, None, x)).abs().max().item()
        assert diff <= 1e-5, (name, diff)
    # transformers 5 keeps the experts fused in memory ([E, 2H, C] gate_up, [E, C, H] down): a
    # checkpoint saved in that form (e.g. from model.state_dict()) loads too
    state = mix.state_dict()
    if any(k.endswith("experts.gate_up_proj") for k in state):
        from safetensors.torch import save_file

        fused = tmp_path / "mixtral-fused"
        fused.mkdir()
        shutil.copyfile(tmp_path / "mixtral" / "config.json", fused / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors")
        diff = (hf_logits(mix, x) - mixtrain_logits(fused, None, x)).abs().max().item()
        assert diff <= 1e-5, diff
    cfg = compose(["model=from_hf_moe", f"model.hf_path={tmp_path / 'mixtral'}", "model.moe.lb_loss_weight=0.02"])
    assert (cfg.model.moe.n_experts, cfg.model.moe.top_k, cfg.model.moe.renormalize, cfg.model.moe.lb_loss_weight) == (4, 2, True, 0.02)
    assert compose(["model=from_hf_moe", f"model.hf_path={tmp_path / 'qwen2moe'}"]).model.moe.renormalize is False


def test_consumer_layers_drop_kv_projections(llama_dir):
    from safetensors.torch import load_file

    cfg = compose(["model=from_hf", f"model.hf_path={llama_dir}", "layout=ma_offset"])
    layout = build_layout(cfg.layout, 6, cfg.model.sliding_window)
    state, notes = convert(llama_dir, cfg.model, layout)
    hf = load_file(llama_dir / "model.safetensors")
    consumers = [i for i, s in enumerate(layout.layers) if s.kv_source != i]
    assert consumers and any("K/V projections dropped" in n for n in notes)
    for i in range(6):
        assert torch.equal(state[f"layers.{i}.attn.wq.weight"], hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert (f"layers.{i}.attn.wk.weight" in state) == (i not in consumers)
        assert (f"layers.{i}.attn.wv.weight" in state) == (i not in consumers)


@pytest.mark.slow
def test_ma_offset_import_trains(llama_dir, shared_cache, tmp_path):
    """`mixtrain train model=from_hf ... train.init_from=<HF> layout=ma_offset`: starts from the
    HF weights (with its tokenizer), loss falls, consumer layers have no K/V weights."""
    from safetensors.torch import load_file

    from mixtrain.data.tokenizer import get_tokenizer
    from mixtrain.train.checkpoint import latest_checkpoint
    from mixtrain.train.export import read_checkpoint
    from mixtrain.train.run import train

    hf_dir = tmp_path / "llama"
    shutil.copytree(llama_dir, hf_dir)
    base = [f"data.cache_dir={shared_cache}", "data.embedded_max_chars=300000"]
    tok = get_tokenizer(compose(base).data, 512)  # a 512-token BPE stands in for the model's own tokenizer
    shutil.copyfile(tok.path, hf_dir / "tokenizer.json")
    cfg = compose([
        "model=from_hf", f"model.hf_path={hf_dir}", f"train.init_from={hf_dir}", "layout=ma_offset", *base,
        "logger=csv", "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "train.seq_len=64",
        "train.micro_batch_size=4", "train.global_batch_tokens=256", "train.max_tokens=1536", "train.val_every_steps=6",
        "train.val_batches=1", "optim.lr=1e-3", "optim.warmup_fraction=0", f"run.root={tmp_path}", "run.name=up",
    ])
    result = train(cfg)
    assert result["steps"] == 6
    import csv

    with open(tmp_path / "up" / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses[-1] < losses[0] - 0.05, losses
    state, saved = read_checkpoint(latest_checkpoint(tmp_path / "up"))
    assert saved["data"]["tokenizer"] == str((hf_dir / "tokenizer.json").resolve())
    layout = build_layout(cfg.layout, 6, cfg.model.sliding_window)
    hf = load_file(hf_dir / "model.safetensors")
    for i, spec in enumerate(layout.layers):
        assert (f"layers.{i}.attn.wk.weight" in state) == (spec.kv_source == i)
    # started from the HF weights: 6 AdamW steps of lr 1e-3 move each weight by < 6e-3
    # (a fresh initialisation would be ~0.1 away)
    assert (state["tok_embeddings.weight"] - hf["model.embed_tokens.weight"]).abs().max() < 7e-3
    assert (state["layers.0.attn.wq.weight"] - hf["model.layers.0.self_attn.q_proj.weight"]).abs().max() < 7e-3


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_mismatches_are_refused_naming_what_differs(llama_dir, tmp_path):
    # a model recipe of other shapes
    cfg = compose(["model=tiny", f"train.init_from={llama_dir}"])
    layout = build_layout(cfg.layout, 6, cfg.model.sliding_window)
    with pytest.raises(UserError) as e:
        convert(llama_dir, cfg.model, layout)
    msg = str(e.value)
    assert "model.ffn_hidden: 96 in the HF model, 192 here" in msg
    assert "model.norm_eps" not in msg and f"model=from_hf model.hf_path={llama_dir}" in msg
    # what mixtrain does not implement: every reason listed
    bad = _edit_config(llama_dir, tmp_path / "bad", hidden_act="gelu", attention_bias=True,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(UserError) as e:
        derive(bad)
    msg = str(e.value)
    assert "hidden_act='gelu'" in msg and "attention_bias=true" in msg and "rope scaling 'llama3'" in msg
    gemma = _edit_config(llama_dir, tmp_path / "gemma", model_type="gemma", architectures=["GemmaForCausalLM"])
    with pytest.raises(UserError, match=r"architecture GemmaForCausalLM \(model_type 'gemma'\) is not supported"):
        prepare_run(compose(["model=from_hf", f"model.hf_path={gemma}"]))
    remote = _edit_config(llama_dir, tmp_path / "remote", model_type="mixtrain", architectures=["MixtrainForCausalLM"])
    with pytest.raises(UserError, match=r"a mixtrain export with mixtrain's own remote code .*train.init_from=<run dir or export>"):
        derive(remote)
    # the recipe without its folder, for every command that composes recipes
    with pytest.raises(UserError, match=r"model.hf_path is not set: give the folder of a Hugging Face model"):
        compose(["model=from_hf"])
    # dense vs MoE recipe
    with pytest.raises(UserError, match="is a dense model \\(no experts\\): use model=from_hf"):
        prepare_run(compose(["model=from_hf_moe", f"model.hf_path={llama_dir}"]))


def test_nonzero_biases_and_shared_expert_are_refused(tmp_path):
    torch.manual_seed(3)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**DIMS, "num_hidden_layers": 2})).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        qwen.model.layers[1].self_attn.k_proj.bias.fill_(0.5)
    path = save(qwen, tmp_path / "qwen2")
    with pytest.raises(UserError, match=r"layer 1: model.layers.1.self_attn.k_proj.bias is not zero \(max \|b\| = 0.5\)"):
        load_hf_model(path)
    # a consumer layer drops K/V, so its K bias does not matter there: layer 1 reads layer 0's cache
    model, _ = load_hf_model(path, {"layers": ["G", "G<0"]})
    assert not hasattr(model.layers[1].attn, "wk")
