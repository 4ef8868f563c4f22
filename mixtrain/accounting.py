"""Analytic accounting: parameters, FLOPs per token and KV-cache bytes.

Everything here is a pure function of a :class:`~mixtrain.config.ModelConfig` and a
:class:`~mixtrain.layouts.Layout`; no torch module is built. The model in
``mixtrain.model`` must agree with :func:`param_counts` exactly (a test checks it),
MFU uses :func:`train_flops_per_token` and :func:`peak_flops`, and the inference
cache must allocate what :func:`kv_bytes_per_sequence` says.

Which projections a layer owns (``docs/layouts.md``):

- a KV *producer* (``kv_source == index``) has ``wq, wk, wv, wo``;
- a KV *consumer* (``kv_source != index``) has ``wq, wo`` only and caches nothing;
- a Shared Attention layer (``attn_source`` set) reuses another layer's
  post-softmax probabilities: no ``wq``/``wk``, no QK product, keeps its own
  ``wv`` (and so a V-only cache) and ``wo``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

from .config import ModelConfig
from .layouts import LayerSpec, Layout

__all__ = [
    "ParamCounts",
    "KVCacheLayer",
    "layer_projections",
    "param_counts",
    "mean_keys_per_query",
    "attention_flops_per_token",
    "train_flops_per_token",
    "forward_flops_per_token",
    "kv_cache_layers",
    "kv_stored_tokens",
    "kv_bytes_per_sequence",
    "kv_bytes_per_token",
    "standard_layout",
    "kv_ratio",
    "peak_flops",
]


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model.

    ``embedding`` is the input embedding plus the output head (counted once when they
    are tied). ``active`` is what one token uses: ``top_k`` of ``n_experts`` experts
    in every MoE layer, everything else in full. ``attention``/``mlp``/``router``/
    ``norms`` are the per-part totals over all layers (``mlp`` counts all experts;
    ``mlp_active`` only ``top_k`` of them); ``norms`` includes the final norm.
    """

    total: int
    active: int
    embedding: int
    total_non_embedding: int
    active_non_embedding: int
    attention: int
    mlp: int
    mlp_active: int
    router: int
    norms: int
    input_embedding: int
    output_head: int  # 0 when tied to the input embedding

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def layer_projections(index: int, spec: LayerSpec) -> tuple[str, ...]:
    """The attention projections layer ``index`` owns (a subset of wq, wk, wv, wo)."""
    producer = spec.kv_source == index
    shared_attn = spec.attn_source is not None
    names = []
    if not shared_attn:
        names.append("wq")
        if producer:
            names.append("wk")
    if producer:
        names.append("wv")
    names.append("wo")
    return tuple(names)


def _attention_params(cfg: ModelConfig, index: int, spec: LayerSpec) -> int:
    d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    size = {"wq": d * q_dim, "wk": d * kv_dim, "wv": d * kv_dim, "wo": q_dim * d}
    return sum(size[n] for n in layer_projections(index, spec))


