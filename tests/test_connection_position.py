"""`LoR2CConfig.connection_position="before_output_norm"`: in a post-LN block, `out = LN2(h + FFN(h))`, a span's
connection is added to the input of its last block's final LayerNorm, `LN2(h + FFN(h) + s B A x)`, instead of to
the block's output. The reference is an untouched copy of the base model with hand-written hooks: a pre-hook on
every block records its input, a pre-hook on the last block's norm adds `s B A x_first` to the norm's input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lor2c_hf import ConfigError, LoR2CConfig, LoR2CModel, LoR2CTrainer, get_lor2c_model
from test_export import clean_load
from test_trainer import cls_data, training_args
from test_zero3_contract import EmulatedZero3
from tiny_models import random_ids, tiny_model

L, R = 6, 4
BEFORE = "before_output_norm"
NORMS = {"bert": "output.LayerNorm", "roberta": "output.LayerNorm", "distilbert": "output_layer_norm"}
BLOCKS = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer", "distilbert": "distilbert.transformer.layer"}


def adapted(arch: str, method: str = "lor2c", position: str = BEFORE, seed: int = 3, **overrides) -> tuple[nn.Module, LoR2CModel]:
    """(an untouched copy of the base, the LoR2CModel with random non-zero A and B), in eval mode."""
    base = tiny_model(arch, head="cls", num_layers=L)
    untouched = copy.deepcopy(base)
    model = get_lor2c_model(base, LoR2CConfig.for_method(method, r=R, connection_position=position, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.lor2c.lora_A, *model.lor2c.lora_B]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return untouched, model.eval()


def reference(untouched: nn.Module, arch: str, model: LoR2CModel, at_norm: bool = True) -> nn.Module:
    """`untouched` with each span's connection hooked in by hand: at its last block's norm input, or (at_norm=False)
    at its last block's output. Weights are read from the public `model.connections` as detached copies."""
    scaling = model.lor2c_config.lora_alpha / model.lor2c_config.r
    blocks = untouched.get_submodule(BLOCKS[arch])
    inputs: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks):
        def record(module, args, kwargs, index=index):
            inputs[index] = args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "x"))
        block.register_forward_pre_hook(record, with_kwargs=True)
    for connection in model.connections:
        first, last = connection.span
        a, b = connection.lora_A.detach().clone(), connection.lora_B.detach().clone()
        if at_norm:
            def before_norm(module, args, first=first, a=a, b=b):
                return (args[0] + scaling * (inputs[first] @ a.T) @ b.T, *args[1:])
            blocks[last].get_submodule(NORMS[arch]).register_forward_pre_hook(before_norm)
        else:
            def after_block(module, args, output, first=first, a=a, b=b):
                delta = scaling * (inputs[first] @ a.T) @ b.T
                return output + delta if isinstance(output, torch.Tensor) else (output[0] + delta, *output[1:])
            blocks[last].register_forward_hook(after_block)
    return untouched


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("method", ["lor2c", "sharelor2c"])
def test_connection_is_added_before_the_output_norm(arch, method):
    untouched, model = adapted(arch, method)
    assert model.lor2c_config.output_norm == NORMS[arch]  # detected, and saved with the adapter
    ids = random_ids(batch=2, seq=9)
    got = logits(model, ids)
    torch.testing.assert_close(got, logits(reference(untouched, arch, model), ids), rtol=1e-5, atol=1e-6)
    model.remove_hooks()  # the norm hooks go too: the base computes its bare function again
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.get_base_model().modules())


def test_the_two_positions_differ_and_the_default_adds_at_the_block_output():
    ids = random_ids(batch=2, seq=9)
    untouched, default = adapted("bert", position="block_output")
    assert default.lor2c_config.connection_position == "block_output" and default.lor2c_config.output_norm is None
    norm = default.get_base_model().bert.encoder.layer[0].output.LayerNorm
    assert not norm._forward_pre_hooks  # the default hooks nothing inside a block
    at_output = logits(default, ids)
    torch.testing.assert_close(at_output, logits(reference(copy.deepcopy(untouched), "bert", default, at_norm=False), ids),
                               rtol=1e-5, atol=1e-6)
    _, before = adapted("bert")  # same seeds: the same base and adapter weights, the other position
    assert (logits(before, ids) - at_output).abs().max() > 1e-3
    assert not torch.allclose(logits(reference(untouched, "bert", default, at_norm=True), ids), at_output, atol=1e-3)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_merged_spans_and_injects_match_the_reference(arch):
    """Events change only what the hooks read: a span [first, last] reads the input of `first` at `last`'s norm; an
    injected block has no connection (its LoRA keeps B = 0, so the reference needs none)."""
    untouched, model = adapted(arch, "imlor2c", num_merges=2, num_injects=1)
    model.apply_merge(), model.apply_merge(), model.apply_inject()
    assert any(a != b for a, b in model.structure["spans"]) and model.structure["injected"]
    ids = random_ids(batch=2, seq=9)
    torch.testing.assert_close(logits(model, ids), logits(reference(untouched, arch, model), ids), rtol=1e-5, atol=1e-6)


