# Copied into every Hugging Face export of a mixtrain model whose layout no stock
# transformers class expresses (trust_remote_code=True). Self-contained: it needs
# transformers and torch only, never mixtrain.
"""A mixtrain decoder for transformers: per-layer global / sliding attention, cross-layer
KV sharing, Shared Attention and Cross-Layer Attention's KV-path norm (see
``configuration_mixtrain.py`` for the layout fields).

Memory: :class:`MixtrainCache` (what ``generate()`` uses) keeps K/V for *producer* layers
only. A consumer layer attends over its producer's K/V of the same forward and caches
nothing; a sliding producer keeps only its last W tokens; a Shared Attention layer keeps
V only. So the cache of a MixAttention layout is as small as its layout says:
``sum over producers of min(W, T) (or T) x (2, or 1 for V only) x n_kv_heads x head_dim
x bytes``.

Conventions (same as mixtrain): K is cached after RoPE; RoPE rotates halves, with its
angles computed in fp32; a layer whose probabilities a later layer borrows computes them
explicitly (softmax in fp32, returned in the activation dtype); other layers use
``F.scaled_dot_product_attention``.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_mixtrain import MixtrainConfig

# ----------------------------------------------------------------------------- cache


class MixtrainCacheLayer:
    """The cache of one producer layer: K and V ``[B, Hkv, S, D]`` (V only for a Shared
    Attention layer), S = tokens seen (global) or at most ``window`` (sliding)."""

    is_compileable = False

    def __init__(self, index: int, window: Optional[int], has_k: bool):
        self.index, self.window, self.has_k = index, window, has_k
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.is_sliding = window is not None

    @property
    def is_initialized(self) -> bool:
        return self.values is not None

    def update(self, k: Optional[torch.Tensor], v: torch.Tensor):
        """Append this forward's k/v [B, Hkv, t, D] and return what its queries attend
        over: every cached token (global), or the last W - 1 cached tokens plus the new
        ones (sliding: the first new query sees its W - 1 predecessors, nothing older).
        A sliding layer then keeps its last W tokens (as mixtrain's engine and its
        accounting do)."""
        old_k, old_v = self.keys, self.values
        if self.window is not None and old_v is not None:
            start = max(old_v.shape[2] - (self.window - 1), 0)
            old_v = old_v[:, :, start:]
            old_k = old_k[:, :, start:] if old_k is not None else None
        K = k if old_k is None or k is None else torch.cat([old_k, k], dim=2)
        V = v if old_v is None else torch.cat([old_v, v], dim=2)
        keep_k, keep_v = K, V
        if self.window is not None and V.shape[2] > self.window:
            # clone: a view would keep the whole concatenation alive
            keep_v = V[:, :, -self.window:].clone()
            keep_k = K[:, :, -self.window:].clone() if K is not None else None
        self.keys, self.values = (keep_k if self.has_k else None), keep_v
        return K, V

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.keys, self.values) if t is not None)

    def _apply(self, fn) -> None:
        if self.keys is not None:
            self.keys = fn(self.keys)
        if self.values is not None:
            self.values = fn(self.values)

    def reset(self) -> None:
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))


class MixtrainCache(Cache):
    """Producer layers only (``layers`` holds one :class:`MixtrainCacheLayer` per
    producer, in depth order; ``layer_of[i]`` is the entry layer i reads or writes)."""

    def __init__(self, config: MixtrainConfig):
        layers = []
        self.layer_of: dict[int, MixtrainCacheLayer] = {}
        for i in range(config.num_hidden_layers):
            if config.kv_sources[i] == i:
                entry = MixtrainCacheLayer(i, config.sliding_windows[i], config.attn_sources[i] is None)
                layers.append(entry)
                self.layer_of[i] = entry
        for i in range(config.num_hidden_layers):
            self.layer_of.setdefault(i, self.layer_of[config.kv_sources[i]])
        try:
            super().__init__(layers=layers)
        except TypeError:  # a transformers version whose Cache takes no layers
            super().__init__()
        self.layers = layers
        self.seen_tokens = 0  # columns written (every row shares one timeline)

    # -- what the model uses ------------------------------------------------------------

    def update_layer(self, layer_idx: int, k: Optional[torch.Tensor], v: torch.Tensor):
        return self.layer_of[layer_idx].update(k, v)

    def allocated_bytes(self) -> int:
        """Bytes of the K/V tensors held (the storage, not just the visible views)."""
        return sum(layer.nbytes() for layer in self.layers)

    # -- the Cache interface generate() relies on ---------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.update_layer(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    get_max_cache_shape = get_max_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        n = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.seen_tokens + n, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return all(layer.window is None for layer in self.layers)

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers) and all(layer.is_initialized for layer in self.layers)

    @property
    def is_sliding(self) -> list:
        return [layer.is_sliding for layer in self.layers]

    @property
    def is_linear(self) -> list:
        return [False for _ in self.layers]

    @property
    def batch_size(self) -> int:
        return next((layer.values.shape[0] for layer in self.layers if layer.values is not None), 0)

    def activate_past_recording(self) -> None:  # nothing to record: rolling back is refused instead
        pass

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return False

    def prefetch(self, *args, **kwargs) -> None:
        pass

    def offload(self, *args, **kwargs) -> None:
        pass

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int):
        layer = self.layers[idx]
        return layer.keys, layer.values

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``tokens_to_remove`` tokens (global caches only: a sliding
        cache no longer holds what would come back into its window)."""
        if tokens_to_remove <= 0:
            return
        if not self.is_croppable:
            raise NotImplementedError("a sliding-window cache cannot be rolled back (its older tokens are gone)")
        keep = max(self.seen_tokens - tokens_to_remove, 0)
        for layer in self.layers:
            layer._apply(lambda t: t[:, :, :keep].clone())
        self.seen_tokens = keep

    def to_legacy_cache(self):
        return tuple((layer.keys, layer.values) for layer in self.layers)

    def __repr__(self) -> str:
        return (f"MixtrainCache({len(self.layers)} producer layers, {self.seen_tokens} tokens seen, "
                f"{self.allocated_bytes():,} bytes)")


