"""Attention masks: causal (global), sliding window, and document masking.

One mask is built per forward for each distinct ``(kind, window)`` of the layout
(``Layout.mask_keys``), never per layer. Every layer with that mask key reuses it.

Conventions (layouts.md):

- query i attends key j iff ``j <= i`` (causal) and, for a sliding layer with window
  W, ``i - W < j`` (W keys seen, itself included);
- with ``doc_ids`` [B, T], additionally ``doc_ids[b, i] == doc_ids[b, j]``.

Indices are positions *in the sequence* (0..T-1), not RoPE positions.

Two representations of the same mask:

- dense boolean ``[B or 1, 1, T, T]`` (True = attend) for SDPA and the explicit
  softmax path (Shared Attention sources);
- FlexAttention ``BlockMask`` built from a ``mask_mod``. Without ``doc_ids`` it only
  depends on (kind, window, T, device) and is cached across forwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

MaskKey = tuple[str, Optional[int]]


def _check_key(kind: str, window: Optional[int]) -> None:
    if kind == "global":
        return
    if kind != "sliding":
        raise ValueError(f"unknown attention kind {kind!r}: expected 'global' or 'sliding'")
    if window is None or window < 1:
        raise ValueError(f"a sliding layer needs a window W >= 1 (got {window!r})")


# ----------------------------------------------------------------------------- dense


def dense_mask(
    kind: str,
    window: Optional[int],
    T: int,
    device: torch.device | str,
    doc_ids: Optional[Tensor] = None,
) -> Tensor:
    """Boolean mask, True where query i may attend key j.

    Returns [1, 1, T, T] without doc_ids, [B, 1, T, T] with doc_ids [B, T].
    """
    _check_key(kind, window)
    i = torch.arange(T, device=device)[:, None]  # [T, 1] query index
    j = torch.arange(T, device=device)[None, :]  # [1, T] key index
    mask = j <= i  # [T, T]
    if kind == "sliding":
        mask = mask & (j > i - window)
    mask = mask[None, None]  # [1, 1, T, T]
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        mask = mask & same_doc[:, None]  # [B, 1, T, T]
    return mask


# ----------------------------------------------------------------------------- flex


def mask_mod_for(kind: str, window: Optional[int], doc_ids: Optional[Tensor] = None) -> Callable:
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) -> bool with the same meaning as dense_mask."""
    _check_key(kind, window)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    base = causal if kind == "global" else sliding
    if doc_ids is None:
        return base

    def document(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return document


def _create_block_mask(mask_mod: Callable, B: Optional[int], T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, None, T, T, device=str(device))


@functools.lru_cache(maxsize=64)
def _cached_block_mask(kind: str, window: Optional[int], T: int, device: str):
    return _create_block_mask(mask_mod_for(kind, window), None, T, torch.device(device))


def block_mask(
    kind: str,
    window: Optional[int],
    T: int,
    device: torch.device | str,
    doc_ids: Optional[Tensor] = None,
):
    """FlexAttention BlockMask; cached across forwards (keyed by kind, window, T, device)
    when there are no doc_ids, rebuilt every call otherwise."""
    if doc_ids is None:
        return _cached_block_mask(kind, window, T, str(torch.device(device)))
    B = doc_ids.shape[0]
    return _create_block_mask(mask_mod_for(kind, window, doc_ids), B, T, torch.device(device))


# ----------------------------------------------------------------------------- per forward


@dataclass
class AttentionMask:
    """One mask in the representations the layers need.

    dense: bool [B or 1, 1, T, T] or None (needed by SDPA and by explicit-softmax layers).
    block: FlexAttention BlockMask or None (needed by the flex kernel).
    """

    kind: str
    window: Optional[int]
    dense: Optional[Tensor] = None
    block: Any = None
    # Plain causal attention (global, no documents): SDPA's is_causal path, which takes
    # the flash kernel on GPU (faster than FlexAttention for full causal) and builds no mask.
    causal: bool = False
    # Every key visible to every query (a decode step over a KV cache without padding):
    # no mask at all.
    full: bool = False


def build_masks(
    mask_keys: Iterable[MaskKey],
    T: int,
    device: torch.device | str,
    impl: str,
    doc_ids: Optional[Tensor] = None,
    dense_keys: Iterable[MaskKey] = (),
) -> dict[MaskKey, AttentionMask]:
    """Build every distinct mask of a forward once.

    impl: resolved kernel, 'sdpa' or 'flex'. 'sdpa' builds dense masks; 'flex' builds
    block masks, plus dense masks for the keys in ``dense_keys`` (layers that compute
    their probabilities explicitly for Shared Attention).
    """
    dense_keys = set(dense_keys)
    masks: dict[MaskKey, AttentionMask] = {}
    for key in dict.fromkeys(mask_keys):
        kind, window = key
        m = AttentionMask(kind, window)
        # Plain causal attention: global layers, and sliding layers whose window covers
        # the whole sequence (T <= W: the window cuts nothing).
        plain_causal = kind == "global" or (window is not None and T <= window)
        if plain_causal and doc_ids is None and key not in dense_keys:
            m.causal = True
            masks[key] = m
            continue
        if impl == "sdpa" or key in dense_keys:
            m.dense = dense_mask(kind, window, T, device, doc_ids)
        if impl == "flex":
            m.block = block_mask(kind, window, T, device, doc_ids)
        masks[key] = m
    return masks


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """RoPE positions that restart at 0 at every document boundary: [B, T] -> [B, T].

    Optional: RoPE is relative, so with document masking the attention scores are the
    same whether positions restart or not (up to rounding)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx))
    start_idx = torch.cummax(start_idx, dim=1).values  # index where each token's doc starts
    return idx - start_idx
