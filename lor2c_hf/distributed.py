"""Keeping structure changes identical on every rank.

The SFS is computed from weights that DDP keeps in sync, but a decision must never depend on float ties
breaking differently on different hardware: rank 0 decides and broadcasts. Under DeepSpeed ZeRO-3 the
adapter weights are partitioned, so they are gathered before scoring.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .zero3 import is_partitioned


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_process_group() -> None:
    """Refuse several launched processes that share no process group: each would train alone, write into the same
    output folder and remove the others' temporary files (`accelerate launch --num_processes 2` on CPU without
    `use_cpu=True`)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"This process was launched as one of WORLD_SIZE={world} processes (RANK="
                           f"{os.environ.get('RANK', '?')}), but no process group was set up, so each would train alone "
                           "into the same output folder. On CPU pass use_cpu=True in TrainingArguments (--use_cpu), or "
                           "launch with accelerate launch --multi_gpu --num_processes N (gloo); on GPUs check that CUDA "
                           "is visible to every process.")


def broadcast_decision(decision: Any) -> Any:
    """Rank 0's `decision` on every rank (a no-op outside a process group)."""
    if not is_distributed():
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers of `module` on every rank, as DDP keeps them (DeepSpeed does not sync buffers)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def full_numel(param: torch.Tensor) -> int:
    """Elements of `param` as the model defines it; a ZeRO-3 partitioned parameter holds none locally."""
    return getattr(param, "ds_numel", None) or param.numel()


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned `params` inside the block; a no-op for ordinary tensors."""
    if any(is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield
