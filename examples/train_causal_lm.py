"""Causal language modelling with a plain `transformers.Trainer` script, made LoR2C by swapping the Trainer.

The only LoR2C changes against a stock Trainer script are the import, `LoR2CTrainer` instead of `Trainer`
and the `lor2c_config=` argument. To stay offline and finish in seconds, the model is a tiny random Llama
built from a config and the data are generated counting sequences; swap in `from_pretrained(...)` and a real
dataset for real work. The presets merge and inject 4 times each (M = N = 4) at the ends of epochs 1-4, so
the model has enough blocks (16) for every event to find a candidate.

    python examples/train_causal_lm.py --method imlor2c --output_dir out/causal_lm
"""

from __future__ import annotations

import argparse
import math

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from lor2c_hf import METHODS, LoR2CConfig, LoR2CTrainer

VOCAB_SIZE, SEQ_LEN = 128, 24


def build_model(num_layers: int = 16, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama."""
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=num_layers, max_position_embeddings=SEQ_LEN,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_dataset(num_examples: int, seed: int) -> datasets.Dataset:
    """Counting sequences (start, start + step, ...) modulo the vocabulary: the next token is predictable."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, VOCAB_SIZE, size=(num_examples, 1))
    steps = rng.integers(1, 4, size=(num_examples, 1))
    ids = (starts + steps * np.arange(SEQ_LEN)) % VOCAB_SIZE
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    return ds.map(lambda row: {"labels": row["input_ids"]})  # the model shifts labels itself


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="lor2c")
    parser.add_argument("--output_dir", default="out/causal_lm")
    parser.add_argument("--num_train_epochs", type=float, default=6)
    args = parser.parse_args(argv)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=16,
        learning_rate=2e-2,
        lr_scheduler_type="linear",
        warmup_steps=0.06,  # a float below 1 is a ratio of the total steps
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    trainer = LoR2CTrainer(  # was: Trainer(
        model=build_model(),
        args=training_args,
        train_dataset=build_dataset(64, seed=0),
        eval_dataset=build_dataset(32, seed=1),
        lor2c_config=LoR2CConfig.for_method(args.method),  # the one new argument
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"final eval loss {metrics['eval_loss']:.4f}, perplexity {math.exp(metrics['eval_loss']):.2f}")
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
