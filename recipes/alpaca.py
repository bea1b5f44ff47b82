#!/usr/bin/env python
"""Instruction tuning on Alpaca with LoR2C, its variants, or PEFT LoRA (the paper's LLaMA2-7B setup).

    accelerate launch recipes/alpaca.py --method imlor2c
    accelerate launch recipes/alpaca.py --config recipes/configs/alpaca_imlor2c.yaml --num_train_epochs 1
    accelerate launch recipes/alpaca.py --method imlor2c --tiny     # offline, about a minute on a laptop CPU

Defaults are the paper's: meta-llama/Llama-2-7b-hf on yahma/alpaca-cleaned with 2,000 examples held out, the
Alpaca prompt template, cutoff 256 tokens, loss on prompt and response, 3 epochs, global batch 128 (whatever
the number of processes), AdamW at 3e-4 with linear decay after 100 warmup steps, r=64 alpha=32 dropout 0.05,
injected LoRA r=32 alpha=16, M=N=8 on the step schedule. At the end: held-out loss and perplexity, greedy
generations for a few fixed instructions, and the adapter in --output_dir.

--tiny swaps in what ships with the repository: a 6-block Llama built from `recipes/data/tiny-llama/config.json`
with random weights (and the word-level tokenizer there), trained on the 175 Alpaca seed tasks in
`recipes/data/alpaca/`, with M=N=2. It runs the whole pipeline offline; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

import common
from common import (
    AdapterArguments, ModelArguments, RecipeArgumentParser, RecipeError, RecipeTrainingArguments, check_model_arguments,
    check_positive, check_ranks_agree, resolve_resume, describe_batch, load_data, load_model, load_tokenizer, main_print, perplexity,
    prepare_training_namespace, require_columns, require_text, run_recipe, unwrap_model, validate_adapter_arguments,
    world_size_from_env, wrap_model,
)

# The Stanford Alpaca template (as used by alpaca-lora and the paper).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Fixed instructions whose greedy answers are printed and saved after training.
SHOWCASE = (
    ("Tell me about alpacas.", ""),
    ("Translate the following sentence into Spanish.", "The weather is nice today."),
    ("Write a Python function that returns the n-th Fibonacci number.", ""),
)
COLUMNS = ("instruction", "output")


@dataclass
class AlpacaDataArguments:
    """The instruction data, how it is tokenized, and the generations after training."""

    dataset_name: str = field(default="yahma/alpaca-cleaned", metadata={"help": "Hub id, a json/jsonl/parquet/arrow/csv file, or a save_to_disk folder with columns instruction, input (optional), output."})
    val_set_size: int = field(default=2000, metadata={"help": "Examples held out for the final loss and perplexity (0: none)."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example (prompt + response)."})
    train_on_inputs: bool = field(default=True, metadata={"help": "Loss on prompt and response (the paper); false masks the prompt."})
    add_eos_token: bool = field(default=True, metadata={"help": "Append EOS to examples that fit within cutoff_len."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training examples (quick runs)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated for each fixed instruction after training (0: skip)."})
    tiny: bool = field(default=False, metadata={"help": "Offline pipeline check: a tiny random Llama built from recipes/data/tiny-llama and the shipped Alpaca seed tasks, M=N=2, about a minute on a CPU. Its numbers mean nothing."})


SECTIONS = {"model": ModelArguments, "adapter": AdapterArguments, "data": AlpacaDataArguments, "training": RecipeTrainingArguments}

PAPER_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path="meta-llama/Llama-2-7b-hf",
    method="imlor2c", r=64, lora_alpha=32, lora_dropout=0.05, inject_r=32, inject_alpha=16, inject_dropout=0.05,
    num_merges=8, num_injects=8, schedule="steps",
    num_train_epochs=3, global_batch_size=128, per_device_train_batch_size=4, per_device_eval_batch_size=8,
    learning_rate=3e-4, lr_scheduler_type="linear", warmup_steps=100, optim="adamw_torch", weight_decay=0.0,
    logging_steps=10, eval_strategy="steps", eval_steps=200, save_steps=200, save_total_limit=3,
    bf16=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
)


DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY_MODEL = os.path.join(DATA_DIR, "tiny-llama")
# --tiny: what ships with the repository, sized to run in about a minute on one CPU core; any flag still overrides.
TINY_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path=TINY_MODEL, dataset_name=os.path.join(DATA_DIR, "alpaca", "alpaca_seed_tasks.jsonl"),
    val_set_size=15, cutoff_len=96, max_new_tokens=12, r=8, lora_alpha=16, inject_r=4, inject_alpha=8,
    num_merges=2, num_injects=2, num_train_epochs=2, global_batch_size=8, per_device_train_batch_size=8,
    per_device_eval_batch_size=15, learning_rate=2e-3, warmup_steps=0, logging_steps=5, eval_strategy="no",
    save_strategy="no", bf16=False, report_to="none",
)
TINY_NOTICE = ("--tiny: a random 6-block Llama trained for seconds on 160 examples. Its loss, perplexity and answers "
               "mean nothing: this run only shows the pipeline working end to end.")


def wants_tiny(argv: Sequence[str]) -> bool:
    """Whether the command line asks for --tiny (read before parsing: it changes the defaults)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--tiny":
            return i + 1 == len(argv) or argv[i + 1].lower() not in ("false", "0", "no", "n", "f")
        if arg.startswith("--tiny="):
            return arg.split("=", 1)[1].lower() not in ("false", "0", "no", "n", "f")
    return False


