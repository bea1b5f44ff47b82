"""Serving a trained LoR2C model: `merge_and_unload()` gives a plain transformers model whose `save_pretrained`
works, `unload()` gives the untouched base back (also after a merge), and `export_for_transformers` writes a
folder that transformers loads in a process where lor2c_hf cannot be imported, with the same logits and
greedy generation as the trained `LoR2CModel`."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
import transformers

from lor2c_hf import LoR2CConfig, NonFiniteError, get_lor2c_model
from tiny_models import random_ids, tiny_model

NUM_LAYERS = 6


def trained(arch: str, head: str, method: str = "imlor2c", seed: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(a copy of the bare base, a LoR2CModel with non-zero weights after 2 merges and 2 injects for imlor2c)."""
    base = tiny_model(arch, head=head, num_layers=NUM_LAYERS)
    bare = copy.deepcopy(base)
    events = 2 if method == "imlor2c" else 0
    model = get_lor2c_model(base, LoR2CConfig.for_method(method, r=4, inject_r=2, num_merges=events, num_injects=events))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for _ in range(events):
        model.apply_merge()
        model.apply_inject()
    return bare, model.eval()


def clean_load(folder: str, auto_class: str, ids: torch.Tensor, out: str, cache: str, generate: bool) -> subprocess.CompletedProcess:
    """Load `folder` with transformers in a fresh interpreter that has site-packages on its path but no lor2c_hf:
    `-I -S` skips PYTHONPATH, the working directory and every .pth file (the editable install's finder among them)."""
    torch.save(ids, out + ".ids")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})!r}
        try:
            import lor2c_hf
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("lor2c_hf is importable here: " + lor2c_hf.__file__)
        import torch, transformers
        model = transformers.{auto_class}.from_pretrained({folder!r}, trust_remote_code=True).eval()
        ids = torch.load({out + '.ids'!r})
        with torch.no_grad():
            result = {{"logits": model(input_ids=ids).logits, "class": type(model).__name__}}
            if {generate!r}:
                result["generated"] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert "lor2c_hf" not in sys.modules
        torch.save(result, {out!r})
    """)
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": cache, "OMP_NUM_THREADS": "1",
           "HOME": cache}
    return subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=cache, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("arch,head,auto_class", [("llama", "causal", "AutoModelForCausalLM"),
                                                   ("bert", "cls", "AutoModelForSequenceClassification")])
def test_exported_folder_loads_without_lor2c_hf_and_computes_the_same(tmp_path, arch, head, auto_class):
    _, model = trained(arch, head)
    assert model.structure["injected"] and any(a != b for a, b in model.structure["spans"])  # merged spans and LoRA
    ids = random_ids(batch=2, seq=7)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0) if head == "causal" else None
    folder = str(tmp_path / "served")
    model.export_for_transformers(folder)
    with torch.no_grad():  # the trained model itself is unchanged by the export
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert "modeling_lor2c.py" in os.listdir(folder)
    with open(os.path.join(folder, "modeling_lor2c.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] if node.level == 0 else "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "os", "functools", "typing", "torch", "transformers"}, imported

    cache = tmp_path / "cache"
    cache.mkdir()
    result = clean_load(folder, auto_class, ids, str(tmp_path / "result.pt"), str(cache), generate=head == "causal")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(str(tmp_path / "result.pt"))
    assert loaded["class"].endswith("WithLoR2C")
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=1e-5)
    if generated is not None:
        assert torch.equal(loaded["generated"], generated)


def test_loading_without_trust_remote_code_fails_instead_of_dropping_the_connections(tmp_path):
    _, model = trained("llama", "causal")
    folder = str(tmp_path / "served")
    model.export_for_transformers(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_merge_and_unload_returns_a_transformers_model_whose_save_pretrained_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    _, model = trained("llama", "causal")
    ids = random_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert merged is model.get_base_model()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    merged.save_pretrained(str(tmp_path / "merged"))
    with open(tmp_path / "merged" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "lor2c_llama" and "AutoModelForCausalLM" in config["auto_map"]
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    again.save_pretrained(str(tmp_path / "resaved"))  # a loaded folder saves again, code included
    assert "modeling_lor2c.py" in os.listdir(tmp_path / "resaved")


@pytest.mark.parametrize("merge_first", [False, True])
def test_unload_returns_the_untouched_base(merge_first):
    bare, model = trained("llama", "causal")
    if merge_first:
        model.merge_and_unload()
    base = model.unload()
    assert type(base) is transformers.LlamaForCausalLM and type(base.config) is transformers.LlamaConfig
    assert not hasattr(base.config, "lor2c_serving")
    reference = bare.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in base.state_dict().items()) and base.state_dict().keys() == reference.keys()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, bare(input_ids=ids).logits)


def test_merge_and_unload_refuses_a_nonfinite_fold_and_changes_nothing():
    _, model = trained("llama", "causal")
    block = model.structure["injected"][0]
    layer = next(iter(model.lor2c_injected.layers_of(block).values()))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(NonFiniteError, match=f"block {block}"):
        model.merge_and_unload()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) or (v.isnan() == after[k].isnan()).all() for k, v in before.items())
    assert type(model.get_base_model()) is transformers.LlamaForCausalLM
