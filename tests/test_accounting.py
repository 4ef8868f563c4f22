"""Accounting: parameter counts, FLOPs per token, KV-cache bytes, layout report.

Numbers are checked against hand computation (and, once ``mixtrain.model`` exists,
against the parameters of the real model built on the meta device).
"""

from __future__ import annotations

import json

import pytest

from mixtrain import accounting as acc
from mixtrain.config import ModelConfig, MoEConfig
from mixtrain.layouts import LayerSpec, Layout
from mixtrain.report import format_layout_summary, human_bytes, human_count, layout_summary


# --------------------------------------------------------------------------- helpers


def parse(name: str, text: str, window: int | None = None) -> Layout:
    """Hand-built layouts in layouts.md notation: 'G s s<1 G<0 s@2' (s@k: attn_source k)."""
    layers = []
    for i, tok in enumerate(text.split()):
        attn = None
        if "@" in tok:
            tok, a = tok.split("@")
            attn = int(a)
        src = i
        if "<" in tok:
            tok, s = tok.split("<")
            src = int(s)
        kind = {"G": "global", "s": "sliding"}[tok]
        layers.append(LayerSpec(kind, window if kind == "sliding" else None, src, attn))
    return Layout(name, tuple(layers))


def paper_moe() -> ModelConfig:
    return ModelConfig(
        name="paper_moe", vocab_size=100352, d_model=1536, n_layers=24, n_heads=12, n_kv_heads=3,
        head_dim=128, moe=MoEConfig(n_experts=16, top_k=4, expert_hidden=2688), max_seq_len=4096,
        sliding_window=1024, tie_embeddings=False,
    )


MA_OFFSET = (
    "s s<0 s s<2 s<2 G s s<6 s s<8 s<8 G<5 s s<12 s s<14 s<14 G<5 s s<18 s s<20 s<20 G<5"
)
MA = "G s s<1 s s<3 s<3 G<0 s s<7 s s<9 s<9 G<0 s s<13 s s<15 s<15 G<0 s s<19 s s<21 G<0"


def test_hand_layouts_well_formed():
    for text in (MA, MA_OFFSET):
        lay = parse("x", text, 1024)
        assert lay.n_layers == 24 and len(lay.producers) == 9
        for i, l in enumerate(lay.layers):
            src = lay.layers[l.kv_source]
            assert l.kv_source <= i and src.kv_source == l.kv_source and src.kind == l.kind


def std(n: int) -> Layout:
    return acc.standard_layout(n)


def tiny(**kw) -> ModelConfig:
    base = dict(name="tiny", vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                head_dim=16, ffn_hidden=192, max_seq_len=10, sliding_window=4)
    base.update(kw)
    return ModelConfig(**base)


# Layer 0 global producer, 1 sliding producer (W=4), 2 consumer of 1, 3 global Shared
# Attention layer reusing layer 0's probabilities (own V, no Q/K).
MIXED = "G s s<1 G@0"


# --------------------------------------------------------------------------- params


def test_paper_moe_param_counts():
    cfg = paper_moe()
    pc = acc.param_counts(cfg, std(24))
    assert f"{pc.active / 1e9:.3g}" == "1.64"
    assert f"{pc.total / 1e9:.3g}" == "5.21"
    # exact, by hand
    emb = 2 * 100352 * 1536
    attn = 24 * (2 * 1536 * 1536 + 2 * 1536 * 384)
    expert = 3 * 1536 * 2688
    router = 24 * 1536 * 16
    norms = (2 * 24 + 1) * 1536
    assert pc.embedding == emb == 308_281_344
    assert pc.attention == attn
    assert pc.router == router
    assert pc.norms == norms
    assert pc.total == emb + attn + 24 * 16 * expert + router + norms == 5_206_844_928
    assert pc.active == emb + attn + 24 * 4 * expert + router + norms == 1_639_589_376
    assert pc.total_non_embedding == pc.total - emb
    assert pc.active_non_embedding == pc.active - emb


def test_consumers_have_no_kv_projections():
    cfg = paper_moe()
    full = acc.param_counts(cfg, std(24)).attention
    ma_off = acc.param_counts(cfg, parse("ma_offset", MA_OFFSET, 1024)).attention
    n_consumers = sum(1 for i, s in enumerate(parse("x", MA_OFFSET, 1024).layers) if s.kv_source != i)
    assert n_consumers == 24 - 9
    assert full - ma_off == n_consumers * 2 * 1536 * 384


