"""One training job, from a composed recipe to checkpoints and logs.

``train(cfg)`` is what ``mixtrain train`` runs for each job (one per sweep point).
It checks the recipe for mistakes before anything heavy happens, builds the layout,
data, module, strategy, logger and callbacks, and fits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from mixtrain import accounting
from mixtrain.errors import UserError
from mixtrain.files import atomic_write_text
from mixtrain.layouts import LayoutError, build_layout, diagram


# ------------------------------------------------------------------ checks
# Settings a later stage may change on the previous stage's weights.
STAGE_MAY_CHANGE = ("name", "rope_theta", "max_seq_len", "attn_impl", "sliding_window")


def _model_differences(cfg: DictConfig, layout, previous: dict[str, Any], may_change: tuple[str, ...]) -> list[str]:
    """How the model and layout of ``cfg`` differ from those of a saved config."""
    mine = OmegaConf.to_container(cfg.model, resolve=True)
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


def check_resume(cfg: DictConfig, layout, run_dir: Path, ckpt_path: str) -> None:
    """A run continues with the model and layout it was started with (its
    ``config.yaml``); only the attention kernel may change."""
    saved = run_dir / "config.yaml"
    try:
        previous = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception:  # noqa: BLE001 - no readable record: loading the checkpoint still checks shapes
        return
    if not isinstance(previous, dict) or "model" not in previous:
        return
    diff = _model_differences(cfg, layout, previous, ("attn_impl",))
    if diff:
        raise UserError(
            f"run {run_dir} was trained with a different model than this command asks for: " + "; ".join(diff)
            + f". To continue it ({Path(ckpt_path).name}) give the model and layout of {saved}; for a new model, "
            f"start a new run (another run.name, or run.resume=never in a new directory); nothing was changed"
        )


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not known; use one of: {', '.join(map(str, allowed))}")


def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside the run (after the run
    directory is made and the data prepared), checked up front with the key named."""
    _choice("train.trainable", cfg.train.trainable, ("all", "attention"))
    _choice("train.stage", cfg.train.stage, ("pretrain", "extend", "longqa"))
    _choice("trainer.strategy", cfg.trainer.strategy, ("auto", "ddp", "fsdp"))
    _choice("trainer.activation_checkpointing", cfg.trainer.activation_checkpointing, ("none", "full", "selective"))
    _choice("logger.kind", cfg.logger.kind, ("wandb", "csv", "none"))
    _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))
    _choice("data.kind", cfg.data.kind, ("pretrain", "longqa", "recall"))
    check_model_config(cfg.model)
    if cfg.data.kind == "recall":
        from mixtrain.data.recall import spec_from_config

        spec_from_config(cfg.data, cfg.train.seq_len, cfg.model.vocab_size)  # settings named before anything is made
    if cfg.data.kind == "longqa":
        from mixtrain.data.longqa import SOURCES, offline_generator

        _choice("data.qa_source", cfg.data.qa_source, SOURCES)
        if cfg.data.qa_source == "offline":
            offline_generator(cfg.data.qa_generator)  # unknown names and imports fail here, named
        if cfg.data.qa_source == "jsonl" and not cfg.data.qa_path:
            raise UserError("data.qa_source=jsonl needs data.qa_path=<file.jsonl or glob>")
        if cfg.data.qa_chunk_tokens < 1:
            raise UserError(f"data.qa_chunk_tokens={cfg.data.qa_chunk_tokens} must be at least 1")
    for key in ("seq_len", "micro_batch_size", "global_batch_tokens", "val_every_steps", "save_every_steps"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key}={cfg.train[key]} must be at least 1")


def check_model_config(m: DictConfig) -> None:
    """The ``model`` group's values, checked with the key named (``mixtrain train`` and
    ``mixtrain layout`` both refuse a model that cannot be built)."""
    from mixtrain.model.attention import ATTN_IMPLS

    _choice("model.attn_impl", m.attn_impl, ATTN_IMPLS)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
        if m[key] < 1:
            raise UserError(f"model.{key}={m[key]} must be at least 1")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads} (GQA groups)")
    if m.head_dim % 2:
        raise UserError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs of dimensions)")
    if m.moe is not None:
        _choice("model.moe.impl", m.moe.impl, ("native", "megablocks"))
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


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under @hydra.main
        return Path(cfg.run.root) / cfg.run.name


