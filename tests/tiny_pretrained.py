"""A tiny "pretrained" model folder made offline, loadable with `from_pretrained` like a Hub checkpoint.

A word-level tokenizer is trained on the caller's text with the `tokenizers` library and saved, together
with a random tiny model whose vocabulary matches it, by `save_pretrained` into one folder. Recipes can then
be run end to end (`--model_name_or_path <folder>`) with no Hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterable, Optional, Sequence

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_tokenizer(texts: Iterable[str], encoder: bool = False) -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer over `texts` (lower-cased, split on whitespace and punctuation).

    Decoder style (default): `<s> text`, no pad token (like Llama). Encoder style: `<s> a </s>` and
    `<s> a </s></s> b </s>` for pairs, with pad and mask tokens (like RoBERTa).
    """
    tokenizer = Tokenizer(WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(list(texts), WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if encoder:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
        return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                          pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(model_type: str, tokenizer: tf.PreTrainedTokenizerFast, num_layers: int, **overrides) -> tf.PretrainedConfig:
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"))
    small = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                 num_attention_heads=4, max_position_embeddings=512, **special)
    if model_type == "llama":
        config = tf.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **small)
    elif model_type == "roberta":
        config = tf.RobertaConfig(type_vocab_size=1, **small)
    else:
        raise ValueError(f"tiny_config: model_type {model_type!r} is not one of 'llama', 'roberta'.")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_pretrained(directory: str, texts: Iterable[str], model_type: str = "llama", head: str = "causal",
                         num_layers: int = 4, num_labels: int = 2, seed: int = 0, **config_overrides) -> str:
    """Write a tokenizer trained on `texts` and a random tiny model ('causal' or 'cls' head) to `directory`."""
    tokenizer = train_tokenizer(texts, encoder=model_type == "roberta")
    config = tiny_config(model_type, tokenizer, num_layers, **config_overrides)
    auto = {"causal": tf.AutoModelForCausalLM, "cls": tf.AutoModelForSequenceClassification}[head]
    if head == "cls":
        config.num_labels = num_labels
    torch.manual_seed(seed)
    model = auto.from_config(config)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def offline_env(cache_dir: str, **extra: str) -> dict[str, str]:
    """Environment for a recipe subprocess: no Hub, data set cache in `cache_dir`, one thread per process;
    `extra` overrides any of these."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": os.path.join(cache_dir, "datasets"),
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **extra})
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(argv: Sequence[str], cwd: str, env: Optional[dict[str, str]] = None, launcher: Sequence[str] = (),
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <argv>` (or `<launcher> <argv>`, e.g. accelerate launch) from the repo's `recipes/` paths."""
    command = list(launcher) if launcher else [sys.executable]
    return subprocess.run(command + list(argv), cwd=cwd, env=env or offline_env(cwd), capture_output=True, text=True,
                          timeout=timeout)
