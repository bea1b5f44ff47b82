"""Trainable-parameter counts (SPEC §1, §2, §4, §5): the paper's numbers on meta-device models with the real
shapes, the formulas after structure changes, and `print_trainable_parameters`."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

from lor2c_hf import LoR2CConfig, get_lor2c_model
from lor2c_hf.structure import Structure
from tiny_models import random_ids, tiny_model

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32)


def _on_meta(auto_class, config):
    with torch.device("meta"):
        return auto_class.from_config(config)


def roberta_base(head=AutoModel):
    return _on_meta(head, RobertaConfig())


def llama2_7b():
    return _on_meta(AutoModel, LlamaConfig(**LLAMA2_7B))


def _merged(num_blocks: int, merges: int, injected: tuple[int, ...] = ()) -> Structure:
    """A structure with `merges` merges of adjacent spans (from the top) and the given blocks injected."""
    structure = Structure.initial(num_blocks)
    for block in sorted(injected, reverse=True):
        structure.inject(structure.spans.index([block, block]))
    for _ in range(merges):
        k = structure.merge_candidates()[-1]
        structure.merge(k, structure.owners[k])
    return structure


# --- the paper's numbers -------------------------------------------------------------------------------------


def test_roberta_base_lor2c_r8():
    model = get_lor2c_model(roberta_base(), LoR2CConfig(r=8))
    assert model.lor2c.lora_B[0].is_meta
    assert (model.num_blocks, model.hidden_size) == (12, 768)
    assert model.num_adapter_parameters() == 2 * 12 * 768 * 8 == 147_456


def test_roberta_base_sharelor2c_r8():
    model = get_lor2c_model(roberta_base(), LoR2CConfig.for_method("sharelor2c", r=8))
    assert model.num_adapter_parameters() == (12 + 1) * 768 * 8 == 79_872


def test_llama2_7b_lor2c_r64():
    model = get_lor2c_model(llama2_7b(), LoR2CConfig(r=64, lora_alpha=32, lora_dropout=0.05))
    assert (model.num_blocks, model.hidden_size) == (32, 4096)
    assert model.num_adapter_parameters() == 2 * 32 * 4096 * 64 == 16_777_216


def test_llama2_7b_after_8_merges():
    model = get_lor2c_model(llama2_7b(), LoR2CConfig(r=64, num_merges=8))
    model.set_structure(_merged(32, 8))
    assert len(model.structure["spans"]) == 24
    assert model.num_adapter_parameters() == 2 * (32 - 8) * 4096 * 64 == 12_582_912


def test_llama2_7b_imlor2c_8_merges_8_injects():
    """SPEC §6: IMLoR2C with M = N = 8 goes from 16.8M to 12.6M; the injects do not change the count."""
    model = get_lor2c_model(llama2_7b(), LoR2CConfig.for_method("imlor2c", r=64, num_merges=8, num_injects=8))
    assert model.lor2c_config.inject_r == 32
    model.set_structure(_merged(32, 8, injected=tuple(range(0, 32, 4))))
    assert len(model.structure["injected"]) == 8
    assert model.num_adapter_parameters() == 12_582_912


@pytest.mark.parametrize("injected", [(0,), (5,), (3, 11)])
def test_roberta_base_inject_leaves_count_unchanged(injected):
    model = get_lor2c_model(roberta_base(), LoR2CConfig.for_method("injectlor2c", r=8))
    model.set_structure(_merged(12, 0, injected=injected))
    # each inject swaps 2*d*r of LoR2C for LoRA r/2 on q and v: 2 * (d*r/2 + r/2*d) = 2*d*r
    assert model.num_adapter_parameters() == 147_456


def test_sharelor2c_merge_count_formula():
    model = get_lor2c_model(roberta_base(), LoR2CConfig(r=8, share_a=True, num_merges=3))
    model.set_structure(_merged(12, 3))
    assert model.num_adapter_parameters() == 768 * 8 + (12 - 3) * 768 * 8


def test_lora_on_q_and_v_has_twice_the_parameters():
    """SPEC §1: LoRA on q, v at the same rank has twice LoR2C's parameters (PEFT counts it)."""
    lora = get_peft_model(tiny_model("bert", head="base", num_layers=4),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    lor2c = get_lor2c_model(tiny_model("bert", head="base", num_layers=4), LoR2CConfig(r=4))
    assert lora.get_nb_trainable_parameters()[0] == 2 * lor2c.num_adapter_parameters()


# --- the count is what really trains, through real events ----------------------------------------------------


def _parameters_receiving_gradients(model, head: str) -> int:
    """numel of the adapter parameters that a forward/backward actually reaches (heads excluded)."""
    with torch.no_grad():
        for p in model.lor2c.parameters():
            p.normal_(0, 0.2)
        for p in getattr(model, "lor2c_injected", torch.nn.Module()).parameters():
            p.normal_(0, 0.2)
    model.zero_grad(set_to_none=True)
    ids = random_ids(2, 6)
    labels = torch.tensor([0, 1]) if head == "cls" else ids
    model(input_ids=ids, labels=labels).loss.backward()
    return sum(
        p.numel() for n, p in model.named_parameters()
        if n.startswith(("lor2c.", "lor2c_injected.")) and p.grad is not None and p.grad.abs().sum() > 0
    )


def test_counts_follow_real_merge_and_inject_events():
    """MHA model (BERT: q and v are d x d): merges remove 2*d*r each, injects keep the count."""
    model = get_lor2c_model(tiny_model("bert", num_layers=8), LoR2CConfig(r=4, num_merges=3, num_injects=2))
    d, r, L = 32, 4, 8
    assert model.num_adapter_parameters() == 2 * L * d * r == _parameters_receiving_gradients(model, "cls")
    for merges, event in enumerate([model.apply_merge, model.apply_merge, model.apply_merge], start=1):
        record = event()
        expected = 2 * (L - merges) * d * r
        assert record["params_before"] - record["params_after"] == 2 * d * r
        assert model.num_adapter_parameters() == expected == _parameters_receiving_gradients(model, "cls")
    for _ in range(2):
        record = model.apply_inject()
        assert record["params_before"] == record["params_after"] == expected
        assert model.num_adapter_parameters() == expected == _parameters_receiving_gradients(model, "cls")


# --- reporting -----------------------------------------------------------------------------------------------

LINE = re.compile(r"^trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})$")


def _parse(line: str) -> tuple[int, int, float]:
    match = LINE.match(line.strip())
    assert match, line
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), float(match[3])


