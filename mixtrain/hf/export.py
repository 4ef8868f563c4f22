"""``mixtrain export --format hf``: a folder that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load, offline.

Which class a model goes to (:func:`hf_target`):

- a stock transformers class where one computes exactly what mixtrain computes
  (no custom code, any tool that knows the class can serve it):

  =========================================  ==========================================
  dense, every layer global, own KV          ``LlamaForCausalLM``
  dense, every layer sliding (one W)         ``MistralForCausalLM`` (``sliding_window=W``)
  dense, global + sliding (one W), no        ``MinistralForCausalLM`` (per-layer
  sharing (e.g. ``interleaved``)             ``layer_types``; no attention biases)
  MoE, renormalised top-k, all global or     ``MixtralForCausalLM`` (Mixtral always
  all sliding (one W), no sharing            renormalises its top-k weights)
  MoE otherwise without sharing (one W)      ``Qwen2MoeForCausalLM`` (``norm_topk_prob`` =
                                             ``moe.renormalize``, ``qkv_bias=False``, no
                                             shared expert: its size is 0, its gate inert)
  =========================================  ==========================================

  Routing is the same in all three MoE cases: softmax over the router logits in fp32,
  top-k of the probabilities, optional renormalisation, experts weighted by those
  probabilities (SwiGLU experts, no biases, no jitter).

- everything else (cross-layer KV sharing, MixAttention presets, CLA and its KV-path norm,
  Shared Attention, Character.AI blocks, several sliding windows, custom layouts, MoE with
  any of these): ``MixtrainForCausalLM``, the self-contained remote code in
  ``mixtrain/hf/remote/`` copied into the folder (``trust_remote_code=True``). Its cache
  keeps producer layers only (consumers read their producer's entry, sliding producers
  keep their last W tokens, Shared Attention layers V only), so ``generate()`` allocates
  what ``mixtrain.accounting.kv_bytes_per_sequence`` says.

The tokenizer (the run's ``tokenizer.json``) is written as ``tokenizer.json`` +
``tokenizer_config.json`` with its EOS and pad tokens, and the same ids go into
``config.json`` and ``generation_config.json``.

MoE auxiliary losses: mixtrain computes the load-balancing loss per MoE layer
(``E * sum_e f_e P_e`` with ``f_e`` the share of the N*k assignments) and averages over
layers, plus a z-loss. The stock HF classes pool the router statistics of all layers
before one Switch loss, count ``f_e`` per token rather than per assignment (``top_k``
times larger: 2.0 at perfect balance with top-2, where mixtrain gives 1.0) and have no
z-loss. The export sets ``router_aux_loss_coef = lb_loss_weight / top_k`` (the same
weighted loss for one MoE layer); with several layers the pooled value differs from the
per-layer mean whenever layers route differently (see the README). The remote-code class
computes mixtrain's own losses with its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mixtrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REMOTE_DIR = Path(__file__).resolve().parent / "remote"


@dataclass(frozen=True)
class HFTarget:
    """Where a model goes: the transformers architecture and why."""

    architecture: str  # e.g. "LlamaForCausalLM"
    remote_code: bool
    reason: str


# ----------------------------------------------------------------------------- choice


def hf_target(model_cfg: Any, layout, remote_code: bool = False) -> HFTarget:
    """The transformers class that computes exactly what mixtrain computes for this model
    and layout (``remote_code=True`` forces the remote-code class)."""
    specs = layout.layers
    sharing = [i for i, s in enumerate(specs) if s.kv_source != i or s.attn_source is not None]
    windows = {s.window for s in specs if s.kind == "sliding"}
    kinds = {s.kind for s in specs}
    moe = model_cfg.get("moe") if hasattr(model_cfg, "get") else getattr(model_cfg, "moe", None)
    kv_norm = bool(model_cfg.get("kv_norm", False) if hasattr(model_cfg, "get") else getattr(model_cfg, "kv_norm", False))
    remote = "MixtrainForCausalLM"
    if remote_code:
        return HFTarget(remote, True, "remote code requested (--remote-code)")
    if sharing:
        return HFTarget(remote, True, f"layers {_ranges(sharing)} reuse another layer's K/V or attention "
                                      "probabilities; no stock class shares caches across layers")
    if kv_norm:
        return HFTarget(remote, True, "the KV path has its own norm (model.kv_norm, CLA); no stock class has one")
    if len(windows) > 1:
        return HFTarget(remote, True, f"sliding layers use {len(windows)} windows {sorted(windows)}; stock classes "
                                      "have one sliding_window")
    if moe is None:
        if kinds == {"global"}:
            return HFTarget("LlamaForCausalLM", False, "every layer global with its own KV cache")
        if kinds == {"sliding"}:
            return HFTarget("MistralForCausalLM", False, "every layer sliding with one window, own KV caches")
        return HFTarget("MinistralForCausalLM", False, "global and sliding layers (one window) with their own KV "
                                                       "caches: per-layer layer_types, no attention biases")
    if moe.get("renormalize") and len(kinds) == 1:
        return HFTarget("MixtralForCausalLM", False, "MoE with renormalised top-k weights (Mixtral's routing), "
                                                     "one attention kind, own KV caches")
    norm = "renormalised" if moe.get("renormalize") else "not renormalised"
    return HFTarget("Qwen2MoeForCausalLM", False, f"MoE with top-k weights {norm} (norm_topk_prob="
                                                  f"{bool(moe.get('renormalize'))}), no shared expert, "
                                                  "per-layer layer_types")


def _ranges(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (" ..." if len(idx) > 8 else "")


# ----------------------------------------------------------------------------- config


def _common(m: Any, tok: "TokenizerInfo") -> dict[str, Any]:
    return dict(
        vocab_size=int(m.vocab_size),
        hidden_size=int(m.d_model),
        intermediate_size=int(m.ffn_hidden),
        num_hidden_layers=int(m.n_layers),
        num_attention_heads=int(m.n_heads),
        num_key_value_heads=int(m.n_kv_heads),
        head_dim=int(m.head_dim),
        max_position_embeddings=int(m.max_seq_len),
        rms_norm_eps=float(m.norm_eps),
        initializer_range=float(m.init_std),
        tie_word_embeddings=bool(m.tie_embeddings),
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


def _hf_aux_coef(moe: Any) -> float:
    """HF's router_aux_loss_coef for mixtrain's lb_loss_weight: HF's Switch loss counts
    f_e per token (top_k times mixtrain's per-assignment share), so for one MoE layer
    coef * HF loss == lb_loss_weight * mixtrain loss exactly; with several layers HF pools
    the statistics over layers and the two differ when the layers route differently."""
    return float(moe.lb_loss_weight) / int(moe.top_k)


def _layer_types(layout) -> list[str]:
    return ["sliding_attention" if s.kind == "sliding" else "full_attention" for s in layout.layers]


def _rope(m: Any) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)}}


def hf_config(target: HFTarget, m: Any, layout, tok: "TokenizerInfo"):
    """The transformers config object of ``target`` for mixtrain model config ``m``."""
    import transformers as tf

    c = _common(m, tok)
    windows = [s.window for s in layout.layers if s.kind == "sliding"]
    window = windows[0] if windows else None
    arch = target.architecture
    if arch == "LlamaForCausalLM":
        return tf.LlamaConfig(**c, **_rope(m), attention_bias=False, mlp_bias=False)
    if arch == "MistralForCausalLM":
        return tf.MistralConfig(**c, **_rope(m), sliding_window=window)
    if arch == "MinistralForCausalLM":
        return tf.MinistralConfig(**c, **_rope(m), sliding_window=window, layer_types=_layer_types(layout))
    moe = m.moe
    if arch == "MixtralForCausalLM":
        c["intermediate_size"] = int(moe.expert_hidden)
        return tf.MixtralConfig(**c, **_rope(m), sliding_window=window, num_local_experts=int(moe.n_experts),
                                num_experts_per_tok=int(moe.top_k), router_aux_loss_coef=_hf_aux_coef(moe),
                                router_jitter_noise=0.0)
    if arch == "Qwen2MoeForCausalLM":
        return tf.Qwen2MoeConfig(
            **c, **_rope(m), use_sliding_window=window is not None, sliding_window=window,
            max_window_layers=int(m.n_layers), layer_types=_layer_types(layout),
            num_experts=int(moe.n_experts), num_experts_per_tok=int(moe.top_k),
            moe_intermediate_size=int(moe.expert_hidden), shared_expert_intermediate_size=0,
            norm_topk_prob=bool(moe.renormalize), decoder_sparse_step=1, mlp_only_layers=[],
            qkv_bias=False, router_aux_loss_coef=_hf_aux_coef(moe))
    from mixtrain.hf.remote.configuration_mixtrain import MixtrainConfig

    extra = {}
    if moe is not None:
        extra = dict(num_experts=int(moe.n_experts), num_experts_per_tok=int(moe.top_k),
                     moe_intermediate_size=int(moe.expert_hidden), norm_topk_prob=bool(moe.renormalize),
                     router_aux_loss_coef=float(moe.lb_loss_weight), router_z_loss_coef=float(moe.z_loss_weight))
    c.pop("hidden_act")
    return MixtrainConfig(
        **c, rope_theta=float(m.rope_theta), kv_norm=bool(m.get("kv_norm", False)),
        layer_types=_layer_types(layout), sliding_windows=[s.window for s in layout.layers],
        kv_sources=[s.kv_source for s in layout.layers], attn_sources=[s.attn_source for s in layout.layers],
        **extra)


# ----------------------------------------------------------------------------- weights


def hf_state_dict(target: HFTarget, state: dict[str, torch.Tensor], m: Any, layout) -> dict[str, torch.Tensor]:
    """mixtrain weight names -> the names (and shapes) of ``target``'s in-memory modules."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
                                    "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state["tok_embeddings.weight"] if m.tie_embeddings else state["output.weight"]
    arch = target.architecture
    for i in range(int(m.n_layers)):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "mlp_norm.weight"]
        if src + "kv_norm.weight" in state:
            out[dst + "kv_layernorm.weight"] = state[src + "kv_norm.weight"]
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            if f"{src}attn.{a}.weight" in state:
                out[f"{dst}self_attn.{b}.weight"] = state[f"{src}attn.{a}.weight"]
        if m.moe is None:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.{b}.weight"] = state[f"{src}mlp.{a}.weight"]
            continue
        w1, w3, w2 = (state[f"{src}mlp.{n}"] for n in ("w1", "w3", "w2"))  # [E,C,H], [E,C,H], [E,H,C]
        out[dst + "mlp.gate.weight"] = state[src + "mlp.router.weight"]
        if arch == "MixtrainForCausalLM":
            for e in range(w1.shape[0]):
                out[f"{dst}mlp.experts.{e}.gate_proj.weight"] = w1[e].t()
                out[f"{dst}mlp.experts.{e}.up_proj.weight"] = w3[e].t()
                out[f"{dst}mlp.experts.{e}.down_proj.weight"] = w2[e].t()
            continue
        # transformers 5 keeps experts fused in memory: gate_up [E, 2H, C], down [E, C, H]
        # (save_pretrained writes the classic per-expert tensors).
        out[dst + "mlp.experts.gate_up_proj"] = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1)
        out[dst + "mlp.experts.down_proj"] = w2.transpose(1, 2)
        if arch == "Qwen2MoeForCausalLM":
            C = w1.shape[1]
            out[dst + "mlp.shared_expert.gate_proj.weight"] = w1.new_zeros(0, C)
            out[dst + "mlp.shared_expert.up_proj.weight"] = w1.new_zeros(0, C)
            out[dst + "mlp.shared_expert.down_proj.weight"] = w1.new_zeros(C, 0)
            out[dst + "mlp.shared_expert_gate.weight"] = w1.new_zeros(1, C)
    return out


