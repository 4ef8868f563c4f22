"""Start from an existing Hugging Face checkpoint: ``train.init_from=<HF folder>``.

A folder that ``save_pretrained`` wrote (``config.json`` + ``model.safetensors``, sharded
or not, or ``pytorch_model.bin``) of a supported family loads into a mixtrain model of
the same shapes under any layout:

    mixtrain train model=from_hf model.hf_path=DIR train.init_from=DIR layout=ma_offset

``model=from_hf`` (recipes/model/from_hf.yaml) derives the model recipe from
``config.json`` through the ``mixtrain.hf`` resolver (:func:`hf_value`); any field can
still be overridden (``model.max_seq_len=4096``). Weights map one to one:

    embed_tokens -> tok_embeddings, input_layernorm -> attn_norm (and kv_norm with CLA's
    KV-path norm), q/k/v/o_proj -> wq/wk/wv/wo, post_attention_layernorm -> mlp_norm,
    gate/up/down_proj -> w1/w3/w2, norm -> norm, lm_head -> output
    MoE: router gate -> router, expert e's gate/up/down [out, in] -> w1/w3/w2[e] [in, out]

A KV consumer layer of the layout keeps the HF layer's Q and O and drops its K/V
projections (it reads its producer's cache); a sliding layer keeps all of them; a
Shared Attention layer keeps V and O. Supported families (:data:`FAMILIES`): Llama,
Mistral, Qwen2 (attention biases must be zero: mixtrain has none), Mixtral (top-k
weights renormalised) and Qwen2-MoE (no shared expert, or an all-zero one). Anything
mixtrain cannot express exactly (another activation, RoPE scaling, biases, partial
rotary, dense layers between MoE layers, ...) is refused before training starts, with
everything that differs listed.

Load-balancing loss: HF pools the router statistics over all layers before the
Switch loss; mixtrain computes it per MoE layer and averages, so
``router_aux_loss_coef`` carries over as ``moe.lb_loss_weight`` but the loss values
are not the same for more than one MoE layer.

Everything here reads JSON and safetensors directly: importing a model needs neither
transformers nor network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from mixtrain.errors import UserError

# model_type -> (family, has qkv biases, is MoE)
FAMILIES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("Llama", False, False),
    "mistral": ("Mistral", False, False),
    "qwen2": ("Qwen2", True, False),
    "mixtral": ("Mixtral", False, True),
    "qwen2_moe": ("Qwen2-MoE", True, True),
}
# ModelConfig fields whose value must equal the HF model's (they set shapes or the function).
MUST_MATCH = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "tie_embeddings", "norm_eps")
MOE_MUST_MATCH = ("n_experts", "top_k", "expert_hidden", "renormalize")
# Used when config.json sets no sliding window (layouts with sliding layers need one).
DEFAULT_WINDOW = 4096


def _fmt_path(path: Any) -> str:
    return str(path)


def is_hf_folder(path: Any) -> bool:
    """A folder ``save_pretrained`` wrote: ``config.json`` with a ``model_type``, and no
    mixtrain ``config.yaml`` (a mixtrain export or run directory)."""
    if path is None:
        return False
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir() or not (p / "config.json").is_file() or (p / "config.yaml").is_file():
        return False
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _read_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise UserError(f"{path} has no config.json: model.hf_path / train.init_from must be a folder written by "
                        f"save_pretrained (config.json + model.safetensors)")
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{f} does not hold a JSON object")
    return data


def _rope(c: dict[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope theta, the scaling settings we would ignore or None). transformers 4.x keeps
    ``rope_theta`` + ``rope_scaling``; 5.x one ``rope_parameters`` mapping."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form: the global layers' settings
    scaling = c.get("rope_scaling")
    theta = c.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def _name_of(path: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.resolve().name).strip("-.") or "model"
    return f"hf-{base}"


def _problems_and_fields(path: Path, c: dict[str, Any]) -> tuple[list[str], dict[str, Any], list[str]]:
    """What mixtrain cannot express, the ModelConfig fields, and notes for the user."""
    problems: list[str] = []
    notes: list[str] = []
    mt = c.get("model_type")
    if mt == "mixtrain":
        problems.append(
            "this is a mixtrain export with mixtrain's own remote code (model_type 'mixtrain'); start from the "
            "mixtrain run or its `mixtrain export` folder instead (train.init_from=<run dir or export>, with that "
            "run's model and layout)"
        )
        return problems, {}, notes
    if mt not in FAMILIES:
        arch = ", ".join(c.get("architectures") or []) or "?"
        problems.append(
            f"architecture {arch} (model_type {mt!r}) is not supported; supported model types: "
            + ", ".join(f"{k} ({v[0]})" for k, v in FAMILIES.items())
        )
        return problems, {}, notes
    family, _, is_moe = FAMILIES[mt]
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r}: mixtrain's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            problems.append(f"{key}=true: mixtrain's projections have no biases")
    theta, scaling = _rope(c)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        problems.append(f"rope scaling {kind!r} ({json.dumps(scaling, sort_keys=True)}) is not implemented: mixtrain's "
                        f"RoPE is plain (rope_theta only)")
    prf = c.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={prf}: mixtrain rotates the whole head")
    for key in ("qk_norm", "use_qk_norm"):
        if c.get(key):
            problems.append(f"{key}=true: mixtrain has no query/key norms")
    d = int(c["hidden_size"])
    n_heads = int(c["num_attention_heads"])
    head_dim = c.get("head_dim") or d // n_heads
    n_kv = c.get("num_key_value_heads") or n_heads
    max_pos = int(c.get("max_position_embeddings") or 2048)
    window = None
    if mt == "mistral" and c.get("sliding_window"):
        window = int(c["sliding_window"])
        notes.append(f"{path.name} attends in a sliding window of {window} in every layer (model.sliding_window={window}, "
                     f"the window of the layout's sliding layers); layout=swa is the same model")
    layer_types = c.get("layer_types")
    if mt in ("qwen2", "qwen2_moe") and c.get("use_sliding_window") and c.get("sliding_window"):
        window = int(c["sliding_window"])
        notes.append(f"{path.name} uses sliding-window attention ({window}) in some layers; the layout decides which "
                     f"layers slide in mixtrain")
    elif isinstance(layer_types, list) and "sliding_attention" in layer_types and c.get("sliding_window"):
        window = int(c["sliding_window"])
    fields: dict[str, Any] = {
        "name": _name_of(path),
        "vocab_size": int(c["vocab_size"]),
        "d_model": d,
        "n_layers": int(c["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(n_kv),
        "head_dim": int(head_dim),
        "ffn_hidden": int(c.get("intermediate_size") or 4 * d),
        "moe": None,
        "max_seq_len": max_pos,
        "rope_theta": theta,
        "sliding_window": min(window or DEFAULT_WINDOW, max_pos),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "kv_norm": False,
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
    }
    if is_moe:
        from mixtrain.config import MoEConfig

        if mt == "mixtral":
            moe = MoEConfig(n_experts=int(c.get("num_local_experts", 8)), top_k=int(c.get("num_experts_per_tok", 2)),
                            expert_hidden=int(c["intermediate_size"]), renormalize=True,
                            lb_loss_weight=float(c.get("router_aux_loss_coef", 0.001)), z_loss_weight=0.0)
            if c.get("router_jitter_noise"):
                notes.append(f"router_jitter_noise={c['router_jitter_noise']} (training-time noise) is not used by mixtrain")
        else:
            moe = MoEConfig(n_experts=int(c.get("num_experts", 60)), top_k=int(c.get("num_experts_per_tok", 4)),
                            expert_hidden=int(c["moe_intermediate_size"]), renormalize=bool(c.get("norm_topk_prob", False)),
                            lb_loss_weight=float(c.get("router_aux_loss_coef", 0.001)), z_loss_weight=0.0)
            step = int(c.get("decoder_sparse_step", 1))
            dense = list(c.get("mlp_only_layers") or [])
            if step != 1 or dense:
                problems.append(f"decoder_sparse_step={step}, mlp_only_layers={dense}: some layers have a dense MLP; "
                                f"mixtrain puts the MoE in every layer")
        fields["moe"] = dataclasses.asdict(moe)
    return problems, fields, notes


@lru_cache(maxsize=16)
def _derive_cached(path: str, mtime: float) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    p = Path(path)
    problems, fields, notes = _problems_and_fields(p, _read_config(p))
    return tuple(problems), json.dumps(fields), tuple(notes)


def _resolve_path(path: Any, key: str = "model.hf_path") -> Path:
    if path is None or str(path) in ("", "???", "None"):
        raise UserError(f"{key} is not set: give the folder of a Hugging Face model (config.json + weights), "
                        f"e.g. model=from_hf {key}=/path/to/model")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise UserError(f"{key}={path}: no such folder; give the folder of a Hugging Face model (config.json + weights)")
    return p


def derive(path: Any, key: str = "model.hf_path") -> tuple[dict[str, Any], list[str]]:
    """The ModelConfig fields of the HF model in ``path`` and notes for the user. A model
    mixtrain cannot express is a UserError listing every reason."""
    p = _resolve_path(path, key)
    cfg_file = p / "config.json"
    mtime = cfg_file.stat().st_mtime if cfg_file.is_file() else 0.0
    problems, fields, notes = _derive_cached(str(p.resolve()), mtime)
    if problems:
        raise UserError(f"{key}={path}: this Hugging Face model cannot be loaded into mixtrain exactly:\n  - "
                        + "\n  - ".join(problems))
    return json.loads(fields), list(notes)


def hf_value(path: Any, key: str) -> Any:
    """The ``mixtrain.hf`` resolver: ``${mixtrain.hf:${.hf_path},d_model}``; ``moe.top_k`` etc.
    for ``model=from_hf_moe``, ``ffn_hidden_dense`` for ``model=from_hf`` (a recipe of the
    other kind is refused, naming the right one)."""
    if key == "name":  # also names the run directory, which Hydra resolves before mixtrain's checks
        try:
            return derive(path)[0]["name"]
        except UserError:
            return "from_hf"
    fields, _ = derive(path)
    if key == "ffn_hidden_dense":  # model=from_hf
        if fields["moe"] is not None:
            raise UserError(f"model.hf_path={path} is a mixture-of-experts model: use model=from_hf_moe")
        return fields["ffn_hidden"]
    if key.startswith("moe."):  # model=from_hf_moe
        if fields["moe"] is None:
            raise UserError(f"model.hf_path={path} is a dense model (no experts): use model=from_hf")
        return fields["moe"][key[4:]]
    if key not in fields:
        raise UserError(f"mixtrain.hf resolver: no model field {key!r} (known: {', '.join(fields)})")
    return fields[key]


# ------------------------------------------------------------------ checks against the recipe


def differences(model_cfg: Any, fields: dict[str, Any]) -> list[str]:
    """How the recipe's model differs from the HF model in what sets shapes or the function."""
    def get(obj, k):
        return obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)

    diff = []
    for k in MUST_MATCH:
        mine, theirs = get(model_cfg, k), fields[k]
        if k == "norm_eps":
            same = mine is not None and abs(float(mine) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs)))
        else:
            same = mine == theirs
        if not same:
            diff.append(f"model.{k}: {theirs!r} in the HF model, {mine!r} here")
    moe_mine, moe_theirs = get(model_cfg, "moe"), fields["moe"]
    if (moe_mine is None) != (moe_theirs is None):
        diff.append(f"model.moe: {'a mixture of experts' if moe_theirs else 'a dense MLP'} in the HF model, "
                    f"{'a mixture of experts' if moe_mine is not None else 'a dense MLP'} here")
    elif moe_theirs is None:
        if get(model_cfg, "ffn_hidden") != fields["ffn_hidden"]:
            diff.append(f"model.ffn_hidden: {fields['ffn_hidden']!r} in the HF model, {get(model_cfg, 'ffn_hidden')!r} here")
    else:
        for k in MOE_MUST_MATCH:
            if get(moe_mine, k) != moe_theirs[k]:
                why = " (Mixtral always renormalises the top-k weights)" if k == "renormalize" and moe_theirs[k] else ""
                diff.append(f"model.moe.{k}: {moe_theirs[k]!r} in the HF model, {get(moe_mine, k)!r} here{why}")
    return diff


