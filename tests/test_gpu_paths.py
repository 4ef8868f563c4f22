"""The GPU code paths, exercised on CPU where torch allows (torch >= 2.8 runs
``torch._grouped_mm`` forward and backward on CPU, ``torch.compile`` with inductor,
and FSDP2 over gloo):

- the MoE ``grouped`` expert path trains exactly like the per-expert loop, in fp32 and
  under bf16 autocast (where both must compute in bf16);
- ``trainer.compile=true`` trains like eager;
- FSDP2 with the bf16 ``MixedPrecisionPolicy`` on two gloo ranks: bf16 compute, fp32
  master weights and gradients, the gradient of the whole batch;
- the MFU peak table: which GPU name gives which peak, and what an unknown GPU gets.

On a GPU machine, ``launch/gpu_check.sh`` runs the CUDA-only tests (marked ``gpu``).
"""

from __future__ import annotations

import functools
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from mixtrain import accounting
from mixtrain.config import compose
from mixtrain.layouts import build_layout


@functools.cache
def _recipe(*overrides: str):
    cfg = compose(list(overrides))
    return cfg, build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)


def _train_moe(expert_impl: str, autocast: bool, steps: int = 2):
    """A few AdamW steps of tiny_moe (ma_offset) on CPU with every MoE layer's experts on
    ``expert_impl``. Returns (losses, first-step gradients, final weights)."""
    from mixtrain.model import build_model
    from mixtrain.model.moe import MoE
    from mixtrain.train.module import lm_loss

    cfg, layout = _recipe("model=tiny_moe", "layout=ma_offset")
    model = build_model(cfg.model, layout, device=torch.device("cpu"), seed=0)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == cfg.model.n_layers
    for m in moes:
        m.expert_impl = expert_impl
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses, grads = [], None
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x[:, :-1])
        loss, _ = lm_loss(out, x[:, 1:], cfg.model.moe)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def moe_runs():
    return {(impl, amp): _train_moe(impl, amp) for impl in ("loop", "grouped") for amp in (False, True)}


@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 1e-2)], ids=["fp32", "bf16-autocast"])
def test_moe_grouped_path_trains_like_the_loop(moe_runs, monkeypatch, autocast, tol):
    loop, grouped = moe_runs[("loop", autocast)], moe_runs[("grouped", autocast)]
    assert grouped[0] == pytest.approx(loop[0], rel=tol, abs=0)
    assert grouped[0][1] < grouped[0][0]  # it trains
    for name, g in loop[1].items():
        assert grouped[1][name] is not None and grouped[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grouped[1][name], g, rtol=tol, atol=tol * 1e-2, msg=name)
    for name, w in loop[2].items():
        torch.testing.assert_close(grouped[2][name], w, rtol=tol, atol=tol * 1e-2, msg=name)


