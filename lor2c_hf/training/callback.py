"""`LoR2CCallback`: the adapter's guarantees on any `Trainer`, through documented callback events only.

`LoR2CTrainer` installs it; on a plain `Trainer`, TRL's `SFTTrainer`, `DPOTrainer`, `GRPOTrainer`,
`RewardTrainer` or your own subclass, pass `callbacks=[LoR2CCallback()]` with a `LoR2CModel` (or `ResLoRAModel`).
The model itself does the rest: it is a `PeftModel` to `Trainer`, which therefore saves checkpoints with its
`save_pretrained` (adapter and structure only), resumes and reloads the best checkpoint with its `load_adapter`,
and under DeepSpeed resumes through its `state_dict`, which carries the structure.

What the callback adds, event by event:
- `on_init_end`: refuses a model without an adapter; sets aside incomplete checkpoints (so `Trainer`'s own
  `resume_from_checkpoint=True` takes the newest complete one); makes `training_args.bin` pickle without tokens.
- `on_train_begin`: the event schedule (SPEC §6); holds back `save_total_limit`, so `Trainer` rotates nothing.
- `on_step_end` / `on_epoch_end`: stops at the step that made the adapter NaN or Inf; fires due merges/injects.
- `on_save`: once every rank has written its files, the manifest that marks the checkpoint complete, and only
  then the rotation under the user's `save_total_limit`.
- `on_log`: event metrics join the log of their step (`lor2c/merge_sfs`, ...).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..distributed import check_process_group
from ..guards import check_training_step
from ..model import LoR2CModel
from ..schedule import due_events, epoch_points, step_points
from ..wrapper import unwrap_adapter
from .checkpoints import HELD_LIMIT, mark_complete, pickle_without_tokens, set_aside_incomplete

logger = logging.getLogger("lor2c_hf")
SUPPORTED_PATTERN = ("LoR2CTrainer(model=..., lor2c_config=...), class MyTrainer(LoR2CTrainer, YourTrainer), or "
                     "YourTrainer(model=get_lor2c_model(model, config), callbacks=[LoR2CCallback()])")


def _scheduled(model: Any) -> Optional[LoR2CModel]:
    """The LoR2CModel whose events this callback runs; None for adapters without events (ResLoRA)."""
    adapter = unwrap_adapter(model)
    return adapter if isinstance(adapter, LoR2CModel) else None


def _fsdp_enabled(args: TrainingArguments) -> bool:
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class LoR2CCallback(TrainerCallback):
    """Runs `apply_merge`/`apply_inject` on the paper's schedule and keeps checkpoints complete and resumable.

    Which events are done is read from the model's structure, so a run resumed from a checkpoint (whose
    adapter carries the structure) continues the schedule where it stopped; events that were due when the
    checkpoint was written fire as training resumes (Trainer saves a step's checkpoint before `on_epoch_end`).

    `stop_on_nonfinite` (default True): after every optimizer step, stop with `NonFiniteError` naming the step
    and the tensors when a trainable tensor of the adapter (or a task head) is NaN or Inf.
    """

    def __init__(self, stop_on_nonfinite: bool = True) -> None:
        self.stop_on_nonfinite = stop_on_nonfinite
        self.merge_points: list[int] = []
        self.inject_points: list[int] = []
        self._pending_logs: dict[str, float] = {}

    # --- set-up ------------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        self._check_model(model)
        check_process_group()  # before anything is written into the shared output folder
        pickle_without_tokens(args)  # checkpoints' training_args.bin without the Hub token
        with args.main_process_first(desc="LoR2C: set incomplete checkpoints aside"):
            if args.should_save and args.output_dir:
                set_aside_incomplete(args.output_dir)

    @staticmethod
    def _check_model(model: Any) -> None:
        try:
            unwrap_adapter(model)
        except TypeError as e:
            raise TypeError(f"LoR2CCallback was added to a trainer whose model is a {type(model).__name__}, not a LoR2C "
                            f"or ResLoRA adapter model. Use {SUPPORTED_PATTERN}.") from e

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        self._check_model(model)  # also when the callback came by `add_callback` after the trainer was made
        if args.max_steps <= 0 and args.num_train_epochs <= 0:  # zero steps: the untrained adapter would be the result
            raise ValueError(f"Training has no optimizer step: num_train_epochs={args.num_train_epochs}, "
                             f"max_steps={args.max_steps}; expected num_train_epochs > 0 or max_steps > 0.")
        pickle_without_tokens(args)
        if not hasattr(args, HELD_LIMIT):  # rotation waits for the manifest: see on_save
            setattr(args, HELD_LIMIT, args.save_total_limit)
            args.save_total_limit = None
        lor2c = _scheduled(model)
        if lor2c is None:
            return
        c = lor2c.lor2c_config
        if c.has_events and _fsdp_enabled(args):
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

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if hasattr(args, HELD_LIMIT):
            args.save_total_limit = getattr(args, HELD_LIMIT)
            delattr(args, HELD_LIMIT)

    # --- steps and events --------------------------------------------------------------------------------

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
            record = getattr(lor2c, f"apply_{kind}")(step=state.global_step, epoch=state.epoch)
            if not record.get("skipped"):
                self._pending_logs.update({
                    f"lor2c/{kind}_first_block": float(record["blocks"][0]),
                    f"lor2c/{kind}_last_block": float(record["blocks"][-1]),
                    f"lor2c/{kind}_sfs": float(sum(record["scores"])),
                    "lor2c/adapter_params": float(record["params_after"]),
                })
                control.should_log = True  # the step of an event is logged, with the event's metrics

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        """Event metrics join the step's log: the dict the later callbacks (progress bar, printer) get, and the
        entry `Trainer` has just appended to `state.log_history`."""
        if logs is None or not self._pending_logs:
            return
        logs.update(self._pending_logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    # --- checkpoints ---------------------------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        _barrier()  # every rank's files (ZeRO shards) are written before the manifest covers them
        if not args.should_save:
            return
        run_dir = args.output_dir
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return
        mark_complete(checkpoint)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=getattr(args, HELD_LIMIT, args.save_total_limit),
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
