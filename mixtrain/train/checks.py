"""The checks a training job makes before anything heavy happens.

:func:`check_recipe` runs on the composed recipe alone, before the run directory
exists (so a refused run leaves nothing behind) and returns the :class:`Plan` the job
follows; :func:`check_resume` and :func:`check_init_from` compare with what an
earlier run recorded. Every refusal is a :class:`~mixtrain.errors.UserError` that
names the key and says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from mixtrain.errors import UserError
from mixtrain.layouts import Layout, LayoutError, build_layout

# Settings a later stage may change on the previous stage's weights.
STAGE_MAY_CHANGE = ("name", "rope_theta", "max_seq_len", "attn_impl", "sliding_window")


@dataclass
class Plan:
    """What the checks found: the layout, the device, and the step budget."""

    layout: Layout
    on_gpu: bool
    world_size: int
    accumulate: int
    total_steps: int


def check_recipe(cfg: DictConfig) -> Plan:
    """Every check that needs only the recipe (and the files it names), in the order a
    user would fix them. Nothing is written."""
    check_config(cfg)
    check_stage(cfg)
    check_tokenizer_fits(cfg)
    if cfg.data.kind == "longqa":
        check_qa_chunks(cfg.data, cfg.train.seq_len)
    try:
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    except LayoutError as e:
        raise UserError(f"layout: {e}") from e
    on_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    check_device_support(cfg, on_gpu)
    world = world_size_of(cfg)
    steps = plan_steps(cfg, world)
    return Plan(layout, on_gpu, world, steps["accumulate"], steps["total_steps"])


def _model_differences(cfg: DictConfig, layout, previous: dict[str, Any], may_change: tuple[str, ...]) -> list[str]:
    """How the model and layout of ``cfg`` differ from those of a saved config."""
    mine = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    theirs = previous["model"]
    diff = [f"model.{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine
            if k not in may_change and theirs.get(k, mine[k]) != mine[k]]
    if not diff and "layout" in previous:
        prev_layout = build_layout(previous["layout"], theirs["n_layers"], theirs.get("sliding_window", 1))
        shape = lambda lay: [(l.kind, l.kv_source, l.attn_source) for l in lay.layers]  # noqa: E731
        if shape(prev_layout) != shape(layout):
            diff.append(f"layout: {prev_layout.name} there, {layout.name} here (different layer kinds or KV sharing)")
    return diff


def check_init_from(cfg: DictConfig, layout, previous: Optional[dict[str, Any]]) -> None:
    """``train.init_from`` must hold the same model (up to RoPE theta, length and
    kernel) with the same layout structure, or its weights mean something else."""
    if not previous or "model" not in previous:
        return  # a bare weights file: load_state_dict still checks names and shapes
    diff = _model_differences(cfg, layout, previous, STAGE_MAY_CHANGE)
    if diff:
        raise UserError(
            f"train.init_from={cfg.train.init_from} holds a different model: " + "; ".join(diff)
            + ". Start from a run of the same model and layout"
        )


def check_resume(cfg: DictConfig, layout, run_dir, ckpt_path: str) -> None:
    """A run continues with the model and layout it was started with (its
    ``config.yaml``); only the attention kernel may change."""
    from mixtrain.rundir import RunDir

    run = RunDir(run_dir)
    previous = run.read_config()  # no readable record: loading the checkpoint still checks shapes
    if previous is None or "model" not in previous:
        return
    diff = _model_differences(cfg, layout, previous, ("attn_impl",))
    if diff:
        raise UserError(
            f"run {run.path} was trained with a different model than this command asks for: " + "; ".join(diff)
            + f". To continue it ({Path(ckpt_path).name}) give the model and layout of {run.config_file}; for a new "
            f"model, start a new run (another run.name, or run.resume=never in a new directory); nothing was changed"
        )


def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside the run (after the run
    directory is made and the data prepared), checked up front with the key named.
    Settings with a fixed set of values (train.trainable, trainer.strategy, logger.kind,
    ...) are :class:`~mixtrain.config.Choice` types, refused when the recipe is composed."""
    check_model_config(cfg.model)
    if cfg.data.kind == "recall":
        from mixtrain.data.recall import spec_from_config

        spec_from_config(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)  # settings named before anything is made
    if cfg.data.kind == "longqa":
        from mixtrain.data.longqa import offline_generator

        if cfg.data.qa_source == "offline":
            offline_generator(cfg.data.qa_generator)  # unknown names and imports fail here, named
        if cfg.data.qa_source == "jsonl" and not cfg.data.qa_path:
            raise UserError("data.qa_source=jsonl needs data.qa_path=<file.jsonl or glob>")
    for key in ("seq_len", "micro_batch_size", "global_batch_tokens", "val_every_steps", "save_every_steps",
                "val_batches", "keep_checkpoints"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key}={cfg.train[key]} must be at least 1")
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1): the share of documents held "
                        f"out for validation (e.g. data.val_fraction=0.02)")
    check_optim(cfg.optim)
    check_devices(cfg.trainer)


