"""What every adapter model (`LoR2CModel`, `ResLoRAModel`) shares: it wraps a `transformers` model without
replacing its forward, freezes it except the task heads, and forwards everything else to it.

Adapters are added by forward hooks, so the base model's `state_dict` keys, `generate()` with KV cache and
gradient checkpointing are the base model's own.

Every adapter model is a `peft.PeftModel` to `isinstance` (none of PEFT's machinery runs): that is how
`transformers.Trainer`, accelerate and TRL recognise a model that trains an adapter, so on every road they save
checkpoints with the model's own `save_pretrained`, resume and reload the best model with its `load_adapter`,
let DeepSpeed load its module state non-strictly, and (DPO, GRPO) take a frozen copy of the adapter as the
reference instead of loading a second base model.

Names follow PEFT's conventions: `get_base_model()` and `base_model.model` are the wrapped model, the wrapped
model is the submodule `model` (every dotted name resolves by `getattr`), `peft_config`, `active_adapter(s)`,
`add_adapter`/`set_adapter` (frozen copies only), `disable_adapter()`. The class of each wrapper carries the
wrapped class's `forward` signature, so `Trainer` keeps the right dataset columns and finds the label names.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from peft import PeftModel

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


def hooking_adapter(model: nn.Module) -> Optional[nn.Module]:
    """The adapter model whose forward hooks are on `model` or one of its modules, or None."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                owner = getattr(getattr(hook, "func", hook), "__self__", None)
                if isinstance(owner, AdapterModelMixin):
                    return owner
    return None


def check_not_adapted(model: nn.Module) -> None:
    """Refuse a base that already carries an adapter: both would apply, and `disable_adapter()` of the new one would
    still compute the old one."""
    if isinstance(model, AdapterModelMixin):
        raise ConfigError(f"The model is already a {type(model).__name__}; pass its base model (model.get_base_model()), "
                          "or call model.load_adapter(path) to replace its weights.")
    owner = hooking_adapter(model)
    if owner is not None:
        raise ConfigError(f"This {type(model).__name__} is already adapted by a {type(owner).__name__} (its hooks are on "
                          "the model): a second adapter would add to the first, and disable_adapter() would not give the "
                          "bare base. Call .unload() on the first adapter to get the base back, or load into it with "
                          "load_adapter(path).")
    if getattr(getattr(model, "config", None), "lor2c_serving", None) is not None:
        raise ConfigError(f"This {type(model).__name__} already holds LoR2C connections (a merge_and_unload() or exported "
                          "model); adapt the bare base model instead (unload() gives it back after a merge).")


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


