"""The Transformer against hand-written references: KV sharing, Shared Attention, masks,
kernels, init, recipes and the paper model's parameter counts."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mixtrain.config import ModelConfig, MoEConfig
from mixtrain.layouts import LayerSpec, Layout
from mixtrain.model import ModelOutput, Transformer, build_model
from mixtrain.model.masks import _cached_block_mask, build_masks, dense_mask, positions_from_doc_ids

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"
W = 4

G = lambda src: LayerSpec("global", None, src)  # noqa: E731
S = lambda src, w=W, attn=None: LayerSpec("sliding", w, src, attn)  # noqa: E731

# 0 G | 1 s | 2 s<1 | 3 G<0 | 4 s | 5 s, borrows layer 4's probabilities (own V)
MIXED = Layout("mixed", (G(0), S(1), S(1), G(0), S(4), S(5, attn=4)))


def cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=97, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8,
        ffn_hidden=48, max_seq_len=64, attn_impl="sdpa", init_std=0.2,
    )
    base.update(kw)
    return ModelConfig(**base)


def model(c=None, layout=MIXED, seed=0) -> Transformer:
    return build_model(c or cfg(), layout, device="cpu", seed=seed)


def capture(m: Transformer):
    """Record each attention module's (normalised) input x and its outputs."""
    rec = {}

    def hook(i):
        def fn(mod, args, kwargs, out):
            rec[i] = {"x": args[0], "out": out[0], "kv": out[1], "probs": out[2]}

        return fn

    for i, b in enumerate(m.layers):
        b.attn.register_forward_hook(hook(i), with_kwargs=True)
    return rec


# ----------------------------------------------------------------------------- reference pieces


