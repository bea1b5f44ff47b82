"""LoR2C in code we did not write: the official `run_glue.py` pattern, TRL's `SFTTrainer` (as a base class of
`LoR2CTrainer` and with `LoR2CCallback`), a plain `Trainer` with the callback, `Seq2SeqTrainer`, the loaders of
transformers and PEFT, and PEFT habits (`disable_adapter`, `peft_config`, the state dict).

Every road trains with merges and injects, writes adapter-only checkpoints, resumes from a checkpoint taken
between events to the uninterrupted run's adapter, saves, and reloads to identical logits. Real Trainer, TRL,
PEFT and safetensors throughout; tiny random models.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys

import datasets
import numpy as np
import peft
import pytest
import torch
from peft import PeftModel
from transformers.trainer_utils import _is_peft_model
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.utils import find_labels
from trl import SFTConfig, SFTTrainer

from lor2c_hf.training.checkpoints import MANIFEST_NAME, CheckpointError, checkpoint_problem
from lor2c_hf import (AdapterLoadError, AutoLoR2CModelForCausalLM, AutoLoR2CModelForSequenceClassification,
                      LoR2CCallback, LoR2CConfig, LoR2CModel, LoR2CTrainer, ResLoRAConfig, get_lor2c_model,
                      get_reslora_model)
from tiny_models import random_ids, tiny_model
from tiny_pretrained import REPO, offline_env, save_tiny_pretrained

WORDS = "good great fine bad awful poor movie film plot actor story scene the a very not".split()
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Sentences of random words; the label is whether a positive word comes before any negative one."""
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(g.choice(WORDS, size=int(g.integers(4, 9))))
        first = next((w for w in words if w in ("good", "great", "fine", "bad", "awful", "poor")), "good")
        rows.append((" ".join(words), int(first in ("good", "great", "fine"))))
    return rows


def imlor2c(**overrides) -> LoR2CConfig:
    """M = N = 2 on 16 steps: events after steps 2 and 4 (SPEC §6), so checkpoint-3 lies between them."""
    return LoR2CConfig.for_method("imlor2c", r=4, num_merges=2, num_injects=2, schedule="steps", **overrides)


def adapter_tensors(directory) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lor2c_structure"])


def assert_same_adapter(a_dir, b_dir) -> None:
    (a, a_structure), (b, b_structure) = adapter_tensors(a_dir), adapter_tensors(b_dir)
    assert a_structure == b_structure and len(a_structure.get("events", [None] * 4)) == 4  # ResLoRA: no events
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


def assert_adapter_only_checkpoints(out) -> None:
    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert checkpoints, os.listdir(out)
    for name in checkpoints:
        files = set(os.listdir(os.path.join(out, name)))
        assert ADAPTER_FILES <= files and not files & {"model.safetensors", "pytorch_model.bin"}, (name, files)
        assert checkpoint_problem(os.path.join(out, name)) is None  # a manifest: complete, resumable


