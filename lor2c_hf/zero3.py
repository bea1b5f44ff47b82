"""DeepSpeed ZeRO-3: telling it which module reads which adapter parameter.

ZeRO-3 partitions every parameter and gathers a module's own parameters around each call of that module,
forward and backward. Adapter code reads some parameters elsewhere: a connection's A and B live in
ParameterLists but are read by the slot's `ConnectionCall`; LoRA's B weight is read by `LoraLayer` itself
for the fused add, not by calling `lora_B`. DeepSpeed's `register_external_parameter` declares each such
read, so the parameter is gathered around the reading module's call instead. (Flagging whole adapters as
ZeRO-3 "leaf" modules is not an alternative: ZeRO-3 reduces a leaf's gradients once per call, and a
connection module is called once per span.)

Declaring needs the parameters to be partitioned already, so it happens on the first forward pass after
`deepspeed.initialize` (see `declare_once`), whichever way the engine was built (Trainer, accelerate, or
DeepSpeed directly). Outside ZeRO-3 nothing is imported and nothing changes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned `param` (it then holds only this rank's shard)."""
    return hasattr(param, "ds_id")


def declare_external_parameters(pairs: Iterable[tuple[nn.Module, nn.Parameter]]) -> None:
    """Register each (module, parameter) read with DeepSpeed."""
    import deepspeed

    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)


Reads = Callable[[], Iterable[tuple[nn.Module, nn.Parameter]]]


class ExternalParameterDeclarations:
    """Declares an adapter's external parameter reads once, on the first forward with partitioned parameters.

    `reads` lists the (reading module, parameter) pairs; `probe` is any adapter parameter, checked for ZeRO-3
    partitioning (one attribute lookup per forward until then).
    """

    def __init__(self, probe: nn.Parameter, reads: Reads) -> None:
        self._probe, self._reads = probe, reads
        self.declared = False

    def declare_once(self, *unused: Any, **unused_kwargs: Any) -> None:
        """Usable as a forward pre-hook of the first block."""
        if self.declared or not is_partitioned(self._probe):
            return
        declare_external_parameters(self._reads())
        self.declared = True
