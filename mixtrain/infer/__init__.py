"""Inference: a KV cache that owns memory for producer layers only (sliding layers keep
their last W tokens in a ring buffer), batched chunked prefill and decode, sampling,
and the ``mixtrain bench infer`` benchmark."""

from mixtrain.infer.cache import KVCache, key_mask
from mixtrain.infer.generate import Engine, generate, sample

__all__ = ["KVCache", "key_mask", "Engine", "generate", "sample"]
