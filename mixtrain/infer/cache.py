"""A KV cache that owns memory for producer layers only.

One preallocated buffer per *producer* (``accounting.kv_cache_layers``):

- global producer:  K and V ``[B, Hkv, T_max, D]``, token at column c in slot c;
- sliding producer: K and V ``[B, Hkv, min(W, T_max), D]``, a ring buffer, token at
  column c in slot ``c % cap``;
- Shared Attention layer (borrows another layer's probabilities): V only;
- consumer: nothing (it reads its producer's buffers).

So :meth:`KVCache.allocated_bytes` equals
``accounting.kv_bytes_per_sequence(cfg, layout, T_max, dtype_bytes) * B`` exactly.

Columns and ragged batches. Prompts of different lengths are right-aligned (left
padding): every row shares one column timeline ``0 .. length-1``; row b's real tokens
start at column ``pad[b]``. Because the timeline is shared, the column held by each slot
is the same for every row (:meth:`KVCache.slot_columns`), and one mask per
(kind, window) serves all layers: key column j is visible to query column i iff
``j <= i``, ``j > i - W`` (sliding), and ``j >= pad[b]`` (a padding query sees only
itself, so no softmax row is empty). K is cached after RoPE, so the order of the keys
in a ring buffer does not matter: attention is permutation-invariant over keys.

The model's own forward reads the cache (``Transformer.forward(ids, cache=cache)``):
:meth:`KVCache.positions` and :meth:`KVCache.rope_at` give the RoPE rotations of the
next columns (fp32 tables as long as the cache, so positions past ``max_seq_len`` work
and a bf16 model does not rotate with bf16 tables), :meth:`KVCache.masks` one mask per
(kind, window), and each producer calls :meth:`KVCache.append_and_read`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mixtrain.accounting import KVCacheLayer, kv_cache_layers
from mixtrain.model.attention import rope_tables
from mixtrain.model.masks import AttentionMask, MaskKey


class KVCache:
    """Per-producer K/V buffers for ``batch`` sequences of up to ``max_context`` columns.

    Attributes: ``k[i]`` / ``v[i]`` (``k`` has no entry for V-only layers),
    ``capacity[i]`` (slots), ``length`` (columns written, shared by all rows),
    ``pad`` (long [B] on the device) and ``pad_list`` (the same on the host)."""

    def __init__(self, cfg: Any, layout, batch: int, max_context: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if batch < 1 or max_context < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_context >= 1 (got {batch}, {max_context})")
        self.layout = layout
        self.batch, self.max_context = int(batch), int(max_context)
        self.device, self.dtype = torch.device(device), dtype
        self.layers: list[KVCacheLayer] = kv_cache_layers(cfg, layout)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.capacity: dict[int, int] = {}
        H, D = int(cfg.n_kv_heads), int(cfg.head_dim)
        for c in self.layers:
            cap = c.stored_tokens(self.max_context)
            self.capacity[c.index] = cap
            # zeros, not empty: a masked slot must hold finite values (0 * NaN = NaN in P @ V)
            shape = (self.batch, H, cap, D)
            if c.has_k:
                self.k[c.index] = torch.zeros(shape, device=self.device, dtype=dtype)
            self.v[c.index] = torch.zeros(shape, device=self.device, dtype=dtype)
        self.length = 0
        self.set_padding([0] * self.batch)
        # RoPE of every column the cache can hold (or of max_seq_len, if longer), in fp32.
        n_rope = max(self.max_context, int(cfg.max_seq_len))
        self.rope_cos, self.rope_sin = rope_tables(D, n_rope, float(cfg.rope_theta), device=self.device)

    # -- bookkeeping --------------------------------------------------------------------

    def set_padding(self, pad: list[int]) -> None:
        """Left padding of each row (columns before its first real token)."""
        if len(pad) != self.batch:
            raise ValueError(f"padding for {len(pad)} rows, cache has {self.batch}")
        self.pad_list = [int(p) for p in pad]
        self.pad = torch.tensor(self.pad_list, device=self.device, dtype=torch.long)

    def reset(self, pad: Optional[list[int]] = None) -> None:
        """Forget every token (buffers are reused, not cleared: unwritten slots are masked)."""
        self.length = 0
        self.set_padding(pad if pad is not None else [0] * self.batch)

    def allocated_bytes(self) -> int:
        """Bytes of the storage actually allocated for K and V."""
        return sum(t.untyped_storage().nbytes() for d in (self.k, self.v) for t in d.values())

    def producer(self, layer: int) -> int:
        """The layer whose buffers ``layer`` reads."""
        return self.layout.layers[layer].kv_source

    def slot_columns(self, cap: int, length: int) -> Tensor:
        """Column held by each slot of a buffer of ``cap`` slots after ``length`` columns
        were written (slot s holds the latest column c < length with c % cap == s); -1
        for an empty slot. long [cap]."""
        s = torch.arange(cap, device=self.device)
        cols = s + cap * torch.div(length - 1 - s, cap, rounding_mode="floor")
        return torch.where(s < length, cols, torch.full_like(s, -1))

    def _key_columns(self, kind: str, cap: int, L0: int, t: int) -> Tensor:
        """Columns of the keys a query of columns ``L0 .. L0+t-1`` attends over in a
        buffer of ``cap`` slots, in the order :meth:`append_and_read` returns them."""
        L1 = L0 + t
        if kind == "global" or cap == self.max_context:
            return torch.arange(L1, device=self.device)
        if t == 1:
            return self.slot_columns(cap, L1)[:min(L1, cap)]
        return torch.cat([self.slot_columns(cap, L0)[:min(L0, cap)], torch.arange(L0, L1, device=self.device)])

    # -- what a forward over the next t columns needs -------------------------------------

    def positions(self, t: int) -> Tensor:
        """RoPE positions of the next ``t`` columns of every row: column minus the row's
        left padding (0 on padding columns). long [B, t]."""
        cols = torch.arange(self.length, self.length + t, device=self.device)
        return (cols[None, :] - self.pad[:, None]).clamp(min=0)

    def rope_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, t] -> cos, sin [B, 1, t, D/2] (fp32)."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def masks(self, t: int, mask_keys) -> dict[MaskKey, AttentionMask]:
        """One mask per distinct (kind, window) for a forward over the next ``t`` columns
        (all buffers of one key hold the same columns). A decode step with every cached
        key visible (no row padded) needs no mask: ``full``."""
        need_mask = t > 1 or max(self.pad_list) > 0
        q_cols = torch.arange(self.length, self.length + t, device=self.device) if need_mask else None
        out: dict[MaskKey, AttentionMask] = {}
        for key in dict.fromkeys(mask_keys):
            kind, window = key
            if not need_mask:
                out[key] = AttentionMask(kind, window, full=True)
                continue
            cap = self.max_context if kind == "global" or window is None else min(int(window), self.max_context)
            cols = self._key_columns(kind, cap, self.length, t)
            out[key] = AttentionMask(kind, window, dense=key_mask(q_cols, cols, self.pad, window))
        return out

    # -- the one operation each producer layer does ----------------------------------------

    def append_and_read(self, layer: int, k: Optional[Tensor], v: Tensor,
                        want_cols: bool = True) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        """Store the K/V of columns ``length .. length+t-1`` (k, v: [B, Hkv, t, D]; k None
        for a V-only layer) in ``layer``'s buffers and return what a query of these columns
        attends over: (K [B,Hkv,S,D] | None, V [B,Hkv,S,D], key columns long [S], or None
        without ``want_cols``: a decode step that needs no mask skips computing them).

        Global: slices of the buffer (no copy). Sliding, one column: write the slot, then
        read the ring (the evicted column is outside the new query's window). Sliding,
        a chunk: (ring contents, chunk) concatenated *before* the ring is overwritten, so
        every query of the chunk sees its W-1 predecessors; then the chunk's last
        ``cap`` columns go into the ring. ``length`` advances in :meth:`advance`."""
        t = v.shape[2]
        L0 = self.length
        L1 = L0 + t
        if L1 > self.max_context:
            raise ValueError(f"the KV cache holds {self.max_context} columns; cannot append {t} more "
                             f"after {L0} (allocate a larger max_context)")
        cap = self.capacity[layer]
        kbuf, vbuf = self.k.get(layer), self.v[layer]
        spec = self.layout.layers[layer]
        cols = self._key_columns(spec.kind, cap, L0, t) if want_cols else None
        if spec.kind == "global" or cap == self.max_context:
            # global, or a sliding buffer that never wraps: column c lives in slot c
            if kbuf is not None:
                kbuf[:, :, L0:L1] = k
            vbuf[:, :, L0:L1] = v
            return (kbuf[:, :, :L1] if kbuf is not None else None), vbuf[:, :, :L1], cols
        if t == 1:
            slot = L0 % cap
            if kbuf is not None:
                kbuf[:, :, slot:slot + 1] = k
            vbuf[:, :, slot:slot + 1] = v
            S = min(L1, cap)
            return (kbuf[:, :, :S] if kbuf is not None else None), vbuf[:, :, :S], cols
        S0 = min(L0, cap)
        new_cols = torch.arange(L0, L1, device=self.device)
        K = torch.cat([kbuf[:, :, :S0], k], dim=2) if kbuf is not None else None
        V = torch.cat([vbuf[:, :, :S0], v], dim=2)
        n = min(t, cap)
        slots = new_cols[-n:] % cap
        if kbuf is not None:
            kbuf.index_copy_(2, slots, k[:, :, -n:])
        vbuf.index_copy_(2, slots, v[:, :, -n:])
        return K, V, cols

    def advance(self, t: int) -> None:
        self.length += int(t)

    def fill_synthetic(self, length: int) -> None:
        """Pretend ``length`` columns were written (benchmarks: decode time does not depend
        on the cached values)."""
        if length > self.max_context:
            raise ValueError(f"cannot fill {length} columns into a cache of {self.max_context}")
        self.length = int(length)

    def __repr__(self) -> str:
        n_g = sum(1 for c in self.layers if c.kind == "global")
        return (f"KVCache(batch={self.batch}, max_context={self.max_context}, buffers: {n_g} global + "
                f"{len(self.layers) - n_g} sliding, {self.allocated_bytes():,} bytes, length={self.length})")


def key_mask(q_cols: Tensor, k_cols: Tensor, pad: Tensor, window: Optional[int]) -> Tensor:
    """bool [B, 1, t, S]: query column q_cols[i] may attend key column k_cols[j] of row b.

    k_cols -1 marks an empty slot. Row b's padding columns (< pad[b]) are hidden from
    every query except themselves (a padding query then attends only to itself, so its
    softmax row is never empty and nothing NaN enters the cache)."""
    qc, kc = q_cols[:, None], k_cols[None, :]  # [t,1], [1,S]
    ok = (kc >= 0) & (kc <= qc)
    if window is not None:
        ok = ok & (kc > qc - window)
    real = kc[None] >= pad[:, None, None]  # [B,1,S]
    own = (kc == qc)[None]  # [1,t,S]
    return (ok[None] & (real | own))[:, None]  # [B,1,t,S]
