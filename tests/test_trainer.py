"""`LoR2CTrainer` through the real `transformers.Trainer` loop on tiny random models and generated datasets.

Event points are derived by hand from SPEC §6: with the `steps` schedule and T optimizer steps, event k of M
happens after the first step >= k*T/(4M); with `epochs`, at the end of epoch k * (floor(E/(4M + 1e-9)) + 1).
"""

from __future__ import annotations

import json
import logging
import math
import os
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors import safe_open
from transformers import TrainingArguments

from lor2c_hf import LoR2CCallback, LoR2CConfig, LoR2CModel, LoR2CTrainer, get_lor2c_model
from tiny_models import VOCAB, tiny_model

SEQ = 12


def cls_data(n: int, seed: int = 0) -> datasets.Dataset:
    """Random token sequences; the label is whether the first token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ds = datasets.Dataset.from_dict({"input_ids": torch.randint(2, VOCAB, (n, SEQ), generator=g).tolist()})
    return ds.map(lambda row: {"labels": int(row["input_ids"][0] > VOCAB // 2), "attention_mask": [1] * SEQ})


def lm_data(n: int, seed: int = 0) -> datasets.Dataset:
    """Random token sequences for causal LM; labels are the inputs (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    ds = datasets.Dataset.from_dict({"input_ids": torch.randint(2, VOCAB, (n, SEQ), generator=g).tolist()})
    return ds.map(lambda row: {"labels": row["input_ids"]})


def training_args(out, **overrides) -> TrainingArguments:
    base = dict(per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, save_strategy="no", logging_steps=4)
    return TrainingArguments(str(out), **{**base, **overrides})


def steps_config(merges: int, injects: int, **overrides) -> LoR2CConfig:
    return LoR2CConfig.for_method("imlor2c", r=4, num_merges=merges, num_injects=injects, schedule="steps", **overrides)


def event_steps(model: LoR2CModel) -> list[tuple[str, int]]:
    return [(e["kind"], e["step"]) for e in model.structure["events"]]


def saved_structure(directory) -> dict:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["lor2c_structure"])


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- sequence classification: one run, inspected by several tests ---------------------------------------------

@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls")
    base = tiny_model("roberta", num_layers=8)
    base_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = LoR2CTrainer(base, training_args(out, max_steps=12, save_strategy="steps", save_steps=2),
                           train_dataset=cls_data(64), lor2c_config=steps_config(2, 2))
    adapter_before = trainer.lor2c_model.adapter_state_dict()
    trainer.train()
    return SimpleNamespace(trainer=trainer, base=base, base_before=base_before, adapter_before=adapter_before, out=out)


def test_plain_model_is_wrapped_and_callback_installed_once(cls_run):
    trainer = cls_run.trainer
    assert isinstance(trainer.model, LoR2CModel) and trainer.model.get_base_model() is cls_run.base
    assert sum(isinstance(c, LoR2CCallback) for c in trainer.callback_handler.callbacks) == 1


def test_classification_trains_adapter_and_head_and_freezes_the_base(cls_run):
    for name, p in cls_run.base.named_parameters():
        if name.startswith("classifier."):
            assert not torch.equal(p, cls_run.base_before[name]), f"head {name} did not train"
        else:
            assert torch.equal(p, cls_run.base_before[name]), f"base {name} changed"
    model, after = cls_run.trainer.lor2c_model, cls_run.trainer.lor2c_model.adapter_state_dict()
    s = model.structure
    for slot in s["owners"]:
        assert after[f"lor2c.lora_B.{slot}"].abs().sum() > 0
        assert not torch.equal(after[f"lor2c.lora_A.{slot}"], cls_run.adapter_before[f"lor2c.lora_A.{slot}"])
    for block in s["injected"]:
        assert all(after[k].abs().sum() > 0 for k in after if k.startswith(f"lor2c_injected.blocks.{block}.") and ".lora_B." in k)


