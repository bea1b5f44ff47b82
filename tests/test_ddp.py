"""Real multi-process training on CPU (gloo): `accelerate launch` with 2 processes, DDP or DeepSpeed ZeRO-3,
running `recipes/alpaca.py` on a tiny Llama, against one process with the same global batch (8 = 4 per device x
1 accumulation x 2 processes = 4 x 2 x 1).

Why `--multi_gpu` on a machine without GPUs: in accelerate 1.x, `--cpu` always takes the single-process launcher
(it ignores --num_processes); `--multi_gpu` starts torchrun, and the recipe switches its processes to CPU and
gloo when no CUDA device is visible. Dropout is 0 and sampling sequential, so both runs see the same batches.

ZeRO-2 and ZeRO-3 run where DeepSpeed is installed (`pip install -e ".[deepspeed]"`, as CI does), with `accelerate_configs/deepspeed_zero{2,3}.yaml` as shipped, on DeepSpeed's CPU accelerator (see
`tests/deepspeed_cpu/sitecustomize.py` for the one DeepSpeed CPU bug worked around).
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from safetensors import safe_open

from tiny_pretrained import REPO, offline_env, run_cli, save_tiny_pretrained

SCRIPT = os.path.join(REPO, "recipes", "alpaca.py")
SAMPLE = os.path.join(REPO, "tests", "data", "alpaca_seed_sample.jsonl")
RANK_LINE = re.compile(r"^\[rank (\d+)/(\d+)\] adapter sha256=([0-9a-f]{64}) structure=(.*)$", re.M)
DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ZERO = {stage: ["--config_file", os.path.join(REPO, "accelerate_configs", f"deepspeed_{stage}.yaml"), "--num_processes",
                "2", "--mixed_precision", "no"] for stage in ("zero2", "zero3")}


def read_adapter(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata().get("lor2c_structure", "null"))


def two_and_one_process_runs(tmp_path, method: str, launch: list[str], extra_args: tuple[str, ...] = (),
                             **env_extra: str) -> tuple[str, str]:
    """Train `method` with 2 processes (`launch`) and with 1; check the batch lines and that both ranks agree."""
    with open(SAMPLE, encoding="utf-8") as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    model = save_tiny_pretrained(str(tmp_path / "model"), texts + ["below is an instruction that describes a task"], num_layers=6)
    args = [
        SCRIPT, "--method", method, "--model_name_or_path", model, "--dataset_name", SAMPLE, "--val_set_size", "4",
        "--global_batch_size", "8", "--per_device_train_batch_size", "4", "--num_train_epochs", "3",
        "--train_sampling_strategy", "sequential", "--r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--learning_rate", "1e-2", "--max_new_tokens", "2", "--eval_strategy", "no", "--save_strategy", "no",
        "--warmup_steps", "0", "--bf16", "false", "--report_to", "none",
    ]
    args += list(extra_args)
    if method in ("imlor2c", "mergelor2c", "injectlor2c"):
        args += ["--inject_r", "4", "--inject_dropout", "0", "--num_merges", "2", "--num_injects", "2"]
    env = offline_env(str(tmp_path), **env_extra)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "0"]
    cwd = REPO if "--config_file" in launch else str(tmp_path)  # accelerate configs name ds_configs/ relative to the repo
    two = run_cli(args + ["--output_dir", str(tmp_path / "two")], cwd=cwd, env=env, launcher=launcher)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(args + ["--output_dir", str(tmp_path / "one")], cwd=str(tmp_path), env=offline_env(str(tmp_path)))
    assert one.returncode == 0, one.stderr[-4000:]

    assert "global batch 8 = 4 per device x 1 accumulation x 2 process(es)" in two.stdout
    assert "global batch 8 = 4 per device x 2 accumulation x 1 process(es)" in one.stdout
    ranks = {int(r): (world, sha, json.loads(s)) for r, world, sha, s in RANK_LINE.findall(two.stdout)}
    assert sorted(ranks) == [0, 1] and {w for w, _, _ in ranks.values()} == {"2"}, two.stdout[-3000:]
    assert ranks[0][1:] == ranks[1][1:], "the two ranks ended with different adapters or structures"
    assert "consolidated the full ZeRO-3 state dict" not in two.stdout  # saving the adapter gathers the adapter only
    single = RANK_LINE.findall(one.stdout)
    assert len(single) == 1 and single[0][:2] == ("0", "1")
    return str(tmp_path / "two"), str(tmp_path / "one")


def assert_same_structure(two: dict, one: dict) -> None:
    for key in ("spans", "owners", "injected"):
        assert two[key] == one[key], key
    assert [(e["kind"], e["blocks"], e["step"]) for e in two["events"]] == \
           [(e["kind"], e["blocks"], e["step"]) for e in one["events"]]


def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
    two_dir, one_dir = two_and_one_process_runs(tmp_path, "imlor2c", DDP)
    tensors_two, structure_two = read_adapter(two_dir)
    tensors_one, structure_one = read_adapter(one_dir)
    assert_same_structure(structure_two, structure_one)
    assert sorted(e["kind"] for e in structure_one["events"]) == ["inject", "inject", "merge", "merge"]
    assert tensors_two.keys() == tensors_one.keys()
    for key in tensors_one:
        torch.testing.assert_close(tensors_two[key], tensors_one[key], rtol=1e-5, atol=1e-6, msg=key)
    trained_b = [t for k, t in tensors_one.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in trained_b), "training did not move any B away from zero"


def deepspeed_env() -> dict[str, str]:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    if torch.cuda.is_available():
        return {}
    shim = os.path.join(REPO, "tests", "deepspeed_cpu")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH", "")]))}


@pytest.mark.parametrize("stage,method,extra_args", [
    *(pytest.param(*case, marks=pytest.mark.slow) for case in (  # ZeRO-3, 0.5-2 min each on 2 cores: -m slow
        ("zero3", "lor2c", ()), ("zero3", "sharelor2c", ()),
        ("zero3", "reslora", ("--res_flag", "ms", "--pre_num", "2")), ("zero3", "reslora", ("--res_flag", "bs", "--pre_num", "2")))),
    ("zero2", "lor2c", ()),
], ids=["zero3-lor2c", "zero3-sharelor2c", "zero3-reslora-ms", "zero3-reslora-bs", "zero2-lor2c"])
def test_zero_two_processes_train_exactly_like_one(tmp_path, stage, method, extra_args):
    """ZeRO-3 partitions every adapter parameter; the connections (and ResLoRA's cross-layer reads) must still
    be gathered, get their gradients reduced once per step and be updated as in one process. ZeRO-2 shards
    only gradients and optimizer state."""
    two_dir, one_dir = two_and_one_process_runs(tmp_path, method, ZERO[stage], extra_args, **deepspeed_env())
    tensors_two, structure_two = read_adapter(two_dir)
    tensors_one, structure_one = read_adapter(one_dir)
    if method != "reslora":
        assert_same_structure(structure_two, structure_one)
    assert tensors_two.keys() == tensors_one.keys()
    for key in tensors_one:
        if not key.startswith("reslora.input_"):  # running input norms: rank 0 sees half of the batches
            torch.testing.assert_close(tensors_two[key], tensors_one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(t.abs().sum() > 0 for k, t in tensors_one.items() if "lora_B" in k)


@pytest.mark.slow  # ZeRO-3, about a minute: -m slow
def test_zero3_imlor2c_events_match_one_process(tmp_path):
    """Under ZeRO-3 SFS reads gathered weights, so the events are the ones one process takes; the weights
    then differ by design: DeepSpeed's AdamW steps one flat buffer, so a LoRA dormant until its inject has
    the whole run's step count in its bias correction, and retired slots drift on their momentum (README)."""
    two_dir, one_dir = two_and_one_process_runs(tmp_path, "imlor2c", ZERO["zero3"], **deepspeed_env())
    tensors_two, structure_two = read_adapter(two_dir)
    tensors_one, structure_one = read_adapter(one_dir)
    assert_same_structure(structure_two, structure_one)
    assert sorted(e["kind"] for e in structure_two["events"]) == ["inject", "inject", "merge", "merge"]
    assert all(e["scores"] and min(e["scores"]) > 0 for e in structure_two["events"])  # SFS of gathered, trained B
    injected = [k for k in tensors_two if k.startswith("lor2c_injected.blocks.") and "lora_B" in k
                and int(k.split(".")[2]) in structure_two["injected"]]
    assert injected and all(tensors_two[k].abs().sum() > 0 for k in injected), "injected LoRA did not train"
    dormant = [k for k in tensors_two if k.startswith("lor2c_injected.blocks.") and "lora_B" in k and k not in injected]
    assert dormant and all(tensors_two[k].abs().sum() == 0 for k in dormant)
    assert all(torch.isfinite(t).all() for t in tensors_two.values())


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_resume_mid_schedule_restores_the_structure_and_ends_like_the_uninterrupted_run(tmp_path, stage):
    """DeepSpeed resumes through its own checkpoint (`Trainer` never calls the adapter's `load_adapter` there):
    the structure rides in the model's `state_dict`, so `checkpoint-4` (after all four events at steps 1 and 2
    of 6) resumes with it. Before, every event fired again at step 4 and the run ended in another structure."""
    env = offline_env(str(tmp_path), **deepspeed_env())
    with open(SAMPLE, encoding="utf-8") as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    model = save_tiny_pretrained(str(tmp_path / "model"), texts + ["below is an instruction that describes a task"], num_layers=6)
    args = [
        SCRIPT, "--method", "imlor2c", "--model_name_or_path", model, "--dataset_name", SAMPLE, "--val_set_size", "4",
        "--global_batch_size", "8", "--per_device_train_batch_size", "4", "--max_steps", "6", "--schedule", "steps",
        "--train_sampling_strategy", "sequential", "--r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--inject_r", "4", "--inject_dropout", "0", "--num_merges", "2", "--num_injects", "2",
        "--learning_rate", "1e-2", "--max_new_tokens", "2", "--eval_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "2", "--save_total_limit", "2", "--warmup_steps", "0", "--bf16", "false", "--report_to", "none",
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *ZERO[stage], "--main_process_port", "0"]
    full = run_cli(args + ["--output_dir", str(tmp_path / "full")], cwd=REPO, env=env, launcher=launcher)
    assert full.returncode == 0, full.stderr[-4000:]
    checkpoint = tmp_path / "full" / "checkpoint-4"
    _, saved = read_adapter(str(checkpoint))
    assert len(saved["events"]) == 4 and any(d.startswith("global_step") for d in os.listdir(checkpoint))
    resumed = run_cli(args + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)],
                      cwd=REPO, env=env, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step 4" not in re.sub(r"schedule.*", "", "\n".join(l for l in resumed.stderr.splitlines() if "[LoR2C]" in l))
    tensors_full, structure_full = read_adapter(str(tmp_path / "full"))
    tensors_resumed, structure_resumed = read_adapter(str(tmp_path / "resumed"))
    assert structure_resumed == structure_full  # same events, recorded once, at the same steps
    assert tensors_resumed.keys() == tensors_full.keys()
    for key in tensors_full:
        torch.testing.assert_close(tensors_resumed[key], tensors_full[key], rtol=0, atol=1e-5, msg=key)
