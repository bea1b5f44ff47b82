#!/usr/bin/env python
"""Rebuild `recipes/data/tiny-llama/`: the config and tokenizer of the tiny causal LM that `alpaca.py --tiny` trains.

The folder holds no weights: `--tiny` builds the model from this config with random weights. The tokenizer is
word-level, trained on the shipped Alpaca seed tasks in the Alpaca prompt template, so it loads offline.

    python recipes/data/make_tiny_llama.py
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests")]

import alpaca  # noqa: E402  (the recipe: its template and fixed instructions)
from tiny_pretrained import tiny_config, train_tokenizer  # noqa: E402

SIZE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def main() -> None:
    with open(os.path.join(HERE, "alpaca", "alpaca_seed_tasks.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts = [alpaca.alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]
    texts += [alpaca.alpaca_prompt(i, x) for i, x in alpaca.SHOWCASE]
    tokenizer = train_tokenizer(texts)
    config = tiny_config("llama", tokenizer, num_layers=6, **SIZE)
    out = os.path.join(HERE, "tiny-llama")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: vocabulary {len(tokenizer)}, {config.num_hidden_layers} blocks of width {config.hidden_size}")


if __name__ == "__main__":
    main()