class AdapterModelMixin(PeftModel):
    """`forward`, `generate` and every unknown attribute go to the wrapped model (`get_base_model()`).

    A subclass calls `self._wrap(model)` first, exposes its config as `adapter_config`, names the modules that
    hold one adapter's weights in `adapter_modules`, counts its own active adapter parameters in
    `num_adapter_parameters()` and checks `self._adapter_enabled` in its hooks.
    """

    adapter_modules: tuple[str, ...] = ()  # attributes holding one adapter's weights (swapped by `set_adapter`)

    def __init__(self) -> None:
        nn.Module.__init__(self)  # PeftModel is the type other libraries test for; its own set-up does not apply
        self._frozen_adapters: dict[str, dict[str, Any]] = {}
        self._live_adapter: Optional[dict[str, Any]] = None  # the trained adapter, while a frozen one is active

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
        check_not_adapted(model)
        self.model = model  # state_dict keys: `model.<the base's own keys>`, each tensor once

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)  # not PeftModel's, which reads its own `base_model`
        except AttributeError:
            if name in ("model", "base_model") or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The wrapped `transformers` model (hooks and all), as PEFT's `get_base_model()`."""
        return self._modules["model"]

    @property
    def base_model(self) -> nn.Module:
        """PEFT's meaning: the tuner, whose `.model` is the wrapped model and whose call adapts it (this model)."""
        return self

    @property
    def peft_config(self) -> dict[str, Any]:
        """PEFT's layout: adapter name -> config; the trained adapter is "default", frozen copies follow."""
        return {"default": self.adapter_config, **{n: f["config"] for n, f in self._frozen_adapters.items()}}

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        return set(self.adapter_config.modules_to_save or []) or None

    @property
    def active_peft_config(self) -> Any:
        return self.peft_config[self.active_adapter]

    # --- frozen copies (the reference policy of DPO / GRPO) ----------------------------------------------

    def _adapter_extra(self) -> Any:
        """What besides `adapter_modules` one adapter holds (LoR2C: its structure); None when nothing."""
        return None

    def _set_adapter_extra(self, extra: Any) -> None:
        """Install `extra` (from `_adapter_extra`) and re-point the hooks at the current `adapter_modules`."""

    def _capture_adapter(self) -> dict[str, Any]:
        return {"modules": {n: self._modules[n] for n in self.adapter_modules if n in self._modules},
                "extra": self._adapter_extra()}

    def _install_adapter(self, adapter: dict[str, Any]) -> None:
        for name, module in adapter["modules"].items():
            self._modules[name] = module
        self._set_adapter_extra(adapter["extra"])

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False) -> None:
        """Add a frozen copy of the trained adapter, as it is now, under `adapter_name`.

        TRL's DPO and GRPO trainers call `add_adapter("ref", model.peft_config["default"])` on a PEFT model and
        use it (through `set_adapter`) as the reference policy: the copy costs one adapter's memory, not a second
        base model. For a new adapter it computes the base model's function; for an adapter trained before (SFT,
        then DPO) it is that trained adapter, frozen. Only the trained adapter ("default") is ever trained or saved.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"add_adapter({adapter_name!r}): an adapter of that name exists ({sorted(self.peft_config)}).")
        if peft_config is not self.adapter_config and peft_config != self.adapter_config:
            raise ValueError(f"add_adapter({adapter_name!r}, ...): {type(self).__name__} adds only frozen copies of its own "
                             f"adapter (peft_config=model.peft_config['default']); got a {type(peft_config).__name__} "
                             "with other settings.")
        if self.active_adapter != "default":
            raise RuntimeError(f"add_adapter({adapter_name!r}) while the frozen adapter {self.active_adapter!r} is active.")
        if self.adapter_config.modules_to_save:
            raise ValueError(f"add_adapter({adapter_name!r}): the adapter trains modules_to_save "
                             f"{self.adapter_config.modules_to_save}, which a frozen copy cannot hold apart from the "
                             "trained ones; pass an explicit ref_model to the trainer.")
        params = [p for n in self.adapter_modules if n in self._modules for p in self._modules[n].parameters()]
        if any(hasattr(p, "ds_id") for p in params):
            raise RuntimeError(f"add_adapter({adapter_name!r}) under DeepSpeed ZeRO-3: the adapter's weights are "
                               "partitioned across ranks, so no frozen copy can be taken; pass ref_model, or set "
                               "precompute_ref_log_probs=True in the DPO config.")
        live = self._capture_adapter()
        frozen = {"modules": {n: copy.deepcopy(m).requires_grad_(False) for n, m in live["modules"].items()},
                  "extra": copy.deepcopy(live["extra"])}
        self._frozen_adapters[adapter_name] = {"config": copy.deepcopy(self.adapter_config), "adapter": frozen}

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter: "default" (the trained one) or a frozen copy (`add_adapter`)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"set_adapter({adapter_name!r}): no such adapter; this model has {sorted(self.peft_config)}.")
        if adapter_name == self.active_adapter:
            return
        if self._live_adapter is None:
            self._live_adapter = self._capture_adapter()
        if adapter_name == "default":
            adapter, self._live_adapter = self._live_adapter, None
        else:
            adapter = self._frozen_adapters[adapter_name]["adapter"]
            device = next(p.device for m in self._live_adapter["modules"].values() for p in m.parameters())
            for module in adapter["modules"].values():
                module.to(device)  # the copy was taken before Trainer moved the model
        self._install_adapter(adapter)
        self.active_adapter = adapter_name

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
        self._check_checkpointing(gradient_checkpointing_kwargs)
        base = self.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """What `Trainer` calls: checkpoint the base blocks (non-reentrant) with inputs that require grad."""
        self._check_checkpointing(activation_checkpointing_kwargs)
        self.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if hasattr(self.get_base_model(), "enable_input_require_grads"):
            self.get_base_model().enable_input_require_grads()

    def _check_checkpointing(self, kwargs: Optional[dict]) -> None:
        """Refuse checkpointing settings this adapter cannot train under (none here; a subclass names its own)."""

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


def unwrap_adapter(model: Any) -> Any:
    """The adapter model (`LoR2CModel` or `ResLoRAModel`) inside a DDP / DeepSpeed / compiled wrapper."""
    seen = model
    while not isinstance(seen, AdapterModelMixin):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"Expected a LoR2CModel or ResLoRAModel; got {type(model).__name__}. "
                            "Wrap it with get_lor2c_model() or get_reslora_model().")
        seen = inner
    return seen
