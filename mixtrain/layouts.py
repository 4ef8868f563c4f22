"""Layer layouts: which layers attend globally or in a sliding window, and which
layers reuse an earlier layer's KV cache (or attention probabilities).

The specification is ``docs/layouts.md``; this module is its executable form.
Everything here is pure Python (no torch): a layout is built and validated before
any model exists, and every rule violation raises :class:`LayoutError` with one
paragraph that names the layer(s), the rule and what to do.

Ways to describe a layout (``layout`` config group, :class:`mixtrain.config.LayoutConfig`),
exactly one per config:

- ``preset: ma_offset``          a named layout (:func:`preset_names`);
- ``layers: [G, s, s<-1, ...]``  an explicit per-layer list;
- ``blocks: [{layers: [...], repeat: n}, ...]``  blocks concatenated in order;
- ``foundry: {order: ..., overrides: ...}``  llm-foundry ``block_overrides`` import.

``window: W`` is the sliding window (keys a query sees, itself included); null takes
the model's ``sliding_window``. ``shared_attention: {i: j}`` marks layer i as reusing
layer j's attention probabilities, on top of any of the above.

Layer-string grammar (one string per layer)::

    layer  := kind [suffix] [suffix]          (each suffix at most once, any order)
    kind   := "G"                            global attention
            | "s" [W]                        sliding, window W (default: layout window)
    suffix := "<" ref                        reuse the post-RoPE K/V of layer ref
            | "^" ref                        Shared Attention: reuse layer ref's
                                             post-softmax probabilities (own V)
    ref    := k  (absolute index >= 0)  |  -k  (relative: -1 = the previous layer)

    examples: G   s   s512   G<0   s<-1   s256<3   G^-1

Dict form of one layer: ``{kind: global|sliding, window: int, kv: ref, attn: ref}``.
Inside ``blocks``, negative references are relative to the layer and absolute ones
are indices in the final model (Character.AI's cross-block sharing is ``G<5``).
References may chain (5<3, 3<1); the built layout resolves them (5<1).
"""

from __future__ import annotations

from mixtrain.errors import UserError

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

Kind = Literal["global", "sliding"]


class LayoutError(UserError, ValueError):
    """A layout that breaks a rule of docs/layouts.md. The message names the layer and the rule."""


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

    # ---- views used by the model, accounting, inference and reports ----

    @property
    def n_kv_caches(self) -> int:
        """Number of layers that own a cache (producers). A Shared Attention layer
        owns a cache holding V only; it is counted here (see ``v_only_layers``)."""
        return len(self.producers)

    @property
    def v_only_layers(self) -> list[int]:
        """Shared Attention layers: they own a V cache but no K."""
        return [i for i, l in enumerate(self.layers) if l.attn_source is not None]

    @property
    def n_global_caches(self) -> int:
        return sum(1 for i in self.producers if self.layers[i].kind == "global")

    @property
    def n_sliding_caches(self) -> int:
        return sum(1 for i in self.producers if self.layers[i].kind == "sliding")

    def consumers_of(self, i: int) -> list[int]:
        return [j for j, l in enumerate(self.layers) if l.kv_source == i and j != i]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "kind": l.kind, "window": l.window, "kv_source": l.kv_source,
             "attn_source": l.attn_source}
            for i, l in enumerate(self.layers)
        ]

    def compact(self, windows: bool = False) -> list[str]:
        """Per-layer strings in the layer grammar (absolute references), e.g.
        ``["G", "s", "s<1", ...]``; with ``windows=True`` sliding layers show W."""
        out = []
        for i, l in enumerate(self.layers):
            s = "G" if l.kind == "global" else ("s%d" % l.window if windows else "s")
            if l.kv_source != i:
                s += "<%d" % l.kv_source
            if l.attn_source is not None:
                s += "^%d" % l.attn_source
            out.append(s)
        return out

    def summary(self) -> str:
        """One line, e.g. ``1 global + 8 sliding KV caches``."""
        parts = []
        if self.n_global_caches:
            parts.append("%d global" % self.n_global_caches)
        if self.n_sliding_caches:
            parts.append("%d sliding" % self.n_sliding_caches)
        text = " + ".join(parts) + " KV caches"
        n_v = len(self.v_only_layers)
        if n_v:
            text += " (%d of them V only: shared attention)" % n_v
        return text

    def __str__(self) -> str:
        return diagram(self)


