"""The package layout keeps its promises: the core never imports the application code in `lor2c_hf.extras`,
and `import lor2c_hf` loads none of the recipes' heavy dependencies."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import lor2c_hf

PACKAGE = os.path.dirname(lor2c_hf.__file__)


def imported_modules(path: str) -> set[str]:
    """Absolute names of everything `path` imports, relative imports resolved against its package."""
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_no_core_module_imports_the_extras():
    offenders = []
    for root, _, names in os.walk(PACKAGE):
        if os.path.join(PACKAGE, "extras") in root or "__pycache__" in root:
            continue
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                if any(m == "lor2c_hf.extras" or m.startswith("lor2c_hf.extras.") for m in imported_modules(path)):
                    offenders.append(os.path.relpath(path, PACKAGE))
    assert not offenders, f"core modules import lor2c_hf.extras: {offenders}"


def test_the_scan_sees_an_extras_import(tmp_path):
    """The scan above can fail: a relative import of the extras is found."""
    probe = os.path.join(PACKAGE, "training", "_layout_probe.py")
    with open(probe, "w", encoding="utf-8") as f:
        f.write("from ..extras import glue_metric\n")
    try:
        assert "lor2c_hf.extras" in imported_modules(probe)
    finally:
        os.remove(probe)


def test_importing_the_library_loads_no_application_dependency():
    code = ("import sys, lor2c_hf, lor2c_hf.training; "
            "print(sorted(m for m in ('sklearn', 'lm_eval', 'optuna', 'evaluate', 'matplotlib', 'lor2c_hf.extras') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_one_registry_wraps_every_method_and_refuses_other_configs():
    import pytest
    from tiny_models import tiny_model

    from lor2c_hf import ConfigError, LoR2CConfig, LoR2CModel, ResLoRAConfig, ResLoRAModel, get_adapter_model
    from lor2c_hf.methods import CONFIG_CLASSES, MODEL_CLASSES

    assert isinstance(get_adapter_model(tiny_model("llama"), LoR2CConfig(r=2)), LoR2CModel)
    assert isinstance(get_adapter_model(tiny_model("llama"), ResLoRAConfig(r=2, pre_num=2)), ResLoRAModel)
    assert (LoR2CConfig, ResLoRAConfig) == CONFIG_CLASSES and (LoR2CModel, ResLoRAModel) == MODEL_CLASSES
    with pytest.raises(ConfigError, match=r"got a dict; build one with LoR2CConfig\(\*\*your_dict\)"):
        get_adapter_model(tiny_model("llama"), {"r": 2})