def test_steps_schedule_events_reach_log_history(cls_run):
    model, trainer = cls_run.trainer.lor2c_model, cls_run.trainer
    # T=12, M=N=2: points 1*12/8 = 1.5 -> step 2 and 2*12/8 = 3; merge first on each point.
    assert event_steps(model) == [("merge", 2), ("inject", 2), ("merge", 3), ("inject", 3)]
    assert not any(e.get("skipped") for e in model.structure["events"])
    logged = {h["step"]: h for h in trainer.state.log_history if any(k.startswith("lor2c/") for k in h)}
    assert sorted(logged) == [2, 3]  # one log per event step, holding that step's merge and inject
    for event in model.structure["events"]:
        kind, entry = event["kind"], logged[event["step"]]
        assert "loss" in entry  # the step's own loss is logged with it
        assert (entry[f"lor2c/{kind}_first_block"], entry[f"lor2c/{kind}_last_block"]) == (event["blocks"][0], event["blocks"][-1])
        assert entry[f"lor2c/{kind}_sfs"] == pytest.approx(sum(event["scores"]))
    last_of_step = {e["step"]: e for e in model.structure["events"]}
    assert all(logged[step]["lor2c/adapter_params"] == e["params_after"] for step, e in last_of_step.items())


def test_every_checkpoint_holds_the_adapter_and_its_structure(cls_run):
    model, out = cls_run.trainer.lor2c_model, cls_run.out
    final_events = model.structure["events"]
    checkpoints = sorted((int(d.split("-")[1]), out / d) for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert [k for k, _ in checkpoints] == [2, 4, 6, 8, 10, 12]
    for step, ckpt in checkpoints:
        files = set(os.listdir(ckpt))
        assert {"adapter_model.safetensors", "adapter_config.json", "lor2c_checkpoint.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, f"base weights in {ckpt}"
        structure = saved_structure(ckpt)
        assert structure["events"] == [e for e in final_events if e["step"] <= step]
    final = saved_tensors(checkpoints[-1][1])
    for k, v in model.adapter_state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=0)


def test_save_model_writes_only_the_adapter(cls_run, tmp_path):
    trainer, model = cls_run.trainer, cls_run.trainer.lor2c_model
    trainer.save_model(str(tmp_path))
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"}
    base_bytes = sum(p.numel() * p.element_size() for p in cls_run.base.parameters())
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert adapter_bytes < 0.15 * base_bytes, (adapter_bytes, base_bytes)
    keys = saved_tensors(tmp_path)
    assert all(k.startswith(("lor2c.", "lor2c_injected.", "base_model.classifier.")) for k in keys)
    # The saved adapter on a fresh copy of the same random base reproduces the trained model.
    restored = LoR2CModel.from_pretrained(tiny_model("roberta", num_layers=8), str(tmp_path))
    assert restored.structure == model.structure
    ids = torch.randint(2, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits)


# --- console lines ---------------------------------------------------------------------------------------------

def test_one_console_line_per_event(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lor2c_hf")
    trainer = LoR2CTrainer(tiny_model("llama", num_layers=6), training_args(tmp_path, max_steps=8),
                           train_dataset=lm_data(32), lor2c_config=steps_config(1, 2))
    trainer.train()
    events = trainer.lor2c_model.structure["events"]
    assert event_steps(trainer.lor2c_model) == [("inject", 1), ("merge", 2), ("inject", 2)]  # M: 8/4; N: 8/8, 16/8
    lines = [r.getMessage() for r in caplog.records if r.name == "lor2c_hf" and "] step " in r.getMessage()]
    assert len(lines) == len(events)
    for line, event in zip(lines, events):
        assert "\n" not in line
        assert line.startswith(f"[LoR2C] step {event['step']} ") and f" {event['kind']}: " in line
        assert f"{event['params_before']:,d} -> {event['params_after']:,d}" in line
        assert f"{event['scores'][0]:.4f}" in line and str(event["blocks"][0]) in line


# --- causal LM, accumulation, checkpointing, precision ----------------------------------------------------------

def final_adapter(trainer: LoR2CTrainer) -> dict[str, torch.Tensor]:
    return trainer.lor2c_model.adapter_state_dict()


def test_causal_lm_gradient_accumulation_matches_the_full_batch(tmp_path):
    # Same data order and global batch 8, once as 8 x 1 and once as 4 x 2 accumulated micro-batches.
    runs = []
    for batch, accum in ((8, 1), (4, 2)):
        trainer = LoR2CTrainer(
            tiny_model("llama", num_layers=6),
            training_args(tmp_path / f"b{batch}", max_steps=6, per_device_train_batch_size=batch, gradient_accumulation_steps=accum),
            train_dataset=lm_data(48), lor2c_config=steps_config(1, 1, lora_dropout=0.0, inject_dropout=0.0))
        trainer.train()
        assert trainer.state.global_step == 6
        assert event_steps(trainer.lor2c_model) == [("merge", 2), ("inject", 2)]  # optimizer steps, 6/4 -> 2
        runs.append(trainer)
    assert runs[0].lor2c_model.structure["spans"] == runs[1].lor2c_model.structure["spans"]
    full, accumulated = final_adapter(runs[0]), final_adapter(runs[1])
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-4, atol=1e-5, msg=k)


def test_gradient_checkpointing_trains_exactly_like_without(tmp_path):
    results = {}
    for checkpointing in (False, True):
        base = tiny_model("llama", num_layers=8)
        mlp_calls = []
        # A pre-hook: the recompute stops early once the saved tensors it needs exist, before the MLP returns.
        base.model.layers[2].mlp.register_forward_pre_hook(lambda *a: mlp_calls.append(1))
        trainer = LoR2CTrainer(base, training_args(tmp_path / str(checkpointing), max_steps=8, gradient_checkpointing=checkpointing),
                               train_dataset=lm_data(64), lor2c_config=steps_config(2, 2))
        trainer.train()
        # Checkpointing recomputes each block in backward: the MLP runs twice per step instead of once.
        assert len(mlp_calls) == 8 * (2 if checkpointing else 1)
        assert len(trainer.lor2c_model.structure["events"]) == 4
        results[checkpointing] = trainer
    assert results[True].lor2c_model.structure == results[False].lor2c_model.structure
    plain, checkpointed = final_adapter(results[False]), final_adapter(results[True])
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], msg=k)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    try:
        args = training_args(tmp_path, max_steps=6, bf16=True)
    except ValueError as err:
        pytest.skip(f"this transformers/CPU refuses bf16 mixed precision: {err}")
    base = tiny_model("llama", num_layers=6)
    dtypes = set()
    base.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    trainer = LoR2CTrainer(base, args, train_dataset=lm_data(48), lor2c_config=steps_config(1, 1))
    before = final_adapter(trainer)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and dtypes == {torch.bfloat16}  # autocast really ran
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert event_steps(trainer.lor2c_model) == [("merge", 2), ("inject", 2)]
    after = final_adapter(trainer)
    assert all(v.dtype == torch.float32 for v in after.values())  # adapters stay fp32, like PEFT
    for slot in trainer.lor2c_model.structure["owners"]:
        assert not torch.equal(after[f"lor2c.lora_B.{slot}"], before[f"lor2c.lora_B.{slot}"])


