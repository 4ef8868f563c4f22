"""Dropless token-choice top-k mixture of SwiGLU experts.

Shapes: N tokens (= B*T), C d_model, E experts, H expert_hidden, k top_k.

    router logits [N, E] (fp32) -> softmax -> top-k weights/indices [N, k]
    N*k assignments, sorted by expert -> x_sorted [N*k, C], counts [E]
    experts: y = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
        w1 (gate) [E, C, H], w3 (up) [E, C, H], w2 (down) [E, H, C]
    scatter-add y * weight back to the tokens -> [N, C]

Expert compute: ``torch._grouped_mm`` on CUDA in bf16 (one kernel for all experts),
a per-expert loop over the same sorted buffer elsewhere. ``MoE.expert_impl = "grouped"``
forces the grouped path on any device (torch >= 2.8 runs it on CPU too, forward and
backward, fp32 and bf16: that is how CI tests the GPU path); under autocast (CUDA or
CPU) both paths compute the experts in the autocast dtype. In 16-bit, ``_grouped_mm``
needs rows of a multiple of 16 bytes (d_model and expert_hidden multiples of 8): the
automatic choice falls back to the loop otherwise.

Auxiliary losses (returned, weighted by the trainer):
    lb_loss = E * sum_i f_i * P_i   (Switch / GShard; exactly 1.0 at perfect balance)
        f_i = fraction of the N*k assignments routed to expert i (no gradient)
        P_i = mean router probability of expert i
    z_loss  = mean_n logsumexp(logits_n)^2

``impl: megablocks`` wraps megablocks' dMoE (optional extra, CUDA only, imported
lazily); :func:`native_to_megablocks` / :func:`megablocks_to_native` convert weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mixtrain.config import MoEConfig

MEGABLOCKS_HINT = (
    "model.moe.impl=megablocks needs the optional megablocks backend on a CUDA machine: "
    "`pip install mixtrain[megablocks]` (megablocks 0.10 needs CUDA 12 and torch 2.7, plus "
    "grouped_gemm for its grouped path). Otherwise set model.moe.impl=native, which is "
    "dropless too and uses torch._grouped_mm on CUDA."
)


# ----------------------------------------------------------------------------- routing


def route(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, E] -> (probs [N, E] fp32, weights [N, k] fp32, experts [N, k] long)."""
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balancing_loss(probs: Tensor, counts: Tensor) -> Tensor:
    """E * sum_i f_i * P_i. probs [N, E]; counts [E] assignments per expert (sum N*k)."""
    E = probs.shape[-1]
    f = counts.float() / counts.sum().clamp(min=1)  # [E]
    P = probs.float().mean(dim=0)  # [E]
    return E * (f * P).sum()


