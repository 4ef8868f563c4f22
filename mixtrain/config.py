"""Typed configuration schemas.

Every Hydra config group under ``recipes/`` has a dataclass here, registered with
Hydra's ConfigStore, so a misspelt key or a value of the wrong type fails when the
recipe is composed, with a message that names the key.

The groups mirror the code's concepts:

- ``model``  -> :class:`ModelConfig` (with :class:`MoEConfig`) -> ``mixtrain.model``
- ``layout`` -> :class:`LayoutConfig` -> ``mixtrain.layouts``
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class Choice(str, Enum):
    """A setting with a fixed set of values, checked once when the recipe is composed
    (``train.trainable=mlp`` is refused naming the key and the values). Members are
    their own strings: ``==``, ``str()``, f-strings, ``repr()`` and JSON see "csv", not
    the enum."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        return repr(self.value)


def _choice(name: str, *values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values], module=__name__)  # type: ignore[return-value]


MoEImpl = _choice("MoEImpl", "native", "megablocks")
AttnImpl = _choice("AttnImpl", "auto", "sdpa", "flex")
DataKind = _choice("DataKind", "pretrain", "longqa", "recall")
DataSource = _choice("DataSource", "embedded", "files", "hub")
QASource = _choice("QASource", "offline", "jsonl", "hf")
Trainable = _choice("Trainable", "all", "attention")
Stage = _choice("Stage", "pretrain", "extend", "longqa")
Strategy = _choice("Strategy", "auto", "ddp", "fsdp")
ActivationCheckpointing = _choice("ActivationCheckpointing", "none", "full", "selective")
LoggerKind = _choice("LoggerKind", "wandb", "csv", "none")
LoggerMode = _choice("LoggerMode", "auto", "online", "offline", "disabled")
LRSchedule = _choice("LRSchedule", "cosine", "wsd")


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
    impl: MoEImpl = MoEImpl.native
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
    # Cross-Layer Attention: layers that compute K/V normalise their input with a norm
    # of their own (the KV path), separate from the query path's.
    kv_norm: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # "auto": FlexAttention on CUDA, SDPA with an explicit mask elsewhere.
    attn_impl: AttnImpl = AttnImpl.auto
    # model=from_hf: the Hugging Face model folder (config.json) the fields above are
    # derived from (mixtrain/hf/importer.py); null for mixtrain's own recipes.
    hf_path: Optional[str] = None


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

    # null with layers/blocks/foundry also null means "standard".
    preset: Optional[str] = None
    window: Optional[int] = None
    layers: Optional[list[Any]] = None
    blocks: Optional[list[Any]] = None
    foundry: Optional[dict[str, Any]] = None
    # Preset parameters: "every" for interleaved local/global (every k-th layer global).
    every: Optional[int] = None
    shared_attention: Optional[dict[Any, Any]] = None


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes packed token sequences.

    ``source``: "embedded" (the default corpus built from text already on the
    machine, no download), "files" (local text/JSONL/Parquet files in ``paths``) or
    "hub" (an HF hub data set by ``hub_name``; needs network, never the default).
    """

    # What the examples are: "pretrain" (packed next-token sequences).
    kind: DataKind = DataKind.pretrain
    source: DataSource = DataSource.embedded
    paths: Optional[list[str]] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"
    # Hub only: true streams records from the hub as they are tokenised; false downloads
    # the data set to the HF cache first. Local files are always read record by record.
    streaming: bool = False
    text_field: str = "text"
    # Size cap of the embedded corpus in characters (it is built once and cached).
    embedded_max_chars: int = 4_000_000
    # "train": byte-level BPE trained on this corpus (cached); a tokenizer.json path or an
    # HF tokenizer folder; a tiktoken encoding ("tiktoken:cl100k_base", its file already
    # on this machine, or a path to a .tiktoken file); or an HF hub name (needs network
    # unless cached). See mixtrain/data/tokenizer.py.
    tokenizer: str = "train"
    # The token that ends each document / pads (null: the tokenizer's own, see
    # tokenizer.py); a token the vocabulary lacks is added as a special token.
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    # The tiktoken encoding (split pattern, special tokens) of a .tiktoken file whose name
    # is not the encoding's (null: the file name, e.g. cl100k_base.tiktoken).
    tiktoken_encoding: Optional[str] = None
    # Vocabulary size of a trained tokenizer; null takes model.vocab_size.
    vocab_size: Optional[int] = None
    cache_dir: str = "${oc.env:MIXTRAIN_CACHE,${oc.env:HOME}/.cache/mixtrain}"
    # Processes tokenising in parallel during preparation (null: every core).
    num_proc: Optional[int] = None
    # Size of one preparation unit (and so of one shard) in MB of input text.
    shard_mb: float = 64.0
    # A mixture: a list of sources, each a dict of data keys (source, paths, hub_name,
    # text_field, ...) plus weight, e.g. [{paths: [a/*.jsonl], weight: 0.7}, {paths: [b/*.txt],
    # weight: 0.3}]; the keys above are the defaults of every source. null: one source.
    sources: Optional[list[Any]] = None
    # DataLoader worker processes (batches are memory-mapped slices: 0 is usually enough).
    num_workers: int = 0
    # Fraction of documents held out for validation (by document, deterministic).
    val_fraction: float = 0.02
    # Attention stays inside a document when packing several into one sequence.
    intra_doc_attention: bool = False
    seed: int = 1234
    # Use at most this many documents (null: all). Required with hub streaming, since
    # the packed cache is built from a finite prefix of the stream.
    max_documents: Optional[int] = None
    # ---- data.kind=longqa (the paper's stage 3; mixtrain/data/longqa/). Documents are
    # cut into ~qa_chunk_tokens-token chunks, one QA pair per chunk, chunks of different
    # documents concatenated up to seq_len, all QA pairs appended, loss on answers only.
    # Where the pairs come from: "offline" (generated from each chunk's own text, no
    # model), "jsonl" (qa_path: records with context/question/answer) or "hf" (an HF
    # data set qa_hub_name with those fields; needs network or an HF cache).
    qa_source: QASource = QASource.offline
    # Offline generator: "fact" (a planted "secret code" sentence), "span" (continue a
    # quoted span of the chunk), "mixed" (either, per chunk), or "module:function" taking
    # (chunk_text, random.Random) and returning (context, question, answer).
    qa_generator: str = "mixed"
    qa_chunk_tokens: int = 1024
    qa_path: Optional[str] = None
    qa_hub_name: Optional[str] = None
    qa_hub_config: Optional[str] = None
    qa_hub_split: str = "train"
    qa_context_field: str = "context"
    qa_question_field: str = "question"
    qa_answer_field: str = "answer"
    # Records with the same value here are one document (e.g. "title" for SQuAD, whose
    # paragraphs of one article must not share an example); null: each distinct context.
    qa_document_field: Optional[str] = None
    # Build at most this many training examples (null: until the chunks run out).
    qa_max_examples: Optional[int] = None
    # ---- data.kind=recall (multi-query associative recall, generated on the fly;
    # mixtrain/data/recall.py): key-value pairs at random positions, later queries for
    # their keys, loss on the answers only. Token ids: EOS, filler, keys, values.
    recall_pairs: int = 8
    recall_keys: int = 32
    recall_values: int = 32
    recall_filler: int = 16
    # The sliding window W the queries are placed against (recipes/data/recall.yaml:
    # ${model.sliding_window}); "beyond": every query's pair is outside its window,
    # "within": inside it, "mixed": each query either way with probability 1/2.
    recall_window: Optional[int] = None
    recall_placement: str = "beyond"
    # Beyond-window queries are at least this many tokens after every pair (null: the
    # window). Above the reach of stacked sliding layers (n_layers x window) only global
    # attention can find the pair.
    recall_gap: Optional[int] = None
    # Where beyond sequences put their block of pairs: "random" (any start that leaves
    # room) or "first" (the sequence's first slots, Zoology's MQAR layout).
    recall_block: str = "random"
    # Queries of a beyond sequence (null: one per pair). More than recall_pairs asks each
    # key several times (query i asks pair i % pairs, at a random slot): more answers to
    # learn from per sequence, and answering by position still scores 1 / pairs when
    # recall_pairs divides it.
    recall_queries: Optional[int] = None
    # Validation placement (null: as training), sequences held out (their own seed stream).
    recall_val_placement: Optional[str] = None
    recall_val_sequences: int = 256
    # Training sequences are indexed 0..n-1 (generated when read) and ordered by the resumable sampler.
    recall_train_sequences: int = 1_000_000


@dataclass
class TrainConfig:
    """Token budgets, not epochs. ``global_batch_tokens`` is split into
    micro-batches of ``micro_batch_size`` sequences of ``seq_len`` tokens on each
    device; gradient accumulation makes up the rest."""

    seq_len: int = 128
    micro_batch_size: int = 8
    global_batch_tokens: int = 8192
    max_tokens: int = 1_000_000
    # "all", or "attention": freeze everything but the attention weights
    # (the paper's context-extension and QA stages).
    trainable: Trainable = Trainable.all
    # Start from the weights of this checkpoint / exported model (a new run, not a resume).
    init_from: Optional[str] = None
    # Which of the paper's stages this run is: "pretrain", "extend" or "longqa". The
    # later stages start from the previous stage's weights, so they need init_from.
    stage: Stage = Stage.pretrain
    val_every_steps: int = 50
    val_batches: int = 8
    save_every_steps: int = 100
    keep_checkpoints: int = 2
    # End this invocation after this many optimizer steps (checkpointing first),
    # keeping the schedule of the whole run: for time-limited or preemptible jobs,
    # which then continue with run.resume=auto.
    stop_after_steps: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    # After warmup: "cosine" decays to lr * min_lr_ratio over the rest of training; "wsd"
    # (warmup-stable-decay) holds lr, then decays linearly to lr * min_lr_ratio over the
    # last decay_fraction of the steps.
    schedule: LRSchedule = LRSchedule.cosine
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # null: fused AdamW on CUDA, foreach elsewhere.
    fused: Optional[bool] = None


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    # "auto" (one device), "ddp", or "fsdp" (FSDP2 fully_shard per block through
    # Lightning's ModelParallelStrategy).
    strategy: Strategy = Strategy.auto
    # null: bf16 mixed precision on GPU, fp32 on CPU.
    precision: Optional[str] = None
    # "none", "full" (every block) or "selective" (every other block).
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    compile: bool = False
    # Build the model on the meta device and initialise it after sharding.
    meta_init: bool = False
    log_every_n_steps: int = 10
    progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    # "wandb", "csv" or "none".
    kind: LoggerKind = LoggerKind.wandb
    project: str = "mixtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # "auto": online when a W&B API key is configured, offline otherwise.
    mode: LoggerMode = LoggerMode.auto


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"
    seed: int = 1234
    # null: a fresh run (error if the run directory already holds checkpoints);
    # "auto": continue from the newest complete checkpoint of this run directory;
    # or a path to a checkpoint.
    resume: Optional[str] = None


@dataclass
class MixtrainConfig:
    """The root of a composed recipe (recipes/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mixtrain_schema", node=MixtrainConfig)
    for group, node in [
        ("model", ModelConfig),
        ("layout", LayoutConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


# ---------------------------------------------------------------------------
# Composition: resolvers, search path, and the compose API used by every command
# ---------------------------------------------------------------------------

RECIPES_PACKAGE = "mixtrain_recipes"
_STAMP: Optional[str] = None


def run_stamp() -> str:
    """A run id that every rank and every restart of one job agrees on.

    ``MIXTRAIN_RUN_STAMP`` wins, then SLURM's job id, then torchrun's rendezvous id,
    then the wall clock (taken once per process and exported, so processes that
    Lightning spawns inherit it)."""
    import os
    import time

    global _STAMP
    # An interactive allocation (salloc + a shell) is not one job: its id would merge runs.
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "sh", "zsh", "interactive")
    for var in ("MIXTRAIN_RUN_STAMP", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if var == "SLURM_JOB_ID" and interactive:
            continue
        value = os.environ.get(var)
        if value and value != "none":
            return value
    if _STAMP is None:
        _STAMP = time.strftime("%Y%m%d-%H%M%S")
        os.environ["MIXTRAIN_RUN_STAMP"] = _STAMP
    return _STAMP


def layout_name(layout: Any) -> str:
    """A short name for a layout config: its preset, or 'custom'."""
    preset = layout.get("preset") if hasattr(layout, "get") else None
    return str(preset) if preset else "custom"


def tokenizer_of(source: Any) -> str:
    """``<run dir>/tokenizer.json`` of a run directory, an export folder or a
    checkpoint inside ``<run dir>/checkpoints/`` (later stages reuse their
    predecessor's tokenizer)."""
    from mixtrain.rundir import RunDir

    return str(RunDir.of_path(str(source)).tokenizer_file)


def _hf_value(path: Any, key: str) -> Any:
    """``${mixtrain.hf:<HF folder>,<model field>}``: a model field derived from a Hugging
    Face config.json (recipes/model/from_hf.yaml)."""
    from mixtrain.hf.importer import hf_value

    return hf_value(path, key)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mixtrain.stamp"):
        OmegaConf.register_new_resolver("mixtrain.stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("mixtrain.tokenizer_of"):
        OmegaConf.register_new_resolver("mixtrain.tokenizer_of", tokenizer_of)
    if not OmegaConf.has_resolver("mixtrain.layout_name"):
        OmegaConf.register_new_resolver("mixtrain.layout_name", layout_name)
    if not OmegaConf.has_resolver("mixtrain.hf"):
        OmegaConf.register_new_resolver("mixtrain.hf", _hf_value)


def search_path_overrides() -> list[str]:
    """Users add their own recipe folders with MIXTRAIN_RECIPES=dir1:dir2 (searched
    before the built-in recipes), or with ``hydra.searchpath=[file:///dir]``."""
    import os

    extra = [p for p in os.environ.get("MIXTRAIN_RECIPES", "").split(os.pathsep) if p]
    if not extra:
        return []
    paths = ",".join(f"file://{os.path.abspath(p)}" for p in extra)
    return [f"hydra.searchpath=[{paths}]"]


def setup_hydra() -> None:
    register_configs()
    register_resolvers()


_MISSING_KEY = re.compile(r"Could not override '([\w.]+)'\.\nTo append to your config use \+\S+\n(Key '\w+' not in '\w+')")
_MISSING_OPTION = re.compile(r"Could not find '([\w/]+)/([^']+)'")


def _settings_of(dotted: str) -> list[str]:
    """The valid keys beside ``dotted`` (``train.max_tokns`` -> train.seq_len, ...), from the schemas."""
    import dataclasses
    import typing

    node: Any = MixtrainConfig
    *parents, _ = dotted.split(".")
    for name in parents:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if name not in fields:
            return []
        hint = typing.get_type_hints(node).get(name)
        args = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        node = args[0] if args else hint
    if not dataclasses.is_dataclass(node):
        return []
    prefix = ".".join(parents)
    return [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(node)]


def _nearest(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _clean_hydra_message(text: str) -> str:
    """Hydra's messages in our words: a misspelt key names the nearest valid key (not
    Hydra's ``+key=...`` append hint); lists of recipes leave out the internal
    ``*_schema`` entries and the config search path, and name the nearest recipe."""
    m = _MISSING_KEY.search(text)
    if m:
        key = m.group(1)
        return f"{m.group(2)}: {key} is not a setting{_nearest(key, _settings_of(key))}"
    m = _MISSING_OPTION.search(text)
    if m:
        lines = text.split("\nConfig search path:")[0].splitlines()
        lines = [l for l in lines if not l.strip().endswith("_schema")]
        options = [l.strip() for l in lines if l.startswith("\t")]
        near = _nearest(m.group(2), options)
        lines[0] += f": did you mean {m.group(1)}={near[len('; did you mean '):-1]}?" if near else ""
        return "\n".join(lines)
    return text


_CHOICE_ERROR = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]\s+full_key: (\S+)")


def _explain(e: BaseException) -> str:
    """Hydra's message and the causes under it (which name the key and the type)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        choice = _CHOICE_ERROR.search(str(e))
        if choice:  # a Choice setting: the same words as every other refused value
            value, allowed, key = choice.groups()
            return f"{key}={value!r} is not known; use one of: {allowed}"
        text = str(e).strip().split("\n    full_key:")[0]
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return _clean_hydra_message("\n".join(parts))


def _explain_mapping_into_null(overrides: list[str], error: str) -> str:
    """``layout.shared_attention={3: 2}`` where the recipe leaves the mapping null: OmegaConf
    cannot merge a command-line mapping into a null node; say so and what works instead."""
    m = re.search(r"full_key: ([\w.]+)", error)
    key = m.group(1) if m else None
    bad = [o for o in overrides if o.partition("=")[0].lstrip("+") == key] if key else []
    where = bad[0] if bad else (key or "a mapping override")
    return (f"{where}: this recipe leaves {key or 'that setting'} null, and a mapping cannot be set into a null "
            f"setting from the command line; write it in a recipe file instead (a layout recipe with "
            f"shared_attention or foundry like recipes/layout/shared_attention_example.yaml, in a folder named "
            f"in MIXTRAIN_RECIPES, then layout=<its name>); single entries of a mapping the recipe sets can be "
            f"overridden")


def _explain_null_parent(overrides: list[str], config_name: str) -> Optional[str]:
    """The override that sets a key under a node the recipe leaves null (``model.moe.top_k=2``
    on a dense model, whose ``model.moe`` is null), in words; None when none is found."""
    from hydra import compose as hydra_compose

    groups = [o for o in overrides if "." not in o.partition("=")[0].lstrip("+~")]
    try:
        base = hydra_compose(config_name=config_name, overrides=groups)
    except Exception:
        return None
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        parts = key.split(".")
        node: Any = base
        for i, name in enumerate(parts[:-1]):
            node = node.get(name) if hasattr(node, "get") else None
            if node is None:
                parent = ".".join(parts[: i + 1])
                hint = (" (a dense model): choose an MoE model recipe (model=tiny_moe, model=paper_moe) and then "
                        "override its keys" if parent == "model.moe" else
                        f"; set the whole block ({parent}={{...}}) or choose a recipe that has one")
                return f"{o}: {parent} is null in this recipe{hint}"
    return None


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def whole_numbers_in_overrides(overrides: list[str]) -> list[str]:
    """``train.max_tokens=2e9`` means two billion tokens, but Hydra reads ``2e9`` as a
    float, which an integer setting refuses. Values written in scientific notation
    that are whole numbers (also in a sweep's ``a,b,c`` list) are passed as integers;
    a float setting takes an integer as the same number."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        items = value.split(",")
        if sep and not key.startswith("hydra.") and all(_SCIENTIFIC.fullmatch(v.strip()) for v in items):
            numbers = [float(v) for v in items]
            if all(n.is_integer() and abs(n) < 2**63 for n in numbers):
                o = key + "=" + ",".join(str(int(n)) for n in numbers)
        out.append(o)
    return out


def compose(overrides: Optional[list[str]] = None, config_name: str = "train"):
    """Compose a recipe exactly as ``mixtrain train`` would, without running it.

    Returns the DictConfig (typed by :class:`MixtrainConfig`, interpolations
    unresolved). Errors name the offending key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    setup_hydra()
    overrides = whole_numbers_in_overrides(list(overrides or [])) + search_path_overrides()
    GlobalHydra.instance().clear()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mixtrain.errors import UserError

    with initialize_config_module(config_module=RECIPES_PACKAGE, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise UserError(_explain(e)) from e
        except AttributeError as e:  # OmegaConf cannot merge a mapping into a null node
            if "'NoneType' object has no attribute 'get'" not in str(e):
                raise
            raise UserError(_explain_mapping_into_null(overrides, str(e))) from None
        except AssertionError as e:  # OmegaConf.update under a null node (model.moe.top_k on a dense model)
            if "Unexpected type for root" not in str(e):
                raise
            raise UserError(_explain_null_parent(overrides, config_name) or str(e)) from None
    _refuse_added_keys(cfg)
    from mixtrain.hf.importer import explain_model

    explain_model(cfg)  # model=from_hf: a model.hf_path that cannot be read is a UserError here
    return cfg


def _refuse_added_keys(cfg: Any, schema: Any = None, prefix: str = "") -> None:
    """A key that no schema declares (``+layout.presett=ma``: ``+`` lets Hydra add it) would
    be read by nothing: refuse it, naming the nearest setting."""
    import dataclasses
    import typing

    from omegaconf import DictConfig

    from mixtrain.errors import UserError

    schema = schema or MixtrainConfig
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise UserError(
                f"{dotted} is not a setting{_nearest(key, fields).replace('mean ', 'mean ' + prefix)}; nothing would read "
                f"it (a '+' override adds a key, it does not make one a setting). See `mixtrain recipes`"
            )
        sub = [a for a in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(a)]
        node = cfg._get_node(key)
        if sub and isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            _refuse_added_keys(node, sub[0], dotted + ".")
