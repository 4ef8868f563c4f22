"""Typed configuration schemas.

Every Hydra config group under ``recipes/`` has a dataclass here, registered with
Hydra's ConfigStore, so a misspelt key or a value of the wrong type fails when the
recipe is composed, with a message that names the key.

The groups mirror the code's concepts:

- ``model``  -> :class:`ModelConfig` (with :class:`MoEConfig`) -> ``mixtrain.model``
- ``layout`` -> :class:`LayoutConfig` -> ``mixtrain.layouts``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class MoEConfig:
    """Dropless token-choice top-k mixture of SwiGLU experts (replaces the dense MLP)."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    # Renormalise the top-k softmax weights so they sum to 1 per token.
    renormalize: bool = False
    # "native": stacked expert weights (torch._grouped_mm on CUDA, per-expert loop on CPU);
    # "megablocks": megablocks dMoE (optional extra, CUDA only).
    impl: str = "native"
    # Loss weights applied by the trainer to the auxiliary losses the layers return.
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001


@dataclass
class ModelConfig:
    """A decoder-only transformer. The layout (which layers are sliding, which share
    KV) is a separate config group; ``sliding_window`` is the default window that
    layout presets use when the layout does not set one."""

    name: str = "tiny"
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden: int = 192  # SwiGLU hidden size of the dense MLP (ignored with moe)
    moe: Optional[MoEConfig] = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    sliding_window: int = 32
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # "auto": FlexAttention on CUDA, SDPA with an explicit mask elsewhere.
    attn_impl: str = "auto"


@dataclass
class LayoutConfig:
    """Which layers are global or sliding and which share KV caches.

    Exactly one way of describing the layout is used:

    - ``preset``: a named layout (``standard``, ``ma_offset``, ``cla2``, ...);
    - ``layers``: an explicit per-layer list;
    - ``blocks``: repeated blocks of layers;
    - ``foundry``: an llm-foundry ``block_overrides`` mapping to import.

    ``window`` is the sliding window W (keys seen, itself included); null takes the
    model's ``sliding_window``. ``shared_attention`` maps a layer index to the earlier
    layer whose attention probabilities it reuses.
    """

    preset: Optional[str] = "standard"
    window: Optional[int] = None
    layers: Optional[list[Any]] = None
    blocks: Optional[list[Any]] = None
    foundry: Optional[dict[str, Any]] = None
    # Preset parameters: "every" for interleaved local/global (every k-th layer global).
    every: Optional[int] = None
    shared_attention: Optional[dict[Any, Any]] = None
