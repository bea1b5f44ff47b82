"""Real multi-process DDP on CPU (gloo): `accelerate launch --multi_gpu --num_processes 2 recipes/alpaca.py
--method imlor2c` on a tiny Llama ends with the same structure and weights on every rank, equal to one process
with the same global batch (8 = 4 per device x 1 accumulation x 2 processes = 4 x 2 x 1).

Why `--multi_gpu` on a machine without GPUs: in accelerate 1.x, `--cpu` always takes the single-process launcher
(it ignores --num_processes); `--multi_gpu` starts torchrun, and the recipe switches its processes to CPU and
gloo when no CUDA device is visible. Dropout is 0 and sampling sequential, so both runs see the same batches.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from safetensors import safe_open

from tiny_pretrained import REPO, offline_env, run_cli, save_tiny_pretrained

SCRIPT = os.path.join(REPO, "recipes", "alpaca.py")
SAMPLE = os.path.join(REPO, "tests", "data", "alpaca_seed_sample.jsonl")
RANK_LINE = re.compile(r"^\[rank (\d+)/(\d+)\] adapter sha256=([0-9a-f]{64}) structure=(.*)$", re.M)


def read_adapter(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lor2c_structure"])


def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
    with open(SAMPLE, encoding="utf-8") as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    model = save_tiny_pretrained(str(tmp_path / "model"), texts + ["below is an instruction that describes a task"], num_layers=6)
    args = [
        SCRIPT, "--method", "imlor2c", "--model_name_or_path", model, "--dataset_name", SAMPLE, "--val_set_size", "4",
        "--global_batch_size", "8", "--per_device_train_batch_size", "4", "--num_train_epochs", "3",
        "--train_sampling_strategy", "sequential", "--r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--inject_r", "4", "--inject_dropout", "0", "--num_merges", "2", "--num_injects", "2", "--warmup_steps", "0",
        "--learning_rate", "1e-2", "--max_new_tokens", "2", "--eval_strategy", "no", "--save_strategy", "no",
        "--bf16", "false", "--report_to", "none",
    ]
    env = offline_env(str(tmp_path))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = run_cli(args + ["--output_dir", str(tmp_path / "two")], cwd=str(tmp_path), env=env, launcher=launcher)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(args + ["--output_dir", str(tmp_path / "one")], cwd=str(tmp_path), env=env)
    assert one.returncode == 0, one.stderr[-4000:]

    assert "global batch 8 = 4 per device x 1 accumulation x 2 process(es)" in two.stdout
    assert "global batch 8 = 4 per device x 2 accumulation x 1 process(es)" in one.stdout
    ranks = {int(r): (world, sha, json.loads(s)) for r, world, sha, s in RANK_LINE.findall(two.stdout)}
    assert sorted(ranks) == [0, 1] and {w for w, _, _ in ranks.values()} == {"2"}, two.stdout[-3000:]
    assert ranks[0][1:] == ranks[1][1:], "the two ranks ended with different adapters or structures"
    single = RANK_LINE.findall(one.stdout)
    assert len(single) == 1 and single[0][:2] == ("0", "1")

    tensors_two, structure_two = read_adapter(str(tmp_path / "two"))
    tensors_one, structure_one = read_adapter(str(tmp_path / "one"))
    for key in ("spans", "owners", "injected"):
        assert structure_two[key] == structure_one[key]
    assert [(e["kind"], e["blocks"], e["step"]) for e in structure_two["events"]] == \
           [(e["kind"], e["blocks"], e["step"]) for e in structure_one["events"]]
    assert sorted(e["kind"] for e in structure_one["events"]) == ["inject", "inject", "merge", "merge"]
    assert tensors_two.keys() == tensors_one.keys()
    for key in tensors_one:
        torch.testing.assert_close(tensors_two[key], tensors_one[key], rtol=1e-5, atol=1e-6, msg=key)
    trained_b = [t for k, t in tensors_one.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in trained_b), "training did not move any B away from zero"
