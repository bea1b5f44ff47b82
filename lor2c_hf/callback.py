"""`LoR2CCallback`: fires merges and injects on the paper's schedule during `Trainer.train()`."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .guards import check_training_step
from .model import LoR2CModel
from .serialization import AdapterIOMixin
from .schedule import due_events, epoch_points, step_points

logger = logging.getLogger("lor2c_hf")
STRUCTURE_FILE = "lor2c_structure.json"


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


def unwrap_lor2c(model: Any) -> LoR2CModel:
    """The `LoR2CModel` inside a DDP / DeepSpeed / compiled wrapper."""
    return unwrap_adapter(model, LoR2CModel)


def _scheduled(model: Any) -> Optional[LoR2CModel]:
    """The LoR2CModel whose events this callback runs; None for adapters without events (ResLoRA)."""
    adapter = unwrap_adapter(model)
    return adapter if isinstance(adapter, LoR2CModel) else None


class LoR2CCallback(TrainerCallback):
    """Runs `apply_merge`/`apply_inject` per SPEC §6 and records them in the logs and in every checkpoint.

    Which events are done is read from the model's structure, so a run resumed from a checkpoint (whose
    adapter carries the structure) continues the schedule where it stopped; events that were due when the
    checkpoint was written fire as training resumes (Trainer saves a step's checkpoint before `on_epoch_end`).

    `stop_on_nonfinite` (default True): after every optimizer step, stop with `NonFiniteError` naming the step
    and the tensors when a trainable tensor of the adapter (or a task head) is NaN or Inf.
    """

    def __init__(self, trainer: Optional[Any] = None, stop_on_nonfinite: bool = True) -> None:
        self.trainer = trainer
        self.stop_on_nonfinite = stop_on_nonfinite
        self.merge_points: list[int] = []
        self.inject_points: list[int] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        lor2c = _scheduled(model)
        if lor2c is None:
            return
        c = lor2c.lor2c_config
        if c.schedule == "epochs":
            horizon, unit = state.num_train_epochs, "epoch"
            self.merge_points, self.inject_points = epoch_points(horizon, c.num_merges), epoch_points(horizon, c.num_injects)
        else:
            horizon, unit = state.max_steps, "step"
            self.merge_points, self.inject_points = step_points(horizon, c.num_merges), step_points(horizon, c.num_injects)
        if c.has_events and state.is_world_process_zero:
            logger.warning("[LoR2C] schedule (%s): merges after %s %s, injects after %s %s",
                           c.schedule, unit, self.merge_points, unit, self.inject_points)
            late = [p for p in self.merge_points + self.inject_points if p > horizon]
            if late:
                logger.warning("[LoR2C] %d event(s) fall after the last %s (%s) and will not happen: %s",
                               len(late), unit, horizon, late)
        self._fire(lor2c, state, self._now(c.schedule, state))  # due at a resumed checkpoint; none on a fresh run

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if self.stop_on_nonfinite:
            check_training_step(unwrap_adapter(model), state.global_step)
        lor2c = _scheduled(model)
        if lor2c is not None and lor2c.lor2c_config.schedule == "steps":
            self._fire(lor2c, state, state.global_step)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        lor2c = _scheduled(model)
        if lor2c is not None and lor2c.lor2c_config.schedule == "epochs":
            self._fire(lor2c, state, self._now("epochs", state))

    @staticmethod
    def _now(schedule: str, state: TrainerState) -> float:
        """Where training stands on the schedule's axis: optimizer steps, or completed epochs (when max_steps
        stops training mid-epoch, that epoch has not ended)."""
        return state.global_step if schedule == "steps" else math.floor((state.epoch or 0) + 1e-6)

    def _fire(self, lor2c: LoR2CModel, state: TrainerState, now: float) -> None:
        s = lor2c._structure
        for kind in due_events(self.merge_points, self.inject_points, s.count("merge"), s.count("inject"), now):
            event = getattr(lor2c, f"apply_{kind}")
            record = event(step=state.global_step, epoch=state.epoch)
            if self.trainer is not None and not record.get("skipped"):
                scores = record["scores"]
                self.trainer.log({
                    f"lor2c/{kind}_first_block": float(record["blocks"][0]),
                    f"lor2c/{kind}_last_block": float(record["blocks"][-1]),
                    f"lor2c/{kind}_sfs": float(sum(scores)),
                    "lor2c/adapter_params": float(record["params_after"]),
                })

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if not state.is_world_process_zero or _scheduled(model) is None:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            from .serialization import atomic_write_text

            payload = {"structure": unwrap_lor2c(model).structure,
                       "merge_points": self.merge_points, "inject_points": self.inject_points}
            atomic_write_text(os.path.join(checkpoint, STRUCTURE_FILE), json.dumps(payload, indent=1))