def resume_path(cfg: DictConfig, run_dir: Path) -> Optional[str]:
    from mixtrain.train.checkpoint import latest_checkpoint, list_checkpoints

    resume = cfg.run.resume
    existing = list_checkpoints(run_dir)
    if resume in (None, "never", "null"):
        if existing:
            raise UserError(
                f"run directory {run_dir} already holds checkpoints (newest: {existing[-1][1].name}). "
                f"Continue it with run.resume=auto, or start a new run with another run.name; nothing was changed"
            )
        return None
    if resume == "auto":
        ckpt = latest_checkpoint(run_dir)
        return str(ckpt) if ckpt else None
    if not Path(resume).exists():
        raise UserError(f"run.resume={resume!r}: no such checkpoint; give a path, 'auto' or null")
    from mixtrain.train.checkpoint import is_loadable

    if not is_loadable(Path(resume)):
        raise UserError(
            f"run.resume={resume!r} is not a complete checkpoint (damaged or cut short); "
            f"use run.resume=auto to take the newest complete one"
        )
    return str(resume)


# ----------------------------------------------------------------- pieces
def make_logger(cfg: DictConfig, run_dir: Path, resolved: dict[str, Any], resume_step: Optional[int] = None):
    """The configured logger. ``resume_step``: the optimizer step the run resumes
    from (None for a fresh start): logs of an abandoned attempt past it are dropped,
    and a fresh start in a used directory opens a new W&B run."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = cfg.logger.mode
        if mode == "auto":
            mode = wandb_mode()
        group, tags, name = cfg.logger.group, list(cfg.logger.tags), cfg.run.name
        sweep = _sweep_point()
        if sweep:  # one W&B run per sweep point, grouped by the sweep, tagged by its values
            group = group or sweep["group"]
            tags = list(dict.fromkeys([*tags, "sweep", *sweep["tags"]]))
            name = f"{name}-{sweep['num']}"
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=group,
            tags=[t[:64] for t in tags] or None,  # W&B limits a tag to 64 characters
            name=name,
            id=_wandb_run_id(run_dir, fresh=resume_step is None),
            save_dir=str(run_dir),
            mode=mode,
            config=resolved,
            resume="allow",
        )
    raise UserError(f"logger.kind={kind!r} is not known; use wandb, csv or none")


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run appends to it.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (rows are appended; the rows of an
    abandoned attempt past the resume step are trimmed first, see trim_csv_log)."""

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when an API key is configured (environment or
    ``~/.netrc``), offline otherwise (the run syncs later with ``wandb sync``)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def finish_wandb() -> None:
    """Finish the active W&B run and wait until its log is complete on disk.

    ``wandb.finish()`` only informs the W&B service that the run is done; the service
    writes the end of the offline log afterwards. Tearing the service down waits for
    that, so code that reads the log next (``mixtrain compare``, a following
    ``mixtrain eval --wandb`` in the same process) sees every record. The next
    ``wandb.init`` starts a fresh service."""
    import wandb

    wandb.finish()
    wandb.teardown()