def vocab_ids(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> torch.Tensor:
    """Random token ids inside the model's own (small, tokenizer-made) vocabulary."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(2, model.config.vocab_size, (batch, seq), generator=g)


def eval_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def loss_and_event_steps(log_history: list[dict]) -> tuple[set[int], set[int]]:
    losses = {h["step"] for h in log_history if "loss" in h}
    events = {h["step"] for h in log_history if "lor2c/adapter_params" in h}
    return losses, events


# --- the model object: state dict, signature, attribute names, disable_adapter ---------------------------------

ADAPTERS = {
    "imlor2c": lambda: imlor2c(lora_dropout=0.0),
    "reslora_ms": lambda: ResLoRAConfig(res_flag="ms", pre_num=2, r=4),
    "reslora_is": lambda: ResLoRAConfig(res_flag="is", r=4),
    "reslora_bs": lambda: ResLoRAConfig(res_flag="bs", pre_num=2, r=4),
}


def adapted(name: str, arch: str = "llama", head: str = "causal"):
    """A model whose adapter changes the output: random B everywhere, and for IMLoR2C its four events."""
    base = tiny_model(arch, head=head, num_layers=6)
    reference = copy.deepcopy(base)
    config = ADAPTERS[name]()
    model = get_lor2c_model(base, config) if isinstance(config, LoR2CConfig) else get_reslora_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("lor2c", "reslora")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if isinstance(model, LoR2CModel):
        for event in ("merge", "inject", "merge", "inject"):
            getattr(model, f"apply_{event}")()
    return model.eval(), reference.eval()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_state_dict_holds_each_tensor_once_and_saves_with_safetensors(name, tmp_path):
    model, reference = adapted(name)
    state = model.state_dict()
    pointers = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers)), "two state_dict keys share memory"
    base_keys = {k for k in state if k.startswith("model.")}
    assert base_keys == {f"model.{k}" for k in reference.state_dict()}
    assert all(k.startswith(("model.", "lor2c", "reslora")) for k in state if k != "_extra_state")
    if not name.startswith("reslora"):  # LoR2C's structure rides in the state dict (DeepSpeed's checkpoints resume through it)
        assert bytes(state["_extra_state"].tolist()).decode() == json.dumps(model.structure)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))  # raised before


def test_forward_signature_and_label_names_are_the_base_models():
    for arch, head in (("roberta", "cls"), ("llama", "causal")):
        base = tiny_model(arch, head=head, num_layers=2)
        model = get_lor2c_model(base, LoR2CConfig(r=2))
        assert list(inspect.signature(model.forward).parameters) == list(inspect.signature(base.forward).parameters)
        assert find_labels(type(model)) == find_labels(type(base)) == ["labels"]
        assert type(model).__name__ == "LoR2CModel" and isinstance(model, LoR2CModel)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # torch.save(model) pickles too
            assert type(twin) is type(model) and twin.structure == model.structure
            ids = random_ids(2, 6)
            assert torch.equal(eval_logits(twin, ids), eval_logits(model, ids))


def test_base_model_follows_peft_and_adapts():
    """`isinstance(model, PeftModel)` holds, so code that reads PEFT's names (`Trainer`'s label smoother:
    `base_model.model`) must find PEFT's meaning: `base_model` is the tuner, `.model` the wrapped model."""
    model, reference = adapted("imlor2c")
    assert isinstance(model, PeftModel) and _is_peft_model(model)
    assert model.base_model.model is model.get_base_model() is model.model
    ids = random_ids(2, 9)
    assert torch.equal(eval_logits(model.base_model, ids), eval_logits(model, ids))
    assert not torch.allclose(eval_logits(model, ids), eval_logits(reference, ids))


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_disable_adapter_computes_exactly_the_bare_base(name):
    model, reference = adapted(name)
    ids = random_ids(2, 9)
    adapted_logits, base_logits = eval_logits(model, ids), eval_logits(reference, ids)
    assert not torch.allclose(adapted_logits, base_logits)
    with model.disable_adapter():
        assert torch.equal(eval_logits(model, ids), base_logits)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                           reference.generate(ids, max_new_tokens=4, do_sample=False))
    assert torch.equal(eval_logits(model, ids), adapted_logits)
    assert model.peft_config == {"default": model.adapter_config}
    assert model.active_adapter == "default" and model.active_adapters == ["default"]


def test_an_inject_under_grouped_query_attention_changes_the_count_as_the_readme_says():
    # Mistral here: d = 32, k/v width 16 (2 of 4 heads). One inject replaces 2·d·r by (r/2)·(d + d + d + d_kv).
    model = get_lor2c_model(tiny_model("mistral", num_layers=4), LoR2CConfig.for_method("injectlor2c", r=8, num_injects=1))
    before = model.num_adapter_parameters()
    model.apply_inject()
    d, d_kv, r = 32, 16, 8
    assert model.num_adapter_parameters() - before == (r // 2) * (3 * d + d_kv) - 2 * d * r == -64


# --- loaders -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    base_dir = save_tiny_pretrained(str(root / "base"), [s for s, _ in sentences(64)], num_layers=5)  # M + N = 4 needs 5 blocks
    model = get_lor2c_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), imlor2c())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("lor2c"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    model.apply_merge()
    model.apply_inject()
    model.save_pretrained(str(root / "adapter"))
    return root, model


def test_auto_loader_builds_base_and_adapter_from_the_folder_alone(saved_causal):
    root, model = saved_causal
    ids = vocab_ids(model)
    loaded = AutoLoR2CModelForCausalLM.from_pretrained(str(root / "adapter"))
    assert isinstance(loaded, LoR2CModel) and loaded.structure == model.structure
    assert torch.equal(eval_logits(loaded, ids), eval_logits(model, ids))
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless is_trainable=True


@pytest.mark.parametrize("load", ["auto_model", "load_adapter", "peft_model", "auto_peft_model"])
def test_transformers_and_peft_loaders_refuse_our_folder_by_name(saved_causal, load):
    root, _ = saved_causal
    adapter, base = str(root / "adapter"), str(root / "base")
    calls = {
        "auto_model": lambda: tf.AutoModelForCausalLM.from_pretrained(adapter),
        "load_adapter": lambda: tf.AutoModelForCausalLM.from_pretrained(base).load_adapter(adapter),
        "peft_model": lambda: peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter),
        "auto_peft_model": lambda: peft.AutoPeftModelForCausalLM.from_pretrained(adapter),
    }
    with pytest.raises(AdapterLoadError, match=r"lor2c_hf.*AutoLoR2CModelForCausalLM\.from_pretrained\(path\)"):
        calls[load]()