def z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2. logits [N, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# ----------------------------------------------------------------------------- experts


def swiglu_experts_loop(x_sorted: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Per-expert loop over the expert-sorted buffer. x_sorted [M, C], counts [E] -> [M, C]."""
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        xe = x_sorted[start : start + n]  # [n, C]
        h = F.silu(xe @ w1[e]) * (xe @ w3[e])  # [n, H]
        outs.append(h @ w2[e])  # [n, C]
        start += n
    if not outs:
        return x_sorted.new_zeros(x_sorted.shape)
    return torch.cat(outs, dim=0)


def swiglu_experts_grouped(x_sorted: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """torch._grouped_mm over the expert-sorted buffer (bf16). offs = end row of each expert."""
    offs = counts.cumsum(0).to(torch.int32)  # [E]
    dt = x_sorted.dtype
    w1, w3, w2 = w1.to(dt), w3.to(dt), w2.to(dt)
    h = F.silu(torch._grouped_mm(x_sorted, w1, offs=offs)) * torch._grouped_mm(x_sorted, w3, offs=offs)  # [M, H]
    return torch._grouped_mm(h, w2, offs=offs)  # [M, C]


# ----------------------------------------------------------------------------- native MoE


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise ValueError(f"model.moe.top_k={cfg.top_k} must be between 1 and model.moe.n_experts={cfg.n_experts}")
        self.n_experts, self.top_k, self.renormalize = cfg.n_experts, cfg.top_k, cfg.renormalize
        E, C, H = cfg.n_experts, d_model, cfg.expert_hidden
        self.router = nn.Linear(C, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, C, H))  # gate projection of each expert
        self.w3 = nn.Parameter(torch.empty(E, C, H))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, H, C))  # down projection
        # None: grouped_mm on CUDA+bf16, loop elsewhere; "loop" / "grouped" force one (tests, benchmarks).
        self.expert_impl: Optional[str] = None

    def extra_repr(self) -> str:
        E, C, H = self.w1.shape
        return (
            f"n_experts={E}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"w1/w3=[{E}, {C}, {H}], w2=[{E}, {H}, {C}]"
        )

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        nn.init.normal_(self.router.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.w1, 0.0, std, generator=generator)
        nn.init.normal_(self.w3, 0.0, std, generator=generator)
        nn.init.normal_(self.w2, 0.0, out_std, generator=generator)

    def experts(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        in_dtype = x_sorted.dtype
        device_type = x_sorted.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            # Under bf16 autocast the residual stream is fp32: compute the experts in the
            # autocast dtype (torch._grouped_mm is not an autocast op).
            x_sorted = x_sorted.to(torch.get_autocast_dtype(device_type))
        E, C, H = self.w1.shape
        row_bytes_ok = (C * x_sorted.element_size()) % 16 == 0 and (H * x_sorted.element_size()) % 16 == 0
        impl = self.expert_impl
        if impl is None:
            # Meta tensors (shape checks) take the grouped path: it needs no counts on the host.
            grouped = x_sorted.is_cuda and x_sorted.dtype == torch.bfloat16 and row_bytes_ok
            impl = "grouped" if grouped or x_sorted.is_meta else "loop"
        elif impl not in ("grouped", "loop"):
            raise ValueError(f"MoE.expert_impl={impl!r}: expected None (automatic), 'grouped' or 'loop'")
        if impl == "grouped" and not row_bytes_ok and not x_sorted.is_meta:
            raise ValueError(
                f"the grouped MoE path (torch._grouped_mm) in {x_sorted.dtype} needs d_model ({C}) and "
                f"model.moe.expert_hidden ({H}) to be multiples of {16 // x_sorted.element_size()} "
                "(rows of a multiple of 16 bytes); change them, or use the per-expert loop"
            )
        fn = swiglu_experts_grouped if impl == "grouped" else swiglu_experts_loop
        return fn(x_sorted, counts, self.w1, self.w3, self.w2).to(in_dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, C] -> (out [B, T, C], {lb_loss, z_loss: scalars; counts: long [E]})."""
        B, T, C = x.shape
        x_flat = x.reshape(B * T, C)  # [N, C]
        logits = self.router(x_flat)  # [N, E]
        probs, weights, experts = route(logits, self.top_k, self.renormalize)  # [N,E], [N,k], [N,k]

        # Sort the N*k assignments by expert (stable: token order kept inside an expert).
        flat_experts = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)  # [N*k]
        token_idx = order // self.top_k  # [N*k] token of each sorted assignment
        # Tokens per expert without a host sync (bincount would need the max on the host).
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts = counts.scatter_add(0, flat_experts, torch.ones_like(flat_experts))  # [E]

        x_sorted = x_flat[token_idx]  # [N*k, C]
        y_sorted = self.experts(x_sorted, counts)  # [N*k, C]
        y_sorted = y_sorted * weights.reshape(-1)[order, None].to(y_sorted.dtype)
        out = torch.zeros_like(x_flat).index_add(0, token_idx, y_sorted.to(x_flat.dtype))  # [N, C]

        aux = {
            "lb_loss": load_balancing_loss(probs, counts),
            "z_loss": z_loss(logits),
            "counts": counts.detach(),
        }
        return out.view(B, T, C), aux


# ----------------------------------------------------------------------------- megablocks


def native_to_megablocks(w1: Tensor, w3: Tensor, w2: Tensor) -> dict[str, Tensor]:
    """Native stacked weights -> megablocks dMoE GLU layout.

    megablocks keeps each expert's weights as rows of [E*H, C] matrices and computes
    x @ w1_e.T (gate, activated), x @ v1_e.T (up), then h @ w2_e:
        w1 [E*H, C] = w1_native[e].T stacked,  v1 [E*H, C] = w3_native[e].T stacked,
        w2 [E*H, C] = w2_native[e] stacked."""
    E, C, H = w1.shape
    return {
        "w1": w1.transpose(1, 2).reshape(E * H, C),
        "v1": w3.transpose(1, 2).reshape(E * H, C),
        "w2": w2.reshape(E * H, C),
    }


def megablocks_to_native(w1: Tensor, v1: Tensor, w2: Tensor, n_experts: int) -> dict[str, Tensor]:
    """Inverse of :func:`native_to_megablocks`: returns {w1 [E,C,H], w3 [E,C,H], w2 [E,H,C]}."""
    EH, C = w1.shape
    E, H = n_experts, EH // n_experts
    return {
        "w1": w1.reshape(E, H, C).transpose(1, 2).contiguous(),
        "w3": v1.reshape(E, H, C).transpose(1, 2).contiguous(),
        "w2": w2.reshape(E, H, C).contiguous(),
    }


def import_megablocks():
    """Import megablocks lazily; a clear error when it cannot run here."""
    if not torch.cuda.is_available():
        raise RuntimeError("megablocks runs on CUDA only and no GPU is visible. " + MEGABLOCKS_HINT)
    try:
        import megablocks.layers.arguments as mb_args
        import megablocks.layers.dmoe as mb_dmoe
    except Exception as e:  # ImportError, or a CUDA extension that fails to load
        raise ImportError(f"could not import megablocks ({type(e).__name__}: {e}). " + MEGABLOCKS_HINT) from e
    return mb_args, mb_dmoe


class MegablocksMoE(nn.Module):
    """megablocks dMoE with the native module's interface and aux losses.

    The aux losses are recomputed here from the router weights with the same definitions
    as the native MoE (megablocks' own module-global loss list is disabled with
    moe_loss_weight=0). Note: megablocks' router softmax runs in the input dtype."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        mb_args, mb_dmoe = import_megablocks()
        try:
            import grouped_gemm  # noqa: F401

            mlp_impl = "grouped"
        except ImportError:
            mlp_impl = "sparse"
        self.n_experts, self.top_k, self.renormalize = cfg.n_experts, cfg.top_k, cfg.renormalize
        args = mb_args.Arguments(
            hidden_size=d_model,
            ffn_hidden_size=cfg.expert_hidden,
            bias=False,
            return_bias=False,
            activation_fn=F.silu,
            mlp_type="glu",
            mlp_impl=mlp_impl,
            moe_num_experts=cfg.n_experts,
            moe_top_k=cfg.top_k,
            moe_normalize_expert_weights=1.0 if cfg.renormalize else None,
            moe_loss_weight=0.0,
            fp16=False,
            bf16=False,
            device=torch.cuda.current_device(),
        )
        self.dmoe = mb_dmoe.dMoE(args)

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        mlp = self.dmoe.experts.mlp
        nn.init.normal_(self.dmoe.router.layer.weight, 0.0, std, generator=generator)
        nn.init.normal_(mlp.w1, 0.0, std, generator=generator)
        nn.init.normal_(mlp.v1, 0.0, std, generator=generator)
        nn.init.normal_(mlp.w2, 0.0, out_std, generator=generator)

    def load_native(self, w1: Tensor, w3: Tensor, w2: Tensor, router: Tensor) -> None:
        mlp = self.dmoe.experts.mlp
        with torch.no_grad():
            for name, t in native_to_megablocks(w1, w3, w2).items():
                getattr(mlp, name).copy_(t)
            self.dmoe.router.layer.weight.copy_(router)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, C = x.shape
        logits = F.linear(x.reshape(B * T, C), self.dmoe.router.layer.weight)
        probs, _, experts = route(logits, self.top_k, self.renormalize)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
        out = self.dmoe(x)
        aux = {"lb_loss": load_balancing_loss(probs, counts), "z_loss": z_loss(logits), "counts": counts.detach()}
        return out, aux


def build_moe(cfg: MoEConfig, d_model: int) -> nn.Module:
    if cfg.impl == "native":
        return MoE(cfg, d_model)
    if cfg.impl == "megablocks":
        return MegablocksMoE(cfg, d_model)
    raise ValueError(f"model.moe.impl={cfg.impl!r}: expected 'native' or 'megablocks'")
