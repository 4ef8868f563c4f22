"""Parallelism applied to a plain model, in one place (torchtitan's order):

1. activation checkpointing per block (full: every block; selective: every other),
2. ``torch.compile`` per block,
3. FSDP2 ``fully_shard`` per block, then the root, with a bf16 mixed-precision
   policy and fp32 gradient reduction on GPU, and explicit forward/backward
   prefetching of the neighbouring block.

The model itself knows nothing of any of this.
"""

from __future__ import annotations

import torch
from torch import nn


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return model.layers


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(
            f"trainer.activation_checkpointing={mode!r} is not known; use none, full or selective"
        )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        if mode == "full" or i % 2 == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for block in blocks_of(model):
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, mesh, mixed_precision: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # Explicit prefetching: gather block i+1's parameters while block i computes in the
    # forward pass, and block i-1's while block i's backward runs.
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def parallelize(
    model: nn.Module,
    *,
    mesh=None,
    fsdp: bool = False,
    activation_checkpointing: str = "none",
    compile: bool = False,
    mixed_precision: bool = False,
) -> nn.Module:
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, mesh, mixed_precision)
    return model
