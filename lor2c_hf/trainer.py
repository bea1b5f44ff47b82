"""`LoR2CTrainer`: `transformers.Trainer` with a LoR2C adapter; swap the class name, pass `lor2c_config`.

It overrides only what an adapter changes: wrapping the model, installing the schedule callback, and (from
`AdapterTrainerMixin`) saving and loading the adapter, not the base weights, in checkpoints. It combines with
any `Trainer` subclass by ordinary multiple inheritance: `class LoR2CSFTTrainer(LoR2CTrainer, SFTTrainer)`.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from transformers import Trainer

from .adapter_trainer import AdapterTrainerMixin, default_find_unused_parameters
from .callback import LoR2CCallback
from .checkpoint_io import CheckpointIOMixin
from .config import LoR2CConfig, check_adapter_config
from .model import LoR2CModel, get_lor2c_model
from .reslora import ResLoRAModel, get_reslora_model
from .reslora_config import ResLoRAConfig


def _conflicting_fields(given: Any, actual: Any) -> list[str]:
    """Fields set in `given` that differ from `actual`; None means "detect", which wrapping filled in."""
    return [f.name for f in dataclasses.fields(given)
            if getattr(given, f.name) is not None and getattr(given, f.name) != getattr(actual, f.name, None)]


def _adapter_fields(config: Optional[Union[LoR2CConfig, ResLoRAConfig]]) -> set[str]:
    """Names a hyper-parameter search may set on the adapter config (not on `TrainingArguments`)."""
    return {f.name for f in dataclasses.fields(config if config is not None else LoR2CConfig)}


class LoR2CTrainer(AdapterTrainerMixin, CheckpointIOMixin, Trainer):
    """Every `Trainer` argument, plus `lor2c_config` (used to wrap a plain model, or each model `model_init`
    returns; not needed for a `LoR2CModel`) and `stop_on_nonfinite` (default True: stop at the step that makes the
    adapter NaN or Inf).

    A `ResLoRAConfig` (or a `ResLoRAModel`) trains ResLoRA the same way; it has no structure events.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, args: Any = None, *trainer_args: Any,
                 lor2c_config: Optional[Union[LoR2CConfig, ResLoRAConfig]] = None, stop_on_nonfinite: bool = True,
                 **trainer_kwargs: Any) -> None:
        if lor2c_config is not None:
            check_adapter_config(lor2c_config, (LoR2CConfig, ResLoRAConfig), "LoR2CTrainer(lor2c_config=...)")
        self._init_lor2c_config = lor2c_config  # what call_model_init wraps each fresh model with
        self._full_hp_space: Optional[Callable[[Any], dict[str, Any]]] = None
        if model is None:
            if trainer_kwargs.get("model_init") is None:
                raise ValueError("LoR2CTrainer needs a model (a transformers model or a LoR2CModel) or a model_init.")
            if args is not None and args.ddp_find_unused_parameters is None:
                args.ddp_find_unused_parameters = True  # trials may differ in M and N, so any slot may get no gradient
        elif isinstance(model, (LoR2CModel, ResLoRAModel)):
            conflicts = _conflicting_fields(lor2c_config, model.adapter_config) if lor2c_config is not None else []
            if conflicts:
                raise ValueError(f"lor2c_config differs from the config of the {type(model).__name__} passed as model in "
                                 f"{conflicts}; pass only one.")
        elif isinstance(lor2c_config, ResLoRAConfig):
            model = get_reslora_model(model, lor2c_config)
        else:
            model = get_lor2c_model(model, lor2c_config or LoR2CConfig())
        default_find_unused_parameters(args, model)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # One schedule callback: a LoR2CCallback the caller passed in `callbacks` is bound to this trainer.
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LoR2CCallback)]
        self.lor2c_callback = given[0] if given else LoR2CCallback(stop_on_nonfinite=stop_on_nonfinite)
        self.lor2c_callback.trainer = self
        if not given:
            self.add_callback(self.lor2c_callback)

    def call_model_init(self, trial: Any = None) -> torch.nn.Module:
        """`model_init`'s fresh model, wrapped like `model` would be: with `lor2c_config`, updated by the adapter
        fields (e.g. `num_merges`, `num_injects`, `merge_criterion`) of the current search trial."""
        model = super().call_model_init(trial)
        params = self._trial_adapter_params(trial)
        if isinstance(model, (LoR2CModel, ResLoRAModel)):
            if params:
                raise ValueError(f"model_init returned a {type(model).__name__}, so the searched adapter fields "
                                 f"{sorted(params)} cannot be applied; return the plain transformers model and pass "
                                 "lor2c_config to LoR2CTrainer.")
            return model
        config = dataclasses.replace(copy.deepcopy(self._init_lor2c_config or LoR2CConfig()), **params)
        if isinstance(config, ResLoRAConfig):
            return get_reslora_model(model, config)
        return get_lor2c_model(model, config)

    def hyperparameter_search(self, hp_space: Optional[Callable[[Any], dict[str, Any]]] = None, *args: Any,
                              **kwargs: Any) -> Any:
        """`Trainer.hyperparameter_search`, where `hp_space` may also return adapter fields (`num_merges`,
        `num_injects`, `merge_criterion`, `r`, ...): those configure the model `call_model_init` wraps, the
        rest set `TrainingArguments` as usual. Needs `model_init` (a fresh model per trial)."""
        self._full_hp_space = hp_space
        try:
            return super().hyperparameter_search(hp_space and partial(self._training_hp_space, hp_space), *args, **kwargs)
        finally:
            self._full_hp_space = None

    def _trial_adapter_params(self, trial: Any) -> dict[str, Any]:
        """The adapter fields of a trial. `Trainer.train` builds the model before it applies the trial to the
        arguments, so they are read here; Optuna returns a trial's earlier suggestion again for the same name."""
        if trial is None or getattr(self, "hp_search_backend", None) is None:
            return {}
        if isinstance(trial, dict):  # Ray Tune / W&B pass the sampled values themselves
            values = trial
        elif self._full_hp_space is not None:
            values = self._full_hp_space(trial)
        else:
            return {}
        adapter = _adapter_fields(self._init_lor2c_config)
        return {k: v for k, v in values.items() if k in adapter}

    def _training_hp_space(self, hp_space: Callable[[Any], dict[str, Any]], trial: Any) -> dict[str, Any]:
        """What `Trainer` sets on `TrainingArguments`: the trial's values less the adapter fields."""
        adapter = _adapter_fields(self._init_lor2c_config)
        return {k: v for k, v in hp_space(trial).items() if k not in adapter}

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed, save the adapter without first consolidating the whole model on rank 0.

        `Trainer` gathers every weight of a non-PEFT model into one 16-bit state dict before `_save` (13.5 GB
        for LLaMA2-7B) and `_save` would ignore it: every rank joins the adapter's own gather instead.
        """
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