def alpaca_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The prompt up to and including '### Response:\\n' (the part masked by --train_on_inputs false)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_batch(batch: dict[str, list], tokenizer: Any, cutoff_len: int, train_on_inputs: bool,
                   add_eos_token: bool) -> dict[str, list]:
    """input_ids / attention_mask / labels of prompt + response; labels of the prompt are -100 unless trained on."""
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    prompts = [alpaca_prompt(i, x) for i, x in zip(batch["instruction"], inputs)]
    full = tokenizer([p + o for p, o in zip(prompts, batch["output"])], truncation=True, max_length=cutoff_len)
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=cutoff_len)["input_ids"]]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, n_prompt in zip(full["input_ids"], prompt_lengths):
        ids = list(ids)
        if add_eos_token and len(ids) < cutoff_len and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def prepare_data(data_args: AlpacaDataArguments, tokenizer: Any, seed: int) -> tuple[Any, Optional[Any]]:
    """(train, held-out) tokenized; examples whose labels are all masked are dropped (they carry no loss)."""
    raw = load_data(data_args.dataset_name, "--dataset_name")
    require_columns(raw, COLUMNS, "--dataset_name", data_args.dataset_name, "yahma/alpaca-cleaned (instruction, input, output)")
    require_text(raw, ("instruction", "input", "output"), "--dataset_name", data_args.dataset_name, nullable=("input",))
    if data_args.val_set_size >= len(raw) or data_args.val_set_size < 0:
        raise RecipeError(f"--val_set_size {data_args.val_set_size} leaves no training data in --dataset_name "
                          f"{data_args.dataset_name} ({len(raw)} examples); pass a smaller value.")
    if data_args.val_set_size:
        split = raw.train_test_split(test_size=data_args.val_set_size, shuffle=True, seed=seed)
        train, held_out = split["train"], split["test"]
    else:
        train, held_out = raw.shuffle(seed=seed), None
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    kwargs = dict(tokenizer=tokenizer, cutoff_len=data_args.cutoff_len, train_on_inputs=data_args.train_on_inputs,
                  add_eos_token=data_args.add_eos_token)

    def tokenize(dataset: Any) -> Any:
        tokenized = dataset.map(tokenize_batch, batched=True, fn_kwargs=kwargs, remove_columns=dataset.column_names,
                                desc="tokenize")
        return tokenized.filter(lambda labels: any(t != -100 for t in labels), input_columns="labels", desc="drop fully masked")

    train = tokenize(train)
    if len(train) == 0:
        raise RecipeError(f"every training example of --dataset_name {data_args.dataset_name} has its labels fully masked "
                          f"(--train_on_inputs false with prompts of --cutoff_len {data_args.cutoff_len} tokens or more): "
                          "nothing to learn; raise --cutoff_len or pass --train_on_inputs true.")
    return train, tokenize(held_out) if held_out is not None else None