def ref_rope(x, theta, positions):
    """Independent RoPE: pair (d, d + D/2) rotated by angle pos * theta^(-2d/D). x [B,H,T,D]."""
    D = x.shape[-1]
    out = torch.empty_like(x)
    for t, p in enumerate(positions.tolist()):
        for d in range(D // 2):
            ang = p * theta ** (-2 * d / D)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[..., t, d], x[..., t, d + D // 2]
            out[..., t, d] = a * c - b * s
            out[..., t, d + D // 2] = b * c + a * s
    return out


def ref_attention(q, k, v, kind, window):
    """Loops over queries; q [B,Hq,T,D], k/v [B,Hkv,T,D]. Returns out, probs."""
    B, Hq, T, D = q.shape
    rep = Hq // k.shape[1]
    out = torch.zeros_like(q)
    probs = torch.zeros(B, Hq, T, T)
    for h in range(Hq):
        kh, vh = k[:, h // rep], v[:, h // rep]
        for i in range(T):
            lo = 0 if kind == "global" else max(0, i - window + 1)
            s = (q[:, h, i : i + 1] @ kh[:, lo : i + 1].transpose(-1, -2)) / math.sqrt(D)  # [B,1,n]
            p = s.softmax(-1)
            probs[:, h, i, lo : i + 1] = p[:, 0]
            out[:, h, i] = (p @ vh[:, lo : i + 1])[:, 0]
    return out, probs


def heads(x, n, D):
    B, T, _ = x.shape
    return x.view(B, T, n, D).transpose(1, 2)


def merge(y):
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


# ----------------------------------------------------------------------------- shapes, API


def test_shapes_dense_and_moe():
    ids = torch.randint(0, 97, (2, 11))
    out = model()(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 11, 97)
    assert out.aux["lb_loss"].shape == () and out.aux["lb_loss"].item() == 0.0
    assert out.aux["z_loss"].item() == 0.0 and "expert_counts" not in out.aux
    m = model(cfg(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16)))
    out = m(ids)
    assert out.logits.shape == (2, 11, 97)
    assert out.aux["expert_counts"].shape == (6, 4) and out.aux["expert_counts"].dtype == torch.long
    assert torch.all(out.aux["expert_counts"].sum(1) == 2 * 11 * 2)
    assert out.aux["lb_loss"].item() >= 1.0 - 1e-6  # >= 1 by construction, 1 only at balance
    (out.logits.sum() + out.aux["lb_loss"]).backward()
    assert m.layers[0].mlp.router.weight.grad is not None


def test_layout_length_mismatch():
    with pytest.raises(ValueError, match="has 6 layers but the model has 5 layers"):
        Transformer(cfg(n_layers=5), MIXED)


def test_bad_layouts_rejected():
    with pytest.raises(ValueError, match="layer 1 .*same attention kind and window"):
        Transformer(cfg(n_layers=2), Layout("x", (G(0), S(0))))
    with pytest.raises(ValueError, match="shared attention needs identical masks"):
        Transformer(cfg(n_layers=2), Layout("x", (G(0), S(1, attn=0))))


def test_roles_and_parameter_counts():
    m = model()
    roles = [b.attn.role for b in m.layers]
    assert roles == ["producer", "producer", "consumer", "consumer", "producer", "shared"]
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    names = lambda mod: {n for n, _ in mod.named_parameters()}  # noqa: E731
    c = cfg()
    kv_proj = 2 * c.d_model * c.n_kv_heads * c.head_dim
    q_proj = c.d_model * c.n_heads * c.head_dim
    assert names(m.layers[2].attn) == {"wq.weight", "wo.weight"}
    assert names(m.layers[5].attn) == {"wv.weight", "wo.weight"}
    assert count(m.layers[2].attn) == count(m.layers[1].attn) - kv_proj
    assert count(m.layers[2]) == count(m.layers[1]) - kv_proj  # whole block
    assert count(m.layers[5].attn) == count(m.layers[4].attn) - q_proj - kv_proj // 2


# ----------------------------------------------------------------------------- KV sharing


def test_consumer_equals_attention_by_hand():
    c = cfg()
    m = model(c)
    rec = capture(m)
    T = 9
    m(torch.randint(0, 97, (2, T)))
    pos = torch.arange(T)
    for consumer, producer in [(2, 1), (3, 0)]:
        P, Cn = m.layers[producer].attn, m.layers[consumer].attn
        xp, xc = rec[producer]["x"], rec[consumer]["x"]
        k = ref_rope(heads(xp @ P.wk.weight.T, c.n_kv_heads, c.head_dim), c.rope_theta, pos)
        v = heads(xp @ P.wv.weight.T, c.n_kv_heads, c.head_dim)
        q = ref_rope(heads(xc @ Cn.wq.weight.T, c.n_heads, c.head_dim), c.rope_theta, pos)
        spec = MIXED.layers[consumer]
        y, _ = ref_attention(q, k, v, spec.kind, spec.window)
        expected = merge(y) @ Cn.wo.weight.T
        torch.testing.assert_close(rec[consumer]["out"], expected, atol=1e-5, rtol=1e-4)
        # the producer hands on exactly its post-RoPE K and V (before GQA repetition)
        kp, vp = rec[producer]["kv"]
        assert kp.shape == (2, c.n_kv_heads, T, c.head_dim)
        torch.testing.assert_close(kp, k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vp, v, atol=1e-6, rtol=1e-5)


def test_consumer_gradients_reach_producer():
    c = cfg()
    m = model(c)
    P, Cn = m.layers[1].attn, m.layers[2].attn
    assert not hasattr(Cn, "wk") and not hasattr(Cn, "wv")
    x = torch.randn(2, 7, c.d_model)
    cos, sin = m.rope_at(torch.arange(7))
    masks = build_masks([("sliding", W)], 7, "cpu", "sdpa")
    _, kv, _ = P(x, cos, sin, masks[("sliding", W)])
    out, produced, _ = Cn(torch.randn(2, 7, c.d_model), cos, sin, masks[("sliding", W)], kv=kv)
    assert produced is None
    out.square().sum().backward()
    assert P.wk.weight.grad.abs().sum() > 0 and P.wv.weight.grad.abs().sum() > 0
    assert P.wq.weight.grad is None  # only the consumer's loss was backpropagated
    # end to end: a loss on the last position reaches every producer's K/V projections
    m.zero_grad()
    m(torch.randint(0, 97, (2, 7))).logits[:, -1].sum().backward()
    for i in (0, 1, 4):
        assert m.layers[i].attn.wk.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Shared Attention


def test_shared_attention_equals_borrowed_probs_times_own_v():
    c = cfg()
    m = model(c)
    rec = capture(m)
    T = 10
    m(torch.randint(0, 97, (2, T)))
    src, sh = m.layers[4].attn, m.layers[5].attn
    pos = torch.arange(T)
    # the source layer's probabilities, by hand
    x4 = rec[4]["x"]
    q = ref_rope(heads(x4 @ src.wq.weight.T, c.n_heads, c.head_dim), c.rope_theta, pos)
    k = ref_rope(heads(x4 @ src.wk.weight.T, c.n_kv_heads, c.head_dim), c.rope_theta, pos)
    v4 = heads(x4 @ src.wv.weight.T, c.n_kv_heads, c.head_dim)
    y4, probs = ref_attention(q, k, v4, "sliding", W)
    torch.testing.assert_close(rec[4]["probs"], probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec[4]["out"], merge(y4) @ src.wo.weight.T, atol=1e-5, rtol=1e-4)
    # the sharing layer: borrowed probs @ its own V, then its wo
    v5 = heads(rec[5]["x"] @ sh.wv.weight.T, c.n_kv_heads, c.head_dim).repeat_interleave(2, dim=1)
    expected = merge(probs @ v5) @ sh.wo.weight.T
    torch.testing.assert_close(rec[5]["out"], expected, atol=1e-5, rtol=1e-4)
    assert rec[3]["probs"] is None  # only sources compute probabilities


# ----------------------------------------------------------------------------- masks


def test_dense_mask_window_edge():
    T = 10
    m = dense_mask("sliding", W, T, "cpu")[0, 0]
    assert m.sum(-1).tolist() == [min(i + 1, W) for i in range(T)]
    for i in range(T):
        assert m[i, i] and (i - W < 0 or not m[i, i - W]) and (i - W + 1 < 0 or m[i, i - W + 1])
    assert dense_mask("global", None, T, "cpu")[0, 0].sum(-1).tolist() == list(range(1, T + 1))
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2]])
    md = dense_mask("sliding", 3, T, "cpu", docs)[0, 0]
    assert md.sum(-1).tolist() == [1, 2, 3, 1, 2, 1, 2, 3, 3, 3]