# The long-QA data builder's rules (mixtrain/data/longqa/), the same here as there.
QA_MIN_CHUNK_TOKENS = 16
QA_QUESTION_ROOM = 64


def check_qa_chunks(d: DictConfig, seq_len: int) -> None:
    """``data.qa_chunk_tokens``: the rule the long-QA builder applies after the data is
    loaded, applied before anything is made (so both say the same)."""
    n = d.qa_chunk_tokens
    if n < QA_MIN_CHUNK_TOKENS:
        raise UserError(f"data.qa_chunk_tokens={n} is too small; use at least {QA_MIN_CHUNK_TOKENS} (the paper: 1024)")
    if d.qa_source == "offline" and n + QA_QUESTION_ROOM > seq_len + 1:
        raise UserError(
            f"data.qa_chunk_tokens={n} leaves no room for a question in seq_len={seq_len}; "
            f"lower data.qa_chunk_tokens (the paper: 1024-token chunks in 32K sequences)"
        )


def check_optim(o: DictConfig) -> None:
    """The optimizer's numbers, with the key named (not torch's 'Invalid learning rate')."""
    if not o.lr > 0:
        raise UserError(f"optim.lr={o.lr} must be positive (e.g. optim.lr=3e-3)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1) (e.g. optim.betas=[0.9,0.95])")
    for key, low, high in (("eps", 0, None), ("weight_decay", 0, None), ("grad_clip", 0, None),
                           ("warmup_fraction", 0, 1), ("min_lr_ratio", 0, 1),
                           ("decay_fraction", 0, 1)):
        v = o[key]
        if v < low or (high is not None and v > high) or (key == "eps" and v <= 0):
            bound = f"in [{low}, {high}]" if high is not None else ("positive" if key == "eps" else "at least 0")
            raise UserError(f"optim.{key}={v} must be {bound}")


def check_devices(t: DictConfig) -> None:
    """``trainer.devices``: auto, -1 (all), a count, or a list of device indices."""
    d = t.devices
    ok = d in ("auto", -1, "-1") or (isinstance(d, int) and not isinstance(d, bool) and d >= 1) \
        or (isinstance(d, str) and d.isdigit() and int(d) >= 1)
    if not ok and (OmegaConf.is_list(d) or isinstance(d, (list, tuple))):
        ok = len(d) > 0 and all(isinstance(i, int) and i >= 0 for i in d)
    if not ok:
        raise UserError(f"trainer.devices={d!r} is not a device count: use auto, -1 (all), a number "
                        f"(e.g. trainer.devices=2) or a list of device indices (trainer.devices=[0,1])")
    if t.num_nodes < 1:
        raise UserError(f"trainer.num_nodes={t.num_nodes} must be at least 1")
    if t.log_every_n_steps < 1:
        raise UserError(f"trainer.log_every_n_steps={t.log_every_n_steps} must be at least 1")


def check_tokenizer_fits(cfg: DictConfig) -> None:
    """The model's embedding has a row for every id the tokenizer can produce: checked
    here for a trained tokenizer (data.vocab_size) and a tokenizer file on this machine
    (an HF hub name is checked when it is loaded)."""
    tokenizer = str(cfg.data.tokenizer)
    v = cfg.model.vocab_size
    if tokenizer == "train":
        if cfg.data.vocab_size is not None and cfg.data.vocab_size > v:
            raise UserError(f"data.vocab_size={cfg.data.vocab_size} exceeds the model's model.vocab_size={v}; "
                            f"lower data.vocab_size or raise model.vocab_size")
        return
    path = Path(tokenizer).expanduser()
    if path.suffix == ".json" and path.is_file():
        from mixtrain.data.tokenizer import check_fits, load_tokenizer_file

        check_fits(load_tokenizer_file(path), int(v), str(path))


def check_places(cfg: DictConfig, run_dir) -> None:
    """The folders a run writes can be written: its run directory (and checkpoints/ of a
    run being resumed) and the data cache. Checked before anything is made."""
    from mixtrain.files import check_writable

    run_dir = Path(run_dir)
    root = f"run.root={cfg.run.root}"
    todo = ("Give a writable folder: run.root=<folder> (or run.name=<new name>)" if not run_dir.exists() else
            "Make it writable (chmod u+w), or copy the run elsewhere and resume there with run.root=<folder>")
    check_writable(run_dir, f"run directory ({root})", todo)
    if (run_dir / "checkpoints").is_dir():
        check_writable(run_dir / "checkpoints", "the run's checkpoints folder", todo)
    cache = str(cfg.data.cache_dir)
    check_writable(cache, f"data cache (data.cache_dir={cache})",
                   "Point data.cache_dir (or the MIXTRAIN_CACHE environment variable) at a writable folder")


def check_stage(cfg: DictConfig) -> None:
    """Stages 2 and 3 start from the previous stage's weights and tokenizer."""
    if cfg.train.stage == "pretrain":
        return
    if not cfg.train.init_from:
        raise UserError(
            f"stage {cfg.train.stage!r} starts from the previous stage's weights: set "
            f"train.init_from=<that run's directory or export> (e.g. train.init_from=runs/my-run)"
        )
    tokenizer = str(cfg.data.tokenizer)
    if tokenizer.endswith(".json") and not Path(tokenizer).is_file():
        raise UserError(
            f"stage {cfg.train.stage!r} reuses the previous stage's tokenizer, but {tokenizer} does not "
            f"exist: train.init_from={cfg.train.init_from} must be the previous stage's run directory, an export, "
            f"or a checkpoint inside a run (they hold tokenizer.json)"
        )


def check_model_config(m: DictConfig) -> None:
    """The ``model`` group's values, checked with the key named (``mixtrain train`` and
    ``mixtrain layout`` both refuse a model that cannot be built)."""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
        if m[key] < 1:
            raise UserError(f"model.{key}={m[key]} must be at least 1")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads} (GQA groups)")
    if m.head_dim % 2:
        raise UserError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs of dimensions)")
    if m.moe is not None:
        if not 1 <= m.moe.top_k <= m.moe.n_experts:
            raise UserError(f"model.moe.top_k={m.moe.top_k} must be between 1 and model.moe.n_experts={m.moe.n_experts}")


def check_device_support(cfg: DictConfig, on_gpu: bool) -> None:
    """Kernels that cannot train on the device this run gets, refused before anything
    is made (not as a traceback from the first backward pass)."""
    if on_gpu:
        return
    if cfg.model.attn_impl == "flex":
        raise UserError(
            "model.attn_impl=flex trains on CUDA only (FlexAttention has no backward pass on CPU); "
            "on this machine use model.attn_impl=sdpa (the same attention; auto picks it off-GPU)"
        )
    if cfg.model.moe is not None and cfg.model.moe.impl == "megablocks":
        from mixtrain.model.moe import MEGABLOCKS_HINT

        raise UserError("no GPU is visible, and megablocks runs on CUDA only. " + MEGABLOCKS_HINT)


def world_size_of(cfg: DictConfig) -> int:
    """Processes that will train, known before the Trainer exists."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = cfg.trainer.devices
    if devices in ("auto", -1, "-1"):
        gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    if not isinstance(devices, (int, str)):  # a list of device indices
        devices = len(devices)
    return int(devices) * int(cfg.trainer.num_nodes)


def plan_steps(cfg: DictConfig, world_size: int) -> dict[str, int]:
    """Gradient accumulation and the number of optimizer steps from token budgets."""
    t = cfg.train
    if t.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"train.seq_len={t.seq_len} is longer than the model's model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower train.seq_len or raise model.max_seq_len (RoPE tables are built for max_seq_len)"
        )
    per_micro = t.micro_batch_size * t.seq_len * world_size
    if t.global_batch_tokens % per_micro:
        raise UserError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"train.micro_batch_size x train.seq_len x devices = {t.micro_batch_size} x {t.seq_len} x {world_size} "
            f"= {per_micro}; choose e.g. train.global_batch_tokens={max(1, round(t.global_batch_tokens / per_micro)) * per_micro}"
        )
    accumulate = t.global_batch_tokens // per_micro
    total_steps = int(t.max_tokens) // int(t.global_batch_tokens)
    if total_steps < 1:
        raise UserError(
            f"train.max_tokens={t.max_tokens} is less than one optimizer step of "
            f"train.global_batch_tokens={t.global_batch_tokens}"
        )
    return {"accumulate": accumulate, "total_steps": total_steps}
