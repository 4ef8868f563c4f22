"""Layouts: every table of docs/layouts.md, presets at other depths, custom
layouts, llm-foundry import, validation messages, the recipes/layout/*.yaml files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mixtrain.config import LayoutConfig
from mixtrain.layouts import (
    LayerSpec,
    Layout,
    LayoutError,
    build_layout,
    diagram,
    from_foundry,
    make_preset,
    parse_blocks,
    parse_layers,
    preset_names,
    validate,
)

W = 1024
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "layout"


def expand(spec: str, n: int = 24) -> list[str]:
    """'0:G 1:s 2:s<1 ...' -> per-layer compact strings."""
    out = [None] * n
    for tok in spec.split():
        i, s = tok.split(":")
        out[int(i)] = s
    assert None not in out, spec
    return out


# The 24-layer tables of layouts.md, written out literally (layer 0 first).
MA = "0:G 1:s 2:s<1 3:s 4:s<3 5:s<3 6:G<0 7:s 8:s<7 9:s 10:s<9 11:s<9 12:G<0 13:s 14:s<13 15:s 16:s<15 17:s<15 18:G<0 19:s 20:s<19 21:s 22:s<21 23:G<0"
TABLES = {
    "standard": (" ".join(f"{i}:G" for i in range(24)), 24, 0),
    "swa": (" ".join(f"{i}:s" for i in range(24)), 0, 24),
    "ma": (MA, 1, 8),
    "ma_endslide": (MA.replace("23:G<0", "23:s<21"), 1, 8),
    "ma_offset": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:G 6:s 7:s<6 8:s 9:s<8 10:s<8 11:G<5 12:s 13:s<12 14:s 15:s<14 16:s<14 17:G<5 18:s 19:s<18 20:s 21:s<20 22:s<20 23:G<5", 1, 8),
    "ma_pairs": ("0:G 1:s 2:s<1 3:s 4:s<3 5:s<3 6:G<0 7:s 8:s<7 9:s 10:s<9 11:s<9 12:G 13:s 14:s<13 15:s 16:s<15 17:s<15 18:G<12 19:s 20:s<19 21:s 22:s<21 23:s<21", 2, 8),
    "ma_offset_slideshare": ("0:s 1:s<0 2:s<0 3:s<0 4:s<0 5:G 6:s 7:s<6 8:s<6 9:s<6 10:s<6 11:G<5 12:s 13:s<12 14:s<12 15:s<12 16:s<12 17:G<5 18:s 19:s<18 20:s<18 21:s<18 22:s<18 23:G<5", 1, 4),
    "ma_pairs_slideshare": ("0:G 1:s 2:s<1 3:s<1 4:s<1 5:s<1 6:G<0 7:s 8:s<7 9:s<7 10:s<7 11:s<7 12:G 13:s 14:s<13 15:s<13 16:s<13 17:s<13 18:G<12 19:s 20:s<19 21:s<19 22:s<19 23:s<19", 2, 4),
    # globals as in the table; sliding runs grouped 2, 3, 2, 3, ... (last group takes the rest)
    "ma_successive_1": ("0:G 1:G<0 2:s 3:s<2 4:s 5:s<4 6:s<4 7:s 8:s<7 9:s 10:s<9 11:s<9 12:G 13:G<12 14:s 15:s<14 16:s 17:s<16 18:s<16 19:s 20:s<19 21:s 22:s<21 23:s<21", 2, 8),
    "ma_successive_2": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:G 6:G<5 7:s 8:s<7 9:s 10:s<9 11:s<9 12:G 13:G<12 14:s 15:s<14 16:s 17:s<16 18:s<16 19:s 20:s<19 21:s 22:s<21 23:s<21", 2, 8),
    "ma_successive_3": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:s 6:s<5 7:s 8:s<7 9:s<7 10:G 11:G<10 12:s 13:s<12 14:s 15:s<14 16:s<14 17:G 18:G<17 19:s 20:s<19 21:s 22:s<21 23:s<21", 2, 8),
    "ma_successive_4": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:s 6:s<5 7:s 8:s<7 9:s<7 10:G 11:G<10 12:s 13:s<12 14:s 15:s<14 16:s<14 17:s 18:s<17 19:s 20:s<19 21:s<19 22:G 23:G<22", 2, 8),
    "ma_noshare_1": ("0:s 1:s<0 2:s 3:G 4:s 5:s<4 6:s 7:s<6 8:s<6 9:s 10:s<9 11:s 12:s<11 13:s<11 14:s 15:s<14 16:s 17:s<16 18:s<16 19:s 20:s<19 21:s 22:s<21 23:s<21", 1, 10),
    "ma_noshare_2": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:s 6:s<5 7:s 8:s<7 9:s<7 10:G 11:s 12:s<11 13:s 14:s<13 15:s<13 16:s 17:s<16 18:s 19:s<18 20:s<18 21:s 22:s<21 23:s", 1, 10),
    "ma_noshare_3": ("0:s 1:s<0 2:s 3:s<2 4:s<2 5:s 6:s<5 7:s 8:s<7 9:s<7 10:s 11:s<10 12:s 13:s<12 14:s<12 15:s 16:s<15 17:s 18:s<17 19:s<17 20:G 21:s 22:s<21 23:s", 1, 10),
}


def check(layout: Layout, expected: list[str], window: int = W) -> None:
    """Compare kind, window and resolved kv_source per layer against compact strings."""
    assert layout.n_layers == len(expected)
    for i, (l, s) in enumerate(zip(layout.layers, expected)):
        m = re.fullmatch(r"([Gs])(?:<(\d+))?", s)
        assert m, s
        kind = "global" if m.group(1) == "G" else "sliding"
        assert (l.kind, l.kv_source) == (kind, int(m.group(2)) if m.group(2) else i), (i, l, s)
        assert l.window == (window if kind == "sliding" else None), (i, l)
        assert l.attn_source is None
    assert layout.compact() == expected


@pytest.mark.parametrize("name", list(TABLES))
def test_paper_tables_24_layers(name):
    spec, n_global, n_sliding = TABLES[name]
    layout = make_preset(name, 24, W)
    check(layout, expand(spec))
    assert (layout.n_global_caches, layout.n_sliding_caches) == (n_global, n_sliding)
    assert layout.n_kv_caches == n_global + n_sliding
    # the same through build_layout (window null -> model default)
    assert build_layout({"preset": name}, 24, W) == layout


def test_ma_summary_and_diagram():
    layout = make_preset("ma", 24, W)
    assert layout.summary() == "1 global + 8 sliding KV caches"
    text = diagram(layout)
    rows = text.splitlines()
    assert rows[-1] == "1 global + 8 sliding KV caches"
    assert len(rows) == 24 + 3
    row0 = next(r for r in rows if re.match(r"\s+0\s", r))
    row2 = next(r for r in rows if re.match(r"\s+2\s", r))
    assert "global" in row0 and "KV own" in row0 and "█" in row0
    assert "W=1024" in row2 and "KV <- 1" in row2 and "█" not in row2


def test_cla_on_20_layers():
    cla2, cla3 = make_preset("cla2", 20, W), make_preset("cla3", 20, W)
    assert cla2.n_kv_caches == 10 and cla3.n_kv_caches == 7
    assert cla2.producers == list(range(0, 20, 2))
    assert cla3.producers == [0, 3, 6, 9, 12, 15, 18]
    assert all(l.kind == "global" for l in cla3.layers)
    assert [l.kv_source for l in cla3.layers][18:] == [18, 18]
    assert make_preset("cla4", 20, W).n_kv_caches == 5


def test_characterai_equals_ma_offset_and_is_depth_generic():
    assert make_preset("characterai", 24, W).layers == make_preset("ma_offset", 24, W).layers
    assert make_preset("characterai", 12, W).compact() == make_preset("ma_offset", 12, W).compact()


def test_interleaved():
    l = make_preset("interleaved", 12, 64, every=4)
    assert [i for i, x in enumerate(l.layers) if x.kind == "global"] == [3, 7, 11]
    assert l.n_kv_caches == 12 and all(l.is_producer(i) for i in range(12))
    with pytest.raises(LayoutError, match=r"layout\.every"):
        make_preset("interleaved", 12, 64)


def test_depth_generic_6_and_12():
    check(make_preset("ma", 6, 32), ["G", "s", "s<1", "s", "s<3", "G<0"], 32)
    check(make_preset("ma_endslide", 6, 32), ["G", "s", "s<1", "s", "s<3", "s<3"], 32)
    check(make_preset("ma_offset", 6, 32), ["s", "s<0", "s", "s<2", "s<2", "G"], 32)
    check(make_preset("ma_pairs", 6, 32), ["G", "s", "s<1", "s", "s<3", "s<3"], 32)
    check(make_preset("ma_offset_slideshare", 6, 32), ["s", "s<0", "s<0", "s<0", "s<0", "G"], 32)
    twelve = "G s s<1 s s<3 s<3 G<0 s s<7 s s<9 G<0".split()
    check(make_preset("ma", 12, 32), twelve, 32)
    check(make_preset("ma_offset", 12, 32), "s s<0 s s<2 s<2 G s s<6 s s<8 s<8 G<5".split(), 32)
    check(make_preset("ma_pairs", 12, 32), "G s s<1 s s<3 s<3 G<0 s s<7 s s<9 s<9".split(), 32)
    check(make_preset("ma_pairs_slideshare", 12, 32), "G s s<1 s<1 s<1 s<1 G<0 s s<7 s<7 s<7 s<7".split(), 32)
    # the generic rule reproduces the 24-layer tables (checked above) and scales on
    l36 = make_preset("ma_pairs", 36, 32)
    assert [(i, l.kv_source) for i, l in enumerate(l36.layers) if l.kind == "global"] == [
        (0, 0), (6, 0), (12, 12), (18, 12), (24, 24), (30, 24)]


def test_depth_errors():
    with pytest.raises(LayoutError) as e:
        make_preset("ma_successive_2", 12, 32)
    msg = str(e.value)
    assert "24 layers only" in msg and "12 layers" in msg and "ma_offset" in msg
    with pytest.raises(LayoutError, match=r"multiple of 6.*the model has 10 layers"):
        make_preset("ma", 10, 32)
    with pytest.raises(LayoutError) as e:
        make_preset("mixattention", 24, 32)
    assert "unknown layout preset 'mixattention'" in str(e.value)
    for name in preset_names():
        assert name in str(e.value)


def test_chains_resolve_to_original_producer():
    l = parse_layers(["s", "s<0", "s<1", "s<2", "G", "G<4", "G<5"], 16)
    assert [x.kv_source for x in l.layers] == [0, 0, 0, 0, 4, 4, 4]
    l = parse_layers(["s", "s^0", "s^1", "G", "G<3", "G<4"], 16)
    assert [x.attn_source for x in l.layers] == [None, 0, 0, None, None, None]
    assert [x.kv_source for x in l.layers] == [0, 1, 2, 3, 3, 3]
    assert validate(Layout("c", (LayerSpec("global", None, 0), LayerSpec("global", None, 0),
                                 LayerSpec("global", None, 1)))).layers[2].kv_source == 0


def test_custom_layers_strings_and_dicts():
    l = build_layout({"layers": ["G", "s", "s<-1", "s256", "s256<3", {"kind": "global", "kv": 0},
                                 {"kind": "sliding", "window": 8, "attn": None}, "G^-2"]}, 8, 64)
    assert l.as_dicts()[:3] == [
        {"index": 0, "kind": "global", "window": None, "kv_source": 0, "attn_source": None},
        {"index": 1, "kind": "sliding", "window": 64, "kv_source": 1, "attn_source": None},
        {"index": 2, "kind": "sliding", "window": 64, "kv_source": 1, "attn_source": None},
    ]
    assert l.compact(windows=True) == ["G", "s64", "s64<1", "s256", "s256<3", "G<0", "s8", "G^5"]
    assert l.n_kv_caches == 5 and l.v_only_layers == [7]
    assert "V only" in l.summary() and "attn probs <- 5" in diagram(l)
    # window from layout.window beats the model default
    assert build_layout({"layers": ["s", "s<0"], "window": 5}, 2, 64).layers[1].window == 5


def test_blocks_characterai_and_relative_refs():
    blocks = [{"layers": ["s", "s<-1", "s", "s<-1", "s<-2", "G"]},
              {"layers": ["s", "s<-1", "s", "s<-1", "s<-2", "G<5"], "repeat": 3}]
    l = parse_blocks(blocks, W)
    assert l.layers == make_preset("characterai", 24, W).layers
    l = build_layout({"blocks": [{"layers": ["G", "s", "s<-1"], "repeat": 2}]}, 6, 16)
    assert l.compact() == ["G", "s", "s<1", "G", "s", "s<4"]


FOUNDRY = {
    "order": [
        {"name": "default"},
        {"order": [{"name": "sliding_window_layer"}, {"name": "sliding_window_layer_reuse"},
                   {"name": "sliding_window_layer"},
                   {"name": "sliding_window_layer_reuse", "repeat": 2},
                   {"name": "reuse_kv_layer"}], "repeat": 2},
    ],
    "overrides": {
        "sliding_window_layer": {"attn_config": {"sliding_window_size": 1024}},
        "sliding_window_layer_reuse": {"attn_config": {"sliding_window_size": 1024, "reuse_kv_layer_idx": -1}},
        "reuse_kv_layer": {"attn_config": {"reuse_kv_layer_idx": -6}},
    },
}


def test_foundry_documented_example():
    l = from_foundry(FOUNDRY, 13)
    expected = "G s s<1 s s<3 s<3 G<0 s s<7 s s<9 s<9 G<0".split()
    check(l, expected, window=1025)  # sliding_window_size 1024 = 1024 previous keys + itself
    assert from_foundry(FOUNDRY, None) == l
    assert build_layout({"foundry": {"block_overrides": FOUNDRY}}, 13, 64).layers == l.layers
    assert from_foundry({"order": [{"name": "default"}]}, 1).compact() == ["G"]
    one = {"order": [{"name": "w"}], "overrides": {"w": {"attn_config": {"sliding_window_size": 0}}}}
    assert from_foundry(one, 1).layers[0].window == 1


def bad_case(cfg, n_layers=6, window=16):
    with pytest.raises(LayoutError) as e:
        build_layout(cfg, n_layers, window)
    msg = str(e.value)
    assert "\n" not in msg, msg  # one paragraph
    return msg


MALFORMED = [
    # (layout config, n_layers, words that must appear in the message)
    ({"layers": ["G", "s", "s<2", "s", "s", "s"]}, 6, ["layer 2", "itself", "earlier layer"]),
    ({"layers": ["G", "s<3", "s", "s", "s", "s"]}, 6, ["layer 1", "later layer (3)"]),
    ({"layers": ["G", "s<-2", "s", "s", "s", "s"]}, 6, ["layer 1", "before the first layer (layer 0)"]),
    ({"layers": ["G", "s", "G<1", "s", "s", "s"]}, 6, ["layer 2 (global)", "layer 1 (sliding, W=16)", "same attention kind and window"]),
    ({"layers": ["G", "s32", "s<1", "s", "s", "s"]}, 6, ["layer 2 (sliding, W=16)", "layer 1 (sliding, W=32)", "window"]),
    ({"layers": ["G", "s0", "s", "s", "s", "s"]}, 6, ["layer 1", "window", ">= 1"]),
    ({"layers": ["G", "s", "s", "s"]}, 6, ["4 layers", "6 layers", "model.n_layers"]),
    ({"preset": "ma_offsett"}, 6, ["unknown layout preset 'ma_offsett'", "ma_offset", "characterai", "cla2"]),
    ({"layers": ["G", "s", "G^1", "s", "s", "s"]}, 6, ["layer 2 (global)", "layer 1 (sliding, W=16)", "identical masks"]),
    ({"layers": ["G", "G", "G<1^0", "s", "s", "s"]}, 6, ["layer 2", "own V", "cannot reuse KV"]),
    ({"layers": ["G", "G^0", "G<1", "s", "s", "s"]}, 6, ["layer 2", "layer 1 is a shared-attention layer", "no keys"]),
    ({"layers": ["G", "s", "x<1", "s", "s", "s"]}, 6, ["layer 2", "'x<1'", "grammar", "s<-1"]),
    ({"layers": ["G", "s", "s<<1", "s", "s", "s"]}, 6, ["layer 2", "'s<<1'", "grammar"]),
    ({"layers": ["G512", "s", "s", "s", "s", "s"]}, 6, ["layer 0", "global layer", "no window"]),
    ({"layers": ["G", "s<0<0", "s", "s", "s", "s"]}, 6, ["layer 1", "repeats"]),
    ({"layers": ["G", {"kind": "sliding", "windw": 8}, "s", "s", "s", "s"]}, 6, ["layer 1", "'windw'", "kind, window, kv, attn"]),
    ({"layers": ["G", {"kind": "local-ish"}, "s", "s", "s", "s"]}, 6, ["layer 1", "'global' or 'sliding'"]),
    ({"layers": ["G", 5, "s", "s", "s", "s"]}, 6, ["layer 1", "expected a string"]),
    ({"preset": "ma", "layers": ["G"] * 6}, 6, ["layout.preset", "layout.layers", "layout.preset=null"]),
    ({"layers": ["G"] * 6, "blocks": [{"layers": ["G"], "repeat": 6}]}, 6, ["layout.layers", "layout.blocks"]),
    ({"preset": "ma", "windoww": 3}, 6, ["layout.windoww", "layout.window"]),
    ({"preset": "ma", "window": 0}, 6, ["window", ">= 1"]),
    ({"blocks": [{"layers": ["G"], "repat": 6}]}, 6, ["layout.blocks[0]", "'repat'", "layers, repeat"]),
    ({"blocks": [{"layers": ["s", "G<-1"], "repeat": 3}]}, 6, ["layer 1 (global)", "layer 0 (sliding, W=16)"]),
    ({"preset": "standard", "shared_attention": {3: 3}}, 6, ["layer 3", "itself"]),
    ({"preset": "ma", "shared_attention": {2: 1}}, 6, ["layer 2", "cannot reuse KV"]),
    ({"preset": "standard", "shared_attention": {9: 1}}, 6, ["layer 9 does not exist"]),
    ({"preset": "ma", "every": 6}, 6, ["layout.every", "interleaved"]),
    ({"foundry": {**FOUNDRY, "order": FOUNDRY["order"] + [{"name": "default"}]}}, 13, ["14 layers", "13 layers"]),
    ({"foundry": {**FOUNDRY, "overrides": {**FOUNDRY["overrides"], "sliding_window_layer": {"attn_config": {"sliding_window_sz": 8}}}}}, 13, ["layer 1", "'sliding_window_sz'", "sliding_window_size"]),
    ({"foundry": {"order": [{"name": "default"}, {"name": "r"}], "overrides": {"r": {"attn_config": {"reuse_kv_layer_idx": 1}}}}}, 2, ["layer 1", "negative"]),
    ({"foundry": {"order": [{"name": "default"}, {"name": "r"}], "overrides": {"r": {"attn_config": {"sliding_window_size": 7, "reuse_kv_layer_idx": -1}}}}}, 2, ["layer 1 (sliding, W=8)", "layer 0 (global)"]),
    ({"foundry": {"order": [{"name": "default"}, {"name": "nope"}], "overrides": {}}}, 2, ["layer 1", "'nope'"]),
]


@pytest.mark.parametrize("cfg,n_layers,words", MALFORMED)
def test_malformed_layouts(cfg, n_layers, words):
    msg = bad_case(cfg, n_layers)
    for w in words:
        assert w in msg, (w, msg)


def test_reference_before_the_first_layer_reads_cleanly():
    """The message names the layer and shows the reference once, as written."""
    assert bad_case({"layers": ["G", "s<-7", "s", "s", "s", "s"]}) == (
        "layout.layers, layer 1: KV reuse '<-7' points to layer -6, before the first layer (layer 0); "
        "a relative reference -k must satisfy k <= 1.")
    assert bad_case({"layers": ["G", {"kind": "sliding", "kv": -7}, "s", "s", "s", "s"]}) == (
        "layout.layers, layer 1: kv=-7 points to layer -6, before the first layer (layer 0); "
        "a relative reference -k must satisfy k <= 1.")
    assert bad_case({"preset": "standard", "shared_attention": {2: -7}}) == (
        "layout.shared_attention, layer 2: the shared attention source -7 points to layer -5, before the "
        "first layer (layer 0); a relative reference -k must satisfy k <= 2.")


def test_shared_attention_example_says_its_depth():
    """Written for 24 layers: on the 6-layer default model the error says what depth it needs,
    and the recipe's header names a command that works."""
    raw = OmegaConf.load(RECIPES / "shared_attention_example.yaml")
    assert bad_case(raw, 6) == (
        "layout.shared_attention: layer 14 does not exist (the layout has 6 layers, 0..5); this map is "
        "written for a deeper model: set model.n_layers to at least 16, or pick a model recipe of that depth.")
    header = (RECIPES / "shared_attention_example.yaml").read_text()
    assert "24-layer" in header and "mixtrain layout model=paper_moe layout=shared_attention_example" in header
    from mixtrain.config import compose

    cfg = compose(["model=paper_moe", "layout=shared_attention_example"])
    assert cfg.model.n_layers == 24
    assert build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window).n_layers == 24


