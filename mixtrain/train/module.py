"""The LightningModule: next-token loss (+ MoE auxiliary losses), AdamW with warmup
and cosine decay, gradient clipping, and the model built (and parallelised) in
``configure_model`` so FSDP2 and meta-device construction work."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mixtrain.layouts import Layout
from mixtrain.model import Transformer
from mixtrain.train.parallel import parallelize


def lr_lambda(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
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


def lm_loss(out, labels: torch.Tensor, moe=None, tokens_ref: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy (labels of -100 are ignored: padding, or the non-answer
    tokens of the long-QA stage) plus the weighted MoE load-balancing and z-losses.
    Returns the loss to minimise and detached metrics (``ce``, ``ce_sum``, ``tokens``,
    ``lb_loss``, ``z_loss``, ``expert_counts``).

    With ``tokens_ref`` (the expected number of supervised tokens in a micro-batch) the
    cross-entropy term is ``ce_sum / tokens_ref`` instead of the batch mean: every token
    weighs the same whatever batch it is in, and :meth:`LMModule.on_before_optimizer_step`
    turns the step's gradient into the exact token-weighted mean (see there)."""
    logits = out.logits.float()
    flat_logits, flat_labels = logits.view(-1, logits.size(-1)), labels.reshape(-1)
    tokens = (labels != -100).sum()
    if tokens_ref is None:
        ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        loss, ce_sum = ce, ce.detach() * tokens
    else:  # a sum: a micro-batch without a supervised token adds 0, not 0/0
        ce_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        ce = ce_sum.detach() / tokens.clamp_min(1)
        loss, ce_sum = ce_sum / tokens_ref, ce_sum.detach()
    # ce_sum / tokens add up across micro-batches and ranks to a token-weighted mean
    # (the long-QA stage supervises a varying number of answer tokens per batch).
    metrics = {"ce": ce.detach(), "ce_sum": ce_sum, "tokens": tokens}
    if moe is not None:
        lb, z = out.aux["lb_loss"], out.aux["z_loss"]
        loss = loss + moe.lb_loss_weight * lb + moe.z_loss_weight * z
        metrics.update(lb_loss=lb.detach(), z_loss=z.detach())
        if "expert_counts" in out.aux:
            metrics["expert_counts"] = out.aux["expert_counts"]
    return loss, metrics


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
        self._step_sums: dict[str, torch.Tensor] = {}
        self._step_micro = 0
        # Expected supervised tokens per micro-batch when batches differ in how many
        # tokens carry a loss (the long-QA stage); None when every token does.
        self._tokens_ref: Optional[float] = None

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
    def _loss(self, batch: dict[str, torch.Tensor], tokens_ref: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        doc_ids = batch.get("doc_ids") if self.cfg.data.intra_doc_attention else None
        return lm_loss(self.model(batch["input_ids"], doc_ids=doc_ids), batch["labels"], self.cfg.model.moe, tokens_ref)

    def on_train_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        per_example = dm.supervised_tokens_per_example() if hasattr(dm, "supervised_tokens_per_example") else None
        self._tokens_ref = None if per_example is None else per_example * self.cfg.train.micro_batch_size

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._loss(batch, self._tokens_ref)
        # Summed over the micro-batches of one optimizer step, logged once per step.
        for key, value in metrics.items():
            self._step_sums[key] = self._step_sums.get(key, 0) + value
        self._step_micro += 1
        return loss

    def _log_step_metrics(self) -> None:
        n, sums = self._step_micro, self._step_sums
        if not n:
            return
        self.log("train/loss", sums["ce_sum"] / sums["tokens"].clamp_min(1), prog_bar=True, on_step=True,
                 on_epoch=False, sync_dist=True)
        if "lb_loss" in sums:
            self.log("train/lb_loss", sums["lb_loss"] / n, on_step=True, on_epoch=False, sync_dist=True)
            self.log("train/z_loss", sums["z_loss"] / n, on_step=True, on_epoch=False, sync_dist=True)
        if "expert_counts" in sums:
            counts = sums["expert_counts"].float()  # [n_layers, n_experts], tokens routed this step
            load = counts / counts.sum(-1, keepdim=True).clamp_min(1) * counts.size(-1)  # 1.0 = balanced
            self.log("moe/max_expert_load", load.max(), on_step=True, on_epoch=False)
            self.log("moe/min_expert_load", load.min(), on_step=True, on_epoch=False)
        self._step_sums, self._step_micro = {}, 0

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [ce_sum, tokens]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics = self._loss(batch)
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
            opt, lambda s: lr_lambda(s, self.total_steps, warmup, oc.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self._tokens_ref is not None and self._step_micro:
            self._token_weight_gradients(params)
        self._log_step_metrics()
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def _token_weight_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make the step's gradient that of the mean loss over *all* its supervised tokens.

        Each micro-batch's loss is ``ce_sum / tokens_ref``; Lightning divides it by the
        accumulation count A and data parallelism averages over the W ranks, so the
        gradient holds ``sum(grad ce_sum) / (tokens_ref * A * W)``. Multiplying by
        ``tokens_ref * A * W / N`` (N: supervised tokens of the whole step, all ranks)
        gives ``sum(grad ce_sum) / N``, the gradient of the token-weighted mean, however
        the tokens fell into micro-batches (fairseq's and HF Trainer's convention). MoE
        auxiliary losses are scaled by the same factor, ``tokens_ref * A * W / N``,
        which is 1 on average."""
        tokens = self._step_sums["tokens"].detach().float()
        total = float(self.trainer.strategy.reduce(tokens, reduce_op="sum"))
        scale = self._tokens_ref * self.trainer.accumulate_grad_batches * self.trainer.world_size / max(total, 1.0)
        for p in params:
            p.grad.mul_(scale)

    # ----------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mixtrain_config"] = OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)


def _load_into_possibly_sharded(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a model that may be FSDP2-sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
