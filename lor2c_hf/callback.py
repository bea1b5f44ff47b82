"""`LoR2CCallback`: fires merges and injects on the paper's schedule during `Trainer.train()`.

`LoR2CTrainer` installs it. Added by hand to a plain `Trainer` or TRL's `SFTTrainer`
(`callbacks=[LoR2CCallback()]`), it also gives that trainer the adapter's checkpoint methods
(`adapter_trainer.adopt_trainer`), so checkpoints hold the adapter only and resume with their structure.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from typing import Any, Optional

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_trainer import adopt_trainer, default_find_unused_parameters, unwrap_adapter
from .atomic import atomic_write_text
from .checkpoint_io import CheckpointIOMixin, mark_complete
from .guards import check_training_step
from .model import LoR2CModel
from .schedule import due_events, epoch_points, step_points

logger = logging.getLogger("lor2c_hf")
STRUCTURE_FILE = "lor2c_structure.json"
SUPPORTED_PATTERN = ("LoR2CTrainer(model=..., lor2c_config=...), class MyTrainer(LoR2CTrainer, YourTrainer), or "
                     "YourTrainer(model=get_lor2c_model(model, config), callbacks=[LoR2CCallback()])")


def unwrap_lor2c(model: Any) -> LoR2CModel:
    """The `LoR2CModel` inside a DDP / DeepSpeed / compiled wrapper."""
    return unwrap_adapter(model, LoR2CModel)


def _scheduled(model: Any) -> Optional[LoR2CModel]:
    """The LoR2CModel whose events this callback runs; None for adapters without events (ResLoRA)."""
    adapter = unwrap_adapter(model)
    return adapter if isinstance(adapter, LoR2CModel) else None


def _calling_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    """The `Trainer` whose callback handler is calling `callback` now (callbacks get no reference to it)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)  # None while a Trainer is still being made
            if isinstance(candidate, Trainer) and callback in getattr(handler, "callbacks", ()):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


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
        self._pending_logs: list[dict[str, float]] = []

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        self._bind(args, model)

    def _bind(self, args: TrainingArguments, model: Any) -> None:
        """Added to a trainer that is not a `LoR2CTrainer`: adopt it, or refuse now with the supported patterns."""
        if self.trainer is not None:
            return
        try:
            adapter = unwrap_adapter(model)
        except TypeError as e:
            raise TypeError(f"LoR2CCallback was added to a trainer whose model is a {type(model).__name__}, not a LoR2C "
                            f"or ResLoRA adapter model. Use {SUPPORTED_PATTERN}.") from e
        trainer = _calling_trainer(self)
        if trainer is None:
            raise RuntimeError("LoR2CCallback could not find the Trainer it was added to, so its checkpoints would hold "
                               f"the whole base model and not resume the structure. Use {SUPPORTED_PATTERN}.")
        adopt_trainer(trainer)
        self.trainer = trainer
        default_find_unused_parameters(args, adapter)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        self._bind(args, model)  # a callback added after the Trainer was made (`add_callback`)
        lor2c = _scheduled(model)
        if lor2c is None:
            return
        c = lor2c.lor2c_config
        if c.has_events and getattr(self.trainer, "is_fsdp_enabled", False):
            raise ValueError(f"LoR2CConfig.method={c.method!r} merges/injects from the SFS of the whole adapter, which FSDP "
                             "shards across ranks; train it with DDP or DeepSpeed ZeRO (accelerate_configs/), or use "
                             "FSDP with lor2c/sharelor2c (no events).")
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
        self._fire(lor2c, state, control, self._now(c.schedule, state))  # due at a resumed checkpoint; none on a fresh run

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if self.stop_on_nonfinite:
            check_training_step(unwrap_adapter(model), state.global_step)
        lor2c = _scheduled(model)
        if lor2c is not None and lor2c.lor2c_config.schedule == "steps":
            self._fire(lor2c, state, control, state.global_step)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        lor2c = _scheduled(model)
        if lor2c is not None and lor2c.lor2c_config.schedule == "epochs":
            self._fire(lor2c, state, control, self._now("epochs", state))

    @staticmethod
    def _now(schedule: str, state: TrainerState) -> float:
        """Where training stands on the schedule's axis: optimizer steps, or completed epochs (when max_steps
        stops training mid-epoch, that epoch has not ended)."""
        return state.global_step if schedule == "steps" else math.floor((state.epoch or 0) + 1e-6)

    def _fire(self, lor2c: LoR2CModel, state: TrainerState, control: TrainerControl, now: float) -> None:
        s = lor2c._structure
        for kind in due_events(self.merge_points, self.inject_points, s.count("merge"), s.count("inject"), now):
            event = getattr(lor2c, f"apply_{kind}")
            record = event(step=state.global_step, epoch=state.epoch)
            if not record.get("skipped"):
                scores = record["scores"]
                self._log({
                    f"lor2c/{kind}_first_block": float(record["blocks"][0]),
                    f"lor2c/{kind}_last_block": float(record["blocks"][-1]),
                    f"lor2c/{kind}_sfs": float(sum(scores)),
                    "lor2c/adapter_params": float(record["params_after"]),
                }, control)

    def _log(self, metrics: dict[str, float], control: TrainerControl) -> None:
        """Log an event through the Trainer without taking the place of this step's own log.

        `Trainer.log` resets `control.should_log`, which would drop the loss the Trainer is about to log at
        this step; so when that log is due, the event follows it (from `on_log`) instead.
        """
        if control.should_log:
            self._pending_logs.append(metrics)
        else:
            self.trainer.log(metrics)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        pending, self._pending_logs = self._pending_logs, []
        for metrics in pending:
            self.trainer.log(metrics)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        self.on_log(args, state, control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return
        if _scheduled(model) is not None:
            payload = {"structure": unwrap_lor2c(model).structure,
                       "merge_points": self.merge_points, "inject_points": self.inject_points}
            atomic_write_text(os.path.join(checkpoint, STRUCTURE_FILE), json.dumps(payload, indent=1))
        if not isinstance(self.trainer, CheckpointIOMixin):  # an adopted trainer: its files are all written now
            mark_complete(checkpoint)
