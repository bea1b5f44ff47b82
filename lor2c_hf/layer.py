"""The trainable modules: low-rank residual connections between blocks, and LoRA on a projection.

Every parameter that a structure change could ever activate is allocated when the adapter is created, so the
optimizer built by `Trainer` (and any DDP or ZeRO-3 partitioning of it) never has to change: merges and injects
only decide which slots the forward pass reads. A slot that is not read gets no gradient, so AdamW skips it.
Parameters read outside their owner's own forward are listed by `external_parameters()` for ZeRO-3.
"""

from __future__ import annotations

import math
import torch
from torch import nn
from torch.nn import functional as F

# The block-output helpers live in the standalone serving code (an exported folder ships that file).
from .modeling_lor2c import hidden_input, hidden_output, with_hidden_output  # noqa: F401  (re-exported)


def _kaiming_(weight: torch.Tensor) -> None:
    # The init PEFT (and nn.Linear) use for LoRA's A.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def add_scaled_up_projection(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`base + scaling * h @ b.T`: the second half of a low-rank delta added to the output it adjusts.

    When `base` and `h` share a dtype this is one `addmm`, so no full-width delta is materialised and neither
    the scaling nor the sum costs a separate pass (forward or backward). Otherwise (a bf16 model with fp32
    adapters and no autocast) the delta is computed in the adapter's dtype, added in the wider dtype and cast
    back, as PEFT does.
    """
    if base.dtype == h.dtype and base.is_contiguous():
        out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
        return out.view(base.shape)
    return (base + F.linear(h, b) * scaling).to(base.dtype)


class LoraLayer(nn.Module):
    """Standard LoRA for one projection: `scaling * B(A(dropout(x)))`, with PEFT's layout and init.

    It holds only the adapter; the frozen projection stays where it is and a forward hook passes its output
    through this module, which adds the delta. Used for the LoRA injected by InjectLoR2C and by the ResLoRA
    baseline.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        _kaiming_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`base + scaling * B A dropout(x)`: the projection's output `base` with this LoRA's delta added (fused)."""
        return add_scaled_up_projection(base, self.lora_A(self.dropped_input(x)), self.lora_B.weight, self.scaling)

    def dropped_input(self, x: torch.Tensor) -> torch.Tensor:
        """`dropout(x)` in the adapter's dtype: what `lora_A` reads (ResLoRA combines these across layers)."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_dropout(x) if self.training else x

    def delta_weight(self) -> torch.Tensor:
        """The dense update `scaling * B A` (out x in), for merging into the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """`lora_B.weight` is read by this module's forward, not by a call of `lora_B` (see `zero3.py`)."""
        return [(self, self.lora_B.weight)]


def merge_into_projection(module: nn.Module, delta_weight: torch.Tensor) -> None:
    """Add a dense update `delta_weight` (out x in) to a projection's weight in place, in float32.

    `nn.Linear` stores its weight as (out, in); transformers' GPT-2 `Conv1D` stores (in, out).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or type(weight) not in (torch.Tensor, nn.Parameter):
        raise TypeError(f"Cannot merge LoRA into {type(module).__name__}: its weight is not a plain floating-point tensor "
                        "(quantized or sharded?). Dequantize or gather it first, or keep the adapter unmerged.")
    delta = delta_weight.t() if hasattr(module, "nf") else delta_weight  # Conv1D: (in, out)
    if delta.shape != weight.shape:
        raise ValueError(f"Cannot merge a {tuple(delta_weight.shape)} update into {type(module).__name__} "
                         f"with weight {tuple(weight.shape)}.")
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype))


class ConnectionCall(nn.Module):
    """One slot's connection as a call: `base + scaling * B A dropout(x)` with that slot's A and B.

    It owns no parameters. Each slot has its own call module, called once per forward pass, so DeepSpeed
    ZeRO-3 can gather exactly that slot's A and B around the call, forward and backward (they are declared
    as the module's external parameters, see `zero3.py`). One module called once per span would not do:
    ZeRO-3 reduces a module's gradients once per call. A and B are read from the connections module inside
    the call, not passed as tensors: ZeRO-3 hooks a module's tensor inputs to release its parameters once
    their gradients pass, and a parameter passed in would be released before its own gradient accumulates.
    """

    def __init__(self, slot: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.slot, self.scaling = slot, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, base: torch.Tensor, connections: "LoR2CConnections") -> torch.Tensor:
        a, b = connections.a_of(self.slot), connections.lora_B[self.slot]
        x = x.to(a.dtype)
        return add_scaled_up_projection(base, F.linear(self.lora_dropout(x) if self.training else x, a), b, self.scaling)


class LoR2CConnections(nn.Module):
    """All low-rank residual connections of one model: slot i holds `A_i` (r x d) and `B_i` (d x r).

    With `share_a` there is one A for every slot (ShareLoR2C). Calling the module with `(slot, x, base)`
    returns `base + scaling * B_slot A_slot dropout(x)`, through that slot's `ConnectionCall`.
    """

    def __init__(self, num_slots: int, d: int, r: int, alpha: float, dropout: float, share_a: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.d, self.r, self.scaling, self.share_a = d, r, alpha / r, share_a
        num_a = 1 if share_a else num_slots
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, d, device=device, dtype=dtype)) for _ in range(num_a)]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(d, r, device=device, dtype=dtype)) for _ in range(num_slots)]
        )
        for a in self.lora_A:
            _kaiming_(a)
        self.calls = nn.ModuleList(ConnectionCall(slot, self.scaling, dropout) for slot in range(num_slots))

    def a_of(self, slot: int) -> nn.Parameter:
        return self.lora_A[0 if self.share_a else slot]

    def forward(self, slot: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`base + scaling * B A dropout(x)` for `slot`: a block's output with this connection added (fused)."""
        return self.calls[slot](x, base, self)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Each slot's A and B belong to the ParameterLists but are read by the slot's call (see `zero3.py`)."""
        return [(call, p) for slot, call in enumerate(self.calls) for p in (self.a_of(slot), self.lora_B[slot])]


class InjectedLoRA(nn.Module):
    """LoRA for every (block, target projection) pair InjectLoR2C may activate, allocated up front."""

    def __init__(self, shapes: list[dict[str, tuple[int, int]]], r: int, alpha: float, dropout: float,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {_key(name): LoraLayer(i, o, r, alpha, dropout, device=device, dtype=dtype) for name, (i, o) in s.items()}
            )
            for s in shapes
        )

    def layers_of(self, block: int) -> dict[str, LoraLayer]:
        return {_name(key): layer for key, layer in self.blocks[block].items()}

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        return [pair for block in self.blocks for layer in block.values() for pair in layer.external_parameters()]


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")  # ModuleDict keys cannot hold dots


def _name(key: str) -> str:
    return key.replace("__", ".")