def test_sliding_output_sees_exactly_w_tokens():
    """Producer + consumer, both sliding W: output i depends on tokens i-W+1..i only."""
    layout = Layout("s2", (S(0), S(0)))
    m = model(cfg(n_layers=2), layout)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 16))
    base = m(ids).logits
    i = 12
    far, edge = ids.clone(), ids.clone()
    far[0, i - W] = (far[0, i - W] + 1) % 97
    edge[0, i - W + 1] = (edge[0, i - W + 1] + 1) % 97
    assert torch.equal(m(far).logits[0, i], base[0, i])
    assert not torch.allclose(m(edge).logits[0, i], base[0, i])


def test_masks_built_once_per_forward_per_key(monkeypatch):
    import mixtrain.model.masks as masks_mod

    calls = []
    orig = masks_mod.dense_mask
    monkeypatch.setattr(masks_mod, "dense_mask", lambda *a, **k: calls.append(a[:2]) or orig(*a, **k))
    model()(torch.randint(0, 97, (1, 8)))
    # Plain causal (global) layers need no mask at all: SDPA's is_causal kernel.
    assert calls == [("sliding", W)]


def test_sliding_window_covering_the_sequence_takes_the_causal_kernel():
    from mixtrain.model.masks import build_masks

    masks = build_masks([("sliding", 32)], 32, "cpu", "sdpa")
    assert masks[("sliding", 32)].causal  # T <= W: nothing is cut
    masks = build_masks([("sliding", 32)], 33, "cpu", "sdpa")
    assert not masks[("sliding", 32)].causal and masks[("sliding", 32)].dense is not None
    assert torch.equal(dense_mask("sliding", 32, 32, "cpu"), dense_mask("global", None, 32, "cpu"))


def test_causal_fast_path_equals_the_explicit_global_mask():
    from mixtrain.model.attention import sdpa_attention
    from mixtrain.model.masks import build_masks

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    masks = build_masks([("global", None)], 20, "cpu", "sdpa")
    assert masks[("global", None)].causal and masks[("global", None)].dense is None
    attn = model().layers[0].attn
    fast = attn.attend(q, k, v, masks[("global", None)])
    ref = sdpa_attention(q, k, v, dense_mask("global", None, 20, "cpu"))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_doc_ids_equal_separate_documents():
    m = model()
    torch.manual_seed(2)
    lens = [7, 5, 9]
    docs = [torch.randint(0, 97, (1, n)) for n in lens]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), d) for d, n in enumerate(lens)], dim=1)
    # positions restarting per document: equal to separate runs up to rounding
    pos = positions_from_doc_ids(doc_ids)
    assert pos[0].tolist() == list(range(7)) + list(range(5)) + list(range(9))
    out_restart = m(packed, doc_ids=doc_ids, positions=pos[0]).logits
    out_cont = m(packed, doc_ids=doc_ids).logits  # RoPE is relative: same scores
    start = 0
    for d in docs:
        alone = m(d).logits
        n = d.shape[1]
        torch.testing.assert_close(out_restart[:, start : start + n], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out_cont[:, start : start + n], alone, atol=1e-4, rtol=1e-4)
        start += n
    # without doc_ids the later documents do see the earlier ones
    assert not torch.allclose(m(packed).logits[:, 7:12], out_restart[:, 7:12], atol=1e-4)


