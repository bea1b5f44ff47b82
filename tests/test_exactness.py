"""Outputs with random adapters equal an independent reference of SPEC §1-5, and merge/inject decisions
follow SPEC §4-5.

The reference is an untouched deep copy of the base model with forward hooks that implement
`x_{b+1} = Layer_b(x_b) + s * B A x_a` for every span [a, b] and standard LoRA on q and v of every
injected block, reading the weights from the public `model.connections` / `model.structure`.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from lor2c_hf import LoR2CConfig, get_lor2c_model
from tiny_models import random_ids, tiny_model

ARCHS = {"roberta": ("cls", "roberta.encoder.layer"), "llama": ("causal", "model.layers")}
QV = {"roberta": {"attention.self.query", "attention.self.value"}, "llama": {"self_attn.q_proj", "self_attn.v_proj"}}
NUM_LAYERS = 6
R = 4


# --- the reference -------------------------------------------------------------------------------------------


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _add(output, delta: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return output + delta
    return (output[0] + delta, *output[1:])


class Reference:
    """SPEC's equations as hooks on an untouched copy of the base model."""

    def __init__(self, untouched: nn.Module, blocks_path: str) -> None:
        self.model = untouched
        self.blocks = untouched.get_submodule(blocks_path)
        self.handles: list = []

    def install(self, lor2c_model) -> "Reference":
        """Read the adapter's current structure and weights (detached copies) and hook them in."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        config, structure = lor2c_model.lor2c_config, lor2c_model.structure
        scaling = config.lora_alpha / config.r
        inputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(_record(inputs, index), with_kwargs=True))
        for (first, last), connection in zip(structure["spans"], lor2c_model.connections):
            assert connection.span == [first, last]
            a, b = connection.lora_A.detach().clone(), connection.lora_B.detach().clone()
            assert a.shape == (config.r, lor2c_model.hidden_size) and b.shape == (lor2c_model.hidden_size, config.r)

            def residual(module, args, kwargs, output, first=first, a=a, b=b):
                return _add(output, scaling * (inputs[first] @ a.T) @ b.T)

            self.handles.append(self.blocks[last].register_forward_hook(residual, with_kwargs=True))
        inject_scaling = config.inject_alpha / config.inject_r
        for block in structure["injected"]:
            layers = lor2c_model.lor2c_injected.layers_of(block)
            assert set(layers) == QV[lor2c_model.config.model_type]
            for name, layer in layers.items():
                a, b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
                assert a.shape[0] == config.inject_r

                def lora(module, args, output, a=a, b=b):
                    return output + inject_scaling * (args[0] @ a.T) @ b.T

                self.handles.append(self.blocks[block].get_submodule(name).register_forward_hook(lora))
        return self


def _record(inputs: dict, index: int) -> Callable:
    def hook(module, args, kwargs):
        inputs[index] = _block_input(args, kwargs)

    return hook


# --- helpers -------------------------------------------------------------------------------------------------


def _build(arch: str, **config):
    head, path = ARCHS[arch]
    base = tiny_model(arch, head=head, num_layers=NUM_LAYERS)
    reference = Reference(copy.deepcopy(base), path)
    model = get_lor2c_model(base, LoR2CConfig(r=R, lora_dropout=0.0, **config))
    return model.eval(), reference


def _randomize(model, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("lor2c.", "lor2c_injected.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _assert_matches_reference(model, reference: Reference) -> None:
    ids = random_ids(3, 9, seed=7)
    reference.install(model)
    expected = _logits(reference.model, ids)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    for handle in reference.handles:  # the adapter matters: the base alone differs
        handle.remove()
    assert not torch.allclose(_logits(reference.model, ids), expected, atol=1e-3)


# --- exactness -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lor2c_matches_reference(arch):
    model, reference = _build(arch)
    _randomize(model)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_sharelor2c_shares_one_a_and_matches_reference(arch):
    model, reference = _build(arch, share_a=True)
    connections = model.connections
    assert len(connections) == NUM_LAYERS
    assert all(c.lora_A is connections[0].lora_A for c in connections)
    assert len({id(c.lora_B) for c in connections}) == NUM_LAYERS
    a_params = [p for n, p in model.named_parameters() if n.startswith("lor2c.lora_A")]
    assert len(a_params) == 1 and a_params[0] is connections[0].lora_A
    _randomize(model)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("share_a", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_spans_match_reference(arch, share_a):
    model, reference = _build(arch, share_a=share_a, num_merges=3)
    _randomize(model)
    for _ in range(3):
        model.apply_merge()
    spans = model.structure["spans"]
    assert len(spans) == NUM_LAYERS - 3 and any(last > first for first, last in spans)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_injected_blocks_match_reference(arch):
    model, reference = _build(arch, num_injects=2)
    _randomize(model)
    model.apply_inject()
    model.apply_inject()
    assert len(model.structure["injected"]) == 2
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_and_injects_together_match_reference(arch):
    model, reference = _build(arch, num_merges=2, num_injects=2)
    _randomize(model, seed=3)
    model.apply_merge()
    model.apply_inject()
    model.apply_merge()
    model.apply_inject()
    structure = model.structure
    assert len(structure["injected"]) == 2 and len(structure["spans"]) == NUM_LAYERS - 4
    _assert_matches_reference(model, reference)


def test_cached_generation_after_events_matches_reference():
    """A merged span in a decoder reads its stashed input on every cached decoding step too."""
    model, reference = _build("llama", num_merges=2, num_injects=1)
    _randomize(model, std=0.5)
    model.apply_merge()
    model.apply_merge()
    model.apply_inject()
    reference.install(model)
    ids = random_ids(2, 4, seed=11)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(input_ids=ids, **kwargs)
        theirs = reference.model.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=1e-5, atol=1e-5)


# --- decisions (SPEC §4, §5) --------------------------------------------------------------------------------
#
# Each connection gets A with orthonormal rows and B = U diag(1, 1, x, x) (U orthonormal columns), so B A has
# singular values (1, 1, x, x): with top_k = 2, rho = 1 / (1 + x) and SFS = x / (1 + x), increasing in x.


def _set_spectra(model, tails: list[float], seed: int = 0) -> list[float]:
    """Give the connection of span k the tail value tails[k]; return the SFS computed independently."""
    g = torch.Generator().manual_seed(seed)
    d = model.hidden_size

    def orthonormal_columns() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64))
        return q

    shared_a = orthonormal_columns().T
    with torch.no_grad():
        for connection, x in zip(model.connections, tails):
            a = shared_a if model.lor2c_config.share_a else orthonormal_columns().T
            connection.lora_A.copy_(a)
            connection.lora_B.copy_(orthonormal_columns() @ torch.diag(torch.tensor([1.0, 1.0, x, x], dtype=torch.float64)))
    return [_dense_sfs(c.lora_A, c.lora_B) for c in model.connections]


def _dense_sfs(a: torch.Tensor, b: torch.Tensor, k: int = 2) -> float:
    sv = torch.linalg.svdvals(b.detach().double() @ a.detach().double())
    return float(1 - sv[:k].sum() / sv.sum())


def _adjacent_pairs(spans: list[list[int]]) -> list[int]:
    return [k for k in range(len(spans) - 1) if spans[k][1] + 1 == spans[k + 1][0]]


def _decision_model(num_blocks: int = 5, **config):
    base = tiny_model("llama", head="causal", num_layers=num_blocks)
    return get_lor2c_model(base, LoR2CConfig(r=R, lora_dropout=0.0, **config))


@pytest.mark.parametrize("share_a", [False, True])
def test_paper_merge_picks_min_summed_sfs_and_keeps_higher_sfs(share_a):
    model = _decision_model(num_merges=2, share_a=share_a, merge_criterion="paper")
    sfs = _set_spectra(model, [0.5, 0.1, 0.2, 0.9, 0.8])
    expected = min(_adjacent_pairs(model.structure["spans"]), key=lambda k: sfs[k] + sfs[k + 1])
    assert expected == 1
    b_before = [c.lora_B.detach().clone() for c in model.connections]

    record = model.apply_merge()
    assert record["merged"] == [[1, 1], [2, 2]] and record["blocks"] == [1, 2]
    assert record["scores"] == pytest.approx([sfs[1], sfs[2]], abs=1e-5)
    assert model.structure["spans"] == [[0, 0], [1, 2], [3, 3], [4, 4]]
    merged = model.connections[1]
    assert torch.equal(merged.lora_B, b_before[2])  # block 2 has the higher SFS

    # Second merge: the merged span now scores as its kept connection (block 2's).
    sfs = [sfs[0], sfs[2], sfs[3], sfs[4]]
    expected = min(_adjacent_pairs(model.structure["spans"]), key=lambda k: sfs[k] + sfs[k + 1])
    assert expected == 0
    record = model.apply_merge()
    assert record["blocks"] == [0, 2]
    assert model.structure["spans"] == [[0, 2], [3, 3], [4, 4]]
    assert torch.equal(model.connections[0].lora_B, b_before[0])  # block 0's SFS beats the kept block 2's


def test_official_merge_picks_min_summed_rho_and_keeps_lower_block():
    model = _decision_model(num_merges=1, merge_criterion="official", merge_keep="official")
    sfs = _set_spectra(model, [0.5, 0.1, 0.2, 0.9, 0.8])
    rho = [1 - s for s in sfs]
    expected = min(_adjacent_pairs(model.structure["spans"]), key=lambda k: rho[k] + rho[k + 1])
    assert expected == 3  # min summed rho is max summed SFS: the opposite end from the paper's choice
    b_before = [c.lora_B.detach().clone() for c in model.connections]
    record = model.apply_merge()
    assert record["blocks"] == [3, 4] and record["rho"] == pytest.approx([rho[3], rho[4]], abs=1e-5)
    assert torch.equal(model.connections[3].lora_B, b_before[3])  # the lower block, though block 4 has less SFS


def test_merge_keep_is_independent_of_the_criterion():
    model = _decision_model(num_merges=1, merge_criterion="paper", merge_keep="official")
    _set_spectra(model, [0.5, 0.1, 0.2, 0.9, 0.8])
    b_before = [c.lora_B.detach().clone() for c in model.connections]
    assert model.apply_merge()["blocks"] == [1, 2]
    assert torch.equal(model.connections[1].lora_B, b_before[1])


def test_inject_picks_min_sfs_block_and_merges_never_cross_it():
    model = _decision_model(num_merges=2, num_injects=1, merge_criterion="paper")
    sfs = _set_spectra(model, [0.05, 0.01, 0.06, 0.9, 0.8])
    assert min(range(5), key=lambda k: sfs[k]) == 1
    record = model.apply_inject()
    assert record["blocks"] == [1] and model.structure["injected"] == [1]
    assert model.structure["spans"] == [[0, 0], [2, 2], [3, 3], [4, 4]]

    # Blocks 0 and 2 have the two lowest scores, but block 1 between them is injected.
    record = model.apply_merge()
    assert record["blocks"] == [2, 3]
    record = model.apply_merge()
    assert record["blocks"] == [2, 4]
    assert model.structure["spans"] == [[0, 0], [2, 4]]
    assert all(not (first <= 1 <= last) for first, last in model.structure["spans"])
    record = model.apply_merge()  # no adjacent pair is left: the event is skipped, nothing changes
    assert record["skipped"] and model.structure["spans"] == [[0, 0], [2, 4]]


def test_inject_ignores_merged_spans_even_with_lowest_sfs():
    model = _decision_model(num_blocks=4, num_merges=1, num_injects=1, merge_criterion="paper")
    _set_spectra(model, [0.5, 0.01, 0.02, 0.3])
    assert model.apply_merge()["blocks"] == [1, 2]
    sfs = model.sfs().sfs.tolist()
    assert min(range(3), key=lambda k: sfs[k]) == 1  # the merged span scores lowest ...
    record = model.apply_inject()
    assert record["blocks"] == [3]  # ... but only single-block spans can be injected: block 3 < block 0
    assert model.structure["spans"] == [[0, 0], [1, 2]] and model.structure["injected"] == [3]


# --- the fused add of a low-rank delta --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fp32", "fp32_non_contiguous", "bf16_base_fp32_adapter"])
def test_fused_low_rank_add_equals_separate_ops(case):
    """`base + s * h @ B.T` (one addmm when dtypes agree) equals the unfused sum, in value and in gradients."""
    from lor2c_hf.layer import add_scaled_up_projection

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 16, generator=g)
    if case == "fp32_non_contiguous":
        base = torch.randn(5, 2, 16, generator=g).transpose(0, 1)
    if case == "bf16_base_fp32_adapter":
        base = base.to(torch.bfloat16)
    h = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    b = torch.randn(16, 4, generator=g, requires_grad=True)
    out = add_scaled_up_projection(base, h, b, 2.5)
    assert out.shape == base.shape and out.dtype == base.dtype
    expected = (base.double() + 2.5 * h.double() @ b.double().t()).to(base.dtype)
    torch.testing.assert_close(out, expected, rtol=1e-5 if base.dtype == torch.float32 else 1e-2, atol=1e-5)
    weights = torch.randn(out.shape, generator=g)
    (out.float() * weights).sum().backward()
    grad_out = weights.to(base.dtype).float()  # the gradient reaching the sum, in the output's precision
    torch.testing.assert_close(h.grad, 2.5 * grad_out @ b.detach())
    torch.testing.assert_close(b.grad, 2.5 * grad_out.reshape(-1, 16).t() @ h.detach().reshape(-1, 4))


@pytest.mark.parametrize("method", ["imlor2c", "reslora"])
def test_deepcopy_hooks_the_copy(method):
    """`copy.deepcopy` of a wrapped model gives an independent model: its hooks read its own adapter."""
    from lor2c_hf import ResLoRAConfig, get_reslora_model

    if method == "reslora":
        model = get_reslora_model(tiny_model("llama", num_layers=4), ResLoRAConfig(r=2, lora_alpha=4, res_flag="is"))
    else:
        model = get_lor2c_model(tiny_model("llama", num_layers=4),
                                LoR2CConfig.for_method("imlor2c", r=2, lora_alpha=4, num_merges=1, num_injects=1))
        model.apply_merge()
        model.apply_inject()
    model.eval()
    ids = random_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(input_ids=ids).logits, before)
        for name, p in twin.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
        changed = twin(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (changed - before).abs().max() > 1e-3  # the copy's hooks read the copy's (new) weights
    torch.testing.assert_close(after, before)  # and the original is untouched
    if method == "imlor2c":
        twin.apply_inject()
        assert model.structure["injected"] != twin.structure["injected"]
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, before)