def test_validate_rejects_unresolvable_specs():
    with pytest.raises(LayoutError, match="layer 1 .* reuses the KV cache of layer 2"):
        validate(Layout("x", (LayerSpec("global", None, 0), LayerSpec("global", None, 2),
                              LayerSpec("global", None, 2))))
    with pytest.raises(LayoutError, match="has 3 layers but the model has 4 layers"):
        validate(make_preset("standard", 3, 8), 4)


def test_layoutconfig_dataclass_and_default():
    assert build_layout(LayoutConfig(), 4, 8) == make_preset("standard", 4, 8)
    assert build_layout(LayoutConfig(preset="ma", window=7), 6, 8).layers[1].window == 7
    assert build_layout(None, 2, 8).name == "standard"


RECIPE_DEPTH = {"custom_example": 6, "foundry_example": 13, "ma_pairs_6": 6}


def recipe_files():
    return sorted(RECIPES.glob("*.yaml"))


def test_every_preset_has_a_recipe():
    names = {p.stem for p in recipe_files()}
    assert set(preset_names()) <= names
    assert {"custom_example", "blocks_example", "foundry_example", "shared_attention_example"} <= names


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.stem)
def test_recipe_builds_and_composes_with_schema(path):
    n = RECIPE_DEPTH.get(path.stem, 24)
    raw = OmegaConf.load(path)
    layout = build_layout(raw, n, W)
    assert layout.n_layers == n
    # keys must be LayoutConfig fields: merging into the structured schema fails otherwise
    merged = OmegaConf.merge(OmegaConf.structured(LayoutConfig), raw)
    assert build_layout(merged, n, W) == layout
    assert build_layout(OmegaConf.to_object(merged), n, W) == layout
    if path.stem in PRESETS_IN_RECIPES:
        assert layout.name == path.stem


