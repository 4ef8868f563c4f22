"""The ``mixtrain`` command.

    mixtrain train  [overrides]      train from a Hydra recipe (-m for a sweep)
    mixtrain layout [--context N] [--json] [overrides]
                                     show a layout: diagram, KV bytes, parameters
    mixtrain export RUN_OR_CKPT [--format hf]
                                     one safetensors file + the resolved config, or a HF folder
    mixtrain data   tokenizer|prepare
                                     train a BPE tokenizer, build the packed cache
    mixtrain generate --model RUN_OR_EXPORT --prompt TEXT
                                     sample from a model with a KV cache that owns producers only
    mixtrain bench  infer [overrides] --layouts standard,ma_offset,...
                                     KV memory, batch capacity, prefill/decode speed per layout
    mixtrain bench  train [overrides] --compare layout=standard
                                     tokens/s, MFU, peak memory of training steps vs a baseline
    mixtrain bench  moe [--tokens N ...]
                                     MoE layer fwd+bwd against the expert matmuls alone
    mixtrain bench  data [--tokens 10M,40M] [--num-proc K]
                                     data preparation: wall, tokens/s, peak RSS, disk; read tokens/s
    mixtrain bench  gpu --out DIR [--dry-run]
                                     every GPU figure not measured yet, self-check first (<= 9 min)
    mixtrain eval   ...              RULER-style long-context tasks, perplexity
    mixtrain compare RUNS...         tables and plots across runs or a sweep

``train`` hands the command line to Hydra (``@hydra.main``); the other commands
use argparse and compose the same recipes through :func:`mixtrain.config.compose`,
so ``model=... layout=...`` overrides mean the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

COMMANDS = ("train", "layout", "export")


def _sweep_problem(args: list[str]) -> Optional[str]:
    """What refuses a whole sweep before any point starts, in mixtrain's words: an error in
    the overrides every point shares, or a swept key that is not a setting. A bad swept
    *value* is left to its own point (recorded as failed; the other points run). The sweep's
    first point is composed (each swept key at its first value); None when it composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mixtrain.config import compose
    from mixtrain.errors import UserError

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's own message says where
        return None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()]
    first = list(fixed)
    swept_keys = []
    for o in parsed:
        if o.is_sweep_override() and not o.is_hydra_override():
            try:
                value = next(iter(o.sweep_string_iterator()))
            except Exception:  # noqa: BLE001 - a sweep form without a first value (interval): skip it
                continue
            first.append(f"{o.get_key_element()}={value}")
            swept_keys.append(o.key_or_group)
    try:
        compose(first)
        return None
    except UserError as e:
        message = str(e)
    try:
        compose(fixed)
    except UserError as e:
        return str(e)
    if any(f"{key} is not a setting" in message for key in swept_keys):
        return message
    return None


