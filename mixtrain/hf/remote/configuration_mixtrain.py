# Copied into every Hugging Face export of a mixtrain model whose layout no stock
# transformers class expresses (trust_remote_code=True). Self-contained: it needs
# transformers and torch only, never mixtrain.
"""Configuration of a mixtrain decoder: a Llama-style transformer (RMSNorm, RoPE with
rotated halves, SwiGLU, no biases, grouped-query attention) whose layers differ only in
their attention *layout*:

- ``layer_types[i]``: ``"full_attention"`` (global, causal) or ``"sliding_attention"``;
- ``sliding_windows[i]``: W, the keys a query of a sliding layer sees, itself included
  (query i sees keys j with i - W < j <= i); ``None`` for a global layer;
- ``kv_sources[i]``: the layer whose post-RoPE K/V layer i attends over (``i`` itself for
  a layer that computes and caches its own K/V, a *producer*; an earlier producer with
  the same kind and window for a *consumer*, which has no K/V projections and no cache);
- ``attn_sources[i]``: Shared Attention: the earlier layer whose post-softmax attention
  probabilities layer i multiplies by its own V (no Q/K projections), else ``None``.

``kv_norm``: Cross-Layer Attention's separate RMSNorm on the K/V path of every layer
that projects K or V. ``num_experts > 0`` replaces every dense MLP with a dropless
top-k mixture of SwiGLU experts (softmax over the router logits, top-k, renormalised
when ``norm_topk_prob``).
"""

from transformers import PretrainedConfig

LAYER_TYPES = ("full_attention", "sliding_attention")


class MixtrainConfig(PretrainedConfig):
    model_type = "mixtrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        kv_norm=False,
        layer_types=None,
        sliding_windows=None,
        kv_sources=None,
        attn_sources=None,
        num_experts=0,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.kv_norm = kv_norm
        n = num_hidden_layers
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * n
        self.sliding_windows = list(sliding_windows) if sliding_windows is not None else [None] * n
        self.kv_sources = list(kv_sources) if kv_sources is not None else list(range(n))
        self.attn_sources = list(attn_sources) if attn_sources is not None else [None] * n
        windows = {w for t, w in zip(self.layer_types, self.sliding_windows) if t == "sliding_attention"}
        # The common window, for tools that read one ``sliding_window`` (None if they differ).
        self.sliding_window = windows.pop() if len(windows) == 1 else None
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.use_cache = use_cache
        kwargs.pop("sliding_window", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check_layout()

    def check_layout(self):
        """Raise ValueError naming the layer when the per-layer layout is inconsistent."""
        n = self.num_hidden_layers
        for key in ("layer_types", "sliding_windows", "kv_sources", "attn_sources"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"config.{key} has {len(getattr(self, key))} entries for {n} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        for i in range(n):
            kind, window = self.layer_types[i], self.sliding_windows[i]
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer {i}: layer_types[{i}]={kind!r}, expected one of {LAYER_TYPES}")
            if (kind == "sliding_attention") != (window is not None) or (window is not None and window < 1):
                raise ValueError(f"layer {i}: a sliding layer needs a window >= 1 and a global one none "
                                 f"(got {kind}, {window})")
            src, attn = self.kv_sources[i], self.attn_sources[i]
            if not 0 <= src <= i or self.kv_sources[src] != src:
                raise ValueError(f"layer {i}: kv_sources[{i}]={src} must be {i} or an earlier producer layer")
            if (self.layer_types[src], self.sliding_windows[src]) != (kind, window):
                raise ValueError(f"layer {i}: reads the K/V of layer {src}, which has another kind or window")
            if attn is not None:
                if not 0 <= attn < i or src != i or self.attn_sources[attn] is not None:
                    raise ValueError(f"layer {i}: attn_sources[{i}]={attn} must be an earlier layer that "
                                     f"computes its own probabilities, and layer {i} must keep its own V")
                if (self.layer_types[attn], self.sliding_windows[attn]) != (kind, window):
                    raise ValueError(f"layer {i}: shares the probabilities of layer {attn}, "
                                     f"which has another kind or window")
            elif src != i and self.attn_sources[src] is not None:
                raise ValueError(f"layer {i}: reads the K/V of layer {src}, a shared-attention layer with no keys")
