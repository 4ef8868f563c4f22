"""``mixtrain bench gpu``: every GPU figure the README lists as not measured yet, in one
command on one GPU within a time budget (default 9 minutes), written to one JSON and
one table (``launch/gpu_check.sh`` calls it).

It starts with a self-check of a few seconds (CUDA visible, bf16, the packages each
step imports, the kernels' prerequisites, free GPU memory, a writable output folder)
and stops with one message listing everything missing and what to do, before any
step runs, so a short GPU lease is not spent discovering a missing package. Then the
steps run one after another, each in its own process with a time limit (a crash, an
out-of-memory error or a hang in one step is recorded and the next step runs); a step
that no longer fits the remaining budget is skipped and listed:

1. ``tests``      the GPU-only tests (``pytest -m gpu``);
2. ``moe_layer``  the MoE layer against the grouped matmuls alone (``bench moe``);
3. ``ratio_32k``  the 32K training step time of ma_offset against standard (``bench train``);
4. ``dense_1b``   MFU of a dense ~1B model at 4K, eager and compiled (``bench train``);
5. ``moe_mfu``    MFU of the paper's MoE (12 of its 24 layers, so that the optimizer
                  state fits one 80 GB GPU) at 4K (``bench train``);
6. ``infer_32k``  ``bench infer`` of the paper's model at 32K: KV bytes, sequences that
                  fit, decode tokens/s and the bandwidth of decode attention.

Outputs under ``--out``: ``gpu_check.json`` (self-check, every step's command, status,
time and figures), ``gpu_check.md`` (the figures against their targets), and each
step's own folder with its log and JSON. ``--dry-run`` prints the plan; ``--smoke``
runs the same steps with tiny models on any device (what CI runs on CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]

# Modules each step imports (a missing one is named by the self-check, with its package).
NEEDED_MODULES = {
    "torch": "torch", "lightning": "lightning", "hydra": "hydra-core", "omegaconf": "omegaconf",
    "safetensors": "safetensors", "tokenizers": "tokenizers", "matplotlib": "matplotlib",
    "numpy": "numpy", "pytest": "pytest", "triton": "triton",
}
MIXTRAIN_MODULES = ("mixtrain.cli", "mixtrain.train.bench", "mixtrain.infer.bench", "mixtrain.model")
MIN_FREE_GIB = 70  # the MoE MFU step holds ~45 GB of optimizer state plus activations


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]  # after `python -m`
    timeout_s: int
    figures: Callable[[Path], list[dict[str, Any]]] = field(repr=False)


def _fig(figure: str, value: Any, unit: str = "", target: Optional[str] = None) -> dict[str, Any]:
    return {"figure": figure, "value": value, "unit": unit, "target": target}


# ----------------------------------------------------------------------------- figures


def _junit_figures(folder: Path) -> list[dict[str, Any]]:
    import xml.etree.ElementTree as ET

    root = ET.parse(folder / "junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return [_fig("GPU-only tests passed", total - failed - skipped, "tests"),
            _fig("GPU-only tests failed", failed, "tests", "0"),
            _fig("GPU-only tests skipped", skipped, "tests")]


def _bench_train_rows(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "bench_train.json").read_text())


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(100 * x, 2)


def _dense_figures(folder: Path) -> list[dict[str, Any]]:
    out = []
    for r in _bench_train_rows(folder):
        how = "compiled" if r["compile"] else "eager"
        out += [_fig(f"dense ~1B MFU at {r['seq_len']} ({how})", _pct(r["mfu"]), "%", "45%"),
                _fig(f"dense ~1B tokens/s ({how})", round(r["tokens_per_s"]), "tok/s"),
                _fig(f"dense ~1B peak memory ({how})", r["peak_memory_bytes"], "bytes")]
    return out


def _moe_mfu_figures(folder: Path) -> list[dict[str, Any]]:
    (r,) = _bench_train_rows(folder)
    return [_fig(f"MoE MFU at {r['seq_len']} ({r['layout']}, {r['params_active'] / 1e9:.2f}B active)",
                 _pct(r["mfu"]), "%", "35%"),
            _fig("MoE tokens/s", round(r["tokens_per_s"]), "tok/s"),
            _fig("MoE peak memory", r["peak_memory_bytes"], "bytes")]


def _ratio_figures(folder: Path) -> list[dict[str, Any]]:
    rows = _bench_train_rows(folder)
    base, mine = rows[0], rows[-1]
    return [_fig(f"{mine['seq_len']} step time, {base['layout']} / {mine['layout']}",
                 round(mine["speedup_vs_baseline"], 3), "x", "3x"),
            _fig(f"{base['layout']} step time at {base['seq_len']}", round(base["step_time_s"] * 1e3, 1), "ms"),
            _fig(f"{mine['layout']} step time at {mine['seq_len']}", round(mine["step_time_s"] * 1e3, 1), "ms")]


def _moe_layer_figures(folder: Path) -> list[dict[str, Any]]:
    rows = {r["what"]: r for r in json.loads((folder / "bench_moe.json").read_text())}
    layer, experts = rows["MoE layer"], rows["experts only"]
    return [_fig("MoE layer speed / grouped matmuls alone", _pct(layer["fraction_of_experts_only_speed"]), "%"),
            _fig("grouped-matmul experts fwd+bwd", round(experts["tflops"], 1), "TFLOP/s"),
            _fig("MoE layer fwd+bwd (expert FLOPs)", round(layer["tflops"], 1), "TFLOP/s")]


def _infer_figures(folder: Path) -> list[dict[str, Any]]:
    res = json.loads((folder / "bench_infer.json").read_text())
    out = []
    for r in res["layouts"]:
        name, ctx = r["layout"], r["context"]
        out += [_fig(f"{name} KV bytes/token at {ctx} (allocated / accounting)",
                     f"{r['kv_bytes_per_token']:.1f} / {r['accounting_bytes_per_token']:.1f}", "B"),
                _fig(f"{name} sequences of {ctx} that fit ({r['fit_method']})", r["max_batch"], "seqs"),
                _fig(f"{name} decode tokens/s at batch {r['decode_batch']}",
                     None if r.get("decode_tok_s") is None else round(r["decode_tok_s"]), "tok/s"),
                _fig(f"{name} decode attention bandwidth",
                     None if r.get("attn_bw_GBs") is None else round(r["attn_bw_GBs"], 1), "GB/s"),
                _fig(f"{name} decode step bandwidth (whole step)",
                     None if r.get("step_bw_GBs") is None else round(r["step_bw_GBs"], 1), "GB/s")]
        if r is not res["layouts"][0]:
            out += [_fig(f"{name} tokens that fit vs {res['layouts'][0]['layout']}",
                         None if r.get("tokens_fit_vs_base") is None else round(r["tokens_fit_vs_base"], 2), "x"),
                    _fig(f"{name} decode tokens/s vs {res['layouts'][0]['layout']}",
                         None if r.get("decode_vs_base") is None else round(r["decode_vs_base"], 2), "x")]
    return out


# ----------------------------------------------------------------------------- plan


def gpu_test_files() -> list[str]:
    """The test modules that hold GPU-only tests (collecting only them keeps modules whose
    optional packages the GPU machine lacks out of the run)."""
    return [f"tests/{p.name}" for p in sorted((REPO / "tests").glob("test_*.py"))
            if "pytest.mark.gpu" in p.read_text(errors="ignore")]


def plan(out: Path, smoke: bool = False, device: Optional[str] = None) -> list[Step]:
    """The steps, in priority order (cheap and most wanted first)."""
    device = device or ("auto" if smoke else "cuda")
    m = ["mixtrain", "bench"]
    dev = ["--device", device]
    if smoke:  # the same commands and flags, tiny sizes: proves the orchestration anywhere
        return [
            Step("tests", "GPU-only tests", ["pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_moe.py",
                                             "--junitxml", str(out / "tests" / "junit.xml")], 300, _junit_figures),
            Step("moe_layer", "MoE layer vs grouped matmuls", m + ["moe", "--d-model", "32", "--experts", "4", "--top-k", "2",
                 "--hidden", "16", "--tokens", "64", "--steps", "1", "--warmup", "1", *dev, "--out", str(out / "moe_layer")],
                 300, _moe_layer_figures),
            Step("ratio_32k", "step time ma_offset vs standard", m + ["train", "model=tiny", "layout=ma_offset",
                 "--seq-len", "64", "--micro-batch", "1", "--steps", "1", "--warmup", "1",
                 "--activation-checkpointing", "full", *dev, "--out", str(out / "ratio_32k")], 300, _ratio_figures),
            Step("dense_1b", "dense MFU", m + ["train", "model=tiny", "layout=standard", "--baseline", "",
                 "--seq-len", "64", "--micro-batch", "2", "--steps", "1", "--warmup", "1", *dev,
                 "--out", str(out / "dense_1b")], 300, _dense_figures),
            Step("moe_mfu", "MoE MFU", m + ["train", "model=tiny_moe", "layout=ma_offset", "--baseline", "",
                 "--seq-len", "64", "--micro-batch", "2", "--steps", "1", "--warmup", "1",
                 "--activation-checkpointing", "selective", *dev, "--out", str(out / "moe_mfu")], 300, _moe_mfu_figures),
            Step("infer_32k", "inference at long context", m + ["infer", "model=tiny", "--layouts", "standard,ma_offset",
                 "--context", "96", "--memory-budget", "1MiB", "--decode-steps", "2", "--max-batch", "2",
                 "--prefill-len", "32", "--repeats", "1", *dev, "--out", str(out / "infer_32k")], 300, _infer_figures),
        ]
    return [
        Step("tests", "GPU-only tests", ["pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files(),
                                         "--junitxml", str(out / "tests" / "junit.xml")], 100, _junit_figures),
        Step("moe_layer", "MoE layer vs grouped matmuls (paper shape, 8K tokens)",
             m + ["moe", "--steps", "10", "--warmup", "3", *dev, "--out", str(out / "moe_layer")], 45, _moe_layer_figures),
        Step("ratio_32k", "32K step time, ma_offset vs standard (dense_125m, W=1024)",
             m + ["train", "model=dense_125m", "layout=ma_offset", "model.sliding_window=1024",
                  "--seq-len", "32768", "--micro-batch", "1", "--steps", "5", "--warmup", "2",
                  "--activation-checkpointing", "full", *dev, "--out", str(out / "ratio_32k")], 100, _ratio_figures),
        Step("dense_1b", "MFU of a dense ~1B model at 4K (cla_1b, standard layout), eager and compiled",
             m + ["train", "model=cla_1b", "layout=standard", "--baseline", "", "--compare", "trainer.compile=true",
                  "--seq-len", "4096", "--micro-batch", "4", "--steps", "8", "--warmup", "3", *dev,
                  "--out", str(out / "dense_1b")], 150, _dense_figures),
        Step("moe_mfu", "MFU of the paper's MoE (12 layers, ma_offset) at 4K, compiled",
             m + ["train", "model=paper_moe", "model.n_layers=12", "layout=ma_offset", "trainer.compile=true",
                  "--baseline", "", "--seq-len", "4096", "--micro-batch", "2", "--steps", "6", "--warmup", "3",
                  "--activation-checkpointing", "selective", *dev, "--out", str(out / "moe_mfu")], 150, _moe_mfu_figures),
        Step("infer_32k", "bench infer, paper model at 32K",
             m + ["infer", "model=paper_moe", "--layouts", "standard,ma_offset", "--context", "32768",
                  "--decode-steps", "8", "--repeats", "2", "--prefill-len", "8192", *dev,
                  "--out", str(out / "infer_32k")], 150, _infer_figures),
    ]


# ----------------------------------------------------------------------------- self-check


def self_check(out: Path, need_cuda: bool = True) -> dict[str, Any]:
    """Seconds, not minutes. Returns {"ok", "problems", "warnings", "facts"}."""
    problems, warnings, facts = [], [], {"python": platform.python_version()}
    missing = []
    for module, package in NEEDED_MODULES.items():
        if module == "triton" and not need_cuda:
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure to import is reported
            missing.append(f"{package} ({type(e).__name__}: {e})")
    for module in MIXTRAIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing.append(f"{e.name} (needed by {module})")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{module} does not import: {type(e).__name__}: {e}")
    if missing:
        problems.append("missing Python packages: " + "; ".join(missing) + ". Install them (on a machine "
                        "without network: `pip download` the wheels elsewhere, copy them over, "
                        "`pip install --no-index --find-links DIR ...`), or `pip install -e .` from this project")
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda_build"] = torch.version.cuda
        if need_cuda:
            if not torch.cuda.is_available():
                problems.append(f"CUDA: no GPU is visible to torch {torch.__version__} (built for CUDA "
                                f"{torch.version.cuda}); run this on the GPU machine, with a CUDA build of torch, "
                                "and check CUDA_VISIBLE_DEVICES / nvidia-smi")
            else:
                name = torch.cuda.get_device_name(0)
                free, total = torch.cuda.mem_get_info(0)
                facts.update(gpu=name, gpus=torch.cuda.device_count(), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                             gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1))
                if not torch.cuda.is_bf16_supported():
                    problems.append(f"CUDA: {name} has no bf16 support; the benchmarks train in bf16")
                if free / 2**30 < MIN_FREE_GIB:
                    problems.append(f"CUDA: {free / 2**30:.0f} GiB free on {name}, the MoE step needs about "
                                    f"{MIN_FREE_GIB} GiB; stop what else runs on this GPU")
                from mixtrain.accounting import peak_flops

                peak = peak_flops(name, "bf16")
                facts["peak_bf16_tflops"] = None if peak is None else peak / 1e12
                if peak is None:
                    warnings.append(f"no bf16 peak is known for {name!r}: MFU will be n/a (tokens/s are still measured)")
                try:  # the MoE kernel, forward and backward, in a few milliseconds
                    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    w = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    offs = torch.tensor([16, 32, 48, 64], device="cuda", dtype=torch.int32)
                    torch._grouped_mm(x, w, offs=offs).float().sum().backward()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"torch._grouped_mm (MoE experts) fails on {name}: {type(e).__name__}: {e}")
        if not hasattr(torch, "_grouped_mm"):
            problems.append(f"torch {torch.__version__} has no torch._grouped_mm (MoE experts): use torch >= 2.8")
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as e:
            problems.append(f"FlexAttention is missing from torch {torch.__version__} ({e}): use torch >= 2.5")
    except ImportError:
        pass  # already listed as a missing package
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
        facts["disk_free_gib"] = round(shutil.disk_usage(out).free / 2**30, 1)
    except OSError as e:
        problems.append(f"cannot write to the output folder {out}: {e}")
    return {"ok": not problems, "problems": problems, "warnings": warnings, "facts": facts}


# ----------------------------------------------------------------------------- run


def run_step(step: Step, out: Path, timeout_s: float) -> dict[str, Any]:
    """One step in its own process; its output goes to ``out/<step>/log.txt``."""
    folder = out / step.name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", *step.argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    rec: dict[str, Any] = {"step": step.name, "what": step.what, "command": shlex.join(cmd[1:]),
                           "timeout_s": int(timeout_s)}
    t0 = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    rec["seconds"] = round(time.monotonic() - t0, 1)
    tail = (folder / "log.txt").read_text(errors="replace")[-2000:]
    try:
        rec["figures"] = step.figures(folder)
    except Exception as e:  # noqa: BLE001 - no results file, or a malformed one
        rec["figures"] = []
        rec["figures_error"] = f"{type(e).__name__}: {e}"
    if rc is None:
        rec.update(status="timed out", log_tail=tail)
    elif rc != 0 and not (step.name == "tests" and rec["figures"]):
        rec.update(status=f"failed (exit {rc})", log_tail=tail)
    elif not rec["figures"]:
        rec.update(status="failed (no results)", log_tail=tail)
    else:
        failed = [f for f in rec["figures"] if f["figure"] == "GPU-only tests failed" and f["value"]]
        rec["status"] = "failed (tests)" if failed else "ok"
        if failed:
            rec["log_tail"] = tail
    return rec


def format_table(result: dict[str, Any]) -> str:
    lines = [f"# GPU check: {result['self_check']['facts'].get('gpu', 'no GPU')}", "",
             f"torch {result['self_check']['facts'].get('torch')}, {result['started']}, "
             f"{result['seconds']:.0f} s of a {result['budget_s']} s budget", "",
             "| step | status | seconds | figure | value | target |", "|---|---|---|---|---|---|"]
    check = result["self_check"]
    notes = [f"warning: {w}" for w in check["warnings"]]
    if not check["ok"]:
        notes = ["The self-check failed, nothing was run:", *[f"- {p}" for p in check["problems"]], *notes]
    if notes:
        lines[4:4] = [*notes, ""]
    for s in result["steps"]:
        figs = s.get("figures") or [None]
        for i, f in enumerate(figs):
            head = f"| {s['step']} | {s['status']} | {s.get('seconds', '')} |" if i == 0 else "| | | |"
            if f is None:
                lines.append(f"{head} | | |")
            else:
                value = "n/a" if f["value"] is None else f"{f['value']:,}" if isinstance(f["value"], int) else f["value"]
                lines.append(f"{head} {f['figure']} | {value} {f['unit']} | {f['target'] or ''} |")
    return "\n".join(lines) + "\n"


def run_check(out: Path, budget_s: float = 540, smoke: bool = False, device: Optional[str] = None,
              only: Optional[list[str]] = None, runner: Callable[..., dict[str, Any]] = run_step) -> dict[str, Any]:
    from mixtrain.files import atomic_write_text

    t0 = time.monotonic()
    check = self_check(out, need_cuda=not smoke)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": int(budget_s),
                              "smoke": smoke, "self_check": check, "steps": []}
    if check["ok"]:
        for step in plan(out, smoke, device):
            if only and step.name not in only:
                continue
            left = budget_s - (time.monotonic() - t0)
            if left < min(30, step.timeout_s):
                result["steps"].append({"step": step.name, "what": step.what, "status": "skipped (budget spent)",
                                        "command": shlex.join(step.argv), "figures": []})
                continue
            result["steps"].append(runner(step, out, min(step.timeout_s, left)))
    result["seconds"] = round(time.monotonic() - t0, 1)
    atomic_write_text(out / "gpu_check.json", json.dumps(result, indent=2))
    atomic_write_text(out / "gpu_check.md", format_table(result))
    return result


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.dry_run:
        for step in plan(out, args.smoke, args.device):
            print(f"[{step.name}] {step.what} (at most {step.timeout_s} s)\n  python -m {shlex.join(step.argv)}")
        print(f"budget: {args.budget} s; outputs: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
        return 0
    only = args.only.split(",") if args.only else None
    if only:
        unknown = sorted(set(only) - {s.name for s in plan(out, args.smoke, args.device)})
        if unknown:
            print(f"--only: unknown step(s) {', '.join(unknown)}; steps are "
                  f"{', '.join(s.name for s in plan(out))}", file=sys.stderr)
            return 2
    result = run_check(out, args.budget, args.smoke, args.device, only)
    check = result["self_check"]
    for w in check["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if not check["ok"]:
        print("gpu check: the self-check failed, nothing was run:\n" + "\n".join(f"  - {p}" for p in check["problems"]),
              file=sys.stderr)
        print(f"(details: {out / 'gpu_check.json'})", file=sys.stderr)
        return 2
    print((out / "gpu_check.md").read_text())
    bad = [s["step"] for s in result["steps"] if s["status"] != "ok"]
    print(f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "gpu", help="every GPU figure not measured yet, in one run (self-check first)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and each step's outputs")
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540 = 9 minutes)")
    p.add_argument("--only", default=None, help="comma-separated steps to run (default all)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device, no CUDA needed (tests the orchestration)")
    p.add_argument("--device", default=None, help="device of the steps (default cuda; auto with --smoke)")
    p.set_defaults(func=_main)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mixtrain.gpucheck``: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m mixtrain.gpucheck")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["gpu", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
