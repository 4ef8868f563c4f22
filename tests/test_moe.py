"""MoE: dispatch against a dense reference, aux losses by hand, backends, megablocks plumbing."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mixtrain.config import MoEConfig
from mixtrain.model.moe import (
    MoE,
    build_moe,
    load_balancing_loss,
    megablocks_to_native,
    native_to_megablocks,
    z_loss,
)

C, H, E, K = 16, 24, 4, 2


def make_moe(renormalize=False, seed=0, E=E, K=K):
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(n_experts=E, top_k=K, expert_hidden=H, renormalize=renormalize), C)
    g = torch.Generator().manual_seed(seed)
    # larger std than the training init so that the outputs are far from zero
    moe.init_weights(0.3, 0.3, g)
    return moe


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the (optionally renormalised) top-k weights."""
    xf = x.reshape(-1, x.shape[-1])
    probs = (xf @ moe.router.weight.T).float().softmax(-1)  # [N, E]
    w, idx = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        w = w / w.sum(-1, keepdim=True)
    gate = torch.zeros_like(probs).scatter(1, idx, w)  # [N, E], zero outside the top-k
    all_out = torch.stack(
        [(F.silu(xf @ moe.w1[e]) * (xf @ moe.w3[e])) @ moe.w2[e] for e in range(moe.n_experts)], dim=1
    )  # [N, E, C]
    return (gate[:, :, None] * all_out).sum(1).view_as(x)


@pytest.mark.parametrize("renormalize", [False, True])
def test_loop_matches_dense_reference(renormalize):
    moe = make_moe(renormalize)
    x = torch.randn(3, 7, C)
    out, aux = moe(x)
    ref = dense_reference(moe, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 1e-2  # not trivially zero
    assert aux["counts"].dtype == torch.long and aux["counts"].shape == (E,)
    assert int(aux["counts"].sum()) == 3 * 7 * K


def test_renormalize_changes_weights_by_their_sum():
    x = torch.randn(2, 5, C)
    plain, _ = make_moe(False)(x)
    renorm, _ = make_moe(True)(x)
    assert not torch.allclose(plain, renorm)
    # with top_k == n_experts the renormalised weights are the full softmax: sums to 1
    moe = make_moe(True, E=3, K=3)
    probs = (x.reshape(-1, C) @ moe.router.weight.T).softmax(-1)
    out, _ = moe(x)
    ref = dense_reference(moe, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))


