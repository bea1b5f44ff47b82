"""A run that dies at any point of a save resumes (`resume_from_checkpoint=True`) to the uninterrupted adapter.

The points, at the second save of the run:
- `after_trainer_wrote`: `Trainer` has written every file of the checkpoint (its rotation is held back), and
  the process dies before `LoR2CCallback.on_save` (a callback listed before it raises);
- `during_manifest`: the manifest's temporary file is half written when the process dies;
- `during_rotation`: rotation had deleted one file of the oldest checkpoint when the process died.

Each on `LoR2CTrainer`, plain `Trainer` + callback, `SFTTrainer` + callback and `LoR2CTrainer`-mixed
`DPOTrainer`, with `save_total_limit` 1 and 2, on the `steps` and `epochs` schedules. CI runs every point on
every road (limit 1, steps) and every limit and schedule on the plain-Trainer road; `-m slow` runs the rest.
"""

from __future__ import annotations

import math
import os

import pytest
from transformers import TrainerCallback, set_seed

import lor2c_hf.training.callback as callback_module
import lor2c_hf.training.checkpoints as checkpoints_module
from lor2c_hf.training.checkpoints import MANIFEST_NAME
from test_ecosystem import (assert_same_adapter, cls_setup, cls_trainer, imlor2c, sft_setup,  # noqa: F401 (fixtures)
                            sft_trainer)
from test_trl_roads import make_trainer, setup  # noqa: F401 (fixture)

POINTS = ("after_trainer_wrote", "during_manifest", "during_rotation")
ROADS = ("lor2c_trainer", "trainer_callback", "sft_callback", "dpo_mixin")


class Crash(RuntimeError):
    """The process dies here."""


class CrashOnSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Crash(f"killed after Trainer wrote checkpoint-{state.global_step}")


def build(road: str, schedule: str, limit: int, out, fixtures):
    set_seed(0)  # the crashed run and the uninterrupted one start from the same adapter
    config = imlor2c(lora_dropout=0.0, inject_dropout=0.0)
    config.schedule = schedule
    if road in ("lor2c_trainer", "trainer_callback"):
        trainer = cls_trainer("mixin" if road == "lor2c_trainer" else "callback", *fixtures["cls"], out, config)
    elif road == "sft_callback":
        trainer = sft_trainer("callback", *fixtures["sft"], out, config)
    else:
        trainer = make_trainer("dpo", "mixin", fixtures["trl"], out)
        trainer.lor2c_model.lor2c_config.schedule = schedule
    args = trainer.args
    if schedule == "steps":  # events after steps 2 and 4 of 16, saves every 3 steps
        args.max_steps, args.save_steps = 16, 3
    else:  # events after epochs 1 and 2 of 3
        per_epoch = math.ceil(len(trainer.train_dataset) / args.per_device_train_batch_size)
        args.max_steps, args.num_train_epochs, args.save_steps = -1, 3, per_epoch * 3 // 4
    args.save_total_limit = limit
    return trainer


@pytest.fixture
def fixtures(cls_setup, sft_setup, setup):  # noqa: F811
    return {"cls": cls_setup, "sft": sft_setup, "trl": setup}


def crash_run(road, schedule, limit, point, out, fixtures, monkeypatch) -> None:
    trainer = build(road, schedule, limit, out, fixtures)
    crash_step = 2 * trainer.args.save_steps
    if point == "after_trainer_wrote":
        handler = trainer.callback_handler.callbacks
        ours = next(i for i, cb in enumerate(handler) if isinstance(cb, callback_module.LoR2CCallback))
        handler.insert(ours, CrashOnSave(crash_step))
    elif point == "during_manifest":
        def torn_manifest(path, text):
            if path.endswith(os.path.join(f"checkpoint-{crash_step}", MANIFEST_NAME)):
                with open(os.path.join(os.path.dirname(path), ".tmp-manifest"), "w") as f:
                    f.write(text[: len(text) // 2])
                raise Crash("killed while writing the manifest")
            return real_write(path, text)

        real_write = checkpoints_module.atomic_write_text
        monkeypatch.setattr(checkpoints_module, "atomic_write_text", torn_manifest)
    else:
        def torn_rotation(output_dir, save_total_limit, **kw):
            oldest = os.path.join(output_dir, f"checkpoint-{crash_step // 2}")
            if save_total_limit and os.path.isdir(oldest) and os.path.isdir(os.path.join(output_dir, f"checkpoint-{crash_step}")):
                os.remove(os.path.join(oldest, "adapter_model.safetensors"))
                raise Crash("killed while rotating checkpoints")
            return real_rotate(output_dir, save_total_limit=save_total_limit, **kw)

        real_rotate = callback_module.rotate_checkpoints
        monkeypatch.setattr(callback_module, "rotate_checkpoints", torn_rotation)
    with pytest.raises(Crash):
        trainer.train()
    monkeypatch.undo()


_uninterrupted: dict = {}


def uninterrupted(road, schedule, limit, tmp_path_factory, fixtures) -> str:
    key = (road, schedule)
    if key not in _uninterrupted:
        out = tmp_path_factory.mktemp(f"full-{road}-{schedule}")
        trainer = build(road, schedule, limit, out / "run", fixtures)
        trainer.train()
        trainer.save_model(str(out / "adapter"))
        _uninterrupted[key] = str(out / "adapter")
    return _uninterrupted[key]


def in_ci(road: str, schedule: str, limit: int) -> bool:
    return (schedule, limit) == ("steps", 1) or road == "trainer_callback"


CASES = [pytest.param(road, schedule, limit, point, id=f"{road}-{schedule}-limit{limit}-{point}",
                      marks=() if in_ci(road, schedule, limit) else pytest.mark.slow)
         for road in ROADS for schedule in ("steps", "epochs") for limit in (1, 2) for point in POINTS]


@pytest.mark.parametrize("road,schedule,limit,point", CASES)
def test_a_run_killed_during_a_save_resumes_to_the_uninterrupted_adapter(road, schedule, limit, point, fixtures,
                                                                         tmp_path, tmp_path_factory, monkeypatch):
    expected = uninterrupted(road, schedule, limit, tmp_path_factory, fixtures)
    crash_run(road, schedule, limit, point, tmp_path / "run", fixtures, monkeypatch)
    resumed = build(road, schedule, limit, tmp_path / "run", fixtures)  # sets incomplete checkpoints aside
    left = sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-"))
    assert left, "the crash left no checkpoint to resume from"
    resumed.train(resume_from_checkpoint=True)
    resumed.save_model(str(tmp_path / "adapter"))
    assert_same_adapter(expected, tmp_path / "adapter")
