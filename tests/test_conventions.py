"""Options that reproduce the reference implementations' conventions where they differ from SPEC's choices:
the authors' zero-B SFS score (`LoR2CConfig.zero_b_score="official"`) and LMOps' ResLoRA `is` at block 0
(`ResLoRAConfig.is_block0="self"`)."""

from __future__ import annotations

import copy

import pytest
import torch

from lor2c_hf import ConfigError, LoR2CConfig, ResLoRAConfig, get_lor2c_model, get_reslora_model
from test_reslora import ARCHS, L, _attach_reference, _config, _lora, _main, _randomize
from tiny_models import random_ids, tiny_model


def _lor2c(**overrides):
    config = LoR2CConfig.for_method("imlor2c", r=4, num_merges=1, num_injects=1, merge_criterion="official",
                                    merge_keep="official", **overrides)
    return get_lor2c_model(tiny_model("llama", num_layers=L), config)


def _set_b(model, slots: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in slots:
            b = model.lor2c.lora_B[slot]
            b.copy_(torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("convention, rho", [("spec", 1.0), ("official", 0.0)])
def test_zero_b_connections_score_per_convention(convention, rho):
    model = _lor2c(zero_b_score=convention)
    _set_b(model, [0, 1])  # blocks 2 and 3 keep B = 0
    scores = model.sfs()
    assert scores.zero.tolist() == [False, False, True, True]
    assert scores.rho[2:].tolist() == [rho, rho] and scores.sfs[2:].tolist() == [1 - rho, 1 - rho]
    trained = _lor2c(zero_b_score="spec")
    _set_b(trained, [0, 1])
    torch.testing.assert_close(scores.rho[:2], trained.sfs().rho[:2])  # trained connections: the same either way


def test_official_zero_b_convention_merges_untrained_connections_first_and_injects_them_last():
    for convention, merged, injected in (("official", [2, 3], [0]), ("spec", [0, 1], [2])):
        model = _lor2c(zero_b_score=convention)
        _set_b(model, [0, 1])
        with torch.no_grad():  # make block 0 the least informative trained one (one dominant direction)
            model.lor2c.lora_B[0].mul_(0).add_(torch.outer(torch.ones(model.hidden_size), torch.tensor([1.0, 0, 0, 0])))
        assert model.apply_merge()["blocks"] == merged, convention
        if convention == "official":  # spans [0], [1], [2, 3]: the single blocks 0 and 1 are trained, 0 has max rho
            assert model.apply_inject()["blocks"] == injected
        else:  # spans [0, 1], [2], [3]: the zero-B blocks have SFS 0 (min): block 2 first
            assert model.apply_inject()["blocks"] == injected


def test_zero_b_score_is_checked():
    with pytest.raises(ConfigError, match="zero_b_score"):
        LoR2CConfig(zero_b_score="authors")


def test_is_block0_self_reads_its_own_input_twice():
    head, _, keys = ARCHS["llama"]
    base = tiny_model("llama", num_layers=L, head=head)
    reference = copy.deepcopy(base)
    model = get_reslora_model(base, _config("is", is_block0="self"))
    _randomize(model)
    a, b = _lora(model, keys)
    a[0] = [2 * w for w in a[0]]  # s B A (x_0 + x_0) = s B (2 A) x_0; later layers read x_{l-1} as before
    _attach_reference(reference, "llama", "is", 1, 8 / 4, a, b)
    ids = random_ids(batch=2, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(_main(model(input_ids=ids)), _main(reference(input_ids=ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("convention, factor", [("skip", 1.0), ("self", 2.0)])
def test_is_block0_merge_factor(convention, factor):
    model = get_reslora_model(tiny_model("llama", num_layers=L), _config("is", is_block0=convention)).train()
    model(input_ids=random_ids())
    _randomize(model)
    a, b = _lora(model, ARCHS["llama"][2])
    deltas = model.delta_weights()
    for t, name in enumerate(["self_attn.q_proj", "self_attn.v_proj"]):
        torch.testing.assert_close(deltas[(0, name)], factor * 2.0 * b[0][t] @ a[0][t], rtol=1e-5, atol=1e-6)


def test_is_block0_is_checked():
    with pytest.raises(ConfigError, match="is_block0"):
        ResLoRAConfig(res_flag="is", is_block0="previous")