def check_model(model_cfg: Any, path: Any, key: str = "train.init_from") -> list[str]:
    """Refuse (UserError) a recipe whose model is not the HF model's; return notes."""
    fields, notes = derive(path, key)
    diff = differences(model_cfg, fields)
    if diff:
        raise UserError(
            f"{key}={path} holds a different model than model={get_name(model_cfg)}: " + "; ".join(diff)
            + f". Use the model recipe derived from it: model=from_hf model.hf_path={path}"
        )
    return notes


def get_name(model_cfg: Any) -> str:
    return str(model_cfg.get("name") if isinstance(model_cfg, dict) else getattr(model_cfg, "name", "?"))


def prepare_init(cfg: Any) -> list[str]:
    """For ``mixtrain train`` with ``train.init_from=<HF folder>``, before anything is made:
    the recipe's model must be the HF model's, and the data must be tokenised with its
    tokenizer (``data.tokenizer=train``, the default, becomes ``<folder>/tokenizer.json``).
    Returns notes to print."""
    src = cfg.train.init_from
    notes = check_model(cfg.model, src)
    tok_file = Path(os.path.expanduser(str(src))) / "tokenizer.json"
    if cfg.data.tokenizer == "train":
        if not tok_file.is_file():
            raise UserError(
                f"train.init_from={src} has no tokenizer.json, and the model's token ids mean nothing with a newly "
                f"trained tokenizer: set data.tokenizer=<its tokenizer.json> (a fast tokenizer's file)"
            )
        cfg.data.tokenizer = str(tok_file.resolve())
        notes.append(f"data.tokenizer={cfg.data.tokenizer} (the HF model's own tokenizer)")
    return notes