def test_our_loaders_refuse_a_peft_folder_by_name(saved_causal, tmp_path):
    root, _ = saved_causal
    lora = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(str(root / "base")),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match="PEFT LORA adapter, not a lor2c_hf one.*PeftModel.from_pretrained"):
        AutoLoR2CModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match="PEFT LORA adapter"):
        LoR2CModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(str(root / "base")), str(tmp_path))


# --- the roads: TRL's SFTTrainer (both ways), plain Trainer + callback, Seq2SeqTrainer --------------------------

def wrap(base: torch.nn.Module, config):
    return get_lor2c_model(base, config) if isinstance(config, LoR2CConfig) else get_reslora_model(base, config)


class LoR2CSFTTrainer(LoR2CTrainer, SFTTrainer):
    """The README's pattern: LoR2C's hooks first, TRL's trainer after."""


class LoR2CSeq2SeqTrainer(LoR2CTrainer, Seq2SeqTrainer):
    pass


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    texts = [s for s, _ in sentences(64, seed=1)]
    base_dir = save_tiny_pretrained(str(root / "base"), texts, num_layers=6)
    return base_dir, datasets.Dataset.from_dict({"text": texts})


def sft_trainer(road: str, base_dir: str, data: datasets.Dataset, out, config) -> Trainer:
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    tokenizer.pad_token = tokenizer.eos_token
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    args = SFTConfig(str(out), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-2, save_steps=3,
                     logging_steps=2, report_to=[], use_cpu=True, seed=0, max_length=16, disable_tqdm=True,
                     bf16=False)  # SFTConfig's default bf16 autocast would make the logits comparison inexact
    if road == "mixin":
        return LoR2CSFTTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer, lor2c_config=config)
    return SFTTrainer(model=wrap(base, config), args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[LoR2CCallback()])


def cls_trainer(road: str, base_dir: str, data: datasets.Dataset, out, config) -> Trainer:
    base = tf.AutoModelForSequenceClassification.from_pretrained(base_dir)
    args = TrainingArguments(str(out), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-2, save_steps=3,
                             logging_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    collator = tf.DataCollatorWithPadding(tf.AutoTokenizer.from_pretrained(base_dir))
    if road == "mixin":
        return LoR2CTrainer(model=base, args=args, train_dataset=data, data_collator=collator, lor2c_config=config)
    return Trainer(model=wrap(base, config), args=args, train_dataset=data, data_collator=collator,
                   callbacks=[LoR2CCallback()])


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rows = sentences(64, seed=2)
    base_dir = save_tiny_pretrained(str(root / "base"), [s for s, _ in rows], model_type="roberta", head="cls",
                                    num_layers=6)
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    data = datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]})
    # `sentence` stays in the data set: Trainer drops it because the model's forward does not take it.
    return base_dir, data.map(lambda b: tokenizer(b["sentence"]), batched=True)


ROADS = [("sft", "mixin", "imlor2c"), ("sft", "callback", "imlor2c"), ("cls", "callback", "imlor2c"),
         ("sft", "callback", "reslora_ms")]


