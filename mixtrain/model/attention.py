"""One attention layer, in one of three roles decided by its LayerSpec:

- producer (kv_source == own index): wq, wk, wv, wo. Computes post-RoPE K/V that
  later consumer layers reuse.
- consumer (kv_source < own index):  wq, wo. Attends with its own Q over the
  producer's post-RoPE K/V, exactly as computed (before GQA repetition, no detach).
- shared   (attn_source is not None): wv, wo. Multiplies a earlier layer's
  post-softmax probabilities by its own V (Shared Attention, arXiv 2407.12866).

Shapes: B batch, T sequence, Hq query heads, Hkv KV heads, D head_dim, C d_model.
Q is [B, Hq, T, D]; K and V are [B, Hkv, T, D]; probabilities are [B, Hq, T, T].

Kernels (one meaning, tested equal): 'sdpa' = F.scaled_dot_product_attention with an
explicit boolean mask; 'flex' = FlexAttention with a BlockMask (compiled once on CUDA;
on CPU it only runs forward without autograd). A layer whose probabilities are
borrowed computes them with the explicit math path: softmax(QK^T / sqrt(D) + mask).

With a KV cache (inference, :class:`mixtrain.infer.cache.KVCache`) the same forward
runs: a producer appends its new K/V to its buffers and attends over what the cache
returns (the cached columns plus the new ones), and hands that on to its consumers; a
Shared Attention layer caches its V. The cache builds the masks (key columns against
query columns), and a decode step over a full cache needs none (``AttentionMask.full``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mixtrain.config import ModelConfig
from mixtrain.layouts import LayerSpec
from mixtrain.model.masks import AttentionMask

ATTN_IMPLS = ("auto", "sdpa", "flex")


def resolve_attn_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'flex' on CUDA, 'sdpa' elsewhere."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={impl!r}: expected one of {ATTN_IMPLS}")
    if impl == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return impl


# ----------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_seq_len, head_dim // 2] in fp32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim (got {head_dim})")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [max_seq_len, D/2]
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves (Llama / GPT-NeoX convention). x: [B, H, T, D];
    cos, sin: [B or 1, 1, T, D/2]. Computed in fp32, returned in x.dtype."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    cos, sin = cos.float(), sin.float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- kernels


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], mask bool [B|1,1,Tq,Tk] or None (every key
    visible) -> [B,Hq,Tq,D].

    One query (a decode step) with grouped-query attention folds the query heads of a
    KV head into the query axis (q [B, Hkv, n_rep, D]): the kernel reads each KV head
    once and needs no GQA support, so the fast kernels apply on GPU."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    if Tq == 1 and rep > 1:
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], rep, D), k, v, attn_mask=mask)
        return y.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)


_compiled_flex = None


def flex_attention_kernel(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention; compiled once (process-wide) on CUDA, eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]; query head h reads KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Math path: probs = softmax(QK^T / sqrt(D) masked), out = probs @ V (mask None:
    every key visible). Returns out [B,Hq,Tq,D] and probs [B,Hq,Tq,Tk] (softmax in fp32,
    returned in q.dtype)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B,Hq,Tq,Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


def apply_probs(probs: Tensor, v: Tensor) -> Tensor:
    """Shared Attention: probs [B,Hq,Tq,Tk] @ V [B,Hkv,Tk,D] -> [B,Hq,Tq,D]."""
    return probs @ repeat_kv(v, probs.shape[1] // v.shape[1]).to(probs.dtype)


# ----------------------------------------------------------------------------- layer


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, index: int):
        super().__init__()
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads={cfg.n_kv_heads}")
        self.index = index
        self.kind, self.window = spec.kind, spec.window
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if spec.attn_source is not None:
            self.role = "shared"
        elif spec.kv_source == index:
            self.role = "producer"
        else:
            self.role = "consumer"
        C, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if self.role != "shared":
            self.wq = nn.Linear(C, q_dim, bias=False)
        if self.role == "producer":
            self.wk = nn.Linear(C, kv_dim, bias=False)
        if self.role != "consumer":
            self.wv = nn.Linear(C, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, C, bias=False)

    def extra_repr(self) -> str:
        w = f", window={self.window}" if self.kind == "sliding" else ""
        return f"layer={self.index}, role={self.role}, kind={self.kind}{w}"

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        for name in ("wq", "wk", "wv"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, 0.0, std, generator=generator)
        nn.init.normal_(self.wo.weight, 0.0, out_std, generator=generator)

    # -- pieces of the forward ------------------------------------------------------------

    def project(
        self, x: Tensor, cos: Tensor, sin: Tensor, x_kv: Optional[Tensor] = None
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """x [B,T,C] -> (q [B,Hq,T,D] | None, k [B,Hkv,T,D] | None, v [B,Hkv,T,D] | None).

        q and k are rotated at the positions cos/sin [B|1, 1, T, D/2] were gathered at.
        A producer returns q, k, v; a consumer only q; a shared layer only v. ``x_kv``:
        the K/V path's input when it is normalised separately (CLA), else ``x``."""
        B, T, _ = x.shape
        x_kv = x if x_kv is None else x_kv
        q = k = v = None
        if self.role != "shared":
            q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            q = apply_rope(q, cos, sin)
        if self.role == "producer":
            k = self.wk(x_kv).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            k = apply_rope(k, cos, sin)
        if self.role != "consumer":
            v = self.wv(x_kv).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        """q [B,Hq,Tq,D] over k/v [B,Hkv,Tk,D] -> [B,Hq,Tq,D]. The kernel follows the mask:
        SDPA's causal kernel for plain causal attention, FlexAttention when the mask
        carries a BlockMask (sliding windows, documents), SDPA with the dense mask
        otherwise (no mask at all when every key is visible: ``mask.full``)."""
        if mask.causal and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        if mask.block is not None:
            return flex_attention_kernel(q, k, v, mask.block)
        if mask.dense is None and not mask.full:
            raise RuntimeError(f"layer {self.index}: the attention mask has neither a dense nor a block form")
        return sdpa_attention(q, k, v, mask.dense)

    def merge_heads(self, y: Tensor) -> Tensor:
        """[B,Hq,T,D] -> wo -> [B,T,C]."""
        B, H, T, D = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))

    # -- forward (training, and inference with a cache) ----------------------------------

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: AttentionMask,
        kv: Optional[tuple[Tensor, Tensor]] = None,
        probs: Optional[Tensor] = None,
        return_probs: bool = False,
        x_kv: Optional[Tensor] = None,
        cache=None,
    ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]], Optional[Tensor]]:
        """x [B,T,C] -> (out [B,T,C], (k, v) this layer produced or None, probs or None).

        kv:    the producer's (k, v), required for a consumer.
        probs: the source layer's probabilities, required for a shared layer.
        return_probs: compute probabilities explicitly and return them (a later layer
                      borrows them).
        cache: a KV cache (inference). A producer (or a shared layer, V only) stores its
               new K/V there and attends over, and hands on, what the cache returns for
               these columns (the keys of earlier columns followed by or merged with
               the new ones), so its consumers read the same tensors."""
        q, k, v = self.project(x, cos, sin, x_kv)
        if cache is not None and self.role != "consumer":
            k, v, _ = cache.append_and_read(self.index, k, v, want_cols=False)
        if self.role == "consumer":
            if kv is None:
                raise RuntimeError(f"layer {self.index} is a KV consumer but got no K/V from its producer")
            k, v = kv
        if self.role == "shared":
            if probs is None:
                raise RuntimeError(f"layer {self.index} shares attention probabilities but got none")
            y = apply_probs(probs, v)
            return self.merge_heads(y), None, None
        new_probs = None
        if return_probs:
            if mask.dense is None and not mask.full:
                raise RuntimeError(f"layer {self.index}: explicit attention needs a dense mask")
            y, new_probs = explicit_attention(q, k, v, mask.dense)
        else:
            y = self.attend(q, k, v, mask)
        produced = (k, v) if self.role == "producer" else None
        return self.merge_heads(y), produced, new_probs
