"""What a new user meets first: the offline `--tiny` run of the main recipe under `accelerate launch`, one
`error:` line at once when the model cannot be had, and the library's event lines on lines of their own."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import time

import pytest
from tqdm import tqdm

import lor2c_hf  # noqa: F401  (installs the console handler)
from tiny_pretrained import REPO, offline_env, run_cli

SCRIPT = os.path.join(REPO, "recipes", "alpaca.py")
ACCELERATE = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "-q", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.skipif(shutil.which(ACCELERATE[0]) is None, reason="the accelerate command is not installed")
def test_tiny_alpaca_runs_offline_under_accelerate_launch(tmp_path):
    out = tmp_path / "tiny"
    start = time.monotonic()
    result = run_cli([SCRIPT, "--method", "imlor2c", "--tiny", "--output_dir", str(out)], cwd=str(tmp_path),
                     env=offline_env(str(tmp_path)), launcher=ACCELERATE, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert time.monotonic() - start < 300
    assert result.stdout.count("Its loss, perplexity and answers mean nothing") == 2  # at the start and the end
    events = [line for line in result.stderr.splitlines() if "[LoR2C] step" in line]
    assert len(events) == 4 and all(line.startswith("[LoR2C] step") for line in events), events
    assert "it/s]" in result.stderr  # the Trainer's progress bar
    with open(out / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["method"] == "imlor2c"
    assert (out / "generations.json").exists() and (out / "eval_results.json").exists()


@pytest.mark.skipif(shutil.which(ACCELERATE[0]) is None, reason="the accelerate command is not installed")
def test_unreachable_model_fails_at_once_with_one_error_line(tmp_path):
    """No HF_HUB_OFFLINE and a Hub endpoint that refuses connections: no retries, one line naming the fix."""
    env = offline_env(str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    env.pop("HF_HUB_OFFLINE")
    start = time.monotonic()
    result = run_cli([SCRIPT, "--method", "imlor2c", "--bf16", "false", "--output_dir", str(tmp_path / "o")],
                     cwd=str(tmp_path), env=env, launcher=ACCELERATE, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("alpaca.py: error: --model_name_or_path meta-llama/Llama-2-7b-hf could not be loaded")
    assert "no connection to http://127.0.0.1:9" in errors[0] and "--tiny" in errors[0]


def test_event_lines_are_written_above_a_progress_bar_not_into_it(monkeypatch):
    """With no logging set up by the application, a lor2c_hf warning goes through tqdm.write: the bar is cleared,
    the line printed whole, the bar redrawn. (Python's fallback handler would append it to the bar's line.)"""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with tqdm(total=10, file=stream, ascii=True, mininterval=0) as bar:
        bar.update(3)
        logging.getLogger("lor2c_hf").warning("[LoR2C] step 3 merge: an event line")
        bar.update(1)
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "[LoR2C] step 3 merge: an event line" in lines


def test_event_lines_go_to_the_applications_logging_when_it_has_some(monkeypatch, caplog):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with caplog.at_level(logging.WARNING, logger="lor2c_hf"):
        logging.getLogger("lor2c_hf").warning("[LoR2C] once")
    assert caplog.messages == ["[LoR2C] once"] and "[LoR2C] once" not in stream.getvalue()


def test_model_card_names_how_it_loads_links_nothing_and_shows_the_recorded_metrics():
    import yaml

    from lor2c_hf import LoR2CConfig, get_lor2c_model
    from lor2c_hf.model_card import model_card
    from tiny_models import tiny_model

    model = get_lor2c_model(tiny_model("llama", head="causal"), LoR2CConfig.for_method("imlor2c", num_merges=1, num_injects=1))
    card = model_card(model, "user/tiny", {"eval_loss": 1.23456, "eval_accuracy": 0.875, "epoch": 3.0})
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "lor2c-hf" and "peft" not in front["tags"] and "imlor2c" in front["tags"]
    assert "](http" not in card and "github.com" not in card
    assert "| eval_loss | 1.23456 |" in card and "| eval_accuracy | 0.875 |" in card
    assert "export_for_transformers" in card and "LoR2CModel.from_pretrained" in card
    assert "No evaluation was recorded" in model_card(model, "user/tiny", None)
