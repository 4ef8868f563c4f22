"""The decoder: embeddings -> L pre-norm blocks (attention + SwiGLU MLP or MoE) -> norm -> logits.

Which layers attend globally or in a sliding window, and which reuse an earlier
layer's K/V (or attention probabilities), is the Layout's business; this file only
wires the per-forward hand-over:

    kv_store[producer index]  = (k, v)   post-RoPE, [B, Hkv, T, D]
    probs_store[source index] = probs    post-softmax, [B, Hq, T, T]

The same forward serves training and inference (nanochat's habit): given a KV cache,
``forward(ids, cache=cache)`` extends it by the T new columns (a prefill chunk, or one
token at decode) and the hand-over carries the cached K/V (``[B, Hkv, S, D]``, S the
keys visible to these columns). :class:`mixtrain.infer.generate.Engine` only manages
the cache, the padding/positions and sampling.

Construction is cheap and device-agnostic (torchtitan style):

    with torch.device("meta"):
        model = Transformer(cfg, layout)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mixtrain.config import ModelConfig
from mixtrain.layouts import LayerSpec, Layout, validate
from mixtrain.model.attention import Attention, resolve_attn_impl, rope_tables
from mixtrain.model.masks import build_masks
from mixtrain.model.moe import build_moe


@dataclass
class ModelOutput:
    """logits [B, T, V]; aux: lb_loss, z_loss (scalar tensors, mean over MoE layers, zeros
    for a dense model) and, with MoE, expert_counts (long [n_layers, n_experts], detached)."""

    logits: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        nn.init.normal_(self.w1.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.w3.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.w2.weight, 0.0, out_std, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, spec, index)
        # CLA's separate KV-path norm, in the layers that project K or V.
        self.kv_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.kv_norm and self.attn.role != "consumer" else None
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.moe is not None
        self.mlp = build_moe(cfg.moe, cfg.d_model) if self.is_moe else MLP(cfg.d_model, cfg.ffn_hidden)

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        self.attn_norm.reset_parameters()
        if self.kv_norm is not None:
            self.kv_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.init_weights(std, out_std, generator)
        self.mlp.init_weights(std, out_std, generator)

    def attn_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised inputs of the query path and of the K/V path (the same tensor
        unless the model has CLA's separate KV norm)."""
        x_q = self.attn_norm(x)
        return x_q, (self.kv_norm(x) if self.kv_norm is not None else x_q)

    def forward(self, x, cos, sin, mask, kv=None, probs=None, return_probs=False, cache=None):
        """x [B,T,C] -> (x [B,T,C], produced (k, v) | None, probs | None, moe aux | None).
        ``cache``: the KV cache of an inference forward (see :class:`Attention`)."""
        x_q, x_kv = self.attn_inputs(x)
        a, produced, new_probs = self.attn(x_q, cos, sin, mask, kv=kv, probs=probs, return_probs=return_probs,
                                           x_kv=x_kv, cache=cache)
        x = x + a
        aux = None
        if self.is_moe:
            m, aux = self.mlp(self.mlp_norm(x))
        else:
            m = self.mlp(self.mlp_norm(x))
        x = x + m
        return x, produced, new_probs, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout):
        super().__init__()
        layout = validate(layout, cfg.n_layers)  # the rules of layouts.md; chains resolved
        resolve_attn_impl(cfg.attn_impl, torch.device("cpu"))  # validates the name
        self.cfg, self.layout = cfg, layout
        self.prob_sources = sorted({s.attn_source for s in layout.layers if s.attn_source is not None})
        # Masks of layers that hand their probabilities on need a dense form (explicit softmax).
        self.dense_mask_keys = [layout.layers[i].mask_key for i in self.prob_sources]

        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, spec, i) for i, spec in enumerate(layout.layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # Tied: the logits use tok_embeddings.weight directly (no second Parameter, so tying
        # survives meta-device construction, to_empty and sharding).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def output_weight(self) -> Tensor:
        """[V, C] weight of the output head (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    # -- init ---------------------------------------------------------------------------

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables from cfg.rope_theta and cfg.max_seq_len, on the
        buffers' device. Call after changing either (context extension)."""
        device = self.rope_cos.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device)
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """normal(0, init_std) for linears, embeddings and experts; output projections of
        every block (attention wo, MLP / expert w2) scaled by 1/sqrt(2 * n_layers); norms
        to ones; RoPE tables recomputed. Same seed -> same weights, eager or after meta."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.tok_embeddings.weight.device)
            generator.manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        self.reset_rope()
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for block in self.layers:
            block.init_weights(std, out_std, generator)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)

    # -- forward ------------------------------------------------------------------------

    @torch.no_grad()
    def attention_probabilities(self, input_ids: Tensor, each=None) -> Optional[list[Tensor]]:
        """Every layer's attention probabilities ``[B, H, T, T]`` for ``input_ids`` (one
        forward with the explicit softmax in every layer; inference only). A layer that
        shares an earlier layer's probabilities gets that layer's; a KV consumer's are its
        own queries over its producer's keys. Returns the list, or, with ``each`` (a
        callable ``each(layer, probs)``), hands each layer's over as it is computed and
        keeps none beyond what the forward keeps anyway (long sequences: one layer's
        ``B*H*T*T`` floats at a time)."""
        got: dict[int, Tensor] = {}
        self(input_ids, on_probs=each if each is not None else got.__setitem__)
        return None if each is not None else [got[i] for i in range(len(self.layers))]

    def rope_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] or [B, T] -> cos, sin [1 or B, 1, T, D/2]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [(B,) T, D/2]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]

    def forward(
        self,
        input_ids: Tensor,
        doc_ids: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        cache=None,
        last_only: bool = False,
        on_probs=None,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput(logits [B, T, V], aux).

        doc_ids [B, T] (optional): a token attends only within its document (on top of the
        causal / sliding mask). positions [T] or [B, T] (optional, default 0..T-1): RoPE
        positions; masks always use the index in the sequence.

        cache (inference, a :class:`mixtrain.infer.cache.KVCache`): input_ids are the next
        T columns of every row of the cache. Positions default to the cache's (each row's
        column minus its left padding), RoPE is read from the cache's fp32 tables (so
        positions past ``max_seq_len`` work), the cache builds the masks, every producer
        appends its K/V, and the cache advances by T. ``aux`` is empty with a cache.
        last_only: logits of the last column only ([B, 1, V]).
        on_probs (analysis, no cache): ``on_probs(layer, probs [B, H, T, T])`` for every
        layer: each computes its probabilities explicitly (a layer sharing an earlier
        layer's gets that layer's); only those a later layer reads are kept."""
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache")
            if on_probs is not None:
                raise ValueError("on_probs cannot be combined with a KV cache")
            if positions is None:
                positions = cache.positions(T)
            cos, sin = cache.rope_at(positions)
            masks = cache.masks(T, self.layout.mask_keys)
        else:
            if positions is None:
                if T > self.cfg.max_seq_len:
                    raise ValueError(
                        f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}; "
                        "raise max_seq_len (and call reset_rope) for longer contexts"
                    )
                positions = torch.arange(T, device=device)
            cos, sin = self.rope_at(positions)
            impl = resolve_attn_impl(self.cfg.attn_impl, device)
            dense = self.layout.mask_keys if on_probs is not None else self.dense_mask_keys
            masks = build_masks(self.layout.mask_keys, T, device, impl, doc_ids, dense_keys=dense)

        kv_store: dict[int, tuple[Tensor, Tensor]] = {}
        probs_store: dict[int, Tensor] = {}
        moe_aux: list[dict[str, Tensor]] = []

        h = self.tok_embeddings(input_ids)  # [B, T, C]
        for i, (block, spec) in enumerate(zip(self.layers, self.layout.layers)):
            h, produced, probs, aux = block(
                h,
                cos,
                sin,
                masks[spec.mask_key],
                kv=kv_store.get(spec.kv_source) if spec.kv_source != i else None,
                probs=probs_store.get(spec.attn_source) if spec.attn_source is not None else None,
                return_probs=on_probs is not None or i in self.prob_sources,
                cache=cache,
            )
            if produced is not None:
                kv_store[i] = produced
            if on_probs is not None:
                on_probs(i, probs if probs is not None else probs_store[spec.attn_source])
            if probs is not None and i in self.prob_sources:
                probs_store[i] = probs
            if aux is not None:
                moe_aux.append(aux)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        logits = F.linear(h, self.output_weight)  # [B, T, V]

        if cache is not None:
            cache.advance(T)
            return ModelOutput(logits=logits, aux={})
        if moe_aux:
            out_aux = {
                "lb_loss": torch.stack([a["lb_loss"] for a in moe_aux]).mean(),
                "z_loss": torch.stack([a["z_loss"] for a in moe_aux]).mean(),
                "expert_counts": torch.stack([a["counts"] for a in moe_aux]),
            }
        else:
            zero = torch.zeros((), device=device)
            out_aux = {"lb_loss": zero, "z_loss": zero.clone()}
        return ModelOutput(logits=logits, aux=out_aux)


def build_model(cfg: ModelConfig, layout: Layout, device: torch.device | str = "meta", seed: Optional[int] = None) -> Transformer:
    """Construct on the meta device (no memory), then, unless ``device`` is 'meta',
    materialise on ``device`` and initialise (RoPE tables included). With 'meta' the
    caller does to_empty(...) and init_weights(...) itself (e.g. after sharding)."""
    with torch.device("meta"):
        model = Transformer(cfg, layout)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    return model
