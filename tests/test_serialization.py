"""Adapters on disk: `save_pretrained` / `from_pretrained` / `load_adapter` (issue 3, point 7).

Every round trip starts from a freshly built base (same seed, as if loaded again) and must reproduce the
saved model's outputs bit for bit, structure (merged spans, injected LoRA) and task head included. Refused
loads must leave the model exactly as it was: weights, hooks, trainable flags, mode, structure, outputs.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lor2c_hf.serialization as serialization
from lor2c_hf import AdapterLoadError, LoR2CConfig, LoR2CModel, get_lor2c_model
from tiny_models import random_ids, tiny_model

NUM_LAYERS = 6
FILES = {"adapter_config.json", "adapter_model.safetensors"}
ADAPTER_PREFIXES = ("lor2c.", "lor2c_injected.")
# (architecture, head): an encoder and a decoder, each with a trained task head, and a causal decoder.
MODELS = {"roberta-cls": ("roberta", "cls"), "llama-cls": ("llama", "cls"), "llama-causal": ("llama", "causal")}
VARIANTS = {
    "lor2c": dict(config={}, merges=0, injects=0),
    "sharelor2c": dict(config=dict(share_a=True), merges=0, injects=0),
    "merged": dict(config=dict(num_merges=3), merges=3, injects=0),
    "injected": dict(config=dict(num_injects=2), merges=0, injects=2),
    "imlor2c": dict(config=dict(share_a=True, num_merges=2, num_injects=2), merges=2, injects=2),
}


# --- helpers ---------------------------------------------------------------------------------------------


def _base(arch: str = "llama", head: str = "causal", **overrides) -> torch.nn.Module:
    return tiny_model(arch, head=head, num_layers=overrides.pop("num_layers", NUM_LAYERS), seed=0, **overrides)


def _train_like(model: LoR2CModel, seed: int = 0) -> None:
    """What training leaves behind: random adapter weights (B no longer zero) and a moved task head."""
    g = torch.Generator().manual_seed(seed)
    heads = tuple(f"model.{m}." for m in model.lor2c_config.modules_to_save or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(ADAPTER_PREFIXES):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.startswith(heads):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _adapted(arch: str = "llama", head: str = "causal", variant: str = "lor2c", seed: int = 0,
             base_overrides: dict | None = None, **config) -> LoR2CModel:
    spec = VARIANTS[variant]
    model = get_lor2c_model(_base(arch, head, **(base_overrides or {})),
                            LoR2CConfig(r=4, lora_dropout=0.1, **{**spec["config"], **config}))
    _train_like(model, seed)
    for _ in range(spec["merges"]):
        model.apply_merge()
    for _ in range(spec["injects"]):
        model.apply_inject()
    return model.eval()


def _outputs(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = random_ids(3, 9, seed=5) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything a refused load must leave as it was."""
    snap = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": _hooks(model),
        "outputs": _outputs(model),
    }
    if isinstance(model, LoR2CModel):
        snap["structure"] = model.structure
    return snap


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for key in ("requires_grad", "training", "hooks", "structure"):
        assert after.get(key) == before.get(key), key
    assert torch.equal(after["outputs"], before["outputs"])


# --- the files -------------------------------------------------------------------------------------------


def test_save_writes_config_and_real_safetensors_with_the_structure(tmp_path):
    model = _adapted("roberta", "cls", "imlor2c")
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == FILES

    with open(tmp_path / "adapter_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "LOR2C"
    assert LoR2CConfig.from_dict(config) == model.lor2c_config

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["format"] == "pt"
    assert json.loads(metadata["lor2c_structure"]) == model.structure
    assert len(model.structure["events"]) == 4 and model.structure["injected"]
    assert json.loads(metadata["lor2c_base"]) == {"base_model_class": "RobertaForSequenceClassification",
                                                  "model_type": "roberta", "hidden_size": 32, "num_blocks": NUM_LAYERS}
    # Adapter tensors and the task head, nothing of the frozen base.
    expected = {k.replace("model.", "base_model.", 1) if k.startswith("model.") else k: v  # file keys
                for k, v in model.state_dict().items() if k.startswith(ADAPTER_PREFIXES + ("model.classifier.",))}
    assert any(k.startswith("lor2c_injected.") for k in expected) and any(k.startswith("base_model.classifier.") for k in expected)
    assert saved.keys() == expected.keys()
    retired = {f"lor2c.lora_{m}.{slot}" for m in "AB" for slot in range(NUM_LAYERS) if slot not in model.structure["owners"]}
    assert retired  # the merges retired slots: saved as zeros, since nothing reads them again
    for key, value in expected.items():
        assert torch.equal(saved[key], torch.zeros_like(value) if key in retired else value), key
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in model.get_base_model().parameters()) / 10


def test_saved_files_honour_the_umask(tmp_path):
    """Atomic writes go through a private temp file; the result must still be readable like any other file."""
    _adapted().save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in FILES:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