def _sweep_point() -> Optional[dict[str, Any]]:
    """Under ``mixtrain train -m``: the sweep (its directory name, the W&B group), this
    job's number and its swept values (``layout=ma_offset``, the W&B tags)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    item_sep = hc.job.config.override_dirname.item_sep
    pieces = [p for p in str(hc.job.override_dirname).split(item_sep) if p]
    return {"group": Path(str(hc.sweep.dir)).name, "num": int(hc.job.num), "tags": pieces}


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """``<run_dir>/result.json``: how the job ended (``status`` "completed", "stopped"
    (``train.stop_after_steps``) or "failed", with the error) and its final metrics.
    ``mixtrain compare`` and the sweep summary read it. Written atomically."""
    import json
    import time

    path = Path(run_dir) / "result.json"
    atomic_write_text(path, json.dumps({**result, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))
    return path


def _wandb_run_id(run_dir: Path, fresh: bool = False) -> str:
    """One W&B run per run directory, continued by every resume: the id is kept in
    ``<run_dir>/wandb_id``. A fresh start (no checkpoint to resume) opens a new run,
    so an attempt that died before its first checkpoint does not share its curves."""
    import hashlib
    import time

    path = run_dir / "wandb_id"
    if not fresh and path.is_file():
        return path.read_text().strip()
    key = str(run_dir.resolve()) + (f"@{time.time_ns()}" if path.exists() or (run_dir / "wandb").exists() else "")
    run_id = hashlib.sha1(key.encode()).hexdigest()[:16]
    if is_first_process():
        atomic_write_text(path, run_id + "\n")
    return run_id


def is_first_process() -> bool:
    """Global rank 0, known before the Trainer exists (torchrun, SLURM, Lightning's launcher)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return rank == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def trim_csv_log(run_dir: Path, resume_step: int) -> None:
    """Drop the rows an abandoned attempt logged at or after the step the run
    resumes from (they are about to be logged again); all rows for a fresh start."""
    import csv
    import io

    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if r.get("step") and int(r["step"]) < resume_step]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def make_strategy(cfg: DictConfig, on_gpu: bool, world_size: int):
    kind = cfg.trainer.strategy
    if kind == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # Every process is one data-parallel shard (no tensor parallelism).
        return ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True
        )
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo")
    if kind == "auto":
        return "auto"
    raise UserError(f"trainer.strategy={kind!r} is not known; use auto, ddp or fsdp")