# ----------------------------------------------------------------------------- pieces


def rope(positions: torch.Tensor, head_dim: int, theta: float):
    """positions long [B, t] -> cos, sin [B, 1, t, D/2] in fp32 (mixtrain's tables)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos()[:, None], freqs.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves; in fp32, returned in x.dtype. x [B, H, t, D]."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]; query head h reads KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def key_mask(q_cols, k_cols, window, padding):
    """bool [B|1, 1, t, S]: query column q may see key column k (k <= q, within the
    window, not padding). A padding query sees itself, so no softmax row is empty."""
    qc, kc = q_cols[:, None], k_cols[None, :]
    ok = kc <= qc
    if window is not None:
        ok = ok & (kc > qc - window)
    if padding is None:
        return ok[None, None]
    real = padding[:, k_cols].bool()[:, None, :]  # [B, 1, S]
    return (ok[None] & (real | (kc == qc)[None]))[:, None]


class MixtrainMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtrainSparseMoeBlock(nn.Module):
    """Dropless top-k mixture: softmax over the router logits (fp32), top-k, renormalised
    when ``norm_topk_prob``; returns (output, router logits [N, E])."""

    def __init__(self, config: MixtrainConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MixtrainMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts))

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        logits = self.gate(flat)
        probs = logits.float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y.to(flat.dtype))
        return out.view(B, T, C), logits


class MixtrainAttention(nn.Module):
    """Producer (q, k, v, o), consumer (q, o: reads its producer's K/V) or shared
    (v, o: borrows an earlier layer's probabilities)."""

    def __init__(self, config: MixtrainConfig, index: int):
        super().__init__()
        self.index = index
        self.window = config.sliding_windows[index]
        self.kv_source, self.attn_source = config.kv_sources[index], config.attn_sources[index]
        self.role = "shared" if self.attn_source is not None else ("producer" if self.kv_source == index else "consumer")
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        C, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.role != "shared":
            self.q_proj = nn.Linear(C, q_dim, bias=False)
        if self.role == "producer":
            self.k_proj = nn.Linear(C, kv_dim, bias=False)
        if self.role != "consumer":
            self.v_proj = nn.Linear(C, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, C, bias=False)

    def heads(self, x, n):
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)


class MixtrainDecoderLayer(nn.Module):
    def __init__(self, config: MixtrainConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MixtrainAttention(config, index)
        if config.kv_norm and self.self_attn.role != "consumer":
            self.kv_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.kv_layernorm = None
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = config.num_experts > 0
        self.mlp = MixtrainSparseMoeBlock(config) if self.is_moe else MixtrainMLP(config.hidden_size, config.intermediate_size)


# ----------------------------------------------------------------------------- models


class MixtrainPreTrainedModel(PreTrainedModel):
    config_class = MixtrainConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MixtrainDecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache (one entry per layer): the model makes
        # its own MixtrainCache (producers only) on the first forward.
        return False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.RMSNorm):
            module.weight.data.fill_(1.0)


class MixtrainModel(MixtrainPreTrainedModel):
    def __init__(self, config: MixtrainConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MixtrainDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.prob_sources = {s for s in config.attn_sources if s is not None}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, t, _ = h.shape
        device = h.device

        cache = past_key_values
        if cache is not None and not isinstance(cache, MixtrainCache):
            if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
                cache = None  # an empty generic cache handed in by generate(): use ours
            else:
                raise ValueError("this model's layout needs its own MixtrainCache (producer layers only); "
                                 f"got a filled {type(cache).__name__}")
        if cache is None and use_cache:
            cache = MixtrainCache(config)
        L0 = cache.seen_tokens if cache is not None else 0
        L1 = L0 + t
        q_cols = torch.arange(L0, L1, device=device)
        if position_ids is None:
            position_ids = q_cols[None].expand(B, t)
        cos, sin = rope(position_ids, config.head_dim, config.rope_theta)

        padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("this model takes a 2D padding mask [batch, columns] (1 = token, 0 = padding)")
            if attention_mask.shape[1] == t and L0 > 0:
                raise ValueError(f"attention_mask covers {t} columns but the cache already holds {L0}: "
                                 f"pass the mask of all {L1} columns")
            if attention_mask.shape[1] != L1:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, expected {L1}")
            if not bool(attention_mask.all()):
                padding = attention_mask.to(device)

        reads = {}  # producer -> (K, V) of this forward
        masks = {}  # (window, S) -> bool mask or None (every key visible)
        probs_store = {}
        all_hidden = [] if output_hidden_states else None
        router_logits = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(h)
            attn = layer.self_attn
            x_q = layer.input_layernorm(h)
            x_kv = layer.kv_layernorm(h) if layer.kv_layernorm is not None else x_q
            q = k = v = None
            if attn.role != "shared":
                q = apply_rope(attn.heads(attn.q_proj(x_q), attn.n_heads), cos, sin)
            if attn.role == "producer":
                k = apply_rope(attn.heads(attn.k_proj(x_kv), attn.n_kv_heads), cos, sin)
            if attn.role != "consumer":
                v = attn.heads(attn.v_proj(x_kv), attn.n_kv_heads)
            if attn.role == "consumer":
                K, V = (x.to(q.device) for x in reads[attn.kv_source])  # device_map may split layers
            else:
                K, V = cache.update_layer(i, k, v) if cache is not None else (k, v)
                reads[i] = (K, V)
            S = V.shape[2]
            key = (attn.window, S)
            if key not in masks:
                # keys are the last S columns, in order (global: all; sliding: the kept window + new)
                if padding is None and t == 1 and (attn.window is None or S <= attn.window):
                    masks[key] = None  # one query that sees every key
                elif padding is None and S == t and (attn.window is None or attn.window >= t):
                    masks[key] = "causal"
                else:
                    masks[key] = key_mask(q_cols, torch.arange(L1 - S, L1, device=device), attn.window, padding)
            mask = masks[key]
            if isinstance(mask, torch.Tensor) and mask.device != V.device:
                mask = mask.to(V.device)
            rep = attn.n_heads // attn.n_kv_heads
            if attn.role == "shared":
                probs = probs_store[attn.attn_source].to(V.device)
                y = probs @ repeat_kv(V, rep).to(probs.dtype)
            elif i in self.prob_sources:
                if mask is None or isinstance(mask, str):
                    mask = key_mask(q_cols, torch.arange(L1 - S, L1, device=device), attn.window, None)
                Kr, Vr = repeat_kv(K, rep), repeat_kv(V, rep)
                scores = (q.float() @ Kr.float().transpose(-2, -1)) / (attn.head_dim ** 0.5)
                probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
                probs_store[i] = probs
                y = probs @ Vr
            elif isinstance(mask, str):
                y = F.scaled_dot_product_attention(q, repeat_kv(K, rep), repeat_kv(V, rep), is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, repeat_kv(K, rep), repeat_kv(V, rep), attn_mask=mask)
            h = h + attn.o_proj(y.transpose(1, 2).reshape(B, t, attn.n_heads * attn.head_dim))
            x = layer.post_attention_layernorm(h)
            if layer.is_moe:
                m, logits = layer.mlp(x)
                router_logits.append(logits)
            else:
                m = layer.mlp(x)
            h = h + m
        if cache is not None:
            cache.seen_tokens = L1
        h = self.norm(h)
        if output_hidden_states:
            all_hidden.append(h)
        return MoeModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=tuple(router_logits) if router_logits else None,
        )


def router_losses(router_logits, top_k: int):
    """mixtrain's auxiliary losses, each the mean over MoE layers of the per-layer value:
    load balance E * sum_e f_e * P_e (f_e: share of the N*k assignments routed to e, P_e:
    mean router probability of e) and z-loss mean(logsumexp(logits)^2)."""
    lb, z = [], []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        E = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        counts = torch.zeros(E, device=probs.device).scatter_add(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device))
        lb.append(E * (counts / counts.sum().clamp(min=1) * probs.mean(dim=0)).sum())
        z.append(torch.logsumexp(logits.float(), dim=-1).square().mean())
    return torch.stack(lb).mean(), torch.stack(z).mean()


class MixtrainForCausalLM(MixtrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixtrainConfig):
        super().__init__(config)
        self.model = MixtrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Causal LM forward. ``labels`` [B, T] (-100 = ignore) give the next-token
        cross-entropy; with MoE and ``output_router_logits`` the loss adds
        ``router_aux_loss_coef * load balance + router_z_loss_coef * z-loss`` (mixtrain's
        definitions, averaged per MoE layer)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = aux_loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100)
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if want_router and out.router_logits:
            lb, z = router_losses(out.router_logits, self.config.num_experts_per_tok)
            aux_loss = self.config.router_aux_loss_coef * lb + self.config.router_z_loss_coef * z
            if loss is not None:
                loss = loss + aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            router_logits=out.router_logits if want_router else None,
        )


__all__ = ["MixtrainCache", "MixtrainForCausalLM", "MixtrainModel", "MixtrainPreTrainedModel"]
