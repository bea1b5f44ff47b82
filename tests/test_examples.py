"""The example scripts run as users run them (a subprocess per preset), and their saved adapters load back.

Every preset of the paper's methods goes through both plain Trainer scripts; the only LoR2C code in them is
the Trainer swap. The runs start together in a module fixture, two at a time (CI has 2 cores).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lor2c_hf import METHODS, LoR2CModel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("train_classification.py", "train_causal_lm.py")
NUM_BLOCKS = 16  # the scripts' models
# (merges, injects) each preset performs: the paper's method names with M = N = 4.
EXPECTED = {"lor2c": (0, 0), "sharelor2c": (0, 0), "mergelor2c": (4, 0), "injectlor2c": (0, 4), "imlor2c": (4, 4)}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}

    def run(job):
        script, method = job
        out = root / f"{script.removesuffix('.py')}-{method}"
        proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--method", method, "--output_dir", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        return job, (proc, out)

    jobs = [(s, m) for s in SCRIPTS for m in METHODS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


def test_every_preset_is_covered():
    assert set(EXPECTED) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_its_adapter_loads(runs, script, method):
    proc, out = runs[(script, method)]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(os.listdir(out)) == {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"}

    model = LoR2CModel.from_pretrained(load_script(script).build_model(), str(out))
    config, structure = model.lor2c_config, model.structure
    merges, injects = EXPECTED[method]
    assert config.method == method and config.share_a == (method == "sharelor2c")
    assert len(model.lor2c.lora_A) == (1 if config.share_a else NUM_BLOCKS)

    # The epochs schedule with E=6, M=N=4: Δ = floor(6/16) + 1 = 1, events after epochs 1, 2, 3, 4.
    done = [e for e in structure["events"] if not e.get("skipped")]
    assert [e["epoch"] for e in done if e["kind"] == "merge"] == [1.0, 2.0, 3.0, 4.0][:merges]
    assert [e["epoch"] for e in done if e["kind"] == "inject"] == [1.0, 2.0, 3.0, 4.0][:injects]
    assert len(done) == len(structure["events"])
    assert len(structure["spans"]) == NUM_BLOCKS - merges - injects and len(structure["injected"]) == injects
    assert all(model.lor2c.lora_B[slot].abs().sum() > 0 for slot in structure["owners"])  # it trained

    console = [line for line in proc.stderr.splitlines() if line.startswith("[LoR2C] step ")]
    assert len(console) == merges + injects


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_use_only_the_trainer_swap(script):
    """The scripts are stock Trainer scripts: LoR2CTrainer, LoR2CConfig.for_method and the method names, nothing else."""
    tree = ast.parse((EXAMPLES / script).read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "lor2c_hf"
                for a in node.names}
    assert imported == {"LoR2CTrainer", "LoR2CConfig", "METHODS"}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    trainer_calls = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "LoR2CTrainer"]
    assert len(trainer_calls) == 1
    assert [k.arg for k in trainer_calls[0].keywords if "lor2c" in (k.arg or "")] == ["lor2c_config"]
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "LoR2CConfig"]
    assert [u.attr for u in uses] == ["for_method"]
    assert "Trainer(" not in (EXAMPLES / script).read_text().replace("LoR2CTrainer(", "").replace("# was: Trainer(", "")
