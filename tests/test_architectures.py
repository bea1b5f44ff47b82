"""LoR2C on every supported architecture: the block stack is found, the base model keeps working exactly as
before (outputs at B = 0, state_dict keys, KV-cache generation, gradient checkpointing, SDPA/eager,
train/eval, dtype casts), and only the adapter and the task head train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lor2c_hf import LoR2CConfig, get_lor2c_model
from lor2c_hf.structure import Structure
from tiny_models import CONFIGS, DECODERS, ENCODERS, random_ids, tiny_model

ARCHS = ENCODERS + DECODERS

# Where each architecture keeps its blocks, and the heads its sequence-classification model adds.
BLOCK_STACKS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "deberta-v2": "deberta.encoder.layer",
    "distilbert": "distilbert.transformer.layer",
    "electra": "electra.encoder.layer",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "phi": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
CLASSIFICATION_HEADS = {
    "bert": {"classifier"},
    "roberta": {"classifier"},
    "deberta-v2": {"pooler", "classifier"},
    "distilbert": {"pre_classifier", "classifier"},
    "electra": {"classifier"},
    "llama": {"score"},
    "gpt2": {"score"},
}
NUM_LAYERS = 3


def test_every_architecture_is_covered():
    assert set(ARCHS) == set(CONFIGS) == set(BLOCK_STACKS)


def _randomize_adapter(model, seed: int = 0, std: float = 0.2) -> None:
    """Random A and B in every slot, so connections change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lor2c.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(arch: str, head: str, batch: int = 2, seq: int = 8) -> dict:
    ids = random_ids(batch, seq)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if head == "cls":
        inputs["labels"] = torch.tensor([0, 1][:batch])
    else:
        inputs["labels"] = ids
    return inputs


def _output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def _head(arch: str) -> str:
    return "cls" if arch in ENCODERS else "causal"


