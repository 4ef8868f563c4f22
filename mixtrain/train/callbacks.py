"""Training callbacks: throughput and MFU from the analytic FLOPs, and a record of
the layout (diagram, KV bytes per token) at the start of a run."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch

from mixtrain import accounting


class ThroughputMonitor(L.Callback):
    """Tokens per second and model FLOPs utilisation per optimizer step.

    MFU = train FLOPs per token (active parameters + windowed attention, see
    :func:`mixtrain.accounting.train_flops_per_token`) x tokens/s / (peak FLOP/s of
    the device at the training precision x number of devices); not logged where the
    peak is unknown (CPU). A step is timed from the start of its first micro-batch to
    the end of its optimizer step, so validation, checkpoint writes and logging between
    steps are not counted; the first step after a (re)start (compilation, first
    allocations) is skipped. Averaged over the last ``window`` steps.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, window: int = 5, dtype: str = "bf16") -> None:
        from collections import deque

        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.dtype = dtype
        self._durations: deque[float] = deque(maxlen=window)
        self._t_start: Optional[float] = None
        self._skip_first = True
        self._last_step = -1
        self.peak: Optional[float] = None
        self.last: dict[str, float] = {}
        self.step_times: list[float] = []  # every timed step of this invocation
        self.load_start: Optional[float] = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dev = trainer.strategy.root_device
        if dev.type == "cuda":
            per_device = accounting.peak_flops(torch.cuda.get_device_name(dev), self.dtype)
            self.peak = per_device * trainer.world_size if per_device else None
        self._durations.clear()
        self.step_times = []
        self.load_start = _load_average()
        self._skip_first = True
        self._t_start = None
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        if self._t_start is None:  # the first micro-batch of a step
            self._t_start = self._now(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients
        self._last_step = trainer.global_step
        duration, self._t_start = self._now(trainer) - self._t_start, None
        if self._skip_first:
            self._skip_first = False
            return
        self._durations.append(duration)
        self.step_times.append(duration)
        tps = self.tokens_per_step * len(self._durations) / sum(self._durations)
        self.last = {"perf/tokens_per_s": tps}
        if self.peak:
            self.last["perf/mfu"] = self.flops_per_token * tps / self.peak
        pl_module.log_dict(self.last, on_step=True, on_epoch=False, rank_zero_only=True)


    def summary(self) -> dict[str, Any]:
        """The spread of this invocation's step times and the machine's load, so a
        throughput figure says how steady it was (result.json; ``mixtrain compare``)."""
        import os
        import statistics

        t = self.step_times
        return {
            "steps_timed": len(t),
            "step_time_median_s": statistics.median(t) if t else None,
            "step_time_min_s": min(t) if t else None,
            "step_time_max_s": max(t) if t else None,
            "tokens_per_s_median": self.tokens_per_step / statistics.median(t) if t else None,
            "load_avg_1m_start": self.load_start,
            "load_avg_1m_end": _load_average(),
            "cpu_count": os.cpu_count(),
        }


def _load_average() -> Optional[float]:
    """The machine's 1-minute load average (None where the OS has none)."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class LayoutRecord(L.Callback):
    """Puts the layout diagram and its KV-cache figures into the run's log and logger."""

    def __init__(self, text: str, figures: dict[str, float]) -> None:
        self.text = text
        self.figures = figures

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"layout_figures": self.figures})
            experiment = getattr(logger, "experiment", None)
            if trainer.is_global_zero and hasattr(experiment, "summary") and hasattr(experiment, "log"):
                import wandb  # a WandbLogger

                experiment.summary.update(self.figures)
                experiment.log({"layout/diagram": wandb.Html(f"<pre>{self.text}</pre>")}, commit=False)


class StartReport(L.Callback):
    """Says what this run trains and on what, once the model and data are set up: how
    many parameters are trainable (attention only in stages 2 and 3) and, for long-QA
    data, how many examples were built and how many answer tokens they supervise."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        what = " (attention only)" if trainable < total and pl_module.cfg.train.trainable == "attention" else ""
        print(f"trainable parameters: {trainable:,} of {total:,}{what}")
        prepared = getattr(getattr(trainer, "datamodule", None), "prepared", None)
        splits = (getattr(prepared, "meta", None) or {}).get("splits") or {}
        if splits and any("answer_tokens" in s for s in splits.values()):
            for split in ("train", "val"):
                s = splits.get(split) or {}
                if s:
                    print(f"long-QA {split}: {s.get('examples', 0):,} examples built ({s.get('qa_pairs', 0):,} QA pairs), "
                          f"{s.get('answer_tokens', 0):,} answer tokens supervised")


class SaveTokenizer(L.Callback):
    """Keeps the run directory self-contained: its tokenizer.json travels with the
    checkpoints and into exports."""

    def __init__(self, run_dir) -> None:
        from pathlib import Path

        self.path = Path(run_dir) / "tokenizer.json"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if trainer.is_global_zero and dm is not None and hasattr(dm, "tokenizer"):
            dm.tokenizer.save(self.path)


class StopAfterSteps(L.Callback):
    """Ends this invocation after ``steps`` more optimizer steps (the last checkpoint
    is written on the way out); the run continues later with ``run.resume=auto``."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)
        self._start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = trainer.global_step  # counted from where this invocation (re)started

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step - self._start >= self.steps:
            trainer.should_stop = True


class GracefulStop(L.Callback):
    """SIGTERM or SIGUSR1 (a preemption, ``scancel``, a SLURM requeue, Ctrl-\\ from
    ``kill``) ends training at the next optimizer-step boundary instead of mid-step:
    the checkpoint callback then saves on the way out, so a requeued job resumes from
    the step it reached, bit for bit, and redoes nothing.

    The handlers replace Lightning's own (which would stop after the current
    micro-batch, mid gradient accumulation, without a checkpoint) for the duration of
    training. All ranks agree at each step boundary (one boolean all-reduce)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.stopped = False
        self._previous: dict = {}
        self._last_step = -1

    def _handler(self, signum, frame) -> None:
        import signal

        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # mid gradient accumulation: finish the step first
        self._last_step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            from lightning.pytorch.utilities import rank_zero_info

            from mixtrain.train.checkpoint import AtomicCheckpoint

            rank_zero_info(f"{self.requested or 'stop signal'} received: stopping after step {trainer.global_step}")
            # Checkpoint first: whatever Lightning does on the way out (a validation
            # pass) must not stand between the signal and a safe checkpoint.
            for cb in trainer.callbacks:
                if isinstance(cb, AtomicCheckpoint):
                    cb.save(trainer)
            self.stopped = True
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


from lightning.pytorch.callbacks import TQDMProgressBar  # noqa: E402


class StepProgressBar(TQDMProgressBar):
    """A training bar that counts optimizer steps up to ``max_steps`` (from the step a
    resumed run starts at). Lightning's own bar counts micro-batches against a total
    of optimizer steps, which overruns its total under gradient accumulation."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._shown_step = -1

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _start(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = self._shown_step = trainer.global_step
        bar.set_description("step")

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._start(trainer)  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._shown_step or self.train_progress_bar is None:
            return  # mid gradient accumulation
        self._shown_step = step
        if self._should_update(step, self.train_progress_bar.total):
            self._show(trainer, pl_module)

    def _show(self, trainer: L.Trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._show(trainer, pl_module)  # where it stopped (a signal, train.stop_after_steps)
        super().on_train_end(trainer, pl_module)