@pytest.mark.parametrize("task, road, adapter", ROADS)
def test_road_trains_checkpoints_resumes_exactly_saves_and_reloads(task, road, adapter, tmp_path, request):
    base_dir, data = request.getfixturevalue(f"{task}_setup")
    make = sft_trainer if task == "sft" else cls_trainer
    config = imlor2c() if adapter == "imlor2c" else ResLoRAConfig(res_flag="ms", pre_num=2, r=4, lora_dropout=0.1)
    full = make(road, base_dir, data, tmp_path / "full", config)
    full.train()
    model = full.model
    assert_adapter_only_checkpoints(tmp_path / "full")
    if adapter == "imlor2c":
        assert isinstance(model, LoR2CModel) and len(model.structure["events"]) == 4
        losses, events = loss_and_event_steps(full.state.log_history)
        assert {2, 4} <= events and {2, 4} <= losses  # an event does not take the place of its step's loss

    resumed = make(road, base_dir, data, tmp_path / "resumed", copy.deepcopy(config))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    full.save_model(str(tmp_path / "full_adapter"))
    resumed.save_model(str(tmp_path / "resumed_adapter"))
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "full_adapter"))
    assert_same_adapter(tmp_path / "full_adapter", tmp_path / "resumed_adapter")

    auto = AutoLoR2CModelForCausalLM if task == "sft" else AutoLoR2CModelForSequenceClassification
    reloaded = auto.from_pretrained(str(tmp_path / "full_adapter"))
    ids = vocab_ids(model, 3, 8)
    assert torch.equal(eval_logits(reloaded, ids), eval_logits(model, ids))


def test_callback_road_resume_true_skips_an_incomplete_newest_checkpoint(tmp_path, cls_setup, caplog):
    # Trainer alone would take checkpoint-6 (the newest folder); the callback sets it aside when the trainer is made.
    base_dir, data = cls_setup
    full = cls_trainer("callback", base_dir, data, tmp_path / "full", imlor2c())
    full.args.max_steps = 7
    full.train()
    full.save_model(str(tmp_path / "full_adapter"))
    run = tmp_path / "run"
    os.makedirs(run)
    for name in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(tmp_path / "full" / name, run / name)
    os.remove(run / "checkpoint-6" / MANIFEST_NAME)  # as if the process died while writing checkpoint-6
    with caplog.at_level("WARNING", logger="lor2c_hf"):
        resumed = cls_trainer("callback", base_dir, data, run, imlor2c())  # on_init_end sets checkpoint-6 aside
    assert "set aside as" in caplog.text and "incomplete-checkpoint-6" in caplog.text
    assert (run / "incomplete-checkpoint-6" / "adapter_model.safetensors").is_file()  # kept for inspection
    resumed.args.max_steps = 7
    resumed.train(resume_from_checkpoint=True)  # Trainer's own choice: the newest checkpoint left, checkpoint-3
    assert resumed.state.global_step == 7
    resumed.save_model(str(tmp_path / "resumed_adapter"))
    assert_same_adapter(tmp_path / "full_adapter", tmp_path / "resumed_adapter")
    assert checkpoint_problem(str(run / "checkpoint-6")) is None  # rewritten by the resumed run, complete again


def test_seq2seq_trainer_composes_with_lor2c_trainer(tmp_path, sft_setup):
    base_dir, data = sft_setup
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    tokenized = data.map(lambda b: {**tokenizer(b["text"]), "labels": tokenizer(b["text"])["input_ids"]}, batched=True,
                         remove_columns=["text"])
    args = Seq2SeqTrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=1, save_steps=4,
                                    report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = LoR2CSeq2SeqTrainer(model=tf.AutoModelForCausalLM.from_pretrained(base_dir), args=args,
                                  train_dataset=tokenized, lor2c_config=LoR2CConfig.for_method("mergelor2c", r=2, num_merges=1,
                                                                                               schedule="steps"))
    trainer.train()
    assert len(trainer.lor2c_model.structure["events"]) == 1
    assert_adapter_only_checkpoints(tmp_path)


def test_lor2c_callback_passed_to_lor2c_trainer_is_the_only_one(tmp_path, cls_setup):
    base_dir, data = cls_setup
    callback = LoR2CCallback()
    trainer = LoR2CTrainer(model=tf.AutoModelForSequenceClassification.from_pretrained(base_dir),
                           args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), train_dataset=data,
                           callbacks=[callback], lor2c_config=imlor2c())
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoR2CCallback)] == [callback]
    assert trainer.lor2c_callback is callback