def test_print_trainable_parameters_format(capsys):
    model = get_lor2c_model(roberta_base(), LoR2CConfig(r=8))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    trainable, total, percent = _parse(out)
    base_total = sum(p.numel() for p in model.get_base_model().parameters())
    assert trainable == 147_456
    assert total == base_total + 147_456
    assert percent == round(100 * trainable / total, 4)
    assert "trainable params: 147,456 ||" in out  # thousands separators, like PEFT


def test_head_counts_as_trainable():
    model = get_lor2c_model(roberta_base(AutoModelForSequenceClassification), LoR2CConfig(r=8))
    assert model.lor2c_config.modules_to_save == ["classifier"]
    head = sum(p.numel() for p in model.get_base_model().classifier.parameters())
    assert head == 768 * 768 + 768 + 768 * 2 + 2
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 147_456 + head
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_print_matches_get_nb_trainable_parameters(capsys):
    model = get_lor2c_model(tiny_model("distilbert", num_layers=3), LoR2CConfig(r=4, num_merges=1))
    model.apply_merge()
    model.print_trainable_parameters()
    trainable, total, _ = _parse(capsys.readouterr().out)
    assert (trainable, total) == model.get_nb_trainable_parameters()
    heads = sum(p.numel() for n, p in model.get_base_model().named_parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 32 * 4 + heads