# ----------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    path: Optional[Path]
    eos_id: Optional[int]
    pad_id: Optional[int]
    eos: Optional[str] = None
    pad: Optional[str] = None


def find_tokenizer(source: Path, explicit: Optional[str] = None) -> Optional[Path]:
    """``--tokenizer``, else the ``tokenizer.json`` of the source folder or its run directory."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"--tokenizer {explicit}: no such file (give the run's tokenizer.json)")
        return p
    cands = []
    if source.is_dir():
        cands += [source / "tokenizer.json", source.parent / "tokenizer.json"]
    else:
        cands += [source.parent / "tokenizer.json"]
    if source.parent.name == "checkpoints":
        cands.append(source.parent.parent / "tokenizer.json")
    return next((c for c in cands if c.is_file()), None)


def tokenizer_info(path: Optional[Path]) -> TokenizerInfo:
    if path is None:
        return TokenizerInfo(None, None, None)
    from mixtrain.data.tokenizer import load_tokenizer_file

    try:
        tok = load_tokenizer_file(path)
    except Exception as e:  # DataError: not a tokenizer, no EOS token
        raise UserError(f"tokenizer {path}: {e}") from e
    return TokenizerInfo(path, tok.eos_id, tok.pad_id, tok.tk.id_to_token(tok.eos_id), tok.tk.id_to_token(tok.pad_id))


def save_tokenizer(info: TokenizerInfo, out: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (EOS, pad, model_max_length) for AutoTokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_file(str(info.path))  # fresh: mixtrain's wrapper changes encoding options
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=info.eos, pad_token=info.pad,
                                   model_max_length=max_len, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))


# ----------------------------------------------------------------------------- export


def default_out(source: Path) -> Path:
    """``<run>/export-hf`` for a run directory or one of its checkpoints, else
    ``<source>-hf`` next to the source (an exported folder, a safetensors file)."""
    from mixtrain.train.export import resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    if ckpt != source:  # a run directory
        return source / "export-hf"
    if source.parent.name == "checkpoints":
        return source.parent.parent / "export-hf"
    return source.with_name(source.stem + "-hf")


def build_hf_model(source: str | os.PathLike, dtype: str = "fp32", remote_code: bool = False,
                   tokenizer: Optional[TokenizerInfo] = None):
    """(transformers model with the checkpoint's weights, target, resolved mixtrain config).
    The model is built on the meta device and takes the checkpoint's tensors as they are."""
    from omegaconf import OmegaConf

    from mixtrain.layouts import build_layout
    from mixtrain.train.export import read_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    state, cfg = read_checkpoint(source)
    if cfg is None:
        raise UserError(f"{source} carries no mixtrain config (config.yaml); export needs a checkpoint or "
                        f"export written by mixtrain")
    cfg = OmegaConf.create(cfg)
    m = cfg.model
    if m.moe is not None and m.moe.get("impl", "native") != "native":
        state = _megablocks_state_to_native(state, m)
    layout = build_layout(cfg.layout, m.n_layers, m.sliding_window)
    target = hf_target(m, layout, remote_code)
    tok = tokenizer or TokenizerInfo(None, None, None)
    config = hf_config(target, m, layout, tok)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in hf_state_dict(target, state, m, layout).items()}
    if target.remote_code:
        from mixtrain.hf.remote.modeling_mixtrain import MixtrainForCausalLM as cls
    else:
        import transformers

        cls = getattr(transformers, target.architecture)
    config.dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = cls(config)
    tied = bool(m.tie_embeddings)
    if tied:
        weights.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not fit {target.architecture} (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}); is the checkpoint from this config?")
    if tied:
        model.tie_weights()
    return model.eval(), target, cfg


