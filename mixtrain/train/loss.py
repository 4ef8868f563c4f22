"""The training loss and its normalisation, in one place (torchtitan ``components/loss.py``).

The loss of one optimizer step is the next-token cross-entropy *summed* over every
supervised token of the step (labels of -100 carry no loss: padding, or everything but
the answers of an answer-only example), all its micro-batches on all ranks, divided by
the *global* number N of those tokens:

    loss_step = sum over ranks, micro-batches and supervised tokens of CE / N

so every supervised token weighs the same, however the tokens fell into micro-batches
and ranks (a mean of per-micro-batch means would over-weigh a micro-batch with few
answer tokens). The MoE auxiliary losses are added per micro-batch, weighted.

Where N is known. Lightning's automatic optimisation backpropagates each micro-batch
before it loads the next, so N is known once the step's micro-batches are all in,
before the optimizer step. :class:`StepLoss` backpropagates ``ce_sum / R`` for each
micro-batch (R: label positions of the step's first micro-batch, a constant that keeps
the accumulated gradient at the scale of a mean), and :meth:`StepLoss.normalise`,
called then (``LMModule.on_before_optimizer_step``), multiplies the accumulated
gradient by ``R * A * W / N``: Lightning divided each micro-batch's loss by the
accumulation count A and data parallelism averaged over the W ranks, so the gradient
becomes ``sum(grad ce_sum) / N``, exactly that of ``loss_step`` (by linearity). The MoE
auxiliary terms are scaled by the same factor (1 on average).

When every position is supervised (pretraining), N = R * A * W, the factor is exactly
1 and the gradient is left untouched: the numbers are bit for bit those of the plain
mean cross-entropy.

A data source needs nothing but its labels (-100 = no loss) to be weighted correctly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss(out, labels: Tensor, moe=None, tokens_ref: Optional[float] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy (labels of -100 are ignored) plus the weighted MoE
    load-balancing and z-losses. Returns the loss to minimise and detached metrics
    (``ce``, ``ce_sum``, ``tokens``, ``lb_loss``, ``z_loss``, ``expert_counts``).

    Without ``tokens_ref`` the cross-entropy term is the micro-batch's mean; with it,
    ``ce_sum / tokens_ref`` (a micro-batch without a supervised token adds 0, not 0/0):
    what :class:`StepLoss` backpropagates."""
    logits = out.logits.float()
    flat_logits, flat_labels = logits.view(-1, logits.size(-1)), labels.reshape(-1)
    tokens = (labels != IGNORE_INDEX).sum()
    if tokens_ref is None:
        ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
        loss, ce_sum = ce, ce.detach() * tokens
    else:
        ce_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = ce_sum.detach() / tokens.clamp_min(1)
        loss, ce_sum = ce_sum / tokens_ref, ce_sum.detach()
    # ce_sum and tokens add up across micro-batches and ranks to a token-weighted mean.
    metrics = {"ce": ce.detach(), "ce_sum": ce_sum, "tokens": tokens}
    if moe is not None:
        lb, z = out.aux["lb_loss"], out.aux["z_loss"]
        loss = loss + moe.lb_loss_weight * lb + moe.z_loss_weight * z
        metrics.update(lb_loss=lb.detach(), z_loss=z.detach())
        if "expert_counts" in out.aux:
            metrics["expert_counts"] = out.aux["expert_counts"]
    return loss, metrics


class StepLoss:
    """The loss of one optimizer step, accumulated over its micro-batches (see the
    module doc). Per step: :meth:`add` for each micro-batch (returns what to
    backpropagate), then :meth:`normalise` on the accumulated gradients, then
    :meth:`metrics` (which starts the next step)."""

    def __init__(self, moe: Any = None):
        self.moe = moe
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.micro_batches = 0
        self.ref: Optional[float] = None  # label positions of the step's first micro-batch

    def add(self, out, labels: Tensor) -> Tensor:
        """One micro-batch: its model output and labels -> the loss to backpropagate,
        ``ce_sum / R`` (+ MoE terms)."""
        if self.ref is None:
            self.ref = float(labels.numel())
        loss, metrics = lm_loss(out, labels, self.moe, tokens_ref=self.ref)
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.micro_batches += 1
        return loss

    def global_tokens(self, reduce_sum: Callable[[Tensor], Tensor]) -> float:
        """N: supervised tokens of the step over every rank (``reduce_sum``: an
        all-reduce over the data-parallel ranks, the identity on one)."""
        return float(reduce_sum(self.sums["tokens"].detach().float()))

    @torch.no_grad()
    def normalise(self, params: list[Tensor], reduce_sum: Callable[[Tensor], Tensor], accumulate: int,
                  world: int) -> float:
        """Turn the accumulated gradients of ``params`` into those of the step's summed
        loss divided by N (all ranks). Returns the factor applied (1.0: untouched)."""
        if not self.micro_batches:
            return 1.0
        factor = self.ref * accumulate * world / max(self.global_tokens(reduce_sum), 1.0)
        if factor != 1.0:
            for p in params:
                p.grad.mul_(factor)
        return factor

    def metrics(self) -> dict[str, Tensor]:
        """The step's logged figures, then :meth:`reset`: ``loss`` (token-weighted mean
        cross-entropy of this rank's micro-batches), and with MoE ``lb_loss`` / ``z_loss``
        (means over the micro-batches) and ``max_expert_load`` / ``min_expert_load``
        (tokens routed to the busiest / idlest expert of any layer, 1.0 = balanced)."""
        n, sums = self.micro_batches, self.sums
        out: dict[str, Tensor] = {}
        if n:
            out["loss"] = sums["ce_sum"] / sums["tokens"].clamp_min(1)
            if "lb_loss" in sums:
                out["lb_loss"], out["z_loss"] = sums["lb_loss"] / n, sums["z_loss"] / n
            if "expert_counts" in sums:
                counts = sums["expert_counts"].float()  # [n_layers, n_experts], tokens routed this step
                load = counts / counts.sum(-1, keepdim=True).clamp_min(1) * counts.size(-1)
                out["max_expert_load"], out["min_expert_load"] = load.max(), load.min()
        self.reset()
        return out


__all__ = ["IGNORE_INDEX", "StepLoss", "lm_loss"]