# --- schedule modes, best model, resume ------------------------------------------------------------------------

def test_epochs_schedule_fires_at_epoch_ends(tmp_path):
    # E=4, M=2: Δ_M = floor(4/8) + 1 = 1 -> merges after epochs 1, 2. N=1: Δ_N = floor(4/4.000000001) + 1 = 1 -> epoch 1.
    config = LoR2CConfig.for_method("imlor2c", r=4, num_merges=2, num_injects=1)
    trainer = LoR2CTrainer(tiny_model("bert", num_layers=6), training_args(tmp_path, num_train_epochs=4),
                           train_dataset=cls_data(32), lor2c_config=config)  # 4 steps per epoch
    trainer.train()
    events = [(e["kind"], e["step"], e["epoch"]) for e in trainer.lor2c_model.structure["events"]]
    assert events == [("merge", 4, 1.0), ("inject", 4, 1.0), ("merge", 8, 2.0)]


def test_epochs_schedule_ignores_an_unfinished_last_epoch(tmp_path):
    # max_steps=6 at 4 steps per epoch: E = 2, N=2: Δ_N = floor(2/8) + 1 = 1 -> injects after epochs 1 and 2.
    # Training stops at epoch 1.5, so epoch 2 never ends and the second inject must not happen.
    config = LoR2CConfig.for_method("injectlor2c", r=4, num_injects=2)
    trainer = LoR2CTrainer(tiny_model("bert", num_layers=6), training_args(tmp_path, max_steps=6),
                           train_dataset=cls_data(32), lor2c_config=config)
    trainer.train()
    assert event_steps(trainer.lor2c_model) == [("inject", 4)]