# -------------------------------------------------------------------- job
def train(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L

    from mixtrain.data import build_datamodule
    from mixtrain.train.callbacks import (
        GracefulStop,
        LayoutRecord,
        SaveTokenizer,
        StepProgressBar,
        StopAfterSteps,
        ThroughputMonitor,
    )
    from mixtrain.train.checkpoint import AtomicCheckpoint, checkpoint_step
    from mixtrain.train.export import read_checkpoint
    from mixtrain.train.module import LMModule

    check_config(cfg)
    if cfg.train.stage != "pretrain" and not cfg.train.init_from:
        raise UserError(
            f"stage {cfg.train.stage!r} starts from the previous stage's weights: set "
            f"train.init_from=<that run's directory or export> (e.g. train.init_from=runs/my-run)"
        )
    OmegaConf.resolve(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.train.stage != "pretrain" and cfg.data.tokenizer.endswith(".json") and not Path(cfg.data.tokenizer).is_file():
        raise UserError(
            f"stage {cfg.train.stage!r} reuses the previous stage's tokenizer, but {cfg.data.tokenizer} does not "
            f"exist: train.init_from={cfg.train.init_from} must be the previous stage's run directory, an export, "
            f"or a checkpoint inside a run (they hold tokenizer.json)"
        )
    try:
        layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    except LayoutError as e:
        raise UserError(f"layout: {e}") from e

    on_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    check_device_support(cfg, on_gpu)
    world = world_size_of(cfg)
    plan = plan_steps(cfg, world)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_path(cfg, run_dir)
    if ckpt_path:
        check_resume(cfg, layout, run_dir, ckpt_path)

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    fsdp = cfg.trainer.strategy == "fsdp"
    precision = cfg.trainer.precision or ("bf16-mixed" if on_gpu and not fsdp else "32-true")
    module = LMModule(
        cfg, layout, total_steps=plan["total_steps"], fsdp=fsdp, mixed_precision=fsdp and on_gpu
    )
    if cfg.train.init_from and ckpt_path is None:
        module.init_state_dict, previous = read_checkpoint(cfg.train.init_from)
        check_init_from(cfg, layout, previous)

    data = build_datamodule(
        cfg.data,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        vocab_size=cfg.model.vocab_size,
    )
    if hasattr(data, "prepare_before_fit"):  # before fit: no collective (and its timeout) around a long build
        data.prepare_before_fit()
    tokens_per_step = int(cfg.train.global_batch_tokens)
    flops = accounting.train_flops_per_token(cfg.model, layout, cfg.train.seq_len, cfg.train.trainable)
    counts = accounting.param_counts(cfg.model, layout)
    figures = {
        "kv_bytes_per_token_32k": accounting.kv_bytes_per_token(cfg.model, layout, 32768),
        "kv_ratio_vs_standard_32k": accounting.kv_ratio(cfg.model, layout, 32768),
        "kv_caches": layout.n_kv_caches,
        "params_total": counts.total,
        "params_active": counts.active,
        "train_flops_per_token": flops,
    }
    callbacks = [
        AtomicCheckpoint(run_dir, cfg.train.save_every_steps, cfg.train.keep_checkpoints, resumed_from=ckpt_path),
        # MFU against the peak of the precision the matmuls run in (FSDP: its bf16 policy).
        ThroughputMonitor(tokens_per_step, flops, dtype="bf16" if on_gpu and (fsdp or precision != "32-true") else "tf32"),
        LayoutRecord(diagram(layout), figures),
        SaveTokenizer(run_dir),
        GracefulStop(),
    ]
    if cfg.train.stop_after_steps:
        callbacks.append(StopAfterSteps(cfg.train.stop_after_steps))
    if cfg.data.kind == "recall":  # val/recall_within, val/recall_beyond (also in result.json)
        from mixtrain.data.recall import RecallValidation

        callbacks.append(RecallValidation(cfg.data.recall_window))
    if cfg.trainer.progress_bar:
        # Redrawing on every batch floods a log file; a terminal gets a live bar.
        callbacks.append(StepProgressBar(refresh_rate=1 if sys.stdout.isatty() else 25))
    resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
    if is_first_process():
        trim_csv_log(run_dir, resume_step or 0)
    logger = make_logger(cfg, run_dir, resolved, resume_step)
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=cfg.trainer.devices if cfg.trainer.devices != "auto" else "auto",
        num_nodes=cfg.trainer.num_nodes,
        strategy=make_strategy(cfg, on_gpu, world),
        precision=precision,
        max_steps=plan["total_steps"],
        accumulate_grad_batches=plan["accumulate"],
        val_check_interval=cfg.train.val_every_steps * plan["accumulate"],
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.train.val_batches,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.trainer.progress_bar),
        use_distributed_sampler=False,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        default_root_dir=str(run_dir),
        deterministic=bool(cfg.trainer.deterministic),
        enable_model_summary=False,
    )
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))  # other ranks may be reading it
        print(diagram(layout))
        print(
            f"training {plan['total_steps']} steps of {tokens_per_step:,} tokens "
            f"({plan['accumulate']} micro-batch(es) of {cfg.train.micro_batch_size} x {cfg.train.seq_len} per device, "
            f"{world} device(s)); run directory {run_dir}"
            + (f"; resuming from {ckpt_path}" if ckpt_path else "")
        )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        finished = trainer.global_step >= plan["total_steps"]
        if finished and trainer.global_step % cfg.train.val_every_steps:  # end on a validation loss
            trainer.validate(module, datamodule=data, verbose=False)
    finally:
        if cfg.logger.kind == "wandb" and trainer.is_global_zero:
            finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result = {
        "run_dir": str(run_dir),
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "steps": trainer.global_step,
        "metrics": metrics,
    }
    if trainer.is_global_zero:
        from mixtrain.train.checkpoint import latest_checkpoint

        status = "completed" if trainer.global_step >= plan["total_steps"] else "stopped"
        write_result(run_dir, {"status": status, "total_steps": plan["total_steps"], **result})
        print(f"done: {trainer.global_step} steps; val loss {result['val_loss']}")
        print(f"checkpoint: {latest_checkpoint(run_dir)}")
        print(f"logs:       {run_dir}" + (" (W&B offline run under wandb/; upload with `wandb sync`)" if cfg.logger.kind == "wandb" else ""))
    return result
