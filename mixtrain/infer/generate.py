"""Batched generation over a :class:`~mixtrain.infer.cache.KVCache`.

    engine = Engine(model, prefill_chunk=256)
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                          stop_tokens=[0], seed=1)                    # list of new-token lists

or lower level (what the tests and the benchmark use):

    cache = engine.start(prompts, max_context)   # allocate, left-pad, chunked prefill
    logits = engine.last_logits                  # [B, V] at each row's last prompt token
    logits = engine.step(next_tokens)            # one decode step, [B] -> [B, V]

The engine holds no model code: one forward (:meth:`Engine.forward`) is the model's own
forward over the cache, ``model(ids, cache=cache)``, which extends the cache by t
columns (t = a prefill chunk, or 1 at decode): positions, RoPE and masks come from the
cache, every producer layer appends its K/V and attends over what the cache returns
(see :mod:`mixtrain.model.transformer`). The engine manages the cache (allocation,
left padding of ragged prompts, chunked prefill), the decode loop and sampling.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from mixtrain.infer.cache import KVCache
from mixtrain.model.attention import sdpa_attention as _attend  # noqa: F401  (the attention kernel of a decode step; bench infer times it)

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
        self.prob_sources = set(model.prob_sources)  # layers whose probabilities a later layer borrows
        self.cache: Optional[KVCache] = None
        self.last_logits: Optional[Tensor] = None

    # -- setup --------------------------------------------------------------------------

    def new_cache(self, batch: int, max_context: int) -> KVCache:
        """Allocate (and keep) a cache for ``batch`` rows of ``max_context`` columns."""
        self.cache = None  # free the old buffers first
        self.cache = KVCache(self.cfg, self.layout, batch, max_context, self.device, self.dtype)
        return self.cache

    # -- the core -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: Tensor, all_logits: bool = False) -> Tensor:
        """Extend the cache by ids [B, t] (the next t columns of every row) with the
        model's own forward. Returns logits [B, t, V] with ``all_logits``, else [B, V] of
        the last column."""
        cache = self.cache
        if cache is None:
            raise RuntimeError("no cache: call start() or new_cache() first")
        if ids.shape[0] != cache.batch:
            raise ValueError(f"{ids.shape[0]} rows for a cache of {cache.batch}")
        logits = self.model(ids, cache=cache, last_only=not all_logits).logits
        return logits if all_logits else logits[:, -1]

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
