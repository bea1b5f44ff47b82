"""One LoR2CTrainer run for `test_resilience_kill.py`, in its own process so that it can be killed with SIGKILL.

    python resilience_worker.py '{"out": DIR, "schedule": "epochs", "pause": ["saved", 4], "result": FILE}'

`args` overrides training arguments (e.g. save_steps). `pause` = [where, step]: at that point of optimizer step `step` the run prints PAUSED and waits to be killed:
`step` (after the step, before its events and save), `saved` (checkpoint complete), `adapter` (inside the
checkpoint's adapter write, before its rename), `rng` (checkpoint half written: adapter, optimizer and scheduler,
no RNG state or trainer state). Without `pause` the run trains to the end, resuming from the last complete
checkpoint in `out` if there is one, and writes its final adapter and events to `result`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lor2c_hf.serialization as serialization  # noqa: E402
from lor2c_hf import LoR2CConfig, LoR2CTrainer  # noqa: E402
from lor2c_hf.training.checkpoints import last_complete_checkpoint  # noqa: E402
from test_trainer import cls_data, training_args  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

# 4 optimizer steps per epoch. epochs: E=4, M=2 -> merges after epochs 1 and 2, N=1 -> inject after epoch 1;
# a checkpoint every 4 steps falls on each epoch's last step, saved before that epoch's events.
# steps: T=16, M=N=2 -> events after steps 2 and 4; checkpoints every 3 steps.
RUNS: dict[str, dict[str, Any]] = {
    "epochs": dict(args=dict(num_train_epochs=4, save_steps=4), config=dict(num_merges=2, num_injects=1)),
    "steps": dict(args=dict(max_steps=16, save_steps=3), config=dict(num_merges=2, num_injects=2, schedule="steps")),
}


def pause_here() -> None:
    print("PAUSED", flush=True)
    time.sleep(600)


class PauseAt(TrainerCallback):
    def __init__(self, where: str, step: int) -> None:
        self.where, self.step = where, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.where == "step" and state.global_step == self.step:
            pause_here()

    def on_save(self, args, state, control, **kwargs):
        if self.where == "saved" and state.global_step == self.step:
            pause_here()


def pause_inside_saves(trainer: LoR2CTrainer, where: str, step: int) -> None:
    """Wrap the adapter write or the RNG-state write of checkpoint `step` to pause in the middle of the save."""
    if where == "adapter":
        real = serialization.save_file

        def save_then_pause(*args: Any, **kwargs: Any) -> None:
            real(*args, **kwargs)
            if trainer.state.global_step == step:
                pause_here()

        serialization.save_file = save_then_pause
    elif where == "rng":
        real_rng = Trainer._save_rng_state

        def pause_before_rng(self: Trainer, output_dir: str) -> None:
            if self.state.global_step == step:
                pause_here()
            real_rng(self, output_dir)

        Trainer._save_rng_state = pause_before_rng


def run(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Train per `spec`; returns {"adapter": tensors, "events": [(kind, step, blocks)]} when it ends."""
    torch.set_num_threads(1)
    setup = RUNS[spec["schedule"]]
    pause = spec.get("pause")
    trainer = LoR2CTrainer(tiny_model("roberta", num_layers=6),
                           training_args(spec["out"], save_strategy="steps", **{**setup["args"], **spec.get("args", {})}),
                           train_dataset=cls_data(32), lor2c_config=LoR2CConfig.for_method("imlor2c", r=4, **setup["config"]),
                           callbacks=[PauseAt(*pause)] if pause else [])
    if pause:
        pause_inside_saves(trainer, *pause)
    trainer.train(resume_from_checkpoint=True if last_complete_checkpoint(spec["out"]) else None)
    model = trainer.lor2c_model
    return {"adapter": model.adapter_state_dict(),
            "events": [(e["kind"], e["step"], e["blocks"]) for e in model.structure["events"]]}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = run(spec)
    save_file(result["adapter"], spec["result"], metadata={"events": json.dumps(result["events"])})
