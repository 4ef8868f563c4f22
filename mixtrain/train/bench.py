"""``mixtrain bench train``: real training steps of a model, timed, with a baseline
measured in the same process on the same device.

For each configuration (the baseline, the recipe with its overrides, then each
``--compare`` variant) it builds the model exactly as training does
(``parallelize``: activation checkpointing, per-block compile), runs ``--warmup``
untimed and ``--steps`` timed forward+backward+AdamW steps on random tokens, and
reports tokens/s, MFU (analytic FLOPs: :func:`mixtrain.accounting.train_flops_per_token`,
against the device's bf16 peak), step time and peak memory, with ratios against
the baseline (default: the same recipe with ``layout=standard``), which runs first.
Random tokens isolate the model from the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mixtrain import accounting
from mixtrain.devices import resolve_device, synchronize, time_per_call
from mixtrain.errors import UserError


def bench_config(
    overrides: list[str],
    *,
    seq_len: int,
    micro_batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    activation_checkpointing: str = "none",
    compile: bool = False,
    seed: int = 0,
    peak_flops: Optional[float] = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps of the model the overrides describe. ``peak_flops``
    (FLOP/s) replaces the device's known bf16 peak for MFU (for GPUs the table does not
    know); without it MFU needs an A100, H100 or H200."""
    from mixtrain.config import compose
    from mixtrain.layouts import LayoutError, build_layout
    from mixtrain.model import build_model
    from mixtrain.train.module import lm_loss
    from mixtrain.train.parallel import parallelize

    cfg = compose(overrides)
    if seq_len > cfg.model.max_seq_len:
        cfg.model.max_seq_len = seq_len  # benchmarking longer contexts than the recipe trains
    try:
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    except LayoutError as e:
        raise UserError(f"{' '.join(overrides)}: {e}") from e
    on_gpu = device.type == "cuda"
    model = build_model(cfg.model, layout, device=device, seed=seed)
    # The recipe's trainer settings count too, so `--compare trainer.compile=true` works.
    if activation_checkpointing == "none":
        activation_checkpointing = cfg.trainer.activation_checkpointing
    compile = compile or bool(cfg.trainer.compile)
    parallelize(model, activation_checkpointing=activation_checkpointing, compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu, foreach=not on_gpu)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=gen).to(device)
    inputs, labels = x[:, :-1], x[:, 1:]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with amp:
            out = model(inputs)
        loss, _ = lm_loss(out, labels, cfg.model.moe)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    synchronize(device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    tokens = micro_batch * seq_len
    flops = accounting.train_flops_per_token(cfg.model, layout, seq_len)
    peak = peak_flops or (accounting.peak_flops(torch.cuda.get_device_name(device), "bf16") if on_gpu else None)
    counts = accounting.param_counts(cfg.model, layout)
    return {
        "config": " ".join(overrides),
        "model": cfg.model.name,
        "layout": layout.name,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "activation_checkpointing": activation_checkpointing,
        "compile": compile,
        "params_total": counts.total,
        "params_active": counts.active,
        "train_flops_per_token": flops,
        "step_time_s": dt,
        "tokens_per_s": tokens / dt,
        "mfu": flops * tokens / dt / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if on_gpu else None,
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": float(loss),
    }


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    base = list(args.overrides)
    variants = [base] + [base + shlex.split(v) for v in (args.compare or [])]
    if args.baseline:
        variants.insert(0, base + shlex.split(args.baseline))
    results = []
    for overrides in variants:
        results.append(
            bench_config(
                overrides,
                seq_len=args.seq_len,
                micro_batch=args.micro_batch,
                steps=args.steps,
                warmup=args.warmup,
                device=device,
                activation_checkpointing=args.activation_checkpointing,
                compile=args.compile,
                peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
            )
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = results[0]
    for r in results:
        r["speedup_vs_baseline"] = r["tokens_per_s"] / baseline["tokens_per_s"]
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    from mixtrain.report import human_bytes, human_count

    head = ["config", "layout", "params", "tokens/s", "step ms", "MFU", "peak mem", "x baseline"]
    rows = [head]
    for r in results:
        rows.append([
            r["config"] or "(recipe)",
            r["layout"],
            human_count(r["params_active"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_time_s'] * 1e3:.1f}",
            f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a",
            human_bytes(r["peak_memory_bytes"]) if r["peak_memory_bytes"] is not None else "n/a (cpu)",
            f"{r['speedup_vs_baseline']:.2f}x",
        ])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    results = run_bench(args)
    print(format_table(results))
    if results[0]["mfu"] is None:
        print("(MFU needs a GPU with a known peak: A100, H100, H200; or give --peak-tflops)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'bench_train.json'}")
    return 0


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "train",
        help="tokens/s, MFU and peak memory of real training steps, against a baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model=dense_125m layout=ma_offset")
    p.add_argument("--baseline", default="layout=standard", metavar="OVERRIDES",
                   help="overrides on top of the recipe for the baseline, measured first in the same run "
                   "(default: layout=standard; '' for none)")
    p.add_argument("--compare", action="append", metavar="OVERRIDES",
                   help="more variants measured in the same run, e.g. --compare trainer.compile=true (repeatable)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (steadier CPU timings)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak in TFLOP/s, for MFU on a GPU the built-in table does not "
                   "know (A100, H100, H200 are known)")
    p.add_argument("--out", default="bench_train", help="folder for bench_train.json")
    p.set_defaults(func=_main)
    return p


# ---------------------------------------------------------------------------- MoE layer
def bench_moe(
    *, d_model: int, n_experts: int, top_k: int, expert_hidden: int, tokens: int,
    steps: int, warmup: int, device: torch.device, megablocks: bool = False,
) -> list[dict[str, Any]]:
    """Forward+backward of the whole MoE layer (router, permutation, experts, combine)
    against the expert matmuls alone on the same, perfectly balanced, pre-sorted
    tokens: the layer's overhead is what routing and permutation cost."""
    from mixtrain.config import MoEConfig
    from mixtrain.model.moe import MoE, swiglu_experts_grouped, swiglu_experts_loop

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = MoEConfig(n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden)
    layer = MoE(cfg, d_model).to(device=device)
    layer.init_weights(0.02, 0.02)
    x = torch.randn(1, tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    experts_fn = swiglu_experts_grouped if device.type == "cuda" else swiglu_experts_loop
    per_expert = tokens * top_k // n_experts
    counts = torch.full((n_experts,), per_expert, dtype=torch.long, device=device)
    xs = torch.randn(per_expert * n_experts, d_model, device=device, dtype=dtype, requires_grad=True)
    w = [p.detach().to(dtype).requires_grad_() for p in (layer.w1, layer.w3, layer.w2)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def layer_step():
        with amp:
            out, _ = layer(x)
        out.float().sum().backward()

    def experts_step():
        experts_fn(xs, counts, *w).float().sum().backward()

    expert_flops = 3 * 2 * 3 * tokens * top_k * d_model * expert_hidden  # fwd+bwd, three matmuls
    rows = []
    for name, fn in [("experts only", experts_step), ("MoE layer", layer_step)]:
        dt = time_per_call(fn, device, steps, warmup)
        rows.append({"what": name, "ms": dt * 1e3, "tflops": expert_flops / dt / 1e12})
    if megablocks:
        from mixtrain.model.moe import MegablocksMoE

        mb = MegablocksMoE(cfg, d_model).to(device)

        def mb_step():
            with amp:
                out, _ = mb(x)
            out.float().sum().backward()

        dt = time_per_call(mb_step, device, steps, warmup)
        rows.append({"what": "megablocks dMoE", "ms": dt * 1e3, "tflops": expert_flops / dt / 1e12})
    base = rows[0]["ms"]
    for r in rows:
        r["fraction_of_experts_only_speed"] = base / r["ms"]
    return rows


def _moe_main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_moe(
        d_model=args.d_model, n_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden,
        tokens=args.tokens, steps=args.steps, warmup=args.warmup, device=device, megablocks=args.megablocks,
    )
    print(f"MoE fwd+bwd: {args.tokens} tokens, d_model {args.d_model}, {args.experts} experts top-{args.top_k}, "
          f"hidden {args.hidden}, {device.type}")
    for r in rows:
        print(f"  {r['what']:<16} {r['ms']:9.2f} ms  {r['tflops']:8.2f} TFLOP/s  "
              f"{r['fraction_of_experts_only_speed'] * 100:6.1f}% of experts-only speed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_moe.json").write_text(json.dumps(rows, indent=2))
    return 0


def register_moe(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "moe", help="MoE layer forward+backward against the expert matmuls alone",
        description=bench_moe.__doc__,
    )
    p.add_argument("--d-model", type=int, default=1536)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2688)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--megablocks", action="store_true", help="also time megablocks' dMoE (CUDA, if installed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_moe")
    p.set_defaults(func=_moe_main)
    return p