# --------------------------------------------------------------------------------------
# Validation and chain resolution
# --------------------------------------------------------------------------------------

GRAMMAR = (
    "layer grammar: G (global) | s (sliding, layout window) | s512 (sliding, W=512), "
    "then optionally <k (reuse the KV of layer k) and ^k (reuse the attention "
    "probabilities of layer k), k an absolute index >= 0 or negative relative (-1 = "
    "previous layer); examples: G, s, s512, G<0, s<-1, s256<3, G^-1"
)


def _describe(i: int, l: LayerSpec) -> str:
    if l.kind == "global":
        return "layer %d (global)" % i
    return "layer %d (sliding, W=%s)" % (i, l.window)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(layout: Layout, n_layers: Optional[int] = None) -> Layout:
    """Check every rule of docs/layouts.md and return the layout with reference chains
    resolved to the original producer (5<3, 3<1 gives 5<1). ``layout`` may hold
    chained (unresolved) references. Raises :class:`LayoutError`."""
    name = layout.name
    if n_layers is not None and layout.n_layers != n_layers:
        raise LayoutError(
            "layout %r has %d layers but the model has %d layers (model.n_layers): a "
            "layout must describe every layer exactly once; fix the layout or set "
            "model.n_layers=%d." % (name, layout.n_layers, n_layers, layout.n_layers))
    if layout.n_layers == 0:
        raise LayoutError("layout %r has no layers." % name)
    out: list[LayerSpec] = []
    for i, l in enumerate(layout.layers):
        if l.kind not in ("global", "sliding"):
            raise LayoutError("layer %d of layout %r has kind %r: the kind must be "
                              "'global' or 'sliding'." % (i, name, l.kind))
        if l.kind == "sliding":
            if not _is_int(l.window) or l.window < 1:
                raise LayoutError(
                    "layer %d of layout %r is sliding with window %r: the window W "
                    "(keys a query sees, itself included) must be an integer >= 1." % (i, name, l.window))
        elif l.window is not None:
            raise LayoutError("layer %d of layout %r is global but has window %r: a "
                              "global layer has no window (window=None)." % (i, name, l.window))
        kv, attn = l.kv_source, l.attn_source
        if not _is_int(kv) or kv < 0 or kv > i:
            raise LayoutError(
                "layer %d of layout %r reuses the KV cache of layer %r: a layer can only "
                "reuse an earlier layer (0 <= k < %d)." % (i, name, kv, i))
        res_kv, res_attn = i, None
        if attn is not None:
            if not _is_int(attn) or attn < 0 or attn >= i:
                what = "itself" if attn == i else ("a later layer" if _is_int(attn) and attn > i else "layer %r" % (attn,))
                raise LayoutError(
                    "layer %d of layout %r reuses the attention probabilities of %s: "
                    "shared attention can only reuse an earlier layer (0 <= k < %d)."
                    % (i, name, what, i))
            if kv != i:
                raise LayoutError(
                    "layer %d of layout %r both reuses the attention probabilities of layer "
                    "%d and the KV cache of layer %d: a shared-attention layer keeps its own "
                    "V (it multiplies the borrowed probabilities by its own values), so it "
                    "cannot reuse KV; drop one of the two." % (i, name, attn, kv))
            src = layout.layers[attn]
            if src.mask_key != l.mask_key:
                raise LayoutError(
                    "%s of layout %r reuses the attention probabilities of %s: shared "
                    "attention needs identical masks (same kind and window) in both layers."
                    % (_describe(i, l), name, _describe(attn, src)))
            res_attn = out[attn].attn_source if out[attn].attn_source is not None else attn
        if kv != i:
            p = layout.layers[kv]
            if p.attn_source is not None:
                raise LayoutError(
                    "layer %d of layout %r reuses the KV cache of layer %d, but layer %d is "
                    "a shared-attention layer (it reuses layer %d's attention probabilities "
                    "and has no keys): reuse a layer that computes its own K and V."
                    % (i, name, kv, kv, p.attn_source))
            if p.mask_key != l.mask_key:
                raise LayoutError(
                    "%s of layout %r reuses the KV cache of %s: a consumer must have the "
                    "same attention kind and window as its producer (a ring-buffered "
                    "sliding cache cannot serve a global reader, and sliding layers with "
                    "different windows cannot share one cache); change one of the two "
                    "layers or reuse another layer." % (_describe(i, l), name, _describe(kv, p)))
            res_kv = out[kv].kv_source
        out.append(LayerSpec(l.kind, l.window, res_kv, res_attn))
    return Layout(name, tuple(out))


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