def generate_showcase(model: torch.nn.Module, tokenizer: Any, device: torch.device, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to the fixed instructions (every rank generates: ZeRO-3 needs all of them)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = unwrap_model(model).eval()
    results = []
    for instruction, input in SHOWCASE:
        encoded = tokenizer(alpaca_prompt(instruction, input), return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=is_deepspeed_zero3_enabled())
        answer = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        results.append({"instruction": instruction, "input": input, "response": answer})
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    push: dict[str, Any] = {}

    def prepare(namespace: Any) -> None:
        check_positive(namespace.cutoff_len, "--cutoff_len")
        check_positive(namespace.max_train_samples, "--max_train_samples", allow_none=True)
        prepare_training_namespace(namespace)
        if namespace.output_dir is None:
            namespace.output_dir = os.path.join("out", f"alpaca-{'tiny-' if namespace.tiny else ''}{namespace.method}")
        resolve_resume(namespace)
        if namespace.val_set_size == 0:
            namespace.eval_strategy = "no"
        if namespace.push_to_hub and not namespace.hub_model_id:
            raise RecipeError("--push_to_hub needs --hub_model_id <user/repo>.")
        push.update(enabled=namespace.push_to_hub, repo_id=namespace.hub_model_id)
        namespace.push_to_hub = False  # the adapter (and its model card) is pushed once, at the end

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {**PAPER_DEFAULTS, **(TINY_DEFAULTS if wants_tiny(argv) else {})}
    common.MODEL_HINT_EXTRA[:] = ["or add --tiny for an offline run of the whole pipeline on a tiny model"]
    parser = RecipeArgumentParser(SECTIONS, prog="alpaca.py", description=__doc__.split("\n\n")[0])
    model_args, adapter_args, data_args, training_args = parser.parse(argv, defaults=defaults, prepare=prepare)
    validate_adapter_arguments(adapter_args, training_args)
    check_model_arguments(model_args)
    if training_args.world_size != world_size_from_env():
        raise RecipeError(f"the launcher started {world_size_from_env()} processes but training sees {training_args.world_size}.")
    main_print(training_args, f"[alpaca] method {adapter_args.method}; {describe_batch(training_args)}; "
                              f"output {training_args.output_dir}")
    if data_args.tiny:
        main_print(training_args, f"[alpaca] {TINY_NOTICE}")

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    if tokenizer.pad_token is None:  # Llama has none; padded positions are masked in attention and labels
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    with training_args.main_process_first(desc="load and tokenize data"):
        train, held_out = prepare_data(data_args, tokenizer, training_args.seed)
    main_print(training_args, f"[alpaca] {len(train)} training and {len(held_out) if held_out else 0} held-out examples "
                              f"({'prompt and response' if data_args.train_on_inputs else 'response only'} in the loss)")

    if data_args.tiny and os.path.samefile(model_args.model_name_or_path, TINY_MODEL):  # a config, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL))
    else:
        model = load_model(model_args, training_args, AutoModelForCausalLM)
    model.config.pad_token_id = tokenizer.pad_token_id
    model, trainer_class = wrap_model(model, adapter_args, "CAUSAL_LM")
    if training_args.process_index == 0:
        model.print_trainable_parameters()
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    metrics: dict[str, float] = {}
    if held_out is not None:
        metrics = trainer.evaluate()
        metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        main_print(training_args, f"[alpaca] held-out loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}")
    if data_args.max_new_tokens > 0:
        generations = generate_showcase(trainer.model, tokenizer, training_args.device, data_args.max_new_tokens)
        for g in generations:
            main_print(training_args, f"[alpaca] ### Instruction: {g['instruction']} {g['input']}\n[alpaca] ### Response: {g['response']}")
        if training_args.process_index == 0:
            with open(os.path.join(training_args.output_dir, "generations.json"), "w", encoding="utf-8") as f:
                json.dump(generations, f, indent=1, ensure_ascii=False)
    check_ranks_agree(trainer.model, training_args)
    main_print(training_args, f"[alpaca] adapter saved to {training_args.output_dir}")
    if data_args.tiny:
        main_print(training_args, f"[alpaca] {TINY_NOTICE}")
    if push.get("enabled") and training_args.process_index == 0:
        adapter = unwrap_model(trainer.model)
        kwargs = {"metrics": metrics} if hasattr(adapter, "adapter_state_dict") else {}
        url = adapter.push_to_hub(push["repo_id"], private=training_args.hub_private_repo, token=training_args.hub_token, **kwargs)
        main_print(training_args, f"[alpaca] pushed to {push['repo_id']}: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, prog="alpaca.py"))