@pytest.mark.parametrize("arch", ARCHS)
def test_block_stack_is_found(arch):
    base = tiny_model(arch, num_layers=NUM_LAYERS)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    assert model.blocks_path == BLOCK_STACKS[arch]
    stack = base.get_submodule(BLOCK_STACKS[arch])
    assert isinstance(stack, nn.ModuleList) and len(stack) == NUM_LAYERS
    assert model.num_blocks == NUM_LAYERS and len(model.connections) == NUM_LAYERS
    assert model.hidden_size == 32
    assert model.structure["spans"] == [[i, i] for i in range(NUM_LAYERS)]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_output_equals_base_exactly_and_state_dict_is_untouched(arch):
    head = _head(arch)
    base = tiny_model(arch, head=head, num_layers=NUM_LAYERS)
    inputs = _inputs(arch, head)
    expected = _output(base, inputs)
    state_before = {k: v.clone() for k, v in base.state_dict().items()}

    model = get_lor2c_model(base, LoR2CConfig(r=4))
    assert torch.equal(_output(model, inputs), expected)

    state_after = base.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert model.get_base_model() is base

    _randomize_adapter(model)  # and the connections really are in the forward pass
    assert not torch.allclose(_output(model, inputs), expected, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_frozen_except_detected_causal_lm_heads(arch):
    base = tiny_model(arch, head=_head(arch), num_layers=NUM_LAYERS)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    expected_heads = CLASSIFICATION_HEADS[arch] if arch in ENCODERS else set()
    assert set(model.lor2c_config.modules_to_save) == expected_heads
    _assert_only_heads_train(model, base, expected_heads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_sequence_classification_head_is_detected(arch):
    base = tiny_model(arch, head="cls", num_layers=NUM_LAYERS)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    assert set(model.lor2c_config.modules_to_save) == CLASSIFICATION_HEADS[arch]
    _assert_only_heads_train(model, base, CLASSIFICATION_HEADS[arch])


def _assert_only_heads_train(model, base, heads: set[str]) -> None:
    prefixes = tuple(h + "." for h in heads)
    for name, p in base.named_parameters():
        assert p.requires_grad == name.startswith(prefixes), name
    assert all(p.requires_grad for p in model.lor2c.parameters())


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_kv_cache_equals_no_cache_greedy_decode(arch):
    base = tiny_model(arch, head="causal", num_layers=NUM_LAYERS)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    _randomize_adapter(model, std=0.5)
    ids = random_ids(2, 5)
    new_tokens = 6

    seen_lengths = []
    handle = model.get_base_model().get_submodule(BLOCK_STACKS[arch])[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen_lengths.append(_hidden_len(args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        cached = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=model.config.pad_token_id,
        )
    handle.remove()
    assert seen_lengths[0] == 5 and set(seen_lengths[1:]) == {1}, seen_lengths  # the cache was used

    reference = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=reference, use_cache=False).logits[:, -1]
            reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, reference)


def _hidden_len(args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.shape[1]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _training_step_grads(model, inputs: dict, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**inputs).loss.backward()
    return _grads(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_grads(arch):
    """Dropout on (base and connections): checkpointing replays the RNG, so the grads must match."""
    head = _head(arch)
    base = tiny_model(arch, head=head, num_layers=NUM_LAYERS)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    _randomize_adapter(model)
    model.train()
    inputs = _inputs(arch, head)

    plain = _training_step_grads(model, inputs, seed=3)
    model.gradient_checkpointing_enable()
    assert base.is_gradient_checkpointing
    checkpointed = _training_step_grads(model, inputs, seed=3)

    expected_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain) == set(checkpointed) == expected_trainable
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_gradient_checkpointing_with_merged_and_injected_blocks(arch):
    """A merged span reads a hidden state stashed one block earlier and injected LoRA lives inside the
    checkpointed block: both must give the same grads as without checkpointing."""
    head = _head(arch)
    base = tiny_model(arch, head=head, num_layers=4)
    model = get_lor2c_model(base, LoR2CConfig(r=4, num_merges=1, num_injects=1))
    structure = Structure.initial(4)
    structure.merge(0, 1)  # span [0, 1] reading slot 1
    structure.inject(2)  # spans [[0, 1], [2, 2], [3, 3]] -> block 3 injected
    model.set_structure(structure)
    _randomize_adapter(model)
    with torch.no_grad():
        for p in model.lor2c_injected.parameters():
            p.normal_(0, 0.2)
    model.train()
    inputs = _inputs(arch, head)

    plain = _training_step_grads(model, inputs, seed=5)
    model.gradient_checkpointing_enable()
    checkpointed = _training_step_grads(model, inputs, seed=5)
    assert set(plain) == set(checkpointed)
    assert any("lor2c_injected.blocks.3" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_and_eager_attention_both_work(arch):
    head = _head(arch)
    inputs = _inputs(arch, head)
    outputs = {}
    implementations = ["eager"]
    if tiny_model(arch, head=head, num_layers=1)._supports_sdpa:
        implementations.append("sdpa")
    for implementation in implementations:
        base = tiny_model(arch, head=head, num_layers=NUM_LAYERS, _attn_implementation=implementation)
        assert base.config._attn_implementation == implementation
        model = get_lor2c_model(base, LoR2CConfig(r=4))
        _randomize_adapter(model)
        outputs[implementation] = _output(model, inputs)
        assert torch.isfinite(outputs[implementation]).all()
    if "sdpa" in outputs:
        torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_and_eval_modes(arch):
    head = _head(arch)
    model = get_lor2c_model(tiny_model(arch, head=head, num_layers=NUM_LAYERS), LoR2CConfig(r=4, lora_dropout=0.5))
    _randomize_adapter(model)
    inputs = _inputs(arch, head)

    model.train()
    assert all(m.training for m in model.modules())
    torch.manual_seed(0)
    first = _output(model, inputs)
    second = _output(model, inputs)
    assert not torch.equal(first, second)  # dropout is active

    model.eval()
    assert not any(m.training for m in model.modules())
    assert torch.equal(_output(model, inputs), _output(model, inputs))


@pytest.mark.parametrize("training", [False, True])
def test_wrapping_keeps_the_base_models_mode(training):
    """An eval-mode base (as from_pretrained returns it) must not get dropout from the new adapter."""
    base = tiny_model("llama", num_layers=2).train(training)
    model = get_lor2c_model(base, LoR2CConfig(r=4, lora_dropout=0.5))
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_to_bfloat16(arch):
    head = _head(arch)
    model = get_lor2c_model(tiny_model(arch, head=head, num_layers=NUM_LAYERS), LoR2CConfig(r=4))
    _randomize_adapter(model, std=0.1)
    inputs = _inputs(arch, head)
    full = _output(model, inputs)

    assert model.to(torch.bfloat16) is model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    half = _output(model, inputs)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    scale = full.abs().max()
    assert (half.float() - full).abs().max() < 0.1 * scale


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bfloat16_base_gets_float32_adapter(arch):
    """Like PEFT: on a bf16 base the adapter trains in fp32, and the output stays in the base dtype."""
    head = _head(arch)
    base = tiny_model(arch, head=head, num_layers=NUM_LAYERS).to(torch.bfloat16)
    model = get_lor2c_model(base, LoR2CConfig(r=4))
    assert all(p.dtype == torch.float32 for p in model.lor2c.parameters())
    _randomize_adapter(model, std=0.1)
    model.train()
    loss = model(**_inputs(arch, head)).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.lor2c.parameters())
    assert _output(model.eval(), _inputs(arch, head)).dtype == torch.bfloat16
