"""What every adapter model (`LoR2CModel`, `ResLoRAModel`) shares: it wraps a `transformers` model without
replacing its forward, freezes it except the task heads, and forwards everything else to it.

Adapters are added by forward hooks, so the base model's `state_dict` keys, `generate()` with KV cache and
gradient checkpointing are the base model's own.

Names follow the conventions that other code reads: `get_base_model()` is the wrapped model (PEFT's meaning),
`.base_model` is that model's backbone (transformers' meaning, which TRL's fused LM head calls), the wrapped model
is the submodule `model` (PEFT's tuners name it so; every dotted name resolves by `getattr`), and the class of
each wrapper carries the wrapped class's `forward` signature, so `Trainer` keeps the right dataset columns and
finds the label names by itself.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .config import ConfigError
from .distributed import full_numel


def adapter_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for new adapter weights: the base's device, float32 (like PEFT) unless the base is fp32."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, torch.float32
    raise ValueError(f"{type(model).__name__} has no floating-point parameters to take a device and dtype from.")


def check_modules_to_save(model: nn.Module, names: Optional[list[str]], owner: str) -> None:
    """Every name in `modules_to_save` must be a module of the base model."""
    if names:
        modules = dict(model.named_modules())
        missing = [m for m in names if m not in modules]
        if missing:
            raise ConfigError(f"{owner}.modules_to_save: {missing} not found in {type(model).__name__}.")


@functools.lru_cache(maxsize=None)
def _specialized(adapter_class: type, base_class: type) -> type:
    """`adapter_class` with `base_class`'s forward signature (`Trainer` reads it off the class: `find_labels`).

    It keeps the adapter class's name, so messages and `repr` say `LoR2CModel`; `type(m).__mro__[1]` is it.
    """
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    functools.update_wrapper(forward, base_class.forward, assigned=("__doc__",), updated=())  # sets __wrapped__
    return type(adapter_class.__name__, (adapter_class,), {
        "forward": forward, "_specialized_for": base_class, "__module__": adapter_class.__module__,
        "__qualname__": f"{adapter_class.__qualname__}[{base_class.__name__}]"})


def _new_unspecialized(cls: type, *args: Any) -> Any:
    """Unpickling's first step: an empty instance of the public class (`__setstate__` specializes it)."""
    return cls.__new__(cls, *args)


class AdapterModelMixin:
    """`forward`, `generate` and every unknown attribute go to the wrapped model (`get_base_model()`).

    A subclass calls `self._wrap(model)` first, exposes its config as `adapter_config`, counts its own active
    adapter parameters in `num_adapter_parameters()` and checks `self._adapter_enabled` in its hooks.
    """

    # Trainable adapters are attached: lets `Trainer` fine-tune a quantized (4/8-bit) base, as it does for PEFT.
    _hf_peft_config_loaded = True
    _specialized_for: Optional[type] = None
    _adapter_enabled = True
    active_adapter = "default"  # PEFT's name for a model's only adapter

    def __new__(cls, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any):
        if model is not None and cls._specialized_for is not type(model):
            generic = cls.__mro__[1] if cls._specialized_for is not None else cls
            cls = _specialized(generic, type(model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle (and `copy.deepcopy`) by the public class, which pickle can find by name; `__setstate__`
        specializes the copy again."""
        reduced = super().__reduce_ex__(protocol)
        if self._specialized_for is not None and reduced[0] is copyreg.__newobj__:
            return (_new_unspecialized, (type(self).__mro__[1], *reduced[1][1:]), *reduced[2:])
        return reduced

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        wrapped = self._modules.get("model")
        if wrapped is not None and self._specialized_for is not type(wrapped):
            generic = type(self).__mro__[1] if self._specialized_for is not None else type(self)
            self.__class__ = _specialized(generic, type(wrapped))

    def _wrap(self, model: nn.Module) -> None:
        self.model = model  # state_dict keys: `model.<the base's own keys>`, each tensor once

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "base_model") or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The wrapped `transformers` model (hooks and all), as PEFT's `get_base_model()`."""
        return self._modules["model"]

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's backbone, transformers' meaning of the name (e.g. `LlamaModel` in a
        `LlamaForCausalLM`); its blocks carry the adapter, so calling it directly still adapts."""
        wrapped = self.get_base_model()
        return getattr(wrapped, "base_model", wrapped)

    @property
    def peft_config(self) -> dict[str, Any]:
        """PEFT's layout: adapter name -> config."""
        return {self.active_adapter: self.adapter_config}

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, the model computes the bare base model's function (as PEFT's `disable_adapter`)."""
        self._refuse_if_merged("disable the adapter")
        previous = self._adapter_enabled
        self._adapter_enabled = False
        try:
            yield
        finally:
            self._adapter_enabled = previous

    def _freeze_base(self) -> None:
        """Freeze the base model except `modules_to_save` (task heads)."""
        for p in self.get_base_model().parameters():
            p.requires_grad_(False)
        modules = dict(self.get_base_model().named_modules())
        for name in self.adapter_config.modules_to_save or []:
            for p in modules[name].parameters():
                p.requires_grad_(True)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Checkpoint the base blocks; inputs require grad so LoRA inside a checkpointed block still trains."""
        base = self.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    @property
    def accepts_loss_kwargs(self) -> bool:
        base = self.get_base_model()
        if hasattr(base, "accepts_loss_kwargs"):
            return base.accepts_loss_kwargs
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total): active adapter parameters plus `modules_to_save`, and the base model's count."""
        heads = dict(self.get_base_model().named_modules())
        head_params = sum(full_numel(p) for name in self.adapter_config.modules_to_save or [] for p in heads[name].parameters())
        adapter = self.num_adapter_parameters()
        base = sum(full_numel(p) for p in self.get_base_model().parameters())
        return adapter + head_params, base + adapter

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
