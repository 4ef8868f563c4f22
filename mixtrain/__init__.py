"""mixtrain: pretraining inference-friendly language models (MixAttention, cross-layer KV sharing, MoE)."""

__version__ = "0.1.0"
