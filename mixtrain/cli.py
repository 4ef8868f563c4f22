"""The ``mixtrain`` command.

    mixtrain train  [overrides]      train from a Hydra recipe (-m for a sweep)
    mixtrain layout [--context N] [--json] [overrides]
                                     show a layout: diagram, KV bytes, parameters
    mixtrain export RUN_OR_CKPT      one safetensors file + the resolved config
    mixtrain data   tokenizer|prepare
                                     train a BPE tokenizer, build the packed cache
    mixtrain generate --model RUN_OR_EXPORT --prompt TEXT
                                     sample from a model with a KV cache that owns producers only
    mixtrain bench  infer [overrides] --layouts standard,ma_offset,...
                                     KV memory, batch capacity, prefill/decode speed per layout
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

COMMANDS = ("train", "layout", "export", "data")


def _train_main() -> None:
    import hydra

    from mixtrain.config import RECIPES_PACKAGE, setup_hydra

    setup_hydra()

    @hydra.main(version_base="1.3", config_path=f"pkg://{RECIPES_PACKAGE}", config_name="train")
    def _run(cfg) -> float | None:
        from mixtrain.errors import UserError
        from mixtrain.train.run import train

        try:
            result = train(cfg)
        except UserError as e:
            print(f"mixtrain train: error: {e}", file=sys.stderr)
            sys.exit(2)
        return result.get("val_loss") if result else None

    _run()


def _layout_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mixtrain layout",
        description="Show a layout as the model would use it: one row per layer, KV cache bytes "
        "against the standard layout, parameter counts. Takes the same overrides as `mixtrain train`.",
    )
    parser.add_argument("--context", type=int, default=None, help="also report this context length (tokens)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper_moe layout=ma_offset")
    args = parser.parse_args(argv)

    from mixtrain.config import compose
    from mixtrain.layouts import LayoutError, build_layout, diagram
    from mixtrain.report import format_layout_summary, layout_summary

    try:
        cfg = compose(args.overrides)
    except Exception as e:  # Hydra's composition errors name the key
        print(f"mixtrain layout: error: {e}", file=sys.stderr)
        return 2
    try:
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    contexts = [4096, 32768, 131072]
    if args.context and args.context not in contexts:
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
        description="Write one consolidated safetensors file and the resolved config from a run "
        "directory (its newest complete checkpoint) or a checkpoint path.",
    )
    parser.add_argument("source", help="run directory or checkpoint (file or sharded directory)")
    parser.add_argument("--out", default=None, help="output folder (default: <run dir>/export)")
    args = parser.parse_args(argv)
    from mixtrain.train.export import export

    out = export(args.source, args.out)
    print(f"exported: {out / 'model.safetensors'}\nconfig:   {out / 'config.yaml'}")
    return 0


def _data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixtrain data", description="Prepare data: tokenizers and packed caches.")
    sub = parser.add_subparsers(dest="data_command", required=True)
    from mixtrain.data import cli as data_cli

    data_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


# Commands whose parsers live next to their code: (module, function that adds the
# command to an argparse subparsers object and sets ``func``).
REGISTERED = {
    "generate": ("mixtrain.infer.cli", "register_generate"),
    "bench": ("mixtrain.infer.cli", "register_bench"),
    "eval": ("mixtrain.eval.cli", "register"),
    "compare": ("mixtrain.report", "register_compare"),
}


def _registered_main(command: str, argv: list[str]) -> int:
    import importlib

    module, function = REGISTERED[command]
    parser = argparse.ArgumentParser(prog="mixtrain")
    sub = parser.add_subparsers(dest="command", required=True)
    getattr(importlib.import_module(module), function)(sub)
    args = parser.parse_args([command, *argv])
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
        if command == "data":
            return _data_main(rest)
        if command in REGISTERED:
            return _registered_main(command, rest)
    except UserError as e:
        print(f"mixtrain {command}: error: {e}", file=sys.stderr)
        return 2
    print(f"mixtrain: unknown command {command!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