def _grouped_vs_loop(device, dtype, atol):
    moe = make_moe().to(device)
    x = torch.randn(4, 9, C, device=device)
    grad_out = torch.randn(4, 9, C, device=device)
    results = {}
    for impl in ("loop", "grouped"):
        moe.zero_grad()
        moe.expert_impl = impl
        xi = x.to(dtype).requires_grad_(True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out, _ = moe(xi)
        out.backward(grad_out.to(out.dtype))
        results[impl] = (out.float(), xi.grad.float(), moe.w1.grad.clone(), moe.w2.grad.clone(), moe.router.weight.grad.clone())
    for a, b in zip(results["loop"], results["grouped"]):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_grouped_mm_matches_loop_cpu_fp32():
    """torch._grouped_mm also runs on CPU in torch 2.13 (fp32), so the same sorted-buffer
    dispatch is checked here, forward and backward."""
    _grouped_vs_loop("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the bf16 grouped_mm path")
def test_grouped_mm_matches_loop_cuda_bf16():
    _grouped_vs_loop("cuda", torch.bfloat16, 3e-2)


def test_lb_loss_is_one_at_perfect_balance():
    N = 32
    uniform = torch.full((N, E), 1.0 / E)
    balanced = torch.full((E,), N * K // E)
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0, abs=1e-7)
    # at perfect balance the loss is 1 for any router probabilities (sum_i P_i = 1)
    skewed = torch.randn(N, E).softmax(-1)
    assert load_balancing_loss(skewed, balanced).item() == pytest.approx(1.0, abs=1e-6)
    # total collapse onto expert 0 with P_0 = 1: loss = E
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1
    counts = torch.tensor([N * K, 0, 0, 0])
    assert load_balancing_loss(collapsed, counts).item() == pytest.approx(E)


def test_module_with_uniform_router():
    moe = make_moe()
    with torch.no_grad():
        moe.router.weight.zero_()  # logits 0 -> uniform probabilities
    out, aux = moe(torch.randn(2, 8, C))
    assert aux["lb_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert aux["z_loss"].item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    lse0 = math.log(sum(math.exp(v) for v in (0.0, 1.0, 2.0, 3.0)))
    lse1 = 1.0 + math.log(4.0)
    assert z_loss(logits).item() == pytest.approx((lse0**2 + lse1**2) / 2, rel=1e-6)
    moe = make_moe()
    x = torch.randn(2, 3, C)
    _, aux = moe(x)
    logits = x.reshape(-1, C) @ moe.router.weight.T
    assert aux["z_loss"].item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-5)


def test_counts_and_lb_loss_match_assignments():
    moe = make_moe()
    x = torch.randn(5, 6, C)
    _, aux = moe(x)
    probs = (x.reshape(-1, C) @ moe.router.weight.T).softmax(-1)
    idx = probs.topk(K, -1).indices
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    assert torch.equal(aux["counts"], counts)
    assert int(counts.sum()) == 30 * K
    expected = E * ((counts.float() / (30 * K)) * probs.mean(0)).sum()
    assert aux["lb_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradients_reach_router_and_experts():
    moe = make_moe()
    x = torch.randn(3, 10, C, requires_grad=True)
    out, aux = moe(x)
    (out.square().sum() + aux["lb_loss"] + aux["z_loss"]).backward()
    for name in ("router.weight", "w1", "w2", "w3"):
        g = dict(moe.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # the router also gets gradient through the combine weights alone
    moe.zero_grad()
    out, _ = moe(x)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    # experts that received tokens get gradient in their slice
    used = aux["counts"] > 0
    per_expert = moe.w1.grad.abs().sum(dim=(1, 2))
    assert torch.all(per_expert[used] > 0)


def test_megablocks_converter_round_trip_and_meaning():
    moe = make_moe()
    mb = native_to_megablocks(moe.w1.data, moe.w3.data, moe.w2.data)
    assert {k: tuple(v.shape) for k, v in mb.items()} == {"w1": (E * H, C), "v1": (E * H, C), "w2": (E * H, C)}
    back = megablocks_to_native(mb["w1"], mb["v1"], mb["w2"], n_experts=E)
    assert torch.equal(back["w1"], moe.w1.data)
    assert torch.equal(back["w3"], moe.w3.data)
    assert torch.equal(back["w2"], moe.w2.data)
    # megablocks' GLU per expert e: rows [e*H, (e+1)*H); (act(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e
    x = torch.randn(6, C)
    for e in range(E):
        rows = slice(e * H, (e + 1) * H)
        y_mb = (F.silu(x @ mb["w1"][rows].T) * (x @ mb["v1"][rows].T)) @ mb["w2"][rows]
        y_native = (F.silu(x @ moe.w1[e]) * (x @ moe.w3[e])) @ moe.w2[e]
        torch.testing.assert_close(y_mb, y_native.detach())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_megablocks_error_without_cuda():
    with pytest.raises((ImportError, RuntimeError)) as err:
        build_moe(MoEConfig(impl="megablocks"), C)
    msg = str(err.value)
    assert "pip install mixtrain[megablocks]" in msg and "model.moe.impl=native" in msg


def test_megablocks_error_when_not_installed(monkeypatch):
    """With CUDA pretended present, a missing megablocks gives the ImportError with the hint."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megablocks", None)  # makes `import megablocks...` fail
    with pytest.raises(ImportError, match=r"pip install mixtrain\[megablocks\]"):
        build_moe(MoEConfig(impl="megablocks"), C)


def test_unknown_impl():
    with pytest.raises(ValueError, match="model.moe.impl"):
        build_moe(MoEConfig(impl="tutel"), C)


def test_megablocks_not_imported_by_model():
    code = "import sys, mixtrain.model, mixtrain.model.moe; assert 'megablocks' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