def test_load_best_model_at_end_restores_the_best_checkpoints_structure(tmp_path):
    # The metric makes checkpoint-2 the best: it holds one merge and one inject, the final model two of each.
    holder = {}

    def compute_metrics(_):
        return {"closeness": -abs(holder["trainer"].state.global_step - 2)}

    trainer = LoR2CTrainer(
        tiny_model("roberta", num_layers=8),
        training_args(tmp_path, max_steps=16, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                      load_best_model_at_end=True, metric_for_best_model="closeness", greater_is_better=True,
                      per_device_eval_batch_size=16),
        train_dataset=cls_data(64), eval_dataset=cls_data(16, seed=1), compute_metrics=compute_metrics,
        lor2c_config=steps_config(2, 2))  # 16/8 = 2, 32/8 = 4
    holder["trainer"] = trainer
    trainer.train()
    best, last = tmp_path / "checkpoint-2", tmp_path / "checkpoint-16"
    assert trainer.state.best_model_checkpoint == str(best)
    assert len(saved_structure(last)["events"]) == 4 and len(saved_structure(best)["events"]) == 2
    model = trainer.lor2c_model
    assert model.structure == saved_structure(best)
    best_tensors = saved_tensors(best)
    for k, v in model.adapter_state_dict().items():
        torch.testing.assert_close(v, best_tensors[k], rtol=0, atol=0, msg=k)


def test_accepts_a_wrapped_model_and_rejects_a_conflicting_config(tmp_path):
    config = LoR2CConfig(r=4)
    wrapped = get_lor2c_model(tiny_model("llama", num_layers=4), config)
    args = training_args(tmp_path, max_steps=2)
    trainer = LoR2CTrainer(wrapped, args, train_dataset=lm_data(16))
    assert trainer.model is wrapped and trainer.lor2c_model is wrapped
    trainer.train()
    assert all(b.abs().sum() > 0 for b in wrapped.lor2c.lora_B)
    # An equal config is no conflict, although wrapping filled in fields it left to detection (e.g. modules_to_save).
    assert LoR2CTrainer(wrapped, args, train_dataset=lm_data(16), lor2c_config=LoR2CConfig(r=4)).model is wrapped
    with pytest.raises(ValueError, match=r"lor2c_config differs .* \['r', 'inject_r'\]"):
        LoR2CTrainer(wrapped, args, train_dataset=lm_data(16), lor2c_config=LoR2CConfig(r=8))


def test_resume_after_an_event_ends_like_an_uninterrupted_run(tmp_path):
    # Dropout on everywhere (RoBERTa's own, LoR2C's, the injected LoRA's), T=16, M=N=2: events at steps 2 and 4.
    # checkpoint-3 is taken after the first merge and inject and before the second ones, mid-epoch (8 steps/epoch).
    def trainer_for(out):
        return LoR2CTrainer(tiny_model("roberta", num_layers=8),
                            training_args(out, max_steps=16, save_strategy="steps", save_steps=3),
                            train_dataset=cls_data(64), lor2c_config=steps_config(2, 2))

    full = trainer_for(tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert [e["step"] for e in saved_structure(checkpoint)["events"]] == [2, 2]
    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.lor2c_model.structure == full.lor2c_model.structure  # same later events, none fired twice
    assert event_steps(resumed.lor2c_model) == [("merge", 2), ("inject", 2), ("merge", 4), ("inject", 4)]
    logged = [h["step"] for h in resumed.state.log_history if "lor2c/adapter_params" in h]
    assert logged == [2, 4]  # history restored from the checkpoint, then the resumed run's own events
    expected, got = final_adapter(full), final_adapter(resumed)
    assert set(expected) == set(got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)
