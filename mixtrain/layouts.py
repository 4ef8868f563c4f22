"""Layer layouts: which layers attend globally or in a sliding window, and which
layers reuse an earlier layer's KV cache (or attention probabilities).

The specification is ``shared/spec/layouts.md``; this module is its executable form.
(CONTRACT STUB: the data classes below are the interface the model, accounting and
inference code rely on. Presets, validation, YAML parsing, llm-foundry import and the
diagram are filled in next to them.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Kind = Literal["global", "sliding"]


class LayoutError(ValueError):
    """A layout that breaks a rule of layouts.md. The message names the layer and the rule."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a layout.

    kind:        "global" or "sliding".
    window:      W = keys a query sees, itself included (query i sees keys j with
                 i - W < j <= i); None for global layers.
    kv_source:   index of the layer whose post-RoPE K/V this layer uses; equal to the
                 layer's own index for a producer. Always resolved to the original
                 producer (no chains).
    attn_source: Shared Attention: index of the earlier layer whose post-softmax
                 probabilities this layer reuses (resolved to the original computing
                 layer), else None. Such a layer has its own V (kv_source == index) but
                 no Q/K projections.
    """

    kind: Kind
    window: Optional[int] = None
    kv_source: int = 0
    attn_source: Optional[int] = None

    @property
    def mask_key(self) -> tuple[str, Optional[int]]:
        """Layers with the same mask_key share one attention mask."""
        return (self.kind, self.window)


@dataclass(frozen=True)
class Layout:
    name: str
    layers: tuple[LayerSpec, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def is_producer(self, i: int) -> bool:
        return self.layers[i].kv_source == i

    @property
    def producers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_producer(i)]

    @property
    def mask_keys(self) -> list[tuple[str, Optional[int]]]:
        """Distinct masks, in order of first use."""
        return list(dict.fromkeys(l.mask_key for l in self.layers))