# --- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_from_pretrained_reproduces_outputs_exactly(tmp_path, name, variant):
    arch, head = MODELS[name]
    model = _adapted(arch, head, variant)
    expected = _outputs(model)
    model.save_pretrained(tmp_path)

    fresh = _base(arch, head)
    plain = _outputs(fresh)
    loaded = LoR2CModel.from_pretrained(fresh, str(tmp_path))

    assert loaded.get_base_model() is fresh
    assert loaded.structure == model.structure
    assert torch.equal(_outputs(loaded), expected)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter (and head) matter
    for ours, theirs in zip(loaded.connections, model.connections):
        assert ours.span == theirs.span
        assert torch.equal(ours.lora_A, theirs.lora_A) and torch.equal(ours.lora_B, theirs.lora_B)
    heads = model.lor2c_config.modules_to_save
    assert bool(heads) == (head == "cls")
    for head_name in heads:
        for (k, p), q in zip(model.get_base_model().get_submodule(head_name).named_parameters(),
                             fresh.get_submodule(head_name).parameters()):
            assert torch.equal(p, q), f"{head_name}.{k}"


def test_loaded_decoder_generates_the_same_tokens_with_kv_cache(tmp_path):
    model = _adapted("llama", "causal", "imlor2c")
    model.save_pretrained(tmp_path)
    loaded = LoR2CModel.from_pretrained(_base(), str(tmp_path))
    ids = random_ids(2, 4, seed=3)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, theirs = loaded.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(torch.stack(ours.logits), torch.stack(theirs.logits))


def test_load_adapter_restores_weights_and_structure_onto_a_wrapped_model(tmp_path):
    trained = _adapted("roberta", "cls", "imlor2c")
    trained.save_pretrained(tmp_path)
    target = get_lor2c_model(_base("roberta", "cls"), LoR2CConfig.from_dict(trained.lor2c_config.to_dict())).eval()
    assert target.structure != trained.structure
    hooks = _hooks(target)
    target.load_adapter(str(tmp_path))
    assert target.structure == trained.structure
    assert torch.equal(_outputs(target), _outputs(trained))
    # The injected LoRA's hooks replace none of the block hooks and are not stacked twice on a second load.
    target.load_adapter(str(tmp_path))
    assert _hooks(target) == hooks + 2 * len(trained.structure["injected"])
    assert torch.equal(_outputs(target), _outputs(trained))


# --- refused loads leave the model unchanged ----------------------------------------------------------------

MISFITS = {
    "architecture": (dict(arch="mistral"), "model_type: adapter has 'llama', base has 'mistral'"),
    "hidden size": (dict(hidden_size=48), "hidden_size: adapter has 32, base has 48"),
    "depth": (dict(num_layers=5), f"num_blocks: adapter has {NUM_LAYERS}, base has 5"),  # M + N = 4 needs 5 blocks
}


def _misfit_base(kind: str) -> torch.nn.Module:
    overrides = dict(MISFITS[kind][0])
    return _base(overrides.pop("arch", "llama"), "causal", **overrides)


@pytest.mark.parametrize("kind", MISFITS)
def test_load_adapter_onto_another_base_fails_and_changes_nothing(tmp_path, kind):
    _adapted(variant="imlor2c").save_pretrained(tmp_path)
    target = get_lor2c_model(_misfit_base(kind), LoR2CConfig(r=4, num_injects=2, num_merges=2, share_a=True)).eval()
    _train_like(target, seed=9)
    target.apply_merge()
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError) as info:
        target.load_adapter(str(tmp_path))
    message = str(info.value)
    assert MISFITS[kind][1] in message and "LlamaForCausalLM" in message and "not changed" in message
    _assert_unchanged(target, before)


@pytest.mark.parametrize("kind", MISFITS)
def test_from_pretrained_onto_another_base_fails_and_changes_nothing(tmp_path, kind):
    _adapted(variant="imlor2c").save_pretrained(tmp_path)
    base = _misfit_base(kind)
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match=MISFITS[kind][1]):
        LoR2CModel.from_pretrained(base, str(tmp_path))
    _assert_unchanged(base, before)


def test_tensors_that_do_not_fit_fail_before_anything_is_hooked(tmp_path):
    """Same type, width and depth, but grouped-query v_proj (out 16 instead of 32): the injected LoRA cannot fit."""
    _adapted(variant="injected").save_pretrained(tmp_path)
    base = _base(num_key_value_heads=2)
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match=r"v_proj.*(shape|fit)|(shape|fit).*v_proj"):
        LoR2CModel.from_pretrained(base, str(tmp_path))
    _assert_unchanged(base, before)


def test_load_adapter_with_other_settings_names_them_and_changes_nothing(tmp_path):
    _adapted().save_pretrained(tmp_path)
    target = get_lor2c_model(_base(), LoR2CConfig(r=8)).eval()
    _train_like(target, seed=4)
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError, match=r"r: adapter 4, model 8"):
        target.load_adapter(str(tmp_path))
    _assert_unchanged(target, before)


