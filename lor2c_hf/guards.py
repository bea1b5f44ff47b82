"""Non-finite checks: a NaN or Inf in an adapter stops things loudly, at the point it is found.

Training checks the trainable tensors after every optimizer step (`LoR2CCallback`, on by default), an event
refuses to score connections that are not finite, and `save_pretrained` refuses to write a non-finite adapter.
Each error names the step, the tensors and, for LoR2C, the connection span they belong to.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch

from .zero3 import is_partitioned

DISABLE_HINT = "LoR2CTrainer(..., stop_on_nonfinite=False) (or LoR2CCallback(stop_on_nonfinite=False)) turns this check off"


class NonFiniteError(FloatingPointError):
    """An adapter tensor (or a score computed from it) is NaN or Inf; the message says which and where."""


def local_values(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`: its ZeRO-3 partition when partitioned (the full tensor is empty)."""
    return tensor.ds_tensor if is_partitioned(tensor) else tensor


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or Inf, found with a single host sync."""
    pairs = [(n, local_values(t).detach()) for n, t in named if t.is_floating_point()]
    pairs = [(n, t) for n, t in pairs if t.numel()]
    if not pairs:
        return []
    flags = torch.stack([torch.isfinite(t).all().to(pairs[0][1].device) for _, t in pairs]).cpu().tolist()
    return [n for (n, _), ok in zip(pairs, flags) if not ok]


def locate(adapter: Any, name: str) -> str:
    """`name`, with the connection span or injected block it belongs to when the adapter has a LoR2C structure."""
    structure = getattr(adapter, "_structure", None)
    slot = re.match(r"(?:model\.)?lor2c\.lora_([AB])\.(\d+)$", name)
    block = re.match(r"(?:model\.)?lor2c_injected\.blocks\.(\d+)\.", name)
    if structure is not None and slot:
        if slot.group(1) == "A" and getattr(adapter.lor2c, "share_a", False):
            return f"{name} (the A shared by every connection)"
        spans = [span for span, owner in zip(structure.spans, structure.owners) if owner == int(slot.group(2))]
        return f"{name} (connection span {spans[0]})" if spans else f"{name} (retired slot {slot.group(2)}, read by no span)"
    if structure is not None and block:
        state = "active" if int(block.group(1)) in structure.injected else "dormant"
        return f"{name} ({state} injected LoRA of block {block.group(1)})"
    return name


def describe(adapter: Any, names: list[str], limit: int = 6) -> str:
    shown = [locate(adapter, n) for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_training_step(adapter: Any, step: int) -> None:
    """Raise `NonFiniteError` if a trainable tensor of `adapter` is NaN or Inf after optimizer step `step`."""
    bad = nonfinite_names((n, p) for n, p in adapter.named_parameters() if p.requires_grad)
    if bad:
        raise NonFiniteError(
            f"Training stopped at step {step}: the adapter became non-finite (NaN or Inf) in {describe(adapter, bad)}. "
            "The loss or the gradients overflowed; lower the learning rate, clip gradients (max_grad_norm) or check "
            f"the data. Nothing after this step was saved. {DISABLE_HINT}.")


def check_tensors(adapter: Any, named: Iterable[tuple[str, torch.Tensor]], action: str, hint: Optional[str] = None) -> None:
    """Raise `NonFiniteError` naming every non-finite tensor in `named`, before `action` is done."""
    bad = nonfinite_names(named)
    if bad:
        raise NonFiniteError(f"Cannot {action}: {describe(adapter, bad)} hold NaN or Inf values."
                             + (f" {hint}" if hint else ""))