PRESETS: dict[str, str] = {
    "standard": "every layer global with its own KV cache",
    "swa": "every layer sliding with its own KV cache",
    "ma": "MixAttention: globals at multiples of 6 and the last layer, all reuse layer 0; sliding 2-3 groups",
    "ma_endslide": "ma with the last layer sliding (globals at multiples of 6, reusing layer 0)",
    "ma_offset": "globals at 6i+5 reusing layer 5; sliding 2-3 groups",
    "ma_pairs": "globals at multiples of 6; global 6(2m+1) reuses 6(2m); sliding 2-3 groups",
    "ma_offset_slideshare": "ma_offset with each run of 5 sliding layers sharing one cache",
    "ma_pairs_slideshare": "ma_pairs with each run of 5 sliding layers sharing one cache",
    "ma_successive_1": "24 layers: globals 0, 1<0, 12, 13<12; sliding 2-3 groups",
    "ma_successive_2": "24 layers: globals 5, 6<5, 12, 13<12; sliding 2-3 groups",
    "ma_successive_3": "24 layers: globals 10, 11<10, 17, 18<17; sliding 2-3 groups",
    "ma_successive_4": "24 layers: globals 10, 11<10, 22, 23<22; sliding 2-3 groups",
    "ma_noshare_1": "24 layers: one global at 3 (own cache); sliding 2-3 groups",
    "ma_noshare_2": "24 layers: one global at 10 (own cache); sliding 2-3 groups",
    "ma_noshare_3": "24 layers: one global at 20 (own cache); sliding 2-3 groups",
    "cla2": "Cross-Layer Attention: all global, KV computed by the first layer of each pair",
    "cla3": "Cross-Layer Attention: all global, KV computed by the first layer of each triple",
    "characterai": "Character.AI blocks of 6: five sliding (2-3 groups) then a global sharing layer 5's KV",
    "interleaved": "Gemma-style: every k-th layer global (layout.every=k), no sharing",
}

_DEPTH_24 = {
    "ma_successive_1": {0: None, 1: 0, 12: None, 13: 12},
    "ma_successive_2": {5: None, 6: 5, 12: None, 13: 12},
    "ma_successive_3": {10: None, 11: 10, 17: None, 18: 17},
    "ma_successive_4": {10: None, 11: 10, 22: None, 23: 22},
    "ma_noshare_1": {3: None},
    "ma_noshare_2": {10: None},
    "ma_noshare_3": {20: None},
}
_DEPTH_GENERIC_6 = ("ma", "ma_endslide", "ma_offset", "ma_pairs", "ma_offset_slideshare",
                    "ma_pairs_slideshare", "characterai")


def preset_names() -> list[str]:
    """Every preset name (``claN`` works for any N >= 1; cla2 and cla3 are listed)."""
    return list(PRESETS)


def _known_presets() -> str:
    return ", ".join(preset_names()) + " (and claN for any N >= 1)"


def _from_globals(name: str, n: int, window: int, globals_: Mapping[int, Optional[int]],
                  slideshare: bool = False) -> Layout:
    """Globals at the given indices (value: the global layer whose KV it reuses, or
    None for a producer); every other layer sliding, grouped per maximal run by the
    2-3 rule (or one group per run with ``slideshare``)."""
    layers: list[Optional[LayerSpec]] = [None] * n
    for g, src in globals_.items():
        layers[g] = LayerSpec("global", None, g if src is None else src)
    i = 0
    while i < n:
        if layers[i] is not None:
            i += 1
            continue
        j = i
        while j < n and layers[j] is None:
            j += 1
        run = list(range(i, j))
        sizes = [len(run)] if slideshare else []
        while sum(sizes) < len(run):
            sizes.append(2 if len(sizes) % 2 == 0 else 3)
        k = 0
        for size in sizes:
            group = run[k:k + size]
            for m in group:
                layers[m] = LayerSpec("sliding", window, group[0])
            k += size
        i = j
    return Layout(name, tuple(layers))  # type: ignore[arg-type]


def make_preset(name: str, n_layers: int, window: int, every: Optional[int] = None) -> Layout:
    """Build a named preset for a model of ``n_layers`` layers with sliding window
    ``window`` (W). ``every`` is the period of ``interleaved``. Returns a validated layout."""
    n = n_layers
    if not _is_int(n) or n < 1:
        raise LayoutError("preset %r needs a positive number of layers, got %r." % (name, n))
    if not _is_int(window) or window < 1:
        raise LayoutError("preset %r: the sliding window W must be an integer >= 1, got "
                          "%r (set layout.window or model.sliding_window)." % (name, window))
    cla = re.fullmatch(r"cla(\d+)", str(name))
    if every is not None and name != "interleaved":
        raise LayoutError("layout.every=%r only applies to preset=interleaved, not to "
                          "preset=%s; remove layout.every." % (every, name))
    if name == "standard":
        layout = Layout(name, tuple(LayerSpec("global", None, i) for i in range(n)))
    elif name == "swa":
        layout = Layout(name, tuple(LayerSpec("sliding", window, i) for i in range(n)))
    elif cla:
        g = int(cla.group(1))
        if g < 1:
            raise LayoutError("preset %r: the CLA group size must be >= 1." % name)
        layout = Layout(name, tuple(LayerSpec("global", None, i - i % g) for i in range(n)))
    elif name == "interleaved":
        if every is None:
            raise LayoutError("preset interleaved needs layout.every=k (every k-th layer "
                              "global, e.g. layout.every=6 makes layers 5, 11, ... global).")
        if not _is_int(every) or every < 1:
            raise LayoutError("preset interleaved: layout.every must be an integer >= 1, got %r." % (every,))
        layout = Layout(name, tuple(
            LayerSpec("global", None, i) if (i + 1) % every == 0 else LayerSpec("sliding", window, i)
            for i in range(n)))
    elif name in _DEPTH_24:
        if n != 24:
            raise LayoutError(
                "preset %s is defined for 24 layers only; the model has %d layers; use "
                "ma/ma_offset/ma_pairs/ma_endslide (or their _slideshare variants, or "
                "characterai), which are depth-generic for multiples of 6, or write "
                "layout.layers." % (name, n))
        layout = _from_globals(name, n, window, _DEPTH_24[name])
    elif name in _DEPTH_GENERIC_6:
        if n % 6 != 0:
            raise LayoutError(
                "preset %s is built from blocks of 6 layers (5 sliding + 1 global) and "
                "needs a depth that is a multiple of 6; the model has %d layers; use "
                "model.n_layers=%d or %d, or write layout.layers / layout.blocks."
                % (name, n, max(6, n - n % 6), n - n % 6 + 6))
        base = name.replace("_slideshare", "")
        if base == "ma":
            gl = {g: (None if g == 0 else 0) for g in list(range(0, n, 6)) + [n - 1]}
        elif base == "ma_endslide":
            gl = {g: (None if g == 0 else 0) for g in range(0, n, 6)}
        elif base in ("ma_offset", "characterai"):
            gl = {g: (None if g == 5 else 5) for g in range(5, n, 6)}
        else:  # ma_pairs
            gl = {g: (None if (g // 6) % 2 == 0 else g - 6) for g in range(0, n, 6)}
        layout = _from_globals(name, n, window, gl, slideshare=name.endswith("_slideshare"))
    else:
        raise LayoutError("unknown layout preset %r; known presets: %s." % (name, _known_presets()))
    return validate(layout, n)


# --------------------------------------------------------------------------------------
# Custom layouts: per-layer strings / dicts, blocks, shared_attention
# --------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(?P<kind>[Gs])(?P<win>\d+)?(?P<suf>(?:[<^][+-]?\d+)*)$")
_SUFFIX_RE = re.compile(r"([<^])([+-]?\d+)")
_DICT_KEYS = ("kind", "window", "kv", "attn")
_KIND_WORDS = {"global": "global", "g": "global", "sliding": "sliding", "s": "sliding",
               "local": "sliding"}


def _abs_ref(i: int, ref: Any, what: str, where: str, written: Optional[str] = None) -> int:
    """Layer ``i``'s reference ``ref`` (absolute >= 0, or negative relative to ``i``) as an
    absolute layer index. ``what`` names the reference in messages; ``written`` is how it
    reads with its value (default ``what=ref``; give it when ``what`` already shows the value)."""
    if not _is_int(ref):
        raise LayoutError("%s: %s must be an integer layer index (absolute >= 0, or negative "
                          "relative like -1), got %r." % (where, what, ref))
    k = i + ref if ref < 0 else ref
    if k < 0:
        raise LayoutError("%s: %s points to layer %d, before the first layer (layer 0); a relative "
                          "reference -k must satisfy k <= %d." % (where, written or "%s=%d" % (what, ref), k, i))
    if k == i:
        raise LayoutError("%s: %s points to the layer itself (layer %d); a layer can only "
                          "reuse an earlier layer (drop the suffix to make it a producer)."
                          % (where, what, i))
    if k > i:
        raise LayoutError("%s: %s points to a later layer (%d); a layer can only reuse an "
                          "earlier layer (< %d)." % (where, what, k, i))
    return k


def _parse_entry(i: int, entry: Any, window: int, where: str) -> LayerSpec:
    """One layer (string or dict) at final index ``i`` -> LayerSpec with absolute,
    possibly chained references."""
    if isinstance(entry, str):
        text = entry.strip()
        m = _LAYER_RE.match(text)
        if not m:
            raise LayoutError("%s: cannot parse %r; %s." % (where, entry, GRAMMAR))
        kind = "global" if m.group("kind") == "G" else "sliding"
        w = m.group("win")
        if kind == "global" and w is not None:
            raise LayoutError("%s: %r gives a window to a global layer; a global layer has "
                              "no window (write G, or s%s for a sliding layer); %s."
                              % (where, entry, w, GRAMMAR))
        win = int(w) if w is not None else (window if kind == "sliding" else None)
        kv = attn = None
        for op, ref in _SUFFIX_RE.findall(m.group("suf")):
            if (op == "<" and kv is not None) or (op == "^" and attn is not None):
                raise LayoutError("%s: %r repeats the %s suffix; %s." % (where, entry, op, GRAMMAR))
            if op == "<":
                kv = _abs_ref(i, int(ref), "KV reuse '<%s'" % ref, where, written="KV reuse '<%s'" % ref)
            else:
                attn = _abs_ref(i, int(ref), "shared attention '^%s'" % ref, where,
                                written="shared attention '^%s'" % ref)
    elif isinstance(entry, Mapping):
        unknown = [k for k in entry if k not in _DICT_KEYS]
        if unknown:
            raise LayoutError("%s: unknown key %r in %r; valid keys are %s."
                              % (where, unknown[0], dict(entry), ", ".join(_DICT_KEYS)))
        if "kind" not in entry:
            raise LayoutError("%s: %r has no 'kind' (global or sliding)." % (where, dict(entry)))
        kind = _KIND_WORDS.get(str(entry["kind"]).lower())
        if kind is None:
            raise LayoutError("%s: kind %r is not 'global' or 'sliding'." % (where, entry["kind"]))
        win = entry.get("window")
        if kind == "global" and win is not None:
            raise LayoutError("%s: a global layer has no window, got window=%r." % (where, win))
        if kind == "sliding":
            win = window if win is None else win
            if not _is_int(win) or win < 1:
                raise LayoutError("%s: the window W (keys a query sees, itself included) "
                                  "must be an integer >= 1, got %r." % (where, win))
        kv = _abs_ref(i, entry["kv"], "kv", where) if entry.get("kv") is not None else None
        attn = _abs_ref(i, entry["attn"], "attn", where) if entry.get("attn") is not None else None
    else:
        raise LayoutError("%s: expected a string like 's<-1' or a dict like {kind: sliding, "
                          "kv: -1}, got %r; %s." % (where, entry, GRAMMAR))
    if kind == "sliding" and (not _is_int(win) or win < 1):
        raise LayoutError("%s: %r has window %r; the window W must be >= 1." % (where, entry, win))
    return LayerSpec(kind, win, i if kv is None else kv, attn)


def _as_list(x: Any, key: str) -> list:
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise LayoutError("%s must be a list, got %r." % (key, x))
    return list(x)


def parse_layers(entries: Sequence[Any], window: int, name: str = "custom") -> Layout:
    """An explicit per-layer list (strings or dicts) -> validated Layout."""
    entries = _as_list(entries, "layout.layers")
    specs = [_parse_entry(i, e, window, "layout.layers, layer %d" % i) for i, e in enumerate(entries)]
    return validate(Layout(name, tuple(specs)))


def parse_blocks(blocks: Sequence[Any], window: int, name: str = "blocks") -> Layout:
    """``[{layers: [...], repeat: n}, ...]`` concatenated in order -> validated Layout."""
    specs: list[LayerSpec] = []
    for b, block in enumerate(_as_list(blocks, "layout.blocks")):
        if not isinstance(block, Mapping):
            raise LayoutError("layout.blocks[%d] must be a mapping {layers: [...], repeat: n}, "
                              "got %r." % (b, block))
        unknown = [k for k in block if k not in ("layers", "repeat")]
        if unknown:
            raise LayoutError("layout.blocks[%d]: unknown key %r; valid keys are layers, repeat."
                              % (b, unknown[0]))
        repeat = block.get("repeat", 1)
        if not _is_int(repeat) or repeat < 1:
            raise LayoutError("layout.blocks[%d]: repeat must be an integer >= 1, got %r." % (b, repeat))
        body = _as_list(block.get("layers"), "layout.blocks[%d].layers" % b)
        if not body:
            raise LayoutError("layout.blocks[%d] has no layers." % b)
        for r in range(repeat):
            for e, entry in enumerate(body):
                i = len(specs)
                where = "layout.blocks[%d] (repeat %d, entry %d), layer %d" % (b, r, e, i)
                specs.append(_parse_entry(i, entry, window, where))
    return validate(Layout(name, tuple(specs)))


def _deepest(mapping: Mapping[Any, Any]) -> int:
    """The depth a shared_attention map needs: 1 + its largest layer index."""
    keys = []
    for key in mapping:
        try:
            keys.append(int(key))
        except (TypeError, ValueError):
            pass
    return max(keys, default=-1) + 1


def apply_shared_attention(layout: Layout, mapping: Mapping[Any, Any]) -> Layout:
    """Mark layers as reusing attention probabilities: ``{i: j}`` (j absolute or
    negative relative to i). Returns the validated, resolved layout."""
    specs = list(layout.layers)
    for key, ref in mapping.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise LayoutError("layout.shared_attention: key %r is not a layer index." % (key,)) from None
        if i < 0 or i >= len(specs):
            hint = ("; this map is written for a deeper model: set model.n_layers to at least %d, or "
                    "pick a model recipe of that depth" % _deepest(mapping)) if i >= len(specs) else ""
            raise LayoutError("layout.shared_attention: layer %d does not exist (the layout has "
                              "%d layers, 0..%d)%s." % (i, len(specs), len(specs) - 1, hint))
        j = _abs_ref(i, ref, "the shared attention source", "layout.shared_attention, layer %d" % i,
                     written="the shared attention source %r" % (ref,))
        specs[i] = dataclasses.replace(specs[i], attn_source=j)
    return validate(Layout(layout.name, tuple(specs)))


# --------------------------------------------------------------------------------------
# llm-foundry block_overrides import
# --------------------------------------------------------------------------------------

_FOUNDRY_ATTN_KEYS = ("sliding_window_size", "reuse_kv_layer_idx")


def _foundry_order(order: Any, path: str) -> list[str]:
    names: list[str] = []
    for n, item in enumerate(_as_list(order, path)):
        where = "%s[%d]" % (path, n)
        if not isinstance(item, Mapping):
            raise LayoutError("%s must be a mapping like {name: default} or {order: [...], "
                              "repeat: n}, got %r." % (where, item))
        unknown = [k for k in item if k not in ("name", "order", "repeat")]
        if unknown:
            raise LayoutError("%s: unknown key %r; valid keys are name, order, repeat."
                              % (where, unknown[0]))
        if ("name" in item) == ("order" in item):
            raise LayoutError("%s must have exactly one of 'name' and 'order', got %r." % (where, dict(item)))
        repeat = item.get("repeat", 1)
        if not _is_int(repeat) or repeat < 0:
            raise LayoutError("%s: repeat must be a non-negative integer, got %r." % (where, repeat))
        inner = [str(item["name"])] if "name" in item else _foundry_order(item["order"], where + ".order")
        names.extend(inner * repeat)
    return names


def from_foundry(block_overrides: Mapping[str, Any], n_layers: Optional[int] = None,
                 name: str = "foundry") -> Layout:
    """Import llm-foundry's ``block_overrides`` (keys ``order``, ``overrides``, and
    optionally a top-level ``repeat``). ``default`` layers are global with their own
    KV; ``attn_config.sliding_window_size: w`` means w previous keys + itself, so
    W = w + 1 (-1: global); ``attn_config.reuse_kv_layer_idx: -k`` reuses layer i-k.
    A reusing override that does not set ``sliding_window_size`` takes the kind and
    window of the layer it reuses (otherwise its own, which must match)."""
    bo = dict(block_overrides)
    if set(bo) == {"block_overrides"}:
        bo = dict(bo["block_overrides"])
    unknown = [k for k in bo if k not in ("order", "overrides", "repeat")]
    if unknown:
        raise LayoutError("layout.foundry: unknown key %r; llm-foundry block_overrides has "
                          "order, overrides (and mixtrain also accepts repeat)." % unknown[0])
    if "order" not in bo:
        raise LayoutError("layout.foundry needs 'order' (the list of layer kinds, e.g. "
                          "[{name: default}, {order: [...], repeat: 2}]).")
    names = _foundry_order(bo["order"], "layout.foundry.order")
    top = bo.get("repeat", 1)
    if not _is_int(top) or top < 1:
        raise LayoutError("layout.foundry.repeat must be an integer >= 1, got %r." % (top,))
    names = names * top
    overrides = dict(bo.get("overrides") or {})
    if "default" in overrides:
        raise LayoutError("layout.foundry.overrides: 'default' is reserved (a layer without "
                          "overrides, global with its own KV) and cannot be overridden.")
    if n_layers is not None and len(names) != n_layers:
        raise LayoutError("layout.foundry.order expands to %d layers but the model has %d "
                          "layers (model.n_layers); fix the repeats or set model.n_layers=%d."
                          % (len(names), n_layers, len(names)))
    specs: list[LayerSpec] = []
    for i, nm in enumerate(names):
        where = "layout.foundry, layer %d (%s)" % (i, nm)
        kind, win, kv = "global", None, i
        if nm != "default":
            if nm not in overrides:
                raise LayoutError("%s: no override named %r in layout.foundry.overrides (known: %s)."
                                  % (where, nm, ", ".join(overrides) or "none"))
            ov = overrides[nm] or {}
            bad = [k for k in ov if k not in ("attn_config", "allow_mismatch")]
            if bad:
                raise LayoutError("%s: override key %r is not a layout setting; the import reads "
                                  "attn_config.sliding_window_size and attn_config.reuse_kv_layer_idx "
                                  "only (set other block settings in the model config)." % (where, bad[0]))
            ac = dict(ov.get("attn_config") or {})
            bad = [k for k in ac if k not in _FOUNDRY_ATTN_KEYS]
            if bad:
                raise LayoutError("%s: attn_config key %r is not supported; valid keys are %s."
                                  % (where, bad[0], ", ".join(_FOUNDRY_ATTN_KEYS)))
            if "sliding_window_size" in ac:
                w = ac["sliding_window_size"]
                if not _is_int(w) or w < -1:
                    raise LayoutError("%s: sliding_window_size must be -1 (global) or an integer "
                                      ">= 0 (previous keys seen), got %r." % (where, w))
                if w >= 0:
                    kind, win = "sliding", w + 1
            if ac.get("reuse_kv_layer_idx") is not None:
                r = ac["reuse_kv_layer_idx"]
                if not _is_int(r) or r >= 0:
                    raise LayoutError("%s: reuse_kv_layer_idx must be a negative relative index "
                                      "(-1 = previous layer), got %r." % (where, r))
                kv = _abs_ref(i, r, "reuse_kv_layer_idx", where)
                if "sliding_window_size" not in ac:
                    kind, win = specs[kv].kind, specs[kv].window
        specs.append(LayerSpec(kind, win, kv))
    return validate(Layout(name, tuple(specs)), n_layers)


# --------------------------------------------------------------------------------------
# From a config (LayoutConfig / DictConfig / dict)
# --------------------------------------------------------------------------------------

_CFG_KEYS = ("preset", "window", "layers", "blocks", "foundry", "every", "shared_attention")


def _to_plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise LayoutError("layout config must be a LayoutConfig, DictConfig or dict, got %r." % (cfg,))


def _plain(x: Any) -> Any:
    """ListConfig/DictConfig leftovers inside dataclass fields -> plain containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def build_layout(cfg: Any, n_layers: int, default_window: int) -> Layout:
    """The layout for a model of ``n_layers`` layers from a ``layout`` config
    (LayoutConfig, DictConfig or dict with LayoutConfig's keys). ``window: null``
    takes ``default_window`` (the model's sliding_window). Exactly one of preset /
    layers / blocks / foundry; none at all means ``standard``. Validated, chains resolved."""
    d = {k: _plain(v) for k, v in _to_plain(cfg).items()}
    unknown = [k for k in d if k not in _CFG_KEYS]
    if unknown:
        raise LayoutError("unknown layout key layout.%s; valid keys are %s."
                          % (unknown[0], ", ".join("layout." + k for k in _CFG_KEYS)))
    window = d.get("window")
    if window is None:
        window = default_window
    if not _is_int(window) or window < 1:
        raise LayoutError("the sliding window must be an integer >= 1 (keys a query sees, itself "
                          "included), got %r; set layout.window or model.sliding_window." % (window,))
    given = [k for k in ("preset", "layers", "blocks", "foundry") if d.get(k) is not None]
    if len(given) > 1:
        if given[0] == "preset":
            raise LayoutError(
                "both layout.preset (%r) and layout.%s are set; a layout is described one way: "
                "set layout.preset=null to use layout.%s, or remove layout.%s to use the preset."
                % (d["preset"], given[1], given[1], given[1]))
        raise LayoutError("both layout.%s and layout.%s are set; a layout is described one way: "
                          "keep one and set the other to null." % (given[0], given[1]))
    how = given[0] if given else "preset"
    if how == "preset":
        layout = make_preset(d.get("preset") or "standard", n_layers, window, d.get("every"))
    else:
        if d.get("every") is not None:
            raise LayoutError("layout.every only applies to preset=interleaved; remove it when "
                              "using layout.%s." % how)
        if how == "layers":
            layout = parse_layers(d["layers"], window)
        elif how == "blocks":
            layout = parse_blocks(d["blocks"], window)
        else:
            layout = from_foundry(d["foundry"], n_layers)
        if layout.n_layers != n_layers:
            raise LayoutError("layout.%s describes %d layers but the model has %d layers "
                              "(model.n_layers); fix the layout or set model.n_layers=%d."
                              % (how, layout.n_layers, n_layers, layout.n_layers))
    if d.get("shared_attention"):
        sa = d["shared_attention"]
        if not isinstance(sa, Mapping):
            raise LayoutError("layout.shared_attention must be a mapping {layer: source}, got %r." % (sa,))
        layout = apply_shared_attention(layout, sa)
    return validate(layout, n_layers)


# --------------------------------------------------------------------------------------
# Diagram
# --------------------------------------------------------------------------------------

def diagram(layout: Layout) -> str:
    """One row per layer: producers show a bar (long for a global cache, short for a
    sliding one), consumers show the layer they read, then a one-line summary."""
    rows = ["layout %s: %d layers" % (layout.name, layout.n_layers),
            "  layer kind  attention     KV cache"]
    for i, l in enumerate(layout.layers):
        att = "global" if l.kind == "global" else "W=%d" % l.window
        k = "G" if l.kind == "global" else "s"
        if l.kv_source == i:
            kv = "V own" if l.attn_source is not None else "KV own"
            bar = "████████" if l.kind == "global" else "██"
            row = "  %5d  %s   %-12s  %-9s %s" % (i, k, att, kv, bar)
        else:
            row = "  %5d  %s   %-12s  KV <- %d" % (i, k, att, l.kv_source)
        if l.attn_source is not None:
            row += "   attn probs <- %d" % l.attn_source
        rows.append(row.rstrip())
    rows.append(layout.summary())
    return "\n".join(rows)