def test_disable_adapter_and_deepcopy():
    untouched, model = adapted("bert", "mergelor2c", num_merges=1)
    model.apply_merge()
    ids = random_ids()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(untouched, ids), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lor2c.lora_B[0].zero_()  # the copy's hooks read the copy's weights, not the original's
    torch.testing.assert_close(logits(model, ids), logits(reference(copy.deepcopy(untouched), "bert", model), ids),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(twin, ids), logits(reference(untouched, "bert", twin), ids), rtol=1e-5, atol=1e-6)


def test_save_and_load_keep_the_position(tmp_path):
    untouched, model = adapted("bert", "mergelor2c", num_merges=1)
    model.apply_merge()
    ids = random_ids()
    expected = logits(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = LoR2CModel.from_pretrained(copy.deepcopy(untouched), str(tmp_path / "adapter"))
    assert loaded.lor2c_config.connection_position == BEFORE and loaded.lor2c_config.output_norm == "output.LayerNorm"
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    other = get_lor2c_model(copy.deepcopy(untouched), LoR2CConfig.for_method("mergelor2c", r=R, num_merges=1))
    with pytest.raises(ValueError, match="connection_position"):  # the position decides the function: not resumable
        other.load_adapter(str(tmp_path / "adapter"))


def test_exported_folder_adds_at_the_same_place(tmp_path):
    _, model = adapted("bert", "imlor2c", num_merges=1, num_injects=1)
    model.apply_merge(), model.apply_inject()
    ids = random_ids(batch=2, seq=7)
    expected = logits(model, ids)
    folder = str(tmp_path / "served")
    model.export_for_transformers(folder)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)  # the adapter itself is unchanged
    cache = tmp_path / "cache"
    cache.mkdir()
    result = clean_load(folder, "AutoModelForSequenceClassification", ids, str(tmp_path / "result.pt"), str(cache), False)
    assert result.returncode == 0, result.stderr[-3000:]
    served = torch.load(str(tmp_path / "result.pt"))["logits"]
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert merged.config.lor2c_serving["connection_position"] == BEFORE
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)


def _hooks(model: nn.Module) -> list:
    return [(name, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pre_ln_decoders_are_refused_and_left_unchanged(arch):
    base = tiny_model(arch, num_layers=4)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    hooks, flags = _hooks(base), [p.requires_grad for p in base.parameters()]
    for overrides in ({}, {"output_norm": "post_attention_layernorm" if arch == "llama" else "ln_2"}):
        with pytest.raises(ConfigError, match=rf"connection_position='before_output_norm'.*model_type='{arch}'.*pre-LN.*"
                                              "expected a post-LN block"):
            get_lor2c_model(base, LoR2CConfig(r=R, connection_position=BEFORE, **overrides))
    assert _hooks(base) == hooks and [p.requires_grad for p in base.parameters()] == flags
    assert base.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_a_wrong_norm_path_names_the_block_and_the_norms_there():
    base = tiny_model("bert", num_layers=4)
    hooks = _hooks(base)
    with pytest.raises(ConfigError, match=r"output_norm='output.Norm' names no module in block 0 .*'output.LayerNorm'"):
        get_lor2c_model(base, LoR2CConfig(r=R, connection_position=BEFORE, output_norm="output.Norm"))
    with pytest.raises(ConfigError, match=r"output_norm='output.dense' names a Linear, not a norm"):
        get_lor2c_model(base, LoR2CConfig(r=R, connection_position=BEFORE, output_norm="output.dense"))
    assert _hooks(base) == hooks
    with pytest.raises(ConfigError, match="connection_position"):
        LoR2CConfig(connection_position="after_norm")
    with pytest.raises(ConfigError, match="output_norm"):  # a norm named for the default position would be ignored
        LoR2CConfig(output_norm="output.LayerNorm")


def _grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)  # dropout on: checkpointing replays the RNG
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_grads_and_reentrant_is_refused():
    _, model = adapted("roberta", "mergelor2c", num_merges=1)
    model.apply_merge()
    model.train()
    ids = random_ids()
    plain = _grads(model, ids)
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable()
    checkpointed = _grads(model, ids)
    assert set(plain) == set(checkpointed) and any(".lora_B." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_each_slot_is_called_once_and_gathered_under_emulated_zero3(monkeypatch):
    _, model = adapted("bert", "imlor2c", num_merges=2, num_injects=1)
    model.apply_merge(), model.apply_merge(), model.apply_inject()
    ids = random_ids()
    calls: list[int] = []
    handles = [call.register_forward_hook(lambda m, a, o: calls.append(m.slot)) for call in model.lor2c.calls]
    expected = logits(model, ids)
    assert sorted(calls) == sorted(model.structure["owners"])
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        EmulatedZero3(model, monkeypatch)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_lor2c_trainer_trains_with_the_option(tmp_path):
    base = tiny_model("bert", num_layers=4)
    config = LoR2CConfig.for_method("mergelor2c", r=R, num_merges=1, schedule="steps", connection_position=BEFORE)
    trainer = LoR2CTrainer(base, training_args(tmp_path, max_steps=6, logging_steps=1), train_dataset=cls_data(48),
                           lor2c_config=config)
    before = [b.detach().clone() for b in trainer.lor2c_model.lor2c.lora_B]
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.lor2c_model.structure["events"] and trainer.lor2c_model.lor2c_config.connection_position == BEFORE
    assert any(not torch.equal(b, a) for b, a in zip(trainer.lor2c_model.lor2c.lora_B, before))
