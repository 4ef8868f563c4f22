"""Batched generation over a :class:`~mixtrain.infer.cache.KVCache`.

    engine = Engine(model, prefill_chunk=256)
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                          stop_tokens=[0], seed=1)                    # list of new-token lists

or lower level (what the tests and the benchmark use):

    cache = engine.start(prompts, max_context)   # allocate, left-pad, chunked prefill
    logits = engine.last_logits                  # [B, V] at each row's last prompt token
    logits = engine.step(next_tokens)            # one decode step, [B] -> [B, V]

One forward (:meth:`Engine.forward`) extends the cache by t columns (t = a prefill
chunk, or 1 at decode). Per layer, in depth order:

    x, x_kv = block.attn_inputs(h); q, k, v = attn.project(x, rope at each row's positions, x_kv)
    producer:  K, V, cols = cache.append_and_read(i, k, v)     (remembered for consumers)
    consumer:  K, V, cols = what its producer returned this forward
    attention: SDPA over (K, V) with the (kind, window) mask; a layer whose probabilities
               a Shared Attention layer borrows computes them explicitly, and the
               borrowing layer multiplies them by its own V (same slot order: same kind,
               window and therefore capacity)
    h = h + wo(...); h = h + mlp(mlp_norm(h))   (MoE: the model's own forward on [B, t, C])

Decode (t = 1) with grouped-query attention folds the query heads of one KV head into
the query-length axis (q [B, Hkv, n_rep, D]), so the kernel reads each KV head once and
needs no GQA support, and no mask at all when every cached key is visible (equal-length
rows): the fast kernels apply on GPU.

RoPE: the engine keeps its own fp32 tables (same function as the model's), long enough
for the cache, so positions past ``model.max_seq_len`` work and a bf16 model does not
rotate with bf16 tables.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtrain.infer.cache import KVCache, key_mask
from mixtrain.model.attention import apply_probs, explicit_attention, rope_tables

__all__ = ["Engine", "generate", "sample"]


# ----------------------------------------------------------------------------- sampling


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [B, V] -> token ids long [B].

    temperature <= 0: greedy (argmax). Otherwise softmax(logits / temperature), restricted
    to the smallest set of most likely tokens whose probability reaches ``top_p``
    (nucleus; the most likely token is always kept), renormalised, sampled with
    ``generator``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True, stable=True)
        before = sp.cumsum(dim=-1) - sp  # probability mass of the more likely tokens
        sp = torch.where(before < top_p, sp, torch.zeros_like(sp))
        sp[..., 0] = torch.where(sp[..., 0] > 0, sp[..., 0], torch.ones_like(sp[..., 0]))
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- attention


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """q [B,Hq,t,D] over k/v [B,Hkv,S,D], mask bool [B|1,1,t,S] or None -> [B,Hq,t,D]."""
    B, Hq, t, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    if t == 1 and rep > 1:
        # decode: fold the rep query heads of a KV head into the query axis
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, rep, D), k, v, attn_mask=mask)
        return y.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)


# ----------------------------------------------------------------------------- engine


class Engine:
    """Holds a model and its KV cache; prefill and decode for a batch of prompts."""

    def __init__(self, model, prefill_chunk: int = 512, pad_id: int = 0):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
        self.model = model.eval()
        self.cfg, self.layout = model.cfg, model.layout
        self.prefill_chunk = int(prefill_chunk)
        self.pad_id = int(pad_id)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.prob_sources = {s.attn_source for s in self.layout.layers if s.attn_source is not None}
        self.cache: Optional[KVCache] = None
        self.last_logits: Optional[Tensor] = None
        self._cos = self._sin = None

    # -- setup --------------------------------------------------------------------------

    def new_cache(self, batch: int, max_context: int) -> KVCache:
        """Allocate (and keep) a cache for ``batch`` rows of ``max_context`` columns."""
        self.cache = None  # free the old buffers first
        self.cache = KVCache(self.cfg, self.layout, batch, max_context, self.device, self.dtype)
        self._ensure_rope(max_context)
        return self.cache

    def _ensure_rope(self, n: int) -> None:
        if self._cos is None or self._cos.shape[0] < n:
            n = max(n, int(self.cfg.max_seq_len))
            self._cos, self._sin = rope_tables(int(self.cfg.head_dim), n, float(self.cfg.rope_theta), device=self.device)

    # -- the core -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: Tensor, all_logits: bool = False) -> Tensor:
        """Extend the cache by ids [B, t] (the next t columns of every row).
        Returns logits [B, t, V] with ``all_logits``, else [B, V] of the last column."""
        cache = self.cache
        if cache is None:
            raise RuntimeError("no cache: call start() or new_cache() first")
        B, t = ids.shape
        if B != cache.batch:
            raise ValueError(f"{B} rows for a cache of {cache.batch}")
        model = self.model
        L0 = cache.length
        q_cols = torch.arange(L0, L0 + t, device=self.device)
        positions = (q_cols[None, :] - cache.pad[:, None]).clamp(min=0)  # [B, t]
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [B,1,t,D/2]
        # decode with every cached key visible needs no mask (see module doc)
        need_mask = t > 1 or max(cache.pad_list) > 0

        reads: dict[int, tuple] = {}  # producer -> (K, V)
        masks: dict[tuple, Optional[Tensor]] = {}  # (kind, window) -> mask
        probs_store: dict[int, Tensor] = {}
        h = model.tok_embeddings(ids)  # [B, t, C]
        for i, (block, spec) in enumerate(zip(model.layers, self.layout.layers)):
            attn = block.attn
            x_q, x_kv = block.attn_inputs(h)
            q, k, v = attn.project(x_q, cos, sin, x_kv)
            if attn.role == "consumer":
                K, V = reads[spec.kv_source]
            else:
                K, V, cols = cache.append_and_read(i, k, v, want_cols=need_mask)
                reads[i] = (K, V)
                if spec.mask_key not in masks:
                    masks[spec.mask_key] = key_mask(q_cols, cols, cache.pad, spec.window) if need_mask else None
            mask = masks[spec.mask_key]
            if attn.role == "shared":
                y = apply_probs(probs_store[spec.attn_source], V)
            elif i in self.prob_sources:
                m = mask if mask is not None else torch.ones(1, 1, t, K.shape[2], dtype=torch.bool, device=self.device)
                y, probs_store[i] = explicit_attention(q, K, V, m)
            else:
                y = _attend(q, K, V, mask)
            h = h + attn.merge_heads(y)
            x = block.mlp_norm(h)
            h = h + (block.mlp(x)[0] if block.is_moe else block.mlp(x))
        cache.advance(t)
        if not all_logits:
            h = h[:, -1]
        return F.linear(model.norm(h), model.output_weight)

    # -- prefill and decode -------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], max_context: Optional[int] = None,
              all_logits: bool = False) -> Optional[Tensor]:
        """Allocate a cache for the prompts (unless the current one has the same batch and
        max_context), right-align them, and prefill in chunks of ``prefill_chunk``.
        Sets ``last_logits`` [B, V]; returns logits [B, P, V] over the padded columns when
        ``all_logits`` (row b's prompt is columns ``pad[b]..P-1``), else None."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, P = len(prompts), max(len(p) for p in prompts)
        max_context = max_context or P
        if max_context < P:
            raise ValueError(f"max_context={max_context} is shorter than the longest prompt ({P} tokens)")
        if self.cache is None or self.cache.batch != B or self.cache.max_context != max_context:
            self.new_cache(B, max_context)
        pad = [P - len(p) for p in prompts]
        self.cache.reset(pad)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, pad[b]:] = torch.as_tensor(list(p), dtype=torch.long)
        ids = ids.to(self.device)
        outs = []
        for s in range(0, P, self.prefill_chunk):
            out = self.forward(ids[:, s:s + self.prefill_chunk], all_logits=all_logits)
            if all_logits:
                outs.append(out)
        self.last_logits = outs[-1][:, -1] if all_logits else out
        return torch.cat(outs, dim=1) if all_logits else None

    def step(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """One decode step: the next token of every row (long [B]) -> logits [B, V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1, 1)
        self.last_logits = self.forward(tokens)
        return self.last_logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
                 max_context: Optional[int] = None) -> list[list[int]]:
        """New tokens for each prompt (a stop token ends its row and is included)."""
        if max_new_tokens < 1:
            return [[] for _ in prompts]
        P = max(len(p) for p in prompts)
        self.start(prompts, max_context or P + max_new_tokens)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if seed is None else int(seed))
        stop = set(int(s) for s in stop_tokens)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self.last_logits
        for n in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, gen)
            for b, x in enumerate(tok.tolist()):
                if not done[b]:
                    out[b].append(x)
                    done[b] = x in stop
            if all(done) or n == max_new_tokens - 1:
                break
            logits = self.step(tok)
        return out


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """One-call generation: new tokens for each prompt (lists of ids)."""
    return Engine(model, prefill_chunk=prefill_chunk).generate(
        prompts, max_new_tokens, temperature=temperature, top_p=top_p, stop_tokens=stop_tokens, seed=seed)
