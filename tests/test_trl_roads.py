"""TRL's preference and RL trainers on both roads: `class X(LoR2CTrainer, DPOTrainer)` and
`DPOTrainer(model=get_lor2c_model(...), callbacks=[LoR2CCallback()])` (and GRPO, Reward).

Each trains IMLoR2C with four events on 16 steps, writes adapter-only complete checkpoints, resumes from
checkpoint-3 (between the events) to the uninterrupted adapter, and reloads to identical logits. SFTTrainer's
two roads are in test_ecosystem.py. DPO and GRPO take a frozen copy of the adapter as their reference
(`add_adapter("ref")`, as for a PEFT model): no second base model.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers as tf
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

from lor2c_hf import (AutoLoR2CModelForCausalLM, AutoLoR2CModelForSequenceClassification, LoR2CCallback, LoR2CModel,
                      LoR2CTrainer, get_lor2c_model)
from test_ecosystem import (assert_adapter_only_checkpoints, assert_same_adapter, eval_logits, imlor2c, sentences,
                            vocab_ids)
from tiny_pretrained import save_tiny_pretrained


class LoR2CDPOTrainer(LoR2CTrainer, DPOTrainer):
    pass


class LoR2CGRPOTrainer(LoR2CTrainer, GRPOTrainer):
    pass


class LoR2CRewardTrainer(LoR2CTrainer, RewardTrainer):
    pass


COMMON = dict(max_steps=16, learning_rate=1e-2, save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              disable_tqdm=True, bf16=False)


def reward_length(completions, **_) -> list[float]:
    """A reward GRPO can learn from: longer completions (in characters) score higher."""
    return [float(len(c if isinstance(c, str) else str(c))) / 10 for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    rows = sentences(48, seed=4)
    texts = [s for s, _ in rows]
    causal = save_tiny_pretrained(str(root / "causal"), texts, num_layers=6)
    scorer = save_tiny_pretrained(str(root / "scorer"), texts, num_layers=6, head="cls", num_labels=1)
    pairs = datasets.Dataset.from_dict({
        "prompt": [" ".join(s.split()[:2]) for s in texts],
        "chosen": [" ".join(s.split()[2:]) for s in texts],
        "rejected": [" ".join(reversed(s.split()[2:])) for s in texts],
    })
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(s.split()[:3]) for s in texts]})
    return {"causal": causal, "scorer": scorer, "pairs": pairs, "prompts": prompts}


def tokenizer_of(path: str):
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_trainer(kind: str, road: str, setup: dict, out):
    """The trainer of `kind` on `road`; the model's adapter is IMLoR2C (M = N = 2: events after steps 2 and 4)."""
    if kind == "reward":
        base = tf.AutoModelForSequenceClassification.from_pretrained(setup["scorer"], num_labels=1)
        tokenizer = tokenizer_of(setup["scorer"])
        base.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(str(out), per_device_train_batch_size=4, max_length=24, **COMMON)
        kwargs = dict(args=args, train_dataset=setup["pairs"].remove_columns("prompt"), processing_class=tokenizer)
        mixin, plain = LoR2CRewardTrainer, RewardTrainer
    else:
        base = tf.AutoModelForCausalLM.from_pretrained(setup["causal"])
        tokenizer = tokenizer_of(setup["causal"])
        if kind == "dpo":
            args = DPOConfig(str(out), per_device_train_batch_size=4, max_length=24, beta=0.1, **COMMON)
            kwargs = dict(args=args, train_dataset=setup["pairs"], processing_class=tokenizer)
            mixin, plain = LoR2CDPOTrainer, DPOTrainer
        else:
            args = GRPOConfig(str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                              beta=0.04, **COMMON)
            kwargs = dict(reward_funcs=reward_length, args=args, train_dataset=setup["prompts"], processing_class=tokenizer)
            mixin, plain = LoR2CGRPOTrainer, GRPOTrainer
    config = imlor2c(lora_dropout=0.0, inject_dropout=0.0)
    if road == "mixin":
        return mixin(model=base, lor2c_config=config, **kwargs)
    return plain(model=get_lor2c_model(base, config), callbacks=[LoR2CCallback()], **kwargs)


@pytest.mark.parametrize("kind", ["dpo", "grpo", "reward"])
@pytest.mark.parametrize("road", ["mixin", "callback"])
def test_trl_trainer_trains_checkpoints_resumes_and_reloads(kind, road, setup, tmp_path):
    full = make_trainer(kind, road, setup, tmp_path / "full")
    model = full.model
    assert isinstance(model, LoR2CModel)
    if kind in ("dpo", "grpo"):  # the reference is a frozen copy of the adapter, not a second base model
        assert full.ref_model is None and "ref" in model.peft_config
    full.train()
    assert [e["step"] for e in model.structure["events"]] == [2, 2, 4, 4]
    assert_adapter_only_checkpoints(tmp_path / "full")
    full.save_model(str(tmp_path / "full_adapter"))
    if kind == "dpo":  # a new adapter is the base: the policy equals its reference before the first update
        first = next(h for h in full.state.log_history if h.get("step") == 1)
        assert abs(first["rewards/margins"]) < 1e-6, first

    resumed = make_trainer(kind, road, setup, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    resumed.save_model(str(tmp_path / "resumed_adapter"))
    assert_same_adapter(tmp_path / "full_adapter", tmp_path / "resumed_adapter")

    auto = AutoLoR2CModelForSequenceClassification if kind == "reward" else AutoLoR2CModelForCausalLM
    reloaded = auto.from_pretrained(str(tmp_path / "full_adapter"))
    ids = vocab_ids(model, 3, 8)
    model.set_adapter("default") if "ref" in model.peft_config else None
    assert torch.equal(eval_logits(reloaded, ids), eval_logits(model, ids))


def test_dpo_after_sft_uses_the_trained_sft_adapter_as_the_frozen_reference(setup, tmp_path):
    """Load the SFT adapter as the trainable start: DPOTrainer's frozen copy ("ref") is then that SFT adapter,
    so the reference is the SFT model, with no second base (what PEFT users get the same way)."""
    sft = get_lor2c_model(tf.AutoModelForCausalLM.from_pretrained(setup["causal"]), imlor2c(lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if name.startswith("lor2c.lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # stands in for SFT training
    sft.apply_merge()
    sft.save_pretrained(str(tmp_path / "sft"))
    policy = LoR2CModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(setup["causal"]), str(tmp_path / "sft"),
                                        is_trainable=True)
    args = DPOConfig(str(tmp_path / "dpo"), per_device_train_batch_size=4, max_length=24, **{**COMMON, "max_steps": 2})
    trainer = DPOTrainer(model=policy, args=args, train_dataset=setup["pairs"], processing_class=tokenizer_of(setup["causal"]),
                         callbacks=[LoR2CCallback()])
    ids = vocab_ids(policy, 2, 8)
    before = eval_logits(sft, ids)
    trainer.train()
    policy.set_adapter("ref")
    try:
        assert torch.equal(eval_logits(policy, ids), before)  # the reference stayed the SFT adapter, structure too
        assert policy.structure == sft.structure
    finally:
        policy.set_adapter("default")
    assert not torch.equal(eval_logits(policy, ids), before)  # while the trained adapter moved
    with policy.disable_adapter():
        assert not torch.equal(eval_logits(policy, ids), before)
