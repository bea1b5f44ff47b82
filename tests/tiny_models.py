"""Tiny random models of every architecture the library supports, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)

CONFIGS = {
    "bert": lambda L: tf.BertConfig(vocab_size=VOCAB, num_hidden_layers=L, **SMALL),
    "roberta": lambda L: tf.RobertaConfig(vocab_size=VOCAB, num_hidden_layers=L, pad_token_id=1, **SMALL),
    "deberta-v2": lambda L: tf.DebertaV2Config(vocab_size=VOCAB, num_hidden_layers=L, **SMALL),
    "distilbert": lambda L: tf.DistilBertConfig(vocab_size=VOCAB, n_layers=L, dim=32, hidden_dim=64, n_heads=4),
    "electra": lambda L: tf.ElectraConfig(vocab_size=VOCAB, num_hidden_layers=L, embedding_size=32, **SMALL),
    "llama": lambda L: tf.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=L, num_key_value_heads=4, pad_token_id=0, **SMALL),
    "mistral": lambda L: tf.MistralConfig(vocab_size=VOCAB, num_hidden_layers=L, num_key_value_heads=2, pad_token_id=0, **SMALL),
    "qwen2": lambda L: tf.Qwen2Config(vocab_size=VOCAB, num_hidden_layers=L, num_key_value_heads=2, pad_token_id=0, **SMALL),
    "gemma": lambda L: tf.GemmaConfig(vocab_size=VOCAB, num_hidden_layers=L, num_key_value_heads=1, head_dim=8, pad_token_id=0, **SMALL),
    "phi": lambda L: tf.PhiConfig(vocab_size=VOCAB, num_hidden_layers=L, pad_token_id=0, **SMALL),
    "gpt2": lambda L: tf.GPT2Config(vocab_size=VOCAB, n_layer=L, n_embd=32, n_head=4, n_positions=64, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=1),  # GPT-2's default 50256 is outside VOCAB
    "gpt_neox": lambda L: tf.GPTNeoXConfig(vocab_size=VOCAB, num_hidden_layers=L, pad_token_id=0, **SMALL),
    "opt": lambda L: tf.OPTConfig(vocab_size=VOCAB, num_hidden_layers=L, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                  word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1),
}
ENCODERS = ("bert", "roberta", "deberta-v2", "distilbert", "electra")
DECODERS = ("llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "opt")


def tiny_config(arch: str, num_layers: int = 4, **overrides):
    config = CONFIGS[arch](num_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str, head: str = "auto", num_layers: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random model: head 'causal' (decoders), 'cls' (sequence classification, 2 labels), 'base' or 'auto'."""
    config = tiny_config(arch, num_layers, **overrides)
    if head == "auto":
        head = "cls" if arch in ENCODERS else "causal"
    auto = {"causal": tf.AutoModelForCausalLM, "cls": tf.AutoModelForSequenceClassification, "base": tf.AutoModel}[head]
    if head == "cls":
        config.num_labels = 2
    torch.manual_seed(seed)
    model = auto.from_config(config)
    return model.eval()


def random_ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)
