"""One training job, from a composed recipe to checkpoints and logs.

``train(cfg)`` is what ``mixtrain train`` runs for each job (one per sweep point):
check the recipe (:mod:`mixtrain.train.checks`, before anything is written), open the
run directory (:class:`mixtrain.rundir.RunDir`), build the module, data, logger
(:mod:`mixtrain.train.loggers`), callbacks and trainer, fit, and return the metrics.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from mixtrain import accounting
from mixtrain.layouts import diagram
from mixtrain.rundir import RunDir
from mixtrain.train.checks import (  # noqa: F401 - re-exported: callers check recipes through here
    Plan,
    check_config,
    check_init_from,
    check_model_config,
    check_recipe,
    check_resume,
    plan_steps,
)
from mixtrain.train.console import progress_callbacks
from mixtrain.train.loggers import finish_wandb, is_first_process, make_logger


def train(cfg: DictConfig) -> dict[str, Any]:
    """Check, build, fit; returns the final metrics (also in ``<run dir>/result.json``)."""
    from mixtrain.hf.importer import prepare_run

    prepare_run(cfg)  # model=from_hf, train.init_from=<HF folder>: checked, its tokenizer chosen
    plan = check_recipe(cfg)
    OmegaConf.resolve(cfg)
    run, ckpt_path = open_run_dir(cfg, plan)
    module, data = build_module(cfg, plan, ckpt_path), build_data(cfg)
    trainer = build_trainer(cfg, plan, run, ckpt_path)
    if trainer.is_global_zero:
        run.write_config(OmegaConf.to_yaml(cfg))
        print_plan(cfg, plan, run, ckpt_path)
    train_metrics = fit(cfg, plan, trainer, module, data, ckpt_path)
    return record_result(cfg, plan, run, trainer, train_metrics)


# ----------------------------------------------------------------- pieces
def open_run_dir(cfg: DictConfig, plan: Plan) -> tuple[RunDir, Optional[str]]:
    """The run directory (made if needed) and the checkpoint this run resumes from,
    checked against the model the run was started with."""
    from mixtrain.train.checkpoint import resume_path
    from mixtrain.train.checks import check_places

    run = RunDir.of_config(cfg)
    if is_first_process():
        check_places(cfg, run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_path(cfg.run.resume, run.path)
    if ckpt_path:
        check_resume(cfg, plan.layout, run.path, ckpt_path)
    return run, ckpt_path


def precision_of(cfg: DictConfig, plan: Plan) -> str:
    fsdp = cfg.trainer.strategy == "fsdp"
    return cfg.trainer.precision or ("bf16-mixed" if plan.on_gpu and not fsdp else "32-true")


def build_module(cfg: DictConfig, plan: Plan, ckpt_path: Optional[str]):
    """The LightningModule, seeded; a new run with ``train.init_from`` starts from those weights."""
    import lightning as L

    from mixtrain.train.export import read_checkpoint
    from mixtrain.train.module import LMModule

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    fsdp = cfg.trainer.strategy == "fsdp"
    module = LMModule(cfg, plan.layout, total_steps=plan.total_steps, fsdp=fsdp, mixed_precision=fsdp and plan.on_gpu)
    if cfg.train.init_from and ckpt_path is None:
        from mixtrain.hf.importer import convert, is_hf_folder

        if is_hf_folder(cfg.train.init_from):  # a Hugging Face model, mapped onto this layout
            module.init_state_dict, notes = convert(cfg.train.init_from, cfg.model, plan.layout)
            for note in notes:
                print(f"train.init_from: {note}")
        else:
            from mixtrain.train.export import resolve_checkpoint

            module.init_state_dict, previous = read_checkpoint(cfg.train.init_from)
            check_init_from(cfg, plan.layout, previous)
            if is_first_process():
                n = sum(t.numel() for t in module.init_state_dict.values())
                print(f"init_from: loaded {len(module.init_state_dict)} tensors ({n:,} parameters) from "
                      f"{resolve_checkpoint(cfg.train.init_from)}")
    return module


def build_data(cfg: DictConfig):
    from mixtrain.data import build_datamodule

    data = build_datamodule(
        cfg.data, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
        vocab_size=cfg.model.vocab_size,
    )
    if hasattr(data, "prepare_before_fit"):  # before fit: no collective (and its timeout) around a long build
        data.prepare_before_fit()
    return data


def layout_figures(cfg: DictConfig, plan: Plan) -> dict[str, Any]:
    """The layout's KV-cache and parameter figures, logged at the start of the run."""
    layout = plan.layout
    counts = accounting.param_counts(cfg.model, layout)
    return {
        "kv_bytes_per_token_32k": accounting.kv_bytes_per_token(cfg.model, layout, 32768),
        "kv_ratio_vs_standard_32k": accounting.kv_ratio(cfg.model, layout, 32768),
        "kv_caches": layout.n_kv_caches,
        "params_total": counts.total,
        "params_active": counts.active,
        "train_flops_per_token": accounting.train_flops_per_token(cfg.model, layout, cfg.train.seq_len, cfg.train.trainable),
    }