def _megablocks_state_to_native(state: dict[str, torch.Tensor], m: Any) -> dict[str, torch.Tensor]:
    from mixtrain.model.moe import megablocks_to_native

    out = dict(state)
    for i in range(int(m.n_layers)):
        p = f"layers.{i}.mlp."
        keys = [k for k in state if k.startswith(p + "dmoe.")]
        if not keys:
            continue
        mlp = p + "dmoe.experts.mlp."
        native = megablocks_to_native(state[mlp + "w1"], state[mlp + "v1"], state[mlp + "w2"], int(m.moe.n_experts))
        for k in keys:
            out.pop(k)
        out.update({p + n: t for n, t in native.items()})
        out[p + "router.weight"] = state[p + "dmoe.router.layer.weight"]
    return out


def export_hf(source: str | os.PathLike, out: Optional[str | os.PathLike] = None, dtype: str = "fp32",
              tokenizer: Optional[str] = None, remote_code: bool = False) -> tuple[Path, HFTarget]:
    """Write the Hugging Face folder of a run directory, checkpoint or mixtrain export.
    Written next to ``out`` and moved into place when complete (an existing folder is
    replaced only then). Returns (folder, target)."""
    from mixtrain.train.export import resolve_checkpoint

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'mixtrain[hf]'") from None
    src = Path(source)
    resolve_checkpoint(src)  # a missing path or a run without a checkpoint: a UserError first
    tok_path = find_tokenizer(src, tokenizer)
    info = tokenizer_info(tok_path)
    model, target, cfg = build_hf_model(src, dtype, remote_code, info)
    out_dir = Path(out) if out else default_out(src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if target.remote_code:
            from mixtrain.hf.remote.configuration_mixtrain import MixtrainConfig
            from mixtrain.hf.remote.modeling_mixtrain import MixtrainForCausalLM

            MixtrainConfig.register_for_auto_class()
            MixtrainForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model.generation_config.eos_token_id = info.eos_id
        model.generation_config.pad_token_id = info.pad_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(str(tmp))
        if target.remote_code:  # the modeling code alone: its files, nothing from mixtrain
            for name in ("configuration_mixtrain.py", "modeling_mixtrain.py"):
                shutil.copyfile(REMOTE_DIR / name, tmp / name)
        if info.path is not None:
            save_tokenizer(info, tmp, int(cfg.model.max_seq_len))
        _add_provenance(tmp / "config.json", cfg, target)
        _readable(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, target


def _add_provenance(path: Path, cfg, target: HFTarget) -> None:
    """Record the mixtrain layout (in the layer grammar) and why this class was chosen."""
    from mixtrain.layouts import build_layout

    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    data = json.loads(path.read_text())
    data["mixtrain"] = {"layout": layout.name, "layers": layout.compact(windows=True), "hf_class_reason": target.reason}
    from mixtrain.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _readable(folder: Path) -> None:
    """mkdtemp makes a private folder: give it (and its files) the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