def test_batched_positions():
    m = model()
    ids = torch.randint(0, 97, (2, 6))
    pos = torch.stack([torch.arange(6), torch.arange(6) + 3])
    out = m(ids, positions=pos).logits
    torch.testing.assert_close(out[0], m(ids[:1]).logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], m(ids[1:], positions=torch.arange(3, 9)).logits[0], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- kernels


def _sdpa_vs_flex(device, T, train):
    c = cfg(max_seq_len=256)
    m_sdpa = model(c).to(device)
    m_flex = build_model(replace(c, attn_impl="flex"), MIXED, device="meta")
    m_flex.to_empty(device=device)
    m_flex.init_weights()
    m_flex.load_state_dict(m_sdpa.state_dict())
    ids = torch.randint(0, 97, (2, T), device=device)
    doc_ids = (torch.arange(T, device=device) >= T // 3).long().expand(2, T).clone()
    doc_ids[1] = 0
    for d in (None, doc_ids):
        with torch.set_grad_enabled(train):
            a = m_sdpa(ids, doc_ids=d).logits
            b = m_flex(ids, doc_ids=d).logits
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        if train:
            a.square().mean().backward()
            b.square().mean().backward()
            for (n, p), q in zip(m_sdpa.named_parameters(), m_flex.parameters()):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=n)
            m_sdpa.zero_grad()
            m_flex.zero_grad()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sdpa_equals_flex_cpu():
    """FlexAttention's forward runs eagerly on CPU in torch 2.13 only without autograd
    ('FlexAttention does not support backward on CPU'), so compare under no_grad."""
    _sdpa_vs_flex("cpu", 40, train=False)
    _sdpa_vs_flex("cpu", 130, train=False)  # longer than one 128-token block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention, with backward)")
def test_sdpa_equals_flex_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    _sdpa_vs_flex("cuda", 200, train=True)


def test_flex_block_masks_cached_across_forwards():
    _cached_block_mask.cache_clear()
    masks_a = build_masks([("global", None), ("sliding", W)], 32, "cpu", "flex")
    masks_b = build_masks([("global", None), ("sliding", W)], 32, "cpu", "flex")
    assert masks_a[("sliding", W)].block is masks_b[("sliding", W)].block
    # One block mask (the sliding one) built once; the global layer takes SDPA's causal kernel.
    assert _cached_block_mask.cache_info().hits == 1 and _cached_block_mask.cache_info().misses == 1
    assert masks_a[("global", None)].causal and masks_a[("global", None)].block is None


# ----------------------------------------------------------------------------- init


def test_meta_init_equals_eager_init():
    for c in (cfg(), cfg(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16), tie_embeddings=True)):
        eager = Transformer(c, MIXED)  # built with real storage from the start
        eager.init_weights(seed=123)
        with torch.device("meta"):
            meta = Transformer(c, MIXED)
        assert all(p.is_meta for p in meta.parameters())
        meta.to_empty(device="cpu")
        meta.init_weights(seed=123)
        sd_e, sd_m = eager.state_dict(), meta.state_dict()
        assert sd_e.keys() == sd_m.keys()
        for k in sd_e:
            assert torch.equal(sd_e[k], sd_m[k]), k
        assert torch.equal(eager.rope_cos, meta.rope_cos) and torch.equal(eager.rope_sin, meta.rope_sin)
        ids = torch.randint(0, 97, (1, 5))
        assert torch.equal(eager(ids).logits, meta(ids).logits)


