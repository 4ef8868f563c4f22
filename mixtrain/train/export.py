"""Reading trained weights back, and ``mixtrain export``: one consolidated
safetensors file plus the resolved config, loadable on one device."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from mixtrain.errors import UserError
from mixtrain.rundir import RunDir


def _strip_prefix(state_dict: dict[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """What a model source names: the newest complete checkpoint of a run directory, else
    the path itself (a checkpoint, an exported folder, a ``.safetensors`` file). A missing
    path or a run directory without a checkpoint is a UserError saying so (``mixtrain
    export`` and ``mixtrain generate --model`` check it before anything else)."""
    from mixtrain.train.checkpoint import latest_checkpoint, list_checkpoints

    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory, a checkpoint, or an exported model folder")
    if RunDir.is_run_dir(path):
        if not list_checkpoints(path):
            raise UserError(f"{path} is a run directory with no checkpoint yet (nothing under checkpoints/): "
                            f"train it first, or pass a checkpoint path")
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"run directory {path} has no complete checkpoint under {path / 'checkpoints'} "
                            f"(every one there is damaged, not a complete archive)")
        return ckpt
    return path


def read_checkpoint(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """Model weights (unsharded, un-prefixed) and the resolved config (if recorded)
    from a run directory, a Lightning checkpoint (file or sharded directory), an
    exported folder or a ``.safetensors`` file."""
    path = resolve_checkpoint(source)
    if path.is_dir() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml")) if (path / "config.yaml").is_file() else None
        return load_file(path / "model.safetensors"), cfg
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), None
    if path.is_dir():  # a sharded (distributed) checkpoint written under FSDP
        if not (path / ".metadata").is_file():
            raise UserError(f"{path} is a folder but not a run directory, an exported model folder (no "
                            f"model.safetensors) or a complete sharded checkpoint (no .metadata file)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / "full.pt"
            dcp_to_torch_save(path, full)
            state = torch.load(full, map_location="cpu", weights_only=False)
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False) if (path / "meta.pt").is_file() else {}
        return _strip_prefix(state["state_dict"]), meta.get("mixtrain_config")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UserError(f"cannot read checkpoint {path}: {e}. Is it a complete mixtrain checkpoint?") from e
    return _strip_prefix(ckpt["state_dict"]), ckpt.get("mixtrain_config")


def export(source: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    from safetensors.torch import save_file

    from mixtrain.files import check_writable

    src = Path(source)
    resolve_checkpoint(src)  # a missing source is named first
    out_dir = Path(out) if out else (src if RunDir.is_run_dir(src) else RunDir.of_path(src).path) / "export"
    check_writable(out_dir, "export folder" + (" (--out)" if out else ""), "Pass --out <a writable folder>")
    state, cfg = read_checkpoint(source)
    if cfg is None:
        raise UserError(f"{source} carries no mixtrain config; export needs a checkpoint written by mixtrain train")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each weight is its own tensor (a tied head is the embedding itself, not a copy).
    tensors = {k: v.contiguous() for k, v in state.items()}
    tmp = out_dir / ".tmp-model.safetensors"
    save_file(tensors, tmp, metadata={"format": "pt", "producer": "mixtrain"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; like every other file, follow the umask
    os.replace(tmp, out_dir / "model.safetensors")
    OmegaConf.save(OmegaConf.create(cfg), out_dir / "config.yaml")
    tokenizer = RunDir.of_path(source).tokenizer_file
    if tokenizer.is_file() and tokenizer.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    return out_dir


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """Build the model of an export (or checkpoint / run directory) on one device.
    Returns ``(model, cfg)`` with ``cfg`` the resolved DictConfig of the run."""
    from mixtrain.layouts import build_layout
    from mixtrain.model import build_model

    state, cfg = read_checkpoint(source)
    if cfg is None:
        raise UserError(f"{source} carries no mixtrain config (config.yaml); cannot rebuild the model")
    cfg = OmegaConf.create(cfg)
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    model = build_model(cfg.model, layout, device=device)  # weights are overwritten below
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{source} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model.to(dtype)
        model.reset_rope()  # RoPE tables stay fp32
    return model.eval(), cfg
