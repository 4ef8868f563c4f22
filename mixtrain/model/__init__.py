"""The model: a decoder whose layers follow a Layout (sliding/global, shared K/V, shared attention)."""

from mixtrain.model.transformer import Block, MLP, ModelOutput, Transformer, build_model

__all__ = ["Transformer", "ModelOutput", "build_model", "Block", "MLP"]