def test_tiny_param_breakdown_by_hand():
    cfg = tiny()
    lay = parse("mixed", MIXED, 4)
    pc = acc.param_counts(cfg, lay)
    assert acc.layer_projections(0, lay.layers[0]) == ("wq", "wk", "wv", "wo")
    assert acc.layer_projections(2, lay.layers[2]) == ("wq", "wo")
    assert acc.layer_projections(3, lay.layers[3]) == ("wv", "wo")
    assert pc.attention == 12288 + 12288 + 8192 + 6144 == 38912
    assert pc.mlp == pc.mlp_active == 4 * 3 * 64 * 192
    assert pc.router == 0
    assert pc.norms == 9 * 64
    assert pc.embedding == 2 * 512 * 64
    assert pc.total == pc.active == 252480


def test_tied_embeddings_counted_once():
    cfg = tiny(tie_embeddings=True)
    pc = acc.param_counts(cfg, std(4))
    assert pc.embedding == pc.input_embedding == 512 * 64
    assert pc.output_head == 0
    untied = acc.param_counts(tiny(), std(4))
    assert untied.total - pc.total == 512 * 64


def test_tiny_moe_active():
    cfg = tiny(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
    pc = acc.param_counts(cfg, std(4))
    assert pc.mlp == 4 * 4 * 3 * 64 * 32
    assert pc.mlp_active == 4 * 2 * 3 * 64 * 32
    assert pc.router == 4 * 64 * 4
    assert pc.total - pc.active == 4 * 2 * 3 * 64 * 32


# --------------------------------------------------------------------------- FLOPs


def test_mean_keys():
    g, s = LayerSpec("global", None, 0), LayerSpec("sliding", 4, 0)
    assert acc.mean_keys_per_query(g, 10) == 5.5
    assert acc.mean_keys_per_query(s, 10) == pytest.approx((1 + 2 + 3 + 4 + 6 * 4) / 10)
    assert acc.mean_keys_per_query(s, 3) == 2.0  # window larger than the sequence
    for T in (1, 5, 17, 100):
        for W in (1, 3, 16, 200):
            exact = sum(min(i + 1, W) for i in range(T)) / T
            assert acc.mean_keys_per_query(LayerSpec("sliding", W, 0), T) == pytest.approx(exact)


def test_flops_by_hand():
    cfg = tiny()
    lay = parse("mixed", MIXED, 4)
    # N = all params minus the input embedding (output head counted)
    n = 252480 - 512 * 64
    per_key = 2 * 4 * 16
    attn = 2 * per_key * 5.5 + 2 * per_key * 3.4 + 2 * per_key * 3.4 + 1 * per_key * 5.5
    assert attn == pytest.approx(3852.8)
    assert acc.train_flops_per_token(cfg, lay, 10) == pytest.approx(6 * n + 3 * attn)
    assert acc.train_flops_per_token(cfg, lay, 10) == pytest.approx(1_329_830.4)
    assert acc.forward_flops_per_token(cfg, lay, 10) == pytest.approx(443_276.8)


def test_flops_tied_head_still_counts():
    a = acc.train_flops_per_token(tiny(tie_embeddings=True), std(4), 8)
    b = acc.train_flops_per_token(tiny(), std(4), 8)
    assert a == b


def test_paper_moe_flops_sliding_cheaper():
    cfg = paper_moe()
    f_std = acc.train_flops_per_token(cfg, std(24), 32768)
    f_ma = acc.train_flops_per_token(cfg, parse("ma_offset", MA_OFFSET, 1024), 32768)
    assert f_ma < f_std
    # 6N dominates at 4K: within a few percent of 6 * active-minus-input-embedding
    n = acc.param_counts(cfg, std(24)).active - 100352 * 1536
    f4k = acc.train_flops_per_token(cfg, std(24), 4096)
    assert f4k == pytest.approx(6 * n + 3 * 24 * 2 * 2 * 12 * 128 * 4097 / 2)


# --------------------------------------------------------------------------- KV cache


def test_paper_moe_standard_kv_bytes():
    cfg = paper_moe()
    for T in (1, 4096, 32768, 131072):
        assert acc.kv_bytes_per_sequence(cfg, std(24), T) == 36864 * T
        assert acc.kv_bytes_per_token(cfg, std(24), T) == 36864.0
        assert acc.kv_ratio(cfg, std(24), T) == 1.0


def test_ma_offset_kv_at_32k():
    cfg = paper_moe()
    lay = parse("ma_offset", MA_OFFSET, 1024)
    T = 32768
    assert acc.kv_stored_tokens(lay, T) == T + 8 * 1024
    expected = (T + 8 * 1024) * 2 * 3 * 128 * 2
    assert expected == 62_914_560
    assert acc.kv_bytes_per_sequence(cfg, lay, T) == expected
    assert acc.kv_bytes_per_token(cfg, lay, T) == 36864 / 24 * (1 + 8 * 1024 / 32768) == 1920.0
    assert acc.kv_ratio(cfg, lay, T) == pytest.approx(19.2)
    caches = acc.kv_cache_layers(cfg, lay)
    assert [c.index for c in caches] == [0, 2, 5, 6, 8, 12, 14, 18, 20]
    assert next(c for c in caches if c.index == 5).readers == (5, 11, 17, 23)
    # short context: sliding caches hold only T tokens
    assert acc.kv_bytes_per_sequence(cfg, lay, 512) == 9 * 512 * 1536


def test_cla2_mqa_20_layers():
    cfg = ModelConfig(name="cla_1b", vocab_size=50304, d_model=2048, n_layers=20, n_heads=16,
                      n_kv_heads=1, head_dim=128, ffn_hidden=5472, max_seq_len=2048)
    lay = parse("cla2", " ".join("G" if i % 2 == 0 else f"G<{i - 1}" for i in range(20)))
    assert len(acc.kv_cache_layers(cfg, lay)) == 10
    assert acc.kv_bytes_per_token(cfg, lay, 2048) == 10 * 2 * 1 * 128 * 2 == 5120
    assert acc.kv_bytes_per_sequence(cfg, lay, 2048) == 5120 * 2048
    assert acc.kv_ratio(cfg, lay, 2048) == 2.0


def test_shared_attention_v_only():
    cfg = tiny()
    lay = parse("mixed", MIXED, 4)
    caches = acc.kv_cache_layers(cfg, lay)
    assert [(c.index, c.has_k, c.tensors) for c in caches] == [(0, True, 2), (1, True, 2), (3, False, 1)]
    assert acc.kv_stored_tokens(lay, 10) == 10 + 4 + 10
    per = 2 * 16 * 2  # n_kv_heads x head_dim x bf16
    assert acc.kv_bytes_per_sequence(cfg, lay, 10) == (20 + 8 + 10) * per == 2432
    assert acc.kv_bytes_per_sequence(cfg, lay, 10, dtype_bytes=4) == 2 * 2432
    # a standard 4-layer model in which layers 2, 3 share layer 1's probabilities
    sa = parse("sa", "G G G@1 G@1")
    assert acc.kv_bytes_per_sequence(cfg, sa, 7) == 7 * (2 + 2 + 1 + 1) * per
    assert acc.kv_ratio(cfg, sa, 7) == pytest.approx(8 / 6)


def test_kv_bytes_exact_ints():
    cfg = paper_moe()
    v = acc.kv_bytes_per_sequence(cfg, parse("ma", MA, 1024), 131072)
    assert isinstance(v, int) and v == (131072 + 8 * 1024) * 1536


# --------------------------------------------------------------------------- peaks


@pytest.mark.parametrize(
    "name,dtype,expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 SXM5 80GB", "bf16-mixed", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H200 NVL", "bf16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-PCIE-40GB", "fp16", 312e12),
        ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
        ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),
        ("cpu", "bf16", None),
        ("NVIDIA GeForce RTX 3090", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_peak_flops(name, dtype, expected):
    assert acc.peak_flops(name, dtype) == expected


def test_peak_flops_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        acc.peak_flops("NVIDIA H100 80GB HBM3", "int3")


# --------------------------------------------------------------------------- report


def test_human_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(36864) == "36 KiB"
    assert human_bytes(1920) == "1.88 KiB"
    assert human_bytes(36864 * 32768) == "1.12 GiB"
    assert human_count(5_206_844_928) == "5.21B"
    assert human_count(1_639_589_376) == "1.64B"
    assert human_count(141_557_760) == "142M"
    assert human_count(512) == "512"


def test_layout_summary_keys_and_values():
    cfg = tiny()
    lay = parse("mixed", MIXED, 4)
    s = layout_summary(cfg, lay, contexts=(8, 10), context=10)
    json.dumps(s)  # JSON-able
    assert s["layout"] == "mixed" and s["model"] == "tiny"
    assert s["n_layers"] == 4
    assert s["layers"][2] == {"index": 2, "kind": "sliding", "window": 4, "kv_source": 1,
                              "attn_source": None, "producer": False}
    assert s["layers"][3]["attn_source"] == 0 and s["layers"][3]["window"] is None
    assert s["kv_caches"] == 3 and s["kv_caches_v_only"] == 1
    assert s["kv_bytes_per_token"] == 243.2
    assert s["params_total"] == s["params_active"] == 252480
    assert s["params"]["attention"] == 38912
    row = {r["context"]: r for r in s["contexts"]}[10]
    assert row["kv_bytes_per_sequence"] == 2432
    assert row["standard_kv_bytes_per_sequence"] == 4 * 2 * 10 * 64
    assert row["ratio_vs_standard"] == pytest.approx(5120 / 2432)
    assert s["train_flops_per_token"] == pytest.approx(1_329_830.4)  # max_seq_len 10
    # default: top-level KV numbers at 32K
    s2 = layout_summary(paper_moe(), parse("ma_offset", MA_OFFSET, 1024))
    assert s2["kv_context"] == 32768 and s2["kv_bytes_per_token"] == 1920.0
    assert [r["context"] for r in s2["contexts"]] == [4096, 32768, 131072]
    assert s2["kv_caches"] == 9 and s2["kv_caches_global"] == 1 and s2["kv_caches_sliding"] == 8


def test_format_layout_summary():
    s = layout_summary(paper_moe(), parse("ma_offset", MA_OFFSET, 1024))
    text = format_layout_summary(s, "<<DIAGRAM>>\nline2")
    assert "<<DIAGRAM>>\nline2" in text
    assert "19.2x smaller" in text  # 32K
    assert "1.88 KiB" in text and "36 KiB" in text
    assert "5.19B" in text and "ma_offset" in text  # consumers drop K/V projections
    std_text = format_layout_summary(layout_summary(paper_moe(), std(24)), "")
    assert "same" in std_text and "1.64B" in std_text


# --------------------------------------------------------------------------- cross-checks
# The accounting against the real model, presets, diagram and recipes.


MODEL_CASES = {
    "tiny_dense": (tiny(), lambda: std(4)),
    "tiny_moe": (tiny(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32)), lambda: std(4)),
    "mixattention": (tiny(n_layers=6), lambda: parse("ma6", "G s s<1 s s<3 s<3", 4)),
    "tied": (tiny(tie_embeddings=True), lambda: parse("cla2", "G G<0 G G<2")),
    "cla_kv_norm": (tiny(kv_norm=True), lambda: parse("cla2", "G G<0 G G<2")),
    "shared_attention": (tiny(), lambda: parse("mixed", MIXED, 4)),
    "moe_mixattention": (tiny(n_layers=6, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32)),
                         lambda: parse("ma6", "s s<0 G s s<3 G<2", 4)),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_param_counts_match_model(case):
    import torch

    from mixtrain.model import Transformer

    cfg, make = MODEL_CASES[case]
    layout = make()
    with torch.device("meta"):
        model = Transformer(cfg, layout)
    n = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    assert acc.param_counts(cfg, layout).total == n


def test_presets_match_hand_built():
    from mixtrain import layouts

    cfg = paper_moe()
    for name, text in (("ma_offset", MA_OFFSET), ("ma", MA)):
        lay = layouts.make_preset(name, 24, 1024)
        hand = parse(name, text, 1024)
        assert [(l.kind, l.window, l.kv_source) for l in lay.layers] == [
            (l.kind, l.window, l.kv_source) for l in hand.layers
        ]
        assert acc.kv_bytes_per_sequence(cfg, lay, 32768) == acc.kv_bytes_per_sequence(cfg, hand, 32768)
    std_preset = layouts.make_preset("standard", 24, 1024)
    assert acc.kv_bytes_per_token(cfg, std_preset, 32768) == 36864.0
    pc = acc.param_counts(cfg, std_preset)
    assert (f"{pc.active / 1e9:.3g}", f"{pc.total / 1e9:.3g}") == ("1.64", "5.21")


def test_report_with_real_diagram():
    from mixtrain import layouts

    lay = layouts.make_preset("ma_offset", 24, 1024)
    d = layouts.diagram(lay)
    text = format_layout_summary(layout_summary(paper_moe(), lay), d)
    assert d.rstrip("\n") in text and "19.2x smaller" in text


def test_paper_moe_recipe_counts():
    """The shipped recipe recipes/model/paper_moe.yaml gives the paper's counts."""
    from pathlib import Path

    import omegaconf

    path = Path(__file__).resolve().parents[1] / "recipes" / "model" / "paper_moe.yaml"
    cfg = omegaconf.OmegaConf.to_object(
        omegaconf.OmegaConf.merge(omegaconf.OmegaConf.structured(ModelConfig), omegaconf.OmegaConf.load(path))
    )
    pc = acc.param_counts(cfg, std(cfg.n_layers))
    assert (pc.active, pc.total) == (1_639_589_376, 5_206_844_928)
    assert acc.kv_bytes_per_token(cfg, std(cfg.n_layers), 4096) == 36864.0


def test_attention_only_training_counts_no_weight_gradients_for_frozen_weights():
    from mixtrain.config import ModelConfig
    from mixtrain.layouts import make_preset

    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64)
    layout = make_preset("ma_offset", 6, 8)
    full = acc.train_flops_per_token(cfg, layout, 64)
    frozen = acc.train_flops_per_token(cfg, layout, 64, trainable="attention")
    attn = acc.param_counts(cfg, layout).attention
    n = acc.param_counts(cfg, layout).active_non_embedding + 100 * 32
    assert full - frozen == 2 * (n - attn)  # 6N -> 4N for every non-attention matmul weight