def test_callback_on_a_model_without_adapter_is_refused_at_init_with_the_patterns(tmp_path, cls_setup):
    base_dir, data = cls_setup
    with pytest.raises(TypeError, match=r"not a LoR2C or ResLoRA adapter model\. Use LoR2CTrainer\(.*LoR2CCallback\(\)"):
        Trainer(model=tf.AutoModelForSequenceClassification.from_pretrained(base_dir),
                args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), train_dataset=data,
                callbacks=[LoR2CCallback()])


# --- the official run_glue.py pattern, as a script in its own process -------------------------------------------

def write_csv(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return str(path)


def run_glue_client(tmp_path, out, *extra: str) -> subprocess.CompletedProcess:
    script = os.path.join(REPO, "tests", "clients", "run_glue_min.py")
    argv = [sys.executable, script, "--model_name_or_path", str(tmp_path / "base"),
            "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
            "--output_dir", str(out), "--do_train", "--do_eval", "--do_predict", "--max_steps", "16",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--save_steps", "3", "--logging_steps", "2",
            "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
            "--method", "imlor2c", "--r", "4", "--num_merges", "2", "--num_injects", "2", "--schedule", "steps", *extra]
    return subprocess.run(argv, cwd=str(tmp_path), env=offline_env(str(tmp_path)), capture_output=True, text=True,
                          timeout=600)


def test_run_glue_pattern_with_the_one_line_swap(tmp_path):
    rows = sentences(96, seed=4)
    save_tiny_pretrained(str(tmp_path / "base"), [s for s, _ in rows], model_type="roberta", head="cls", num_layers=6)
    write_csv(tmp_path / "train.csv", rows[:64])
    write_csv(tmp_path / "dev.csv", rows[64:])
    full = run_glue_client(tmp_path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    with open(tmp_path / "full" / "eval_results.json", encoding="utf-8") as f:
        assert 0.0 <= json.load(f)["eval_accuracy"] <= 1.0  # labels reached the metric: label names were found
    assert_adapter_only_checkpoints(tmp_path / "full")
    resumed = run_glue_client(tmp_path, tmp_path / "resumed", "--resume_from_checkpoint",
                              str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(tmp_path / "full", tmp_path / "resumed")

    # What a run_glue.py user does next: reload the output dir and predict the same logits.
    reloaded = AutoLoR2CModelForSequenceClassification.from_pretrained(str(tmp_path / "full"))
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tmp_path / "full"))
    dev = [s for s, _ in rows[64:]]
    with torch.no_grad():
        logits = torch.cat([reloaded(**tokenizer([s], return_tensors="pt")).logits for s in dev])
    torch.testing.assert_close(logits, torch.from_numpy(np.load(tmp_path / "full" / "predict_logits.npy")),
                               atol=1e-5, rtol=0)


def test_events_under_fsdp_are_refused_before_the_first_step(tmp_path, cls_setup):
    # FSDP needs several processes (and a GPU in Trainer); the refusal reads only the arguments (`fsdp`, or
    # accelerate's FSDP launch), so the callback's train-begin hook is called here as Trainer calls it.
    base_dir, data = cls_setup
    for config, refused in ((imlor2c(), True), (LoR2CConfig(r=4), False)):
        trainer = cls_trainer("callback", base_dir, data, tmp_path, config)
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoR2CCallback))
        trainer.args.fsdp = ["full_shard"]  # as TrainingArguments(fsdp="full_shard") holds it
        if refused:
            with pytest.raises(ValueError, match="method='imlor2c' merges/injects .* which FSDP shards"):
                callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
        else:
            callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)


def test_callback_road_checkpoints_keep_no_token_and_incomplete_ones_are_refused(tmp_path, cls_setup):
    base_dir, data = cls_setup
    trainer = cls_trainer("callback", base_dir, data, tmp_path / "run", imlor2c())
    trainer.args.hub_token = "hf_not_to_be_written"
    trainer.args.max_steps = 4
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and trainer.args.hub_token == "hf_not_to_be_written"
    os.remove(checkpoint / MANIFEST_NAME)  # as if the process died before the checkpoint was complete
    again = cls_trainer("callback", base_dir, data, tmp_path / "again", imlor2c())
    with pytest.raises(CheckpointError, match="checkpoint-3.*cannot be resumed.*no lor2c_checkpoint.json"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 0