def _mlp_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all-experts MLP params, active MLP params, router params) of one layer."""
    d = cfg.d_model
    if cfg.moe is None:
        dense = 3 * d * cfg.ffn_hidden  # SwiGLU w1, w3 [d->h], w2 [h->d]
        return dense, dense, 0
    m = cfg.moe
    expert = 3 * d * m.expert_hidden
    return m.n_experts * expert, m.top_k * expert, d * m.n_experts


def param_counts(cfg: ModelConfig, layout: Layout) -> ParamCounts:
    """Exact parameter counts (no biases; RMSNorm weights: two per block + final)."""
    d, L = cfg.d_model, layout.n_layers
    attention = sum(_attention_params(cfg, i, s) for i, s in enumerate(layout.layers))
    mlp1, mlp1_active, router1 = _mlp_params(cfg)
    mlp, mlp_active, router = L * mlp1, L * mlp1_active, L * router1
    norms = (2 * L + 1) * d
    if getattr(cfg, "kv_norm", False):  # CLA: a KV-path norm in every layer that projects K or V
        norms += d * sum(1 for i, s in enumerate(layout.layers) if s.kv_source == i)
    input_embedding = cfg.vocab_size * d
    output_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    embedding = input_embedding + output_head
    total_ne = attention + mlp + router + norms
    active_ne = attention + mlp_active + router + norms
    return ParamCounts(
        total=total_ne + embedding,
        active=active_ne + embedding,
        embedding=embedding,
        total_non_embedding=total_ne,
        active_non_embedding=active_ne,
        attention=attention,
        mlp=mlp,
        mlp_active=mlp_active,
        router=router,
        norms=norms,
        input_embedding=input_embedding,
        output_head=output_head,
    )


# --------------------------------------------------------------------------- FLOPs


def mean_keys_per_query(spec: LayerSpec, seq_len: int) -> float:
    """Exact mean, over query positions 0..T-1, of the number of keys attended.

    Global (causal): (T + 1) / 2. Sliding window W: mean of min(i + 1, W).
    """
    T = int(seq_len)
    if T <= 0:
        return 0.0
    if spec.kind == "global" or spec.window is None or spec.window >= T:
        return (T + 1) / 2
    W = int(spec.window)
    total = W * (W + 1) // 2 + (T - W) * W
    return total / T


def attention_flops_per_token(cfg: ModelConfig, layout: Layout, seq_len: int) -> float:
    """Forward FLOPs per token of the attention score/value products (not projections).

    Per layer: QK^T costs 2 * n_heads * head_dim * K FLOPs per query and PV the same,
    K = :func:`mean_keys_per_query`. Shared Attention layers skip QK^T (PV only).
    """
    per_key = 2 * cfg.n_heads * cfg.head_dim
    total = 0.0
    for spec in layout.layers:
        products = 1 if spec.attn_source is not None else 2
        total += products * per_key * mean_keys_per_query(spec, seq_len)
    return total


def _matmul_params(cfg: ModelConfig, layout: Layout) -> int:
    """Active params that are multiplied per token: all active params except the
    input-embedding lookup (the output head counts, even when tied)."""
    pc = param_counts(cfg, layout)
    return pc.active_non_embedding + cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, layout: Layout, seq_len: int, trainable: str = "all") -> float:
    """Training (forward + backward) FLOPs per token, the numerator of MFU.

        F_train = 6 * N + 3 * sum_layers  c_l * 2 * n_heads * head_dim * K_l(T)

    With ``trainable="attention"`` (stages 2 and 3) the frozen weights need no weight
    gradients: they count 4 FLOPs per parameter (forward 2, input gradient 2), the
    attention projections 6.

    N = active parameters minus the input embedding (output head included, even when
    tied; MoE counts ``top_k`` experts and the router). ``c_l`` = 2 (QK^T and PV), or
    1 for a Shared Attention layer (PV only). ``K_l(T)`` = mean keys per query over
    positions 0..T-1: (T+1)/2 for global, mean(min(i+1, W)) for sliding. Norms,
    softmax, RoPE and activations are ignored (as in PaLM / torchtitan).
    """
    n = _matmul_params(cfg, layout)
    trained = n if trainable == "all" else param_counts(cfg, layout).attention
    return 6.0 * trained + 4.0 * (n - trained) + 3.0 * attention_flops_per_token(cfg, layout, seq_len)


def forward_flops_per_token(cfg: ModelConfig, layout: Layout, seq_len: int) -> float:
    """Forward-only FLOPs per token (inference prefill): ``train_flops_per_token / 3``."""
    return 2.0 * _matmul_params(cfg, layout) + attention_flops_per_token(cfg, layout, seq_len)


# --------------------------------------------------------------------------- KV cache


@dataclass(frozen=True)
class KVCacheLayer:
    """One KV cache: owned by a producer layer, read by ``readers`` (itself included).

    ``has_k`` is False for a Shared Attention layer (V-only cache)."""

    index: int
    kind: str
    window: Optional[int]
    has_k: bool
    has_v: bool
    readers: tuple[int, ...]

    def stored_tokens(self, context: int) -> int:
        if self.kind == "global" or self.window is None:
            return int(context)
        return min(int(self.window), int(context))

    @property
    def tensors(self) -> int:
        """Cached tensors per token: 2 (K and V), or 1 (V only)."""
        return int(self.has_k) + int(self.has_v)


def kv_cache_layers(cfg: ModelConfig, layout: Layout) -> list[KVCacheLayer]:
    """The caches of a layout, one per producer, in layer order."""
    out = []
    for i, spec in enumerate(layout.layers):
        if spec.kv_source != i:
            continue
        readers = tuple(j for j, s in enumerate(layout.layers) if s.kv_source == i)
        out.append(
            KVCacheLayer(
                index=i,
                kind=spec.kind,
                window=spec.window if spec.kind == "sliding" else None,
                has_k=spec.attn_source is None,
                has_v=True,
                readers=readers,
            )
        )
    return out


def kv_stored_tokens(layout: Layout, context: int) -> int:
    """Tokens stored per sequence, summed over producer layers.

    Global producer: T; sliding producer: min(W, T); consumer: 0. A V-only (Shared
    Attention) producer counts its tokens in full here and half in bytes.
    """
    total = 0
    for i, spec in enumerate(layout.layers):
        if spec.kv_source != i:
            continue
        if spec.kind == "global" or spec.window is None:
            total += int(context)
        else:
            total += min(int(spec.window), int(context))
    return total


def kv_bytes_per_sequence(cfg: ModelConfig, layout: Layout, context: int, dtype_bytes: int = 2) -> int:
    """Exact KV-cache bytes of one sequence of ``context`` tokens.

    sum over producers of stored_tokens x (2 for K and V, 1 for V-only)
    x n_kv_heads x head_dim x dtype_bytes.
    """
    per_token_tensor = cfg.n_kv_heads * cfg.head_dim * int(dtype_bytes)
    return sum(c.stored_tokens(context) * c.tensors * per_token_tensor for c in kv_cache_layers(cfg, layout))


def kv_bytes_per_token(cfg: ModelConfig, layout: Layout, context: int, dtype_bytes: int = 2) -> float:
    """KV bytes per token of context: ``kv_bytes_per_sequence / context``."""
    return kv_bytes_per_sequence(cfg, layout, context, dtype_bytes) / int(context)


def standard_layout(n_layers: int) -> Layout:
    """The reference layout: every layer global with its own cache."""
    return Layout("standard", tuple(LayerSpec("global", None, i, None) for i in range(n_layers)))


def kv_ratio(cfg: ModelConfig, layout: Layout, context: int) -> float:
    """Standard layout's KV bytes (same model and depth) / this layout's (>1 = smaller)."""
    mine = kv_bytes_per_sequence(cfg, layout, context)
    std = kv_bytes_per_sequence(cfg, standard_layout(layout.n_layers), context)
    return std / mine if mine else float("inf")


# --------------------------------------------------------------------------- peaks

# Dense (no sparsity) peak tensor FLOP/s from NVIDIA's data sheets.
_PEAKS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100-SXM": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100-PCIE": {"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51e12},
    "H100-NVL": {"bf16": 835e12, "fp16": 835e12, "fp8": 1671e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "H200-NVL": {"bf16": 835e12, "fp16": 835e12, "fp8": 1671e12, "tf32": 417.5e12, "fp32": 60e12},
}

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "16-mixed": "fp16", "16-true": "fp16", "torch.float16": "fp16",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32", "32-true": "fp32", "torch.float32": "fp32",
    "fp8": "fp8", "float8": "fp8",
}


def _device_family(name: str) -> Optional[str]:
    n = name.upper()
    if "H200" in n:
        return "H200-NVL" if "NVL" in n else "H200"
    if re.search(r"\bGH200\b", n):
        return "H100-SXM"  # Grace Hopper: H100-class GPU at SXM clocks
    if "H100" in n or "H800" in n:
        if "NVL" in n:
            return "H100-NVL"
        if "PCIE" in n:
            return "H100-PCIE"
        return "H100-SXM"  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    if "A100" in n or "A800" in n:
        return "A100"  # SXM4 and PCIe share the same tensor peak
    return None


def peak_flops(device_name: Optional[str], dtype: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of a GPU by its ``torch.cuda.get_device_name()``, or None.

    Knows A100 (312e12 bf16), H100 SXM (989e12), H100 PCIe (756e12), H100 NVL
    (835e12), H200 (989e12), H200 NVL (835e12); ``dtype`` is bf16/fp16/fp8/tf32/fp32
    (Lightning precision strings such as "bf16-mixed" are accepted). Unknown devices
    (CPU, other GPUs) give None.
    """
    if not device_name:
        return None
    family = _device_family(str(device_name))
    if family is None:
        return None
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"peak_flops: unknown dtype {dtype!r}; use one of bf16, fp16, fp8, tf32, fp32")
    return _PEAKS[family].get(key)
