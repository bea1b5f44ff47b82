"""The `Trainer` methods an adapter changes, in one mixin: `LoR2CTrainer` inherits them, and `LoR2CCallback`
gives them to a trainer it was added to (a plain `Trainer`, TRL's `SFTTrainer`, ...).

An adapter checkpoint holds only the adapter (config, weights with the structure, task heads), never the frozen
base: `Trainer` itself knows only `PreTrainedModel` and `PeftModel`, and would write every base weight (13.5 GB
per checkpoint for LLaMA2-7B) and then fail to find them again on resume.
"""

from __future__ import annotations

import functools
import os
from types import MethodType
from typing import Any, Optional

import torch
from transformers import Trainer

from .checkpoint_io import pickle_without_tokens, resolve_resume
from .model import LoR2CModel
from .model_card import write_model_card
from .serialization import AdapterIOMixin

TRAINING_ARGS_NAME = "training_args.bin"


def unwrap_adapter(model: Any, kind: type = AdapterIOMixin) -> Any:
    """The adapter model of class `kind` (default: `LoR2CModel` or `ResLoRAModel`) inside a DDP / DeepSpeed /
    compiled wrapper."""
    seen = model
    while not isinstance(seen, kind):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            if kind is LoR2CModel:
                raise TypeError(f"LoR2CCallback needs a LoR2CModel; got {type(model).__name__}. Wrap it with get_lor2c_model().")
            raise TypeError(f"LoR2CTrainer needs a LoR2CModel or ResLoRAModel; got {type(model).__name__}. "
                            "Wrap it with get_lor2c_model() or get_reslora_model().")
        seen = inner
    return seen


def default_find_unused_parameters(args: Any, adapter: Any) -> None:
    """DDP must look for unused parameters when events run: retired and not-yet-injected slots get no gradient.
    An explicit `ddp_find_unused_parameters` is left as the user set it."""
    if args is not None and args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = isinstance(adapter, LoR2CModel) and adapter.lor2c_config.has_events


class AdapterTrainerMixin:
    """Checkpoints, `save_model`, resume, best-model reload and the Hub card of an adapter model.

    Every method works on any `Trainer` (no `super()` call), so `adopt_trainer` can bind them to one.
    """

    @property
    def lor2c_model(self) -> Any:
        """The adapter model being trained (a `LoR2CModel`, or a `ResLoRAModel`)."""
        return unwrap_adapter(self.model)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write only the adapter (config, weights, structure), plus tokenizer and training arguments."""
        output_dir = output_dir or self.args.output_dir
        unwrap_adapter(self.model).save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        resolve_resume(resume_from_checkpoint, self.args.output_dir)  # an incomplete checkpoint is refused
        unwrap_adapter(model if model is not None else self.model).load_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        unwrap_adapter(self.model).load_adapter(self.state.best_model_checkpoint)

    def create_model_card(self, model_name: Optional[str] = None, **_: Any) -> None:
        """`Trainer.push_to_hub` calls this: write the adapter's card, with the last evaluation's metrics."""
        if not self.is_world_process_zero():
            return
        metrics = {k: v for entry in self.state.log_history for k, v in entry.items() if k.startswith("eval_")}
        repo_id = self.hub_model_id or self.args.hub_model_id or model_name or os.path.basename(self.args.output_dir)
        os.makedirs(self.args.output_dir, exist_ok=True)
        write_model_card(unwrap_adapter(self.model), self.args.output_dir, repo_id, metrics)


ADOPTED_METHODS = ("_save", "_load_from_checkpoint", "_load_best_model", "create_model_card")


def adopt_trainer(trainer: Trainer) -> None:
    """Bind the adapter's checkpoint methods to `trainer` (a `Trainer` of any class that is not already one)."""
    if isinstance(trainer, AdapterTrainerMixin):
        return
    pickle_without_tokens(trainer.args)  # checkpoints' training_args.bin without the Hub token
    for name in ADOPTED_METHODS:
        setattr(trainer, name, MethodType(getattr(AdapterTrainerMixin, name), trainer))
    if not getattr(trainer.train, "_lor2c_resolves_resume", False):
        trainer.train = _resume_from_complete(trainer.train, trainer)


def _resume_from_complete(train: Any, trainer: Trainer) -> Any:
    """`trainer.train` whose `resume_from_checkpoint=True` takes the newest *complete* checkpoint (an incomplete
    newer one is skipped with a warning), as under `LoR2CTrainer`; `Trainer` itself would pick the newest folder."""

    @functools.wraps(train)
    def resuming_train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        return train(resolve_resume(resume_from_checkpoint, trainer.args.output_dir), *args, **kwargs)

    resuming_train._lor2c_resolves_resume = True  # type: ignore[attr-defined]
    return resuming_train
