"""The adapter methods this library provides, one registry line each: config class, model class, wrapping function.

What is generic over methods (`LoR2CTrainer`, `get_adapter_model`, the Auto classes, PEFT's refusal of our
`peft_type`s) reads this table, so a new method adds its own config/model files and one line here. Loading a
saved adapter picks its class by the config's `method` field (`AdapterIOMixin.adapter_methods`, filled as each
model class is defined).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .config import ConfigError, LoR2CConfig
from .model import LoR2CModel, get_lor2c_model
from .reslora import ResLoRAModel, get_reslora_model
from .reslora_config import ResLoRAConfig


@dataclass(frozen=True)
class AdapterMethod:
    config_class: type
    model_class: type
    get_model: Callable[[nn.Module, Any], nn.Module]


REGISTRY: tuple[AdapterMethod, ...] = (
    AdapterMethod(LoR2CConfig, LoR2CModel, get_lor2c_model),  # lor2c, sharelor2c, mergelor2c, injectlor2c, imlor2c
    AdapterMethod(ResLoRAConfig, ResLoRAModel, get_reslora_model),
)
CONFIG_CLASSES: tuple[type, ...] = tuple(m.config_class for m in REGISTRY)
MODEL_CLASSES: tuple[type, ...] = tuple(m.model_class for m in REGISTRY)


def method_for(config: Any) -> AdapterMethod:
    """The registry entry of `config`'s class, or a ConfigError naming the config classes there are."""
    for method in REGISTRY:
        if type(config) is method.config_class:
            return method
    names = " or ".join(c.__name__ for c in CONFIG_CLASSES)
    hint = "; build one with LoR2CConfig(**your_dict)" if isinstance(config, dict) else ""
    raise ConfigError(f"Expected an adapter config ({names}), got a {type(config).__name__}{hint}.")


def get_adapter_model(model: nn.Module, config: Any) -> nn.Module:
    """Wrap `model` with the adapter `config` describes (as PEFT's `get_peft_model`): a `LoR2CConfig` gives a
    `LoR2CModel`, a `ResLoRAConfig` a `ResLoRAModel`."""
    return method_for(config).get_model(model, config)