def test_moe_under_bf16_autocast_computes_the_experts_in_bf16(moe_runs, monkeypatch):
    """Both paths take the autocast dtype (torch._grouped_mm is not an autocast op: the
    layer casts), so the bf16 runs differ from the fp32 ones, and the grouped kernel really
    ran on bf16 inputs."""
    import mixtrain.model.moe as moe

    for impl in ("loop", "grouped"):
        assert moe_runs[(impl, True)][0] != moe_runs[(impl, False)][0]
    seen = []
    real = moe.swiglu_experts_grouped
    monkeypatch.setattr(moe, "swiglu_experts_grouped", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    _train_moe("grouped", True, steps=1)
    assert seen and set(seen) == {torch.bfloat16}


def test_moe_grouped_path_refuses_unaligned_bf16_shapes_and_auto_avoids_them():
    from mixtrain.config import MoEConfig
    from mixtrain.model.moe import MoE

    layer = MoE(MoEConfig(n_experts=4, top_k=2, expert_hidden=12), 16)  # 12 x 2 bytes: not a multiple of 16
    layer.init_weights(0.1, 0.1)
    x = torch.randn(1, 8, 16).bfloat16()
    layer.expert_impl = "grouped"
    with pytest.raises(ValueError, match=r"expert_hidden \(12\) to be multiples of 8"):
        layer.to(torch.bfloat16)(x)
    layer.expert_impl = None  # the automatic choice takes the loop: no error
    assert layer(x)[0].shape == x.shape


@pytest.mark.slow
def test_compile_trains_like_eager():
    """trainer.compile=true (per-block torch.compile, inductor) for two AdamW steps on CPU:
    the same losses and weights as eager, within float tolerance."""
    from mixtrain.train.module import LMModule, lm_loss

    def train(compiled: bool):
        cfg, layout = _recipe("model=tiny", "layout=ma_offset", f"trainer.compile={str(compiled).lower()}")
        module = LMModule(cfg, layout, total_steps=10)
        module.configure_model()
        model = module.model
        assert [getattr(b, "_compiled_call_impl", None) is not None for b in model.layers] == [compiled] * 6
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(2):
            loss, _ = lm_loss(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    eager, compiled = train(False), train(True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for name, w in eager[1].items():
        torch.testing.assert_close(compiled[1][name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_picks_grouped_experts_and_compiled_flex_trains_like_eager_sdpa(monkeypatch):
    """On a GPU: under bf16 autocast the MoE takes torch._grouped_mm by itself, and
    trainer.compile=true with FlexAttention (attn_impl auto) trains tiny_moe like eager
    SDPA with the per-expert loop, within bf16 error."""
    import mixtrain.model.moe as moe
    from mixtrain.train.module import LMModule, lm_loss

    seen = []
    real = moe.swiglu_experts_grouped
    monkeypatch.setattr(moe, "swiglu_experts_grouped", lambda x, *a: seen.append(x.dtype) or real(x, *a))

    def train(*overrides, expert_impl=None):
        cfg, layout = _recipe("model=tiny_moe", "layout=ma_offset", *overrides)
        module = LMModule(cfg, layout, total_steps=10)
        module.configure_model()
        model = module.model.cuda()
        model.reset_rope()
        for m in model.modules():
            if isinstance(m, moe.MoE):
                m.expert_impl = expert_impl
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 512, (2, 257), generator=torch.Generator().manual_seed(0)).cuda()
        losses = []
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x[:, :-1])
            loss, _ = lm_loss(out, x[:, 1:], cfg.model.moe)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    eager = train("model.attn_impl=sdpa", expert_impl="loop")
    assert seen == []
    compiled = train("trainer.compile=true")
    assert seen and set(seen) == {torch.bfloat16}
    assert compiled == pytest.approx(eager, rel=2e-2)


# ------------------------------------------------------------------ FSDP2 bf16 on gloo


def _fsdp_bf16_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mixtrain.model import build_model
    from mixtrain.train.module import lm_loss
    from mixtrain.train.parallel import apply_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg, layout = _recipe("model=tiny", "layout=ma_offset")
        model = build_model(cfg.model, layout, device=torch.device("cpu"), seed=0)
        apply_fsdp(model, init_device_mesh("cpu", (world,)), mixed_precision=True)
        x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))[rank * 2:(rank + 1) * 2]
        logits = model(x[:, :-1]).logits
        loss, _ = lm_loss(SimpleNamespace(logits=logits, aux={}), x[:, 1:])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({
                "loss": total.item() / world,
                "logits_dtype": str(logits.dtype),
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
                "grads": grads,
            }, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_on_two_gloo_ranks(tmp_path):
    """gloo carries bf16 all-gathers and fp32 reduce-scatters, so the policy the GPU run
    uses (bf16 parameters for compute, fp32 gradient reduction) runs here: the forward is
    bf16, the sharded master weights and their gradients stay fp32, and the two ranks'
    half-batches give the whole batch's gradient (one process, fp32) within bf16 error."""
    import torch.multiprocessing as mp

    from mixtrain.model import build_model
    from mixtrain.train.module import lm_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_fsdp_bf16_worker, args=(2, port, out), nprocs=2)
    r = torch.load(out)
    assert r["logits_dtype"] == "torch.bfloat16"  # computed with bf16 parameters
    assert r["param_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]

    cfg, layout = _recipe("model=tiny", "layout=ma_offset")
    ref = build_model(cfg.model, layout, device=torch.device("cpu"), seed=0)
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    loss, _ = lm_loss(ref(x[:, :-1]), x[:, 1:])
    loss.backward()
    assert r["loss"] == pytest.approx(loss.item(), rel=1e-3)
    for name, p in ref.named_parameters():
        g = r["grads"][name]
        assert g.shape == p.shape
        rel = float((g - p.grad).norm() / p.grad.norm())
        assert rel < 2e-2, (name, rel)  # bf16 error; a missing average over ranks would be 100%


# ------------------------------------------------------------------ MFU peaks


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H800", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H200", 989e12),  # the plain name Lightning's table misses
        ("NVIDIA H200 141GB HBM3e", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A800 80GB PCIe", 312e12),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("AMD Instinct MI300X", None),
        ("", None),
    ],
)
def test_peak_table_by_device_name(name, peak):
    assert accounting.peak_flops(name, "bf16-mixed") == peak


@pytest.mark.parametrize("gpu,mfu", [("NVIDIA H200", True), ("NVIDIA L40S", False)])
def test_throughput_monitor_mfu_on_a_known_and_an_unknown_gpu(monkeypatch, gpu, mfu):
    """On a GPU the table knows, MFU = FLOPs/token x tokens/s / (peak x GPUs); on one it
    does not, tokens/s is logged and MFU is not (never a guessed peak)."""
    import mixtrain.train.callbacks as cb

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    clock = iter([0.0, 1.0, 10.0, 12.0])
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(global_step=0, world_size=2,
                              strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    logged = []
    module = SimpleNamespace(log_dict=lambda d, **k: logged.append(dict(d)))
    mon = cb.ThroughputMonitor(tokens_per_step=1000, flops_per_token=6e9, window=2)
    mon.on_train_start(trainer, module)
    assert mon.peak == (2 * 989e12 if mfu else None)
    for step in (1, 2):
        mon.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step = step
        mon.on_train_batch_end(trainer, module, None, None, 0)
    assert logged[-1]["perf/tokens_per_s"] == 500.0  # step 2 took 2 s (step 1 is start-up)
    if mfu:
        assert logged[-1]["perf/mfu"] == 6e9 * 500.0 / (2 * 989e12)
    else:
        assert "perf/mfu" not in logged[-1]
