"""`LoR2CTrainer`: `transformers.Trainer` with a LoR2C adapter; swap the class name, pass `lor2c_config`.

It overrides only what an adapter changes: wrapping the model, installing the schedule callback, saving and
loading the adapter (not the base weights) in checkpoints, and looking through the wrapper for the base
model's forward signature and label names.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from transformers import Trainer
from transformers.utils import can_return_loss, find_labels

from .callback import LoR2CCallback, unwrap_adapter
from .config import LoR2CConfig
from .model import LoR2CModel, get_lor2c_model
from .reslora import ResLoRAModel, get_reslora_model
from .reslora_config import ResLoRAConfig

TRAINING_ARGS_NAME = "training_args.bin"


def _conflicting_fields(given: Any, actual: Any) -> list[str]:
    """Fields set in `given` that differ from `actual`; None means "detect", which wrapping filled in."""
    return [f.name for f in dataclasses.fields(given)
            if getattr(given, f.name) is not None and getattr(given, f.name) != getattr(actual, f.name, None)]


def _adapter_fields(config: Optional[Union[LoR2CConfig, ResLoRAConfig]]) -> set[str]:
    """Names a hyper-parameter search may set on the adapter config (not on `TrainingArguments`)."""
    return {f.name for f in dataclasses.fields(config if config is not None else LoR2CConfig)}


class LoR2CTrainer(Trainer):
    """Every `Trainer` argument, plus `lor2c_config` (used to wrap a plain model; not needed for a `LoR2CModel`).

    A `ResLoRAConfig` (or a `ResLoRAModel`) trains ResLoRA the same way; it has no structure events.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, args: Any = None, *trainer_args: Any,
                 lor2c_config: Optional[Union[LoR2CConfig, ResLoRAConfig]] = None, **trainer_kwargs: Any) -> None:
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
        if args is not None and args.ddp_find_unused_parameters is None:
            # Slots that merges retire or injects have not yet activated receive no gradient.
            args.ddp_find_unused_parameters = isinstance(model, LoR2CModel) and model.lor2c_config.has_events
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        base_class = self.model.get_base_model().__class__
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        self.lor2c_callback = LoR2CCallback(trainer=self)
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

    @property
    def lor2c_model(self) -> Union[LoR2CModel, ResLoRAModel]:
        """The adapter model being trained (a `LoR2CModel`, or a `ResLoRAModel`)."""
        return unwrap_adapter(self.model)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.lor2c_model.get_base_model().forward).parameters
            self._signature_columns = list(params) + list({"label", "label_ids", *self.label_names})

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

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write only the adapter (config, weights, structure), plus tokenizer and training arguments."""
        output_dir = output_dir or self.args.output_dir
        self.lor2c_model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        unwrap_adapter(model if model is not None else self.model).load_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.lor2c_model.load_adapter(self.state.best_model_checkpoint)

    def create_model_card(self, model_name: Optional[str] = None, **_: Any) -> None:
        """`Trainer.push_to_hub` calls this: write the adapter's card, with the last evaluation's metrics."""
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        metrics = {k: v for entry in self.state.log_history for k, v in entry.items() if k.startswith("eval_")}
        repo_id = self.hub_model_id or self.args.hub_model_id or model_name or os.path.basename(self.args.output_dir)
        os.makedirs(self.args.output_dir, exist_ok=True)
        write_model_card(self.lor2c_model, self.args.output_dir, repo_id, metrics)