def build_callbacks(cfg: DictConfig, plan: Plan, run: RunDir, ckpt_path: Optional[str]) -> list:
    from mixtrain.train.callbacks import (
        GracefulStop,
        LayoutRecord,
        SaveTokenizer,
        StartReport,
        StopAfterSteps,
        ThroughputMonitor,
    )
    from mixtrain.train.checkpoint import AtomicCheckpoint

    figures = layout_figures(cfg, plan)
    fsdp = cfg.trainer.strategy == "fsdp"
    # MFU against the peak of the precision the matmuls run in (FSDP: its bf16 policy).
    dtype = "bf16" if plan.on_gpu and (fsdp or precision_of(cfg, plan) != "32-true") else "tf32"
    callbacks = [
        AtomicCheckpoint(run.path, cfg.train.save_every_steps, cfg.train.keep_checkpoints, resumed_from=ckpt_path),
        ThroughputMonitor(int(cfg.train.global_batch_tokens), figures["train_flops_per_token"], dtype=dtype),
        LayoutRecord(diagram(plan.layout), figures),
        SaveTokenizer(run.path),
        StartReport(),
        GracefulStop(),
    ]
    if cfg.train.stop_after_steps:
        callbacks.append(StopAfterSteps(cfg.train.stop_after_steps))
    if cfg.data.kind == "recall":  # val/recall_within, val/recall_beyond (also in result.json)
        from mixtrain.data.recall import RecallValidation

        callbacks.append(RecallValidation(cfg.data.recall_window))
    # A live bar on a terminal; plain lines in a log file (no escape codes, no redraws).
    callbacks += progress_callbacks(bool(cfg.trainer.progress_bar), plan.total_steps)[0]
    return callbacks


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
    return "auto"  # trainer.strategy was checked: auto


def build_trainer(cfg: DictConfig, plan: Plan, run: RunDir, ckpt_path: Optional[str]):
    import lightning as L

    from mixtrain.train.checkpoint import checkpoint_step
    from mixtrain.train.console import quiet_libraries

    quiet_libraries()
    resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return L.Trainer(
        accelerator="gpu" if plan.on_gpu else "cpu",
        devices=cfg.trainer.devices if cfg.trainer.devices != "auto" else "auto",
        num_nodes=cfg.trainer.num_nodes,
        strategy=make_strategy(cfg, plan.on_gpu, plan.world_size),
        precision=precision_of(cfg, plan),
        max_steps=plan.total_steps,
        accumulate_grad_batches=plan.accumulate,
        val_check_interval=cfg.train.val_every_steps * plan.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.train.val_batches,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=progress_callbacks(bool(cfg.trainer.progress_bar), plan.total_steps)[1],
        use_distributed_sampler=False,
        logger=make_logger(cfg, run, resolved, resume_step),
        callbacks=build_callbacks(cfg, plan, run, ckpt_path),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        default_root_dir=str(run.path),
        deterministic=bool(cfg.trainer.deterministic),
        enable_model_summary=False,
    )


def print_plan(cfg: DictConfig, plan: Plan, run: RunDir, ckpt_path: Optional[str]) -> None:
    print(diagram(plan.layout))
    print(
        f"training {plan.total_steps} steps of {int(cfg.train.global_batch_tokens):,} tokens "
        f"({plan.accumulate} micro-batch(es) of {cfg.train.micro_batch_size} x {cfg.train.seq_len} per device, "
        f"{plan.world_size} device(s)); run directory {run.path}"
        + (f"; resuming from {ckpt_path}" if ckpt_path else "")
    )


def scalar_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def fit(cfg: DictConfig, plan: Plan, trainer, module, data, ckpt_path: Optional[str]) -> dict[str, float]:
    """Train to the step budget (or a stop), ending on a validation loss. Returns the
    metrics of the last training step (a final validate() clears them from the trainer)."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        train_metrics = scalar_metrics(trainer)
        finished = trainer.global_step >= plan.total_steps
        if finished and trainer.global_step % cfg.train.val_every_steps:  # end on a validation loss
            trainer.validate(module, datamodule=data, verbose=False)
    finally:
        if cfg.logger.kind == "wandb" and trainer.is_global_zero:
            finish_wandb()
    return train_metrics


def record_result(cfg: DictConfig, plan: Plan, run: RunDir, trainer, train_metrics: dict[str, float]) -> dict[str, Any]:
    """The final metrics; rank 0 writes them to result.json and says where things are."""
    metrics = {**train_metrics, **scalar_metrics(trainer)}
    result = {
        "run_dir": str(run.path),
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "steps": trainer.global_step,
        "metrics": metrics,
    }
    if trainer.is_global_zero:
        from mixtrain.train.checkpoint import latest_checkpoint

        from mixtrain.train.callbacks import ThroughputMonitor

        status = "completed" if trainer.global_step >= plan.total_steps else "stopped"
        speed = next((cb.summary() for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)
        run.write_result({"status": status, "total_steps": plan.total_steps, **result, "throughput": speed})
        print(f"done: {trainer.global_step} steps; val loss {result['val_loss']}")
        print(f"checkpoint: {latest_checkpoint(run.path)}")
        print(f"logs:       {run.path}" + (" (W&B offline run under wandb/; upload with `wandb sync`)" if cfg.logger.kind == "wandb" else ""))
    return result
