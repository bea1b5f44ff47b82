"""`LoR2CTrainer`: `transformers.Trainer` with a LoR2C adapter; swap the class name, pass `lor2c_config`.

It wraps the model and installs `LoR2CCallback`, which gives every guarantee (the same as on the callback
road); everything else is `Trainer`'s own. It combines with any `Trainer` subclass by ordinary multiple
inheritance, `class LoR2CDPOTrainer(LoR2CTrainer, DPOTrainer)`: every argument but the model goes to the other
trainer exactly as given (positions and keywords), so trainers whose second parameter is not `args` work too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from functools import partial
from typing import Any, Callable, Optional

import torch
from transformers import Trainer

from ..config import LoR2CConfig, check_adapter_config
from ..methods import CONFIG_CLASSES, MODEL_CLASSES, get_adapter_model
from ..model_card import write_model_card
from ..wrapper import unwrap_adapter
from .callback import LoR2CCallback


def _conflicting_fields(given: Any, actual: Any) -> list[str]:
    """Fields set in `given` that differ from `actual`; None means "detect", which wrapping filled in."""
    return [f.name for f in dataclasses.fields(given)
            if getattr(given, f.name) is not None and getattr(given, f.name) != getattr(actual, f.name, None)]


def _adapter_fields(config: Optional[Any]) -> set[str]:
    """Names a hyper-parameter search may set on the adapter config (not on `TrainingArguments`)."""
    return {f.name for f in dataclasses.fields(config if config is not None else LoR2CConfig)}


class LoR2CTrainer(Trainer):
    """Every `Trainer` argument, plus `lor2c_config` (used to wrap a plain model, or each model `model_init`
    returns; not needed for a `LoR2CModel`) and `stop_on_nonfinite` (default True: stop at the step that makes the
    adapter NaN or Inf).

    A `ResLoRAConfig` (or a `ResLoRAModel`) trains ResLoRA the same way; it has no structure events.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, *trainer_args: Any,
                 lor2c_config: Optional[Any] = None, stop_on_nonfinite: bool = True,
                 **trainer_kwargs: Any) -> None:
        if lor2c_config is not None:
            check_adapter_config(lor2c_config, CONFIG_CLASSES, "LoR2CTrainer(lor2c_config=...)")
        self._init_lor2c_config = lor2c_config  # what call_model_init wraps each fresh model with
        self._full_hp_space: Optional[Callable[[Any], dict[str, Any]]] = None
        if model is None:
            if trainer_kwargs.get("model_init") is None:
                raise ValueError("LoR2CTrainer needs a model (a transformers model or a LoR2CModel) or a model_init.")
        elif isinstance(model, MODEL_CLASSES):
            conflicts = _conflicting_fields(lor2c_config, model.adapter_config) if lor2c_config is not None else []
            if conflicts:
                raise ValueError(f"lor2c_config differs from the config of the {type(model).__name__} passed as model in "
                                 f"{conflicts}; pass only one.")
        else:
            model = get_adapter_model(model, lor2c_config or LoR2CConfig())
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        given = [cb for cb in callbacks if isinstance(cb, LoR2CCallback)]
        self.lor2c_callback = given[0] if given else LoR2CCallback(stop_on_nonfinite=stop_on_nonfinite)
        if not given:
            callbacks.append(self.lor2c_callback)
        super().__init__(model, *trainer_args, callbacks=callbacks, **trainer_kwargs)

    @property
    def lor2c_model(self) -> Any:
        """The adapter model being trained (a `LoR2CModel`, or a `ResLoRAModel`)."""
        return unwrap_adapter(self.model)

    def create_model_card(self, model_name: Optional[str] = None, **_: Any) -> None:
        """`Trainer.push_to_hub` calls this: write the adapter's card, with the last evaluation's metrics."""
        if not self.is_world_process_zero():
            return
        metrics = {k: v for entry in self.state.log_history for k, v in entry.items() if k.startswith("eval_")}
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or model_name or os.path.basename(self.args.output_dir)
        os.makedirs(self.args.output_dir, exist_ok=True)
        write_model_card(self.lor2c_model, self.args.output_dir, repo_id, metrics)

    def call_model_init(self, trial: Any = None) -> torch.nn.Module:
        """`model_init`'s fresh model, wrapped like `model` would be: with `lor2c_config`, updated by the adapter
        fields (e.g. `num_merges`, `num_injects`, `merge_criterion`) of the current search trial."""
        model = super().call_model_init(trial)
        params = self._trial_adapter_params(trial)
        if isinstance(model, MODEL_CLASSES):
            if params:
                raise ValueError(f"model_init returned a {type(model).__name__}, so the searched adapter fields "
                                 f"{sorted(params)} cannot be applied; return the plain transformers model and pass "
                                 "lor2c_config to LoR2CTrainer.")
            return model
        config = copy.deepcopy(self._init_lor2c_config or LoR2CConfig()).replace(**params)
        return get_adapter_model(model, config)

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