# --- atomic writes -----------------------------------------------------------------------------------------


def _crash_mid_write(tmp_path, monkeypatch, model: LoR2CModel) -> None:
    def partial_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 37)  # the start of a file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", partial_then_crash)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)


def _crash_at_rename(tmp_path, monkeypatch, model: LoR2CModel) -> None:
    real_replace = os.replace

    def crash(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == str(tmp_path):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(serialization.os, "replace", crash)
    with pytest.raises(OSError, match="Input/output error"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("crash", [_crash_mid_write, _crash_at_rename], ids=["mid-write", "at-rename"])
def test_a_crashed_save_keeps_the_previous_adapter_and_leaves_no_temp_files(tmp_path, monkeypatch, crash):
    first = _adapted(variant="merged", seed=1)
    first.save_pretrained(tmp_path)
    previous = {name: (tmp_path / name).read_bytes() for name in FILES}

    second = _adapted(variant="imlor2c", seed=2)
    crash(tmp_path, monkeypatch, second)
    monkeypatch.undo()

    assert set(os.listdir(tmp_path)) == FILES
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == previous
    loaded = LoR2CModel.from_pretrained(_base(), str(tmp_path))
    assert loaded.structure == first.structure
    assert torch.equal(_outputs(loaded), _outputs(first))
    second.save_pretrained(tmp_path)  # and the next save goes through
    assert torch.equal(_outputs(LoR2CModel.from_pretrained(_base(), str(tmp_path))), _outputs(second))


# --- loading what is not an adapter ------------------------------------------------------------------------


def test_a_directory_without_the_files_gives_a_clear_error(tmp_path):
    base = _base()
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError) as info:
        LoR2CModel.from_pretrained(base, str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "adapter_config.json" in str(info.value) and "adapter_model.safetensors" in str(info.value)

    _adapted().save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="missing.*adapter_model.safetensors") as info:
        LoR2CModel.from_pretrained(base, str(tmp_path))
    assert "adapter_config.json" not in str(info.value).split("missing", 1)[1]
    _assert_unchanged(base, before)


def test_a_path_that_does_not_exist_gives_a_clear_error(tmp_path):
    missing = str(tmp_path / "no" / "such" / "adapter")
    with pytest.raises(AdapterLoadError, match="not a local directory") as info:
        LoR2CModel.from_pretrained(_base(), missing)
    assert missing in str(info.value)


def test_a_safetensors_file_not_written_by_lor2c_is_refused(tmp_path):
    _adapted().save_pretrained(tmp_path)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = _base()
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match="no LoR2C structure metadata"):
        LoR2CModel.from_pretrained(base, str(tmp_path))
    _assert_unchanged(base, before)


# --- is_trainable ------------------------------------------------------------------------------------------


def test_from_pretrained_is_frozen_for_inference_by_default(tmp_path):
    model = _adapted("roberta", "cls", "imlor2c")  # lora_dropout=0.1: only eval mode makes outputs repeatable
    model.save_pretrained(tmp_path)
    loaded = LoR2CModel.from_pretrained(_base("roberta", "cls").train(), str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(_outputs(loaded), _outputs(loaded))


def test_from_pretrained_is_trainable_trains_the_adapter_and_head_only(tmp_path):
    model = _adapted("roberta", "cls", "imlor2c")
    model.save_pretrained(tmp_path)
    loaded = LoR2CModel.from_pretrained(_base("roberta", "cls"), str(tmp_path), is_trainable=True)
    assert loaded.structure == model.structure
    assert torch.equal(_outputs(loaded), _outputs(model))  # the base was in eval mode, so is the adapter

    loaded.train()
    ids = random_ids(4, 9, seed=8)
    out = loaded(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    base_params = {f"model.{n}": p for n, p in loaded.get_base_model().named_parameters()}
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n in base_params} == {n for n in base_params if n.startswith("model.classifier.")}
    active = [c.lora_A for c in loaded.connections] + [c.lora_B for c in loaded.connections]
    for block in loaded.structure["injected"]:
        for layer in loaded.lor2c_injected.layers_of(block).values():
            active += [layer.lora_A.weight, layer.lora_B.weight]
    active += list(loaded.get_base_model().classifier.parameters())
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in active)
    assert all(p.grad is None for n, p in base_params.items() if not n.startswith("model.classifier."))


def test_from_pretrained_refuses_a_model_that_already_has_an_adapter(tmp_path):
    from lor2c_hf import AdapterLoadError, LoR2CConfig, LoR2CModel, get_lor2c_model
    from tiny_models import tiny_model

    wrapped = get_lor2c_model(tiny_model("llama", num_layers=2), LoR2CConfig(r=2))
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match="already carries a LoR2CModel adapter"):
        LoR2CModel.from_pretrained(wrapped, str(tmp_path))