def _sweep_overrides(argv: list[str]) -> list[str]:
    """Extra Hydra overrides for a sweep, added unless the user set them.

    - Name each job's directory by the swept values only (``0-layout=standard``): the
      overrides every point shares (paths included) are excluded from
      ``hydra.job.override_dirname``; the full list stays in ``.hydra/overrides.yaml``.
      A "sweep" of one point (nothing swept) is named by its overrides, not ``0-``.
    - A Hydra callback that finds the failed points after the sweep, on any launcher.
    Harmless in a single run (its directory does not use override_dirname).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - let Hydra report the bad override itself
        return argv
    keys = {o.key_or_group for o in parsed}
    extra = []
    dirname_key = "hydra.job.config.override_dirname.exclude_keys"
    if dirname_key not in keys:
        swept = any(o.is_sweep_override() for o in parsed if not o.is_hydra_override())
        # Nothing swept (``-m layout=swa``, one point): name the point by what it sets.
        fixed = [o.key_or_group for o in parsed if swept and not o.is_hydra_override() and not o.is_sweep_override()]
        exclude = list(dict.fromkeys([*_recipe_exclude_keys(), *fixed]))
        extra.append(f"{dirname_key}=[" + ",".join(f"'{k}'" for k in exclude) + "]")
    if "hydra.callbacks.mixtrain_sweep" not in keys:
        extra.append("+hydra.callbacks.mixtrain_sweep={_target_:mixtrain.train.sweep.SweepOutcome}")
    return [*argv, *extra]


def _recipe_exclude_keys() -> list[str]:
    """The override_dirname exclude_keys of the root recipe (recipes/train.yaml)."""
    from importlib import resources

    from omegaconf import OmegaConf

    from mixtrain.config import RECIPES_PACKAGE

    try:
        text = (resources.files(RECIPES_PACKAGE) / "train.yaml").read_text()
        keys = OmegaConf.select(OmegaConf.create(text), "hydra.job.config.override_dirname.exclude_keys")
        return [str(k) for k in keys or []]
    except Exception:  # noqa: BLE001
        return ["experiment", "run.root", "run.resume", "trainer.devices", "trainer.progress_bar"]


def _train_main() -> None:
    """``mixtrain train [-m] overrides...`` through ``@hydra.main``.

    Under ``-m`` (a sweep) every point is one job with its own run directory (Hydra's
    sweep subdir, named by the swept values only) and its own W&B run, grouped by the
    sweep. A point that fails is recorded (``<run dir>/result.json``, status "failed")
    and the sweep goes on; the command then exits with 1, naming the failed points.
    A single run that meets a user error exits with 2.
    """
    import hydra

    from mixtrain.config import RECIPES_PACKAGE, run_stamp, setup_hydra, whole_numbers_in_overrides

    setup_hydra()
    # Every job of a sweep (and every SLURM task a submitit launcher starts on another
    # machine, which inherits the environment) must agree on the sweep's stamp.
    os.environ.setdefault("MIXTRAIN_RUN_STAMP", run_stamp())
    user_args = whole_numbers_in_overrides(sys.argv[1:])
    if user_args and not any(a.startswith("-") for a in user_args):  # a single run: compose it once here,
        from mixtrain.config import compose  # so a misspelt key or recipe gets our message, not Hydra's
        from mixtrain.errors import UserError

        try:
            compose(user_args)
        except UserError as e:
            print(f"mixtrain train: error: {e}", file=sys.stderr)
            sys.exit(2)
    elif any(a in ("-m", "--multirun") for a in user_args):
        problem = _sweep_problem([a for a in user_args if not a.startswith("-")])
        if problem:
            print(f"mixtrain train -m: error: {problem}", file=sys.stderr)
            sys.exit(2)
    sys.argv = [sys.argv[0], *_sweep_overrides(user_args)]
    failed: list[str] = []

    @hydra.main(version_base="1.3", config_path=f"pkg://{RECIPES_PACKAGE}", config_name="train")
    def _run(cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from mixtrain.config import setup_hydra as _setup  # a submitit job runs in a fresh process
        from mixtrain.errors import UserError
        from mixtrain.rundir import RunDir
        from mixtrain.train.run import train

        _setup()
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            try:
                result = train(cfg)
            except BaseException as e:
                from mixtrain.train.run import is_first_process

                if is_first_process() and not isinstance(e, SystemExit):  # result.json says how it ended,
                    run = RunDir.of_config(cfg)  # unless it ended before writing anything: then no folder
                    if not run.discard_if_unused():
                        run.write_result({"status": "failed", "error": f"{type(e).__name__}: {e}"})
                if isinstance(e, UserError):
                    print(f"mixtrain train: error: {e}", file=sys.stderr)
                    sys.exit(2)
                raise
            return result.get("val_loss") if result else None

        point = f"#{hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'})"
        try:
            result = train(cfg)
        except Exception as e:  # noqa: BLE001 - one failed point must not stop the sweep
            import traceback

            run_dir = RunDir.of_config(cfg).path
            if not isinstance(e, UserError):
                traceback.print_exc()
            print(
                f"mixtrain train: sweep point {point} failed: {type(e).__name__}: {e}\n"
                f"  Its run directory is {run_dir} (result.json records the error); the other points go on. "
                f"Rerun this point alone with: mixtrain train {' '.join(hc.overrides.task)}",
                file=sys.stderr,
            )
            from mixtrain.train.run import is_first_process

            if is_first_process():
                RunDir(run_dir).write_result(
                    {"status": "failed", "error": f"{type(e).__name__}: {e}", "job_num": hc.job.num,
                     "overrides": list(hc.overrides.task), "run_dir": str(run_dir)},
                )
            failed.append(f"{run_dir.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return None
        return result.get("val_loss") if result else None

    _run()
    from mixtrain.train.sweep import SweepOutcome

    # Jobs that ran in this process, and those a remote launcher (submitit) ran
    # elsewhere, which SweepOutcome found in the sweep directory's result.json files.
    failed = SweepOutcome.failed or failed
    if failed:
        print(
            f"mixtrain train: {len(failed)} sweep point(s) failed: " + "; ".join(failed)
            + (f". Sweep directory: {SweepOutcome.sweep_dir}" if SweepOutcome.sweep_dir else ""),
            file=sys.stderr,
        )
        sys.exit(1)


def _layout_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mixtrain layout",
        description="Show a layout as the model would use it: one row per layer, KV cache bytes "
        "against the standard layout, parameter counts. Takes the same overrides as `mixtrain train`.",
    )
    from mixtrain.infer.cli import positive_int

    parser.add_argument("--context", type=positive_int, default=None,
                        help="also report this context length (tokens, 1 or more)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper_moe layout=ma_offset")
    args = parser.parse_args(argv)

    from mixtrain.config import compose
    from mixtrain.layouts import build_layout, diagram
    from mixtrain.report import format_layout_summary, layout_summary

    try:
        cfg = compose(args.overrides)
    except Exception as e:  # Hydra's composition errors name the key
        print(f"mixtrain layout: error: {e}", file=sys.stderr)
        return 2
    from mixtrain.train.run import check_model_config

    # The same checks as `mixtrain train`: no report for a model that cannot be built.
    # A UserError (LayoutError included) is printed by main() as `mixtrain layout: error: ...`.
    check_model_config(cfg.model)
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    contexts = [4096, 32768, 131072]
    if args.context is not None and args.context not in contexts:
        contexts.append(args.context)
    summary = layout_summary(cfg.model, layout, contexts=tuple(sorted(contexts)), context=args.context)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_layout_summary(summary, diagram(layout)))
    return 0


def _export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mixtrain export",
        description="Export a run directory (its newest complete checkpoint), a checkpoint or a mixtrain "
        "export. --format mixtrain (default): one consolidated safetensors file + the resolved config, what "
        "mixtrain generate/eval --model read. --format hf: a Hugging Face folder (config.json, safetensors, "
        "tokenizer) for AutoModelForCausalLM / AutoTokenizer, a stock class where one matches the layout "
        "exactly, else self-contained remote code (trust_remote_code=True).",
    )
    parser.add_argument("source", help="run directory, checkpoint (file or sharded directory) or mixtrain export")
    parser.add_argument("--format", choices=["mixtrain", "hf"], default="mixtrain",
                        help="mixtrain (default) or hf (Hugging Face transformers)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <run dir>/export, or <run dir>/export-hf with --format hf)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="--format hf: weight dtype (default fp32)")
    parser.add_argument("--tokenizer", default=None,
                        help="--format hf: tokenizer.json to ship (default: the run's tokenizer.json)")
    parser.add_argument("--remote-code", action="store_true",
                        help="--format hf: use mixtrain's remote-code class even where a stock class fits")
    args = parser.parse_args(argv)
    if args.format == "hf":
        from mixtrain.hf.export import export_hf

        out, target = export_hf(args.source, args.out, dtype=args.dtype or "fp32", tokenizer=args.tokenizer,
                                remote_code=args.remote_code)
        code = ", trust_remote_code=True" if target.remote_code else ""
        print(f"exported: {out} ({target.architecture}: {target.reason})\n"
              f"load:     AutoModelForCausalLM.from_pretrained({str(out)!r}{code})")
        if not (out / "tokenizer.json").is_file():
            print("note:     no tokenizer.json found next to the source; pass --tokenizer PATH to ship one",
                  file=sys.stderr)
        return 0
    given = [f for f, v in (("--dtype", args.dtype), ("--tokenizer", args.tokenizer), ("--remote-code", args.remote_code)) if v]
    if given:
        parser.error(f"{', '.join(given)} only apply to --format hf")
    from mixtrain.train.export import export

    out = export(args.source, args.out)
    print(f"exported: {out / 'model.safetensors'}\nconfig:   {out / 'config.yaml'}")
    return 0


# Commands whose parsers live next to their code: (module, function that adds the
# command to an argparse subparsers object and sets ``func``).
REGISTERED = {
    "data": ("mixtrain.data.cli", "register_group"),
    "generate": ("mixtrain.infer.cli", "register_generate"),
    "bench": ("mixtrain.cli", "_register_bench"),
    "eval": ("mixtrain.eval.cli", "register"),
    "compare": ("mixtrain.report", "register_compare"),
}


def _register_bench(sub) -> None:
    """``mixtrain bench infer`` (inference engine) and ``mixtrain bench train``."""
    from mixtrain.infer.cli import register_bench
    from mixtrain.train import bench

    parser = register_bench(sub)
    bench.register(parser.bench_subparsers)
    bench.register_moe(parser.bench_subparsers)
    from mixtrain.data import bench as data_bench

    data_bench.register(parser.bench_subparsers)
    from mixtrain import gpucheck

    gpucheck.register(parser.bench_subparsers)


def _registered_main(command: str, argv: list[str]) -> int:
    import importlib

    module, function = REGISTERED[command]
    parser = argparse.ArgumentParser(prog="mixtrain")
    sub = parser.add_subparsers(dest="command", required=True)
    getattr(importlib.import_module(module), function)(sub)
    args, extra = parser.parse_known_args([command, *argv])
    # Recipe overrides may come after options (`--layouts ma model.n_layers=12`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


def _usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (*COMMANDS, *REGISTERED)
    # Lightning re-runs this command line (minus our sub-command) for each extra
    # local process it launches; those processes carry LOCAL_RANK.
    if argv and argv[0] not in commands and "LOCAL_RANK" in os.environ and not argv[0].startswith("-"):
        argv = ["train"] + argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: mixtrain <command> ...\n" + _usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        sys.argv = [sys.argv[0]] + rest
        _train_main()
        return 0
    from mixtrain.errors import UserError

    try:
        if command == "layout":
            return _layout_main(rest)
        if command == "export":
            return _export_main(rest)
        if command in REGISTERED:
            return _registered_main(command, rest)
    except UserError as e:
        print(f"mixtrain {command}: error: {e}", file=sys.stderr)
        return 2
    print(f"mixtrain: unknown command {command!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