PRESETS_IN_RECIPES = set(preset_names())


def test_recipe_examples_content():
    sa = build_layout(OmegaConf.load(RECIPES / "shared_attention_example.yaml"), 24, W)
    assert [(i, l.attn_source) for i, l in enumerate(sa.layers) if l.attn_source is not None] == [
        (2, 1), (3, 1), (14, 13), (15, 13)]
    ex = build_layout(OmegaConf.load(RECIPES / "custom_example.yaml"), 6, 32)
    assert ex.compact() == ["G", "s", "s<1", "s", "s<3", "G<0"]
    bl = build_layout(OmegaConf.load(RECIPES / "blocks_example.yaml"), 24, W)
    assert bl.layers == make_preset("characterai", 24, W).layers


def test_schema_rejects_typo_key(tmp_path, monkeypatch):
    """A misspelt key fails when the recipe is composed, before anything runs, and the
    message names the key and the schema it is not in (a user's layout file and an
    override alike)."""
    from omegaconf.errors import ConfigKeyError

    from mixtrain.config import compose
    from mixtrain.errors import UserError

    with pytest.raises(ConfigKeyError, match=r"Key 'presett' not in 'LayoutConfig'"):
        OmegaConf.merge(OmegaConf.structured(LayoutConfig), OmegaConf.create({"presett": "ma"}))
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "my_typo.yaml").write_text("presett: ma\n")
    monkeypatch.setenv("MIXTRAIN_RECIPES", str(tmp_path))
    with pytest.raises(UserError, match=r"(?s)layout/my_typo.*Key 'presett' not in 'LayoutConfig'"):
        compose(["layout=my_typo"])
    with pytest.raises(UserError, match=r"Key 'windw' not in 'LayoutConfig': layout\.windw is not a setting; "
                                         r"did you mean layout\.window\?"):
        compose(["layout=ma_offset", "layout.windw=64"])