def explain_model(cfg: Any) -> None:
    """Resolve the ``model`` node of a composed recipe; a ``model=from_hf`` that cannot be
    derived becomes a plain UserError (OmegaConf re-raises a resolver's exception as its own,
    keeping only the text). Called by :func:`mixtrain.config.compose` and ``mixtrain train``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if "model" not in cfg:
        return
    try:
        OmegaConf.to_container(cfg.model, resolve=True)
    except OmegaConfBaseException as e:
        text = str(e).split("\n    full_key:")[0]
        prefix = "UserError raised while resolving interpolation: "
        if text.startswith(prefix):
            raise UserError(text[len(prefix):]) from None
        raise


def prepare_run(cfg: Any) -> list[str]:
    """``mixtrain train``, before anything is written: a ``model=from_hf`` recipe that cannot
    be derived is a plain UserError (not Hydra's wrapped one), and ``train.init_from=<HF
    folder>`` is checked and sets the tokenizer (:func:`prepare_init`). Prints and returns notes."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    hf_init = is_hf_folder(cfg.train.get("init_from"))
    explain_model(cfg)
    if cfg.model.get("hf_path") is None and not hf_init:
        return []
    notes = prepare_init(cfg) if hf_init else []
    for n in notes:
        print(f"train.init_from: {n}")
    return notes


# ------------------------------------------------------------------ weights


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of an HF folder: model.safetensors, a sharded safetensors index, or
    pytorch_model.bin (loaded with weights_only)."""
    import torch

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        from safetensors.torch import load_file

        files = [single] if single.is_file() else sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        out: dict[str, Any] = {}
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} lists {f.name}, which is missing: download the complete model")
            out.update(load_file(f))
        return out
    for name in ("pytorch_model.bin",):
        if (path / name).is_file():
            return torch.load(path / name, map_location="cpu", weights_only=True)
    if (path / "pytorch_model.bin.index.json").is_file():
        out = {}
        idx = json.loads((path / "pytorch_model.bin.index.json").read_text())
        for f in sorted(set(idx["weight_map"].values())):
            out.update(torch.load(path / f, map_location="cpu", weights_only=True))
        return out
    raise UserError(f"{path} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def convert(path: Any, model_cfg: Any, layout: Any, key: str = "train.init_from") -> tuple[dict[str, Any], list[str]]:
    """The HF model's weights under mixtrain's names for ``layout`` (a built Layout), and
    notes (which projections were dropped). Checks the model first (:func:`check_model`); refuses non-zero biases, a
    non-zero shared expert, missing or left-over tensors, naming them."""
    import torch

    check_model(model_cfg, path, key)
    notes: list[str] = []
    p = _resolve_path(path, key)
    c = _read_config(p)
    mt = c["model_type"]
    raw = read_tensors(p)
    # Some checkpoints save the bare decoder (no "model." prefix, no lm_head).
    if not any(k.startswith("model.") for k in raw):
        raw = {("model." + k if not k.startswith("lm_head") else k): v for k, v in raw.items()}
    raw = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()
    problems: list[str] = []

    def take(name: str):
        if name not in raw:
            problems.append(f"tensor {name} is missing")
            return None
        used.add(name)
        return raw[name]

    def zero_bias(name: str, what: str) -> None:
        if name in raw:
            used.add(name)
            b = raw[name]
            if b.abs().max().item() != 0:
                problems.append(f"{what}: {name} is not zero (max |b| = {b.abs().max().item():.3g}); mixtrain's "
                                f"projections have no biases")

    get = (lambda o, k: o.get(k)) if isinstance(model_cfg, dict) else (lambda o, k: getattr(o, k))
    kv_norm = bool(get(model_cfg, "kv_norm"))
    tie = bool(get(model_cfg, "tie_embeddings"))
    out: dict[str, Any] = {"tok_embeddings.weight": take("model.embed_tokens.weight"),
                           "norm.weight": take("model.norm.weight")}
    if not tie:
        out["output.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")  # a tied head saved anyway is the embedding
    dropped_kv, dropped_qk = [], []
    for i, spec in enumerate(layout.layers):
        hf = f"model.layers.{i}."
        role = "shared" if spec.attn_source is not None else ("producer" if spec.kv_source == i else "consumer")
        out[f"layers.{i}.attn_norm.weight"] = take(hf + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        if kv_norm and role != "consumer":
            out[f"layers.{i}.kv_norm.weight"] = raw.get(hf + "input_layernorm.weight")  # starts as the shared norm
        proj = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}
        keep = {"producer": "qkvo", "consumer": "qo", "shared": "vo"}[role]
        for short, mine in proj.items():
            name = hf + f"self_attn.{short}_proj.weight"
            if short in keep:
                out[f"layers.{i}.attn.{mine}.weight"] = take(name)
                zero_bias(hf + f"self_attn.{short}_proj.bias", f"layer {i}")
            else:
                used.update({name, hf + f"self_attn.{short}_proj.bias"})
        if role == "consumer":
            dropped_kv.append(i)
        elif role == "shared":
            dropped_qk.append(i)
        if FAMILIES[mt][2]:
            pre = hf + ("block_sparse_moe." if mt == "mixtral" else "mlp.")
            if hf + "mlp.experts.gate_up_proj" in raw:  # transformers 5's fused in-memory form
                pre = hf + "mlp."
                gate_up, down = take(pre + "experts.gate_up_proj"), take(pre + "experts.down_proj")  # [E,2H,C], [E,C,H]
                H = gate_up.shape[1] // 2
                out[f"layers.{i}.mlp.w1"] = gate_up[:, :H].transpose(1, 2).contiguous()
                out[f"layers.{i}.mlp.w3"] = gate_up[:, H:].transpose(1, 2).contiguous()
                out[f"layers.{i}.mlp.w2"] = down.transpose(1, 2).contiguous()
            else:  # one tensor per expert, [out, in] (what save_pretrained writes)
                names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                E = get(model_cfg, "moe")
                E = int(E["n_experts"] if isinstance(E, dict) else E.n_experts)
                for mine, theirs in zip(("w1", "w3", "w2"), names):
                    ws = [take(f"{pre}experts.{e}.{theirs}.weight") for e in range(E)]
                    if all(w is not None for w in ws):
                        out[f"layers.{i}.mlp.{mine}"] = torch.stack([w.t() for w in ws]).contiguous()
            out[f"layers.{i}.mlp.router.weight"] = take(pre + "gate.weight")
            shared = [k for k in raw if k.startswith(pre + "shared_expert")]
            for k in shared:
                used.add(k)
                if k.startswith(pre + "shared_expert.") and raw[k].abs().max().item() != 0:
                    problems.append(f"layer {i}: {k} is not zero: mixtrain's MoE has no shared expert")
        else:
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"layers.{i}.mlp.{mine}.weight"] = take(hf + f"mlp.{theirs}.weight")
    left = sorted(set(raw) - used)
    if left:
        problems.append(f"{len(left)} tensor(s) mixtrain has no place for: {', '.join(left[:6])}"
                        + (" ..." if len(left) > 6 else ""))
    if problems:
        raise UserError(f"{key}={path}: the weights cannot be loaded into mixtrain:\n  - " + "\n  - ".join(problems))
    if dropped_kv:
        notes.append(f"layers {_ranges(dropped_kv)}: K/V projections dropped (KV consumers read their producer's cache)")
    if dropped_qk:
        notes.append(f"layers {_ranges(dropped_qk)}: Q/K projections dropped (Shared Attention reuses probabilities)")
    return out, notes


def _ranges(xs: list[int]) -> str:
    parts, start = [], None
    for a, b in zip(xs, xs[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = None
    return ", ".join(parts)


def load_hf_model(path: Any, layout: Any = None, device: str = "cpu"):
    """A mixtrain Transformer with the HF model's weights (layout: a layout config or a built
    Layout; default standard). Returns ``(model, model_cfg)``."""
    from omegaconf import OmegaConf

    from mixtrain.config import ModelConfig
    from mixtrain.layouts import Layout, build_layout
    from mixtrain.model import build_model

    fields, _ = derive(path, "path")
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {**fields, "hf_path": str(path)})
    if not isinstance(layout, Layout):
        layout = build_layout(layout or {"preset": "standard"}, model_cfg.n_layers, model_cfg.sliding_window)
    model = build_model(model_cfg, layout, device=device)
    state, _ = convert(path, model_cfg, layout, "path")
    model.load_state_dict(state)
    return model.eval(), model_cfg