def test_init_statistics():
    c = cfg(d_model=128, n_heads=8, head_dim=16, ffn_hidden=256, init_std=0.02)
    m = build_model(c, MIXED, device="cpu", seed=0)
    out_std = 0.02 / math.sqrt(2 * 6)
    assert m.layers[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.layers[0].attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert m.layers[0].mlp.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(m.layers[0].attn_norm.weight == 1) and torch.all(m.norm.weight == 1)
    assert build_model(c, MIXED, "cpu", seed=1).layers[0].attn.wq.weight.ne(m.layers[0].attn.wq.weight).any()


def test_reset_rope_for_context_extension():
    c = cfg()
    m = model(c)
    old = m.rope_cos.clone()
    m.cfg.rope_theta, m.cfg.max_seq_len = 8e6, 128
    m.reset_rope()
    assert m.rope_cos.shape == (128, c.head_dim // 2)
    assert not torch.equal(m.rope_cos[:64], old)
    m(torch.randint(0, 97, (1, 100)))  # longer than the original max_seq_len


def test_tied_embeddings_share_storage():
    c = cfg(tie_embeddings=True)
    m = model(c)
    assert m.output is None
    assert m.output_weight is m.tok_embeddings.weight
    untied = model(cfg())
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(untied) - n(m) == c.vocab_size * c.d_model
    ids = torch.randint(0, 97, (1, 5))
    m(ids).logits.sum().backward()
    assert m.tok_embeddings.weight.grad is not None
    h = m.norm(torch.randn(3, c.d_model))
    torch.testing.assert_close(F.linear(h, m.tok_embeddings.weight), h @ m.output_weight.T)
    # survives meta-device construction
    with torch.device("meta"):
        mm = Transformer(c, MIXED)
    mm.to_empty(device="cpu")
    mm.init_weights(0)
    assert mm.output_weight.data_ptr() == mm.tok_embeddings.weight.data_ptr()


# ----------------------------------------------------------------------------- recipes


def load_recipe(path) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def standard(n):
    return Layout("standard", tuple(G(i) for i in range(n)))


def param_counts(m: Transformer) -> tuple[int, int]:
    """(active, total): experts count top_k / n_experts of their weights."""
    total = active = 0
    for name, p in m.named_parameters():
        total += p.numel()
        if name.endswith(("mlp.w1", "mlp.w2", "mlp.w3")):  # stacked expert weights
            active += p.numel() * m.cfg.moe.top_k // m.cfg.moe.n_experts
        else:
            active += p.numel()
    return active, total


# from_hf / from_hf_moe derive the model from a Hugging Face folder (tests/test_hf_import.py).
@pytest.mark.parametrize("path", [p for p in sorted(RECIPES.glob("*.yaml")) if not p.stem.startswith("from_hf")],
                         ids=lambda p: p.stem)
def test_recipe_builds_on_meta(path):
    c = load_recipe(path)
    assert isinstance(c, ModelConfig) and c.name == path.stem
    m = build_model(c, standard(c.n_layers), device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert all(b.is_moe == (c.moe is not None) for b in m.layers)
    assert (m.output is None) == c.tie_embeddings


def test_recipes_present():
    assert {p.stem for p in RECIPES.glob("*.yaml")} >= {"tiny", "tiny_moe", "dense_125m", "paper_moe", "cla_1b"}


def test_paper_moe_parameter_counts():
    c = load_recipe(RECIPES / "paper_moe.yaml")
    m = build_model(c, standard(24), device="meta")
    active, total = param_counts(m)
    assert float(f"{active:.3g}") == 1.64e9, active
    assert float(f"{total:.3g}") == 5.21e9, total
    assert (active, total) == (1_639_589_376, 5_206_844_928)
    # a MixAttention layout (consumers have no K/V projections) is slightly smaller
    ma = Layout("ma-ish", tuple(G(0) if i % 6 == 0 else S(i if i % 2 else i - 1, 1024) for i in range(24)))
    assert param_counts(build_model(c, ma, device="meta"))[1] < total


def test_other_recipe_sizes():
    n = lambda name: param_counts(build_model(c := load_recipe(RECIPES / f"{name}.yaml"), standard(c.n_layers), "meta"))[1]  # noqa: E731
    assert float(f"{n('dense_125m'):.3g}") == 1.26e8
    assert 1.0e9 < n("cla_1b") < 1.3e9


def test_cla_kv_norm_normalises_only_the_kv_path():
    """CLA's separate KV-path norm: present in layers that project K or V, absent in
    consumers; at init (ones) it equals the shared norm, and it acts on K/V alone."""
    plain, split = model(cfg()), model(cfg(kv_norm=True))
    assert [b.kv_norm is not None for b in split.layers] == [True, True, False, False, True, True]
    split.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(split(ids).logits, plain(ids).logits)
    with torch.no_grad():
        split.layers[1].kv_norm.weight.mul_(3.0)  # layer 1 produces K/V for layer 2
    x = torch.randn(2, 12, 32)
    x_q, x_kv = split.layers[1].attn_inputs(x)
    torch.testing.assert_close(x_kv, 3.0 * x_q)
    assert not torch.allclose(split(ids).logits, plain(ids).logits)
