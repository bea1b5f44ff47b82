"""What every adapter model (`LoR2CModel`, `ResLoRAModel`) shares: it wraps a `transformers` model without
replacing its forward, freezes it except the task heads, and forwards everything else to it.

Adapters are added by forward hooks, so the base model's `state_dict` keys, `generate()` with KV cache and
gradient checkpointing are the base model's own.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

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


class AdapterModelMixin:
    """`forward`, `generate` and every unknown attribute go to `self.base_model`.

    A subclass sets `self.base_model`, exposes its config as `adapter_config` and counts its own active
    adapter parameters in `num_adapter_parameters()`.
    """

    base_model: nn.Module
    # Trainable adapters are attached: lets `Trainer` fine-tune a quantized (4/8-bit) base, as it does for PEFT.
    _hf_peft_config_loaded = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def _freeze_base(self) -> None:
        """Freeze the base model except `modules_to_save` (task heads)."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        modules = dict(self.base_model.named_modules())
        for name in self.adapter_config.modules_to_save or []:
            for p in modules[name].parameters():
                p.requires_grad_(True)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Checkpoint the base blocks; inputs require grad so LoRA inside a checkpointed block still trains."""
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    @property
    def accepts_loss_kwargs(self) -> bool:
        base = self.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            return base.accepts_loss_kwargs
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total): active adapter parameters plus `modules_to_save`, and the base model's count."""
        heads = dict(self.base_model.named_modules())
        head_params = sum(full_numel(p) for name in self.adapter_config.modules_to_save or [] for p in heads[name].parameters())
        adapter = self.num_adapter_parameters()
        base = sum(full_numel(p) for p in self.base_model.parameters())
        return adapter + head_params, base + adapter

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
