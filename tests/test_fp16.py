"""fp16 mixed precision, as Trainer runs it on a GPU (`fp16=True`: autocast to float16 plus a GradScaler),
reproduced on the CPU with `torch.autocast("cpu", torch.float16)` and `torch.amp.GradScaler("cpu")`.

Trainer itself cannot be asked for this on a CPU (accelerate silently trains in fp32 there), so these tests
drive the same two pieces by hand. They check that LoR2C, IMLoR2C after its events and ResLoRA compute in
float16 under autocast, that the scaled training steps move the adapter the way fp32 steps do, and that a
float16 base model keeps a float32 adapter whose output is added in float16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lor2c_hf import LoR2CConfig, ResLoRAConfig, get_lor2c_model, get_reslora_model
from tiny_models import random_ids, tiny_model

STEPS = 5


def imlor2c_after_events() -> nn.Module:
    model = get_lor2c_model(tiny_model("llama", num_layers=6),
                            LoR2CConfig.for_method("imlor2c", r=4, lora_alpha=8, lora_dropout=0.0, num_merges=2,
                                                   num_injects=2, inject_dropout=0.0))
    with torch.no_grad():
        for b in model.lor2c.lora_B:
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        model.apply_merge()
    for _ in range(2):
        model.apply_inject()
    return model


BUILDERS = {
    "lor2c": lambda: get_lor2c_model(tiny_model("llama", num_layers=4),
                                     LoR2CConfig.for_method("lor2c", r=4, lora_alpha=8, lora_dropout=0.0)),
    "imlor2c after events": imlor2c_after_events,
    "reslora is": lambda: get_reslora_model(tiny_model("llama", num_layers=4),
                                            ResLoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, res_flag="is")),
}


def train(model: nn.Module, ids: torch.Tensor, fp16: bool) -> tuple[list[float], list[torch.Tensor]]:
    """STEPS AdamW steps; with `fp16` under float16 autocast and a GradScaler, as Trainer does on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0 ** 10)
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fp16_autocast_trains_like_fp32(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().train()
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    ids = random_ids(2, 16)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        half_logits = model(input_ids=ids).logits
    with torch.no_grad():
        full_logits = model(input_ids=ids).logits
    assert half_logits.dtype == torch.float16  # the blocks and the adapters' matmuls ran in float16
    torch.testing.assert_close(half_logits.float(), full_logits, rtol=0.0, atol=2e-2)

    losses16, after16 = train(model, ids, fp16=True)
    losses32, after32 = train(twin, ids, fp16=False)
    assert all(p.dtype == torch.float32 for p in after16)  # master weights stay float32
    assert losses16[-1] < losses16[0] and losses32[-1] < losses32[0]
    update16 = torch.cat([(a - b).flatten() for a, b in zip(after16, before)])
    update32 = torch.cat([(a - b).flatten() for a, b in zip(after32, before)])
    assert torch.isfinite(update16).all() and update16.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(update16, update32, dim=0)
    assert cosine > 0.99, f"fp16 steps moved the adapter elsewhere than fp32 steps (cosine {cosine:.4f})"


def test_float16_base_keeps_a_float32_adapter():
    torch.manual_seed(0)
    base = tiny_model("llama", num_layers=4)
    model = get_lor2c_model(base.half(), LoR2CConfig.for_method("lor2c", r=4, lora_alpha=8))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for b in model.lor2c.lora_B:
            b.normal_(0, 0.05)
    ids = random_ids(2, 16)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reference = copy.deepcopy(model).float()(input_ids=ids).logits  # the same weights computed in float32
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, rtol=0.0, atol=3e-2)
