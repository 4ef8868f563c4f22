"""The LightningModule: next-token loss (+ MoE auxiliary losses, normalised over the
step's supervised tokens by :class:`mixtrain.train.loss.StepLoss`), AdamW with warmup
and cosine decay, gradient clipping, and the model built (and parallelised) in
``configure_model`` so FSDP2 and meta-device construction work."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mixtrain.layouts import Layout
from mixtrain.model import Transformer
from mixtrain.train.loss import StepLoss, lm_loss  # noqa: F401  (lm_loss: `mixtrain bench train` reads it here)
from mixtrain.train.parallel import parallelize


def lr_lambda(step: int, total_steps: int, warmup_steps: int, min_ratio: float,
              schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup to 1, then ``cosine`` decay to ``min_ratio`` at ``total_steps``, or
    ``wsd``: 1 until the last ``decay_fraction`` of the steps, then linear to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if str(schedule) == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total_steps)))
        start = max(warmup_steps, total_steps - decay_steps)
        progress = min(1.0, max(0, step - start) / max(1, total_steps - start))
        return 1.0 - (1.0 - min_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def attention_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that belong to attention modules (Q/K/V/O projections)."""
    from mixtrain.model.attention import Attention

    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, Attention):
            for p_name, _ in module.named_parameters():
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def freeze_all_but_attention(model: torch.nn.Module) -> int:
    """The paper's stages 2 and 3: only attention weights train. Returns the number
    of trainable parameters left."""
    keep = attention_parameter_names(model)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        n += p.numel() if name in keep else 0
    return n


class LMModule(L.LightningModule):
    def __init__(
        self,
        cfg: DictConfig,
        layout: Layout,
        *,
        total_steps: int,
        fsdp: bool = False,
        mixed_precision: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.total_steps = total_steps
        self.fsdp = fsdp
        self.mixed_precision = mixed_precision
        self.model: Optional[Transformer] = None
        self.init_state_dict: Optional[dict[str, torch.Tensor]] = None  # train.init_from weights
        self.step_loss = StepLoss(cfg.model.moe)  # the optimizer step's loss over its micro-batches

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        cfg = self.cfg
        meta = bool(cfg.trainer.meta_init)
        if meta:
            with torch.device("meta"):
                model = Transformer(cfg.model, self.layout)
        else:
            model = Transformer(cfg.model, self.layout)
            model.init_weights(seed=cfg.run.seed)
            if self.init_state_dict is not None:
                model.load_state_dict(self.init_state_dict)
        if cfg.train.trainable == "attention":
            freeze_all_but_attention(model)
        elif cfg.train.trainable != "all":
            raise ValueError(f"train.trainable={cfg.train.trainable!r} is not known; use all or attention")
        parallelize(
            model,
            mesh=self.device_mesh if self.fsdp else None,
            fsdp=self.fsdp,
            activation_checkpointing=cfg.trainer.activation_checkpointing,
            compile=bool(cfg.trainer.compile),
            mixed_precision=self.mixed_precision,
        )
        if meta:
            # Materialise (sharded) storage on the device, then initialise explicitly.
            # A resumed run's weights are loaded afterwards, so this never clobbers them.
            model.to_empty(device=self.trainer.strategy.root_device if self._trainer else "cpu")
            torch.manual_seed(cfg.run.seed)  # a Generator cannot drive DTensor init: seed globally
            model.init_weights(seed=None)
            if self.init_state_dict is not None:
                _load_into_possibly_sharded(model, self.init_state_dict)
        self.model = model

    # ------------------------------------------------------------------ loss
    def _forward(self, batch: dict[str, torch.Tensor]):
        doc_ids = batch.get("doc_ids") if self.cfg.data.intra_doc_attention else None
        return self.model(batch["input_ids"], doc_ids=doc_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step_loss.add(self._forward(batch), batch["labels"])

    def _log_step_metrics(self) -> None:
        """Log the step's figures (:meth:`StepLoss.metrics`) and start the next step."""
        m = self.step_loss.metrics()
        if "loss" in m:
            self.log("train/loss", m["loss"], prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        for key in ("lb_loss", "z_loss"):
            if key in m:
                self.log(f"train/{key}", m[key], on_step=True, on_epoch=False, sync_dist=True)
        for key in ("max_expert_load", "min_expert_load"):
            if key in m:
                self.log(f"moe/{key}", m[key], on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [ce_sum, tokens]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics = lm_loss(self._forward(batch), batch["labels"], self.cfg.model.moe)
        self._val_sums += torch.stack([metrics["ce_sum"].double(), metrics["tokens"].double()])

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over every batch of every rank.
        total = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self.log("val/loss", (total[0] / total[1].clamp_min(1)).float(), prog_bar=True, sync_dist=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The data position is part of the checkpoint: count this micro-batch as consumed.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "on_batch_consumed"):
            dm.on_batch_consumed(batch["input_ids"].size(0))

    # ------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        oc = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # No weight decay on norms, embeddings (and anything one-dimensional).
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": oc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = oc.fused if oc.fused is not None else torch.cuda.is_available()
        kwargs = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, **kwargs)
        warmup = int(round(oc.warmup_fraction * self.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, self.total_steps, warmup, oc.min_lr_ratio, oc.schedule, oc.decay_fraction)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # The step's micro-batches are all in: divide its summed loss by their global count.
        self.step_loss.normalise(params, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"),
                                 self.trainer.accumulate_grad_batches, self.trainer.world_size)
        self._log_step_metrics()
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ----------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mixtrain_config"] = OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)


def _load_into_possibly_sharded(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a model that may be FSDP2-sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
