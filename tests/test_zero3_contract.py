"""The ZeRO-3 gather contract, emulated without DeepSpeed: every adapter read is covered.

DeepSpeed ZeRO-3 leaves each parameter empty except around a call of a module that owns it, or that
declared it with `register_external_parameter`. These tests do the same to every parameter of a wrapped
model (base and adapter): empty by default, filled in a module's forward pre-hook and emptied again in its
forward hook. The outputs must then equal the unpartitioned model's, so a parameter read anywhere else
fails with a shape error. The declarations are caught at `lor2c_hf.zero3.declare_external_parameters`.
Real DeepSpeed runs (gradients, optimizer, 2 processes) are in `test_ddp.py`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lor2c_hf.zero3 as zero3
from lor2c_hf import LoR2CConfig, ResLoRAConfig, get_lor2c_model, get_reslora_model
from tiny_models import random_ids, tiny_model


class EmulatedZero3:
    """Partition every parameter of `model`; gather around the calls of owning or declaring modules."""

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full: dict[nn.Parameter, torch.Tensor] = {}
        self.external: dict[nn.Module, list[nn.Parameter]] = {}
        self.declared = 0
        monkeypatch.setattr(zero3, "declare_external_parameters", self.declare)
        for i, p in enumerate({id(p): p for p in model.parameters()}.values()):
            self.full[p] = p.data
            p.ds_id = i  # what DeepSpeed sets on a partitioned parameter
            p.data = torch.empty(0, dtype=p.dtype)
        for module in model.modules():
            module.register_forward_pre_hook(self.gather)
            module.register_forward_hook(self.release)

    def declare(self, pairs) -> None:
        for module, param in pairs:
            self.external.setdefault(module, []).append(param)
            self.declared += 1

    def _params(self, module: nn.Module) -> list[nn.Parameter]:
        return [*module.parameters(recurse=False), *self.external.get(module, [])]

    def gather(self, module: nn.Module, args) -> None:
        for p in self._params(module):
            p.data = self.full[p]

    def release(self, module: nn.Module, args, output) -> None:
        for p in self._params(module):
            p.data = torch.empty(0, dtype=p.dtype)

    def unpartition(self) -> None:
        for p, data in self.full.items():
            p.data = data
            del p.ds_id


def randomize_adapters(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def lor2c_after_events(method: str, **overrides) -> nn.Module:
    model = get_lor2c_model(tiny_model("llama", num_layers=6), LoR2CConfig.for_method(method, r=4, lora_alpha=8,
                                                                                      **overrides))
    randomize_adapters(model)
    for _ in range(model.lor2c_config.num_merges):
        model.apply_merge()
    for _ in range(model.lor2c_config.num_injects):
        model.apply_inject()
    return model


CASES = {
    "lor2c": lambda: lor2c_after_events("lor2c"),
    "sharelor2c": lambda: lor2c_after_events("sharelor2c"),
    "imlor2c after events": lambda: lor2c_after_events("imlor2c", num_merges=2, num_injects=2),
    "sharelor2c merged": lambda: lor2c_after_events("mergelor2c", share_a=True, num_merges=2),  # one A, merged spans
    **{f"reslora {flag}": (lambda flag=flag: randomized(get_reslora_model(
        tiny_model("llama", num_layers=6), ResLoRAConfig(r=4, lora_alpha=8, res_flag=flag, pre_num=2))))
       for flag in ("is", "bs", "ms")},
}


def randomized(model: nn.Module) -> nn.Module:
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_every_adapter_read_is_gathered_under_emulated_zero3(case, monkeypatch):
    model = CASES[case]().eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        partitioned = EmulatedZero3(model, monkeypatch)
        got = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # declared once, still gathered on later calls
    assert partitioned.declared > 0
    assert all(p.numel() == 0 for p in partitioned.full)  # everything was released after the calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-6)
    partitioned.unpartition()


def test_the_emulation_catches_an_undeclared_read(monkeypatch):
    """Without the declarations the connections read empty tensors: the emulation can fail."""
    model = lor2c_after_events("lor2c").eval()
    model._zero3.declared = True  # as if declared: nothing is registered
    ids = random_ids(2, 12)
    with torch.no_grad():
        EmulatedZero3(model, monkeypatch)
        with pytest.raises(RuntimeError):
            model(input_ids=ids)
