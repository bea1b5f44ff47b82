"""The prepared GPU benchmark (bench/run_gpu.sh -> bench/gpu.py) runs end to end on the CPU at a tiny shape.

The device call is one shot, so every path it takes is exercised here except the CUDA-only calls: the wrapper
itself (no wheels carried), each training row and its interleaved timing, the gradient-checkpointing repeat,
the fp16 GradScaler step, generation, the alpaca recipe through `accelerate launch`, and the 4-bit row's skip.
Timings are not asserted; the JSON's rows, statuses, ratios and the recipe's adapter are.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_GPU = os.path.join(ROOT, "bench", "run_gpu.sh")
FETCH = os.path.join(ROOT, "bench", "fetch_gpu_wheels.sh")
TRAIN_ROWS = ["peft_lora", "lor2c", "imlor2c", "base_block0", "base_embeddings", "peft_lora_gc", "lor2c_gc"]
EXTRA_ROWS = ["fp16", "generation", "alpaca_recipe", "nf4"]
L, D, R = 4, 32, 4  # speed.py's smoke shape, which --tiny uses
sys.path.insert(0, os.path.join(ROOT, "bench"))  # `import gpu` for the in-process checks


def bench_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """bash bench/run_gpu.sh with --tiny, as the device call runs it (OUT set, no wheels carried)."""
    out = tmp_path_factory.mktemp("gpu-bench")
    env = bench_env(OUT=str(out), WHEEL_DIR=str(out / "no-wheels"), GPU_BENCH_ARGS="--tiny --threads 1")
    proc = subprocess.run(["bash", RUN_GPU], cwd=str(out), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "gpu.log").is_file() and "wrote" in (out / "gpu.log").read_text()
    def not_json(constant: str):
        raise AssertionError(f"gpu.json holds {constant}, which is not JSON")

    return json.loads((out / "gpu.json").read_text(encoding="utf-8"), parse_constant=not_json)


def test_every_row_ran_or_says_why_not(run):
    rows = run["rows"]
    assert list(rows) == TRAIN_ROWS + EXTRA_ROWS
    assert run["finished"] is True and run["tiny"] is True and run["device"] == "cpu"
    assert "no wheels" in run["wheel_note"]
    for name in TRAIN_ROWS + ["fp16", "generation", "alpaca_recipe"]:
        assert rows[name]["status"] == "ok", (name, rows[name].get("reason"), rows[name].get("traceback"))
    assert rows["nf4"]["status"] == "skipped" and "CUDA" in rows["nf4"]["reason"]
    assert set(run["phases"]) == {"train", "gradient_checkpointing", "fp16", "generation", "alpaca_recipe", "nf4"}


def test_training_rows_have_finite_positive_ratios(run):
    rows = run["rows"]
    for name in TRAIN_ROWS:
        row = rows[name]
        reference = "peft_lora_gc" if name.endswith("_gc") else "peft_lora"
        assert row["ratio_reference"] == reference
        assert row["steps_timed"] == run["repeats"]
        for key in ("step_time_s", "tokens_per_s", "step_time_ratio", "tokens_per_s_ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["step_time_ratio"] == pytest.approx(row["step_time_s"] / rows[reference]["step_time_s"])
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_time_s"])  # batch 2 x seq 16
        # CUDA-only figures are null on the CPU, present as keys
        for key in ("cuda_peak_step_bytes", "cuda_peak_standalone_bytes", "cuda_peak_step_ratio"):
            assert key in row and row[key] is None
    assert rows["peft_lora"]["step_time_ratio"] == rows["peft_lora_gc"]["step_time_ratio"] == 1.0


def test_rows_build_the_models_they_name(run):
    rows = run["rows"]
    assert rows["peft_lora"]["trainable_parameters"] == rows["peft_lora_gc"]["trainable_parameters"] == 4 * L * D * R
    assert rows["lor2c"]["trainable_parameters"] == rows["lor2c_gc"]["trainable_parameters"] == 2 * L * D * R
    assert rows["imlor2c"]["trainable_parameters"] == 2 * (L - 1) * D * R  # one merge, one inject (M = N = L/4)
    assert len(rows["imlor2c"]["structure"]["injected"]) == 1
    assert rows["base_block0"]["trainable_parameters"] == rows["base_embeddings"]["trainable_parameters"] == 0


def test_fp16_step_keeps_a_float32_adapter_and_a_finite_loss(run):
    fp16 = run["rows"]["fp16"]
    assert fp16["base_dtype"] == "torch.float16" and fp16["adapter_dtypes"] == ["torch.float32"]
    assert fp16["loss_finite"] and all(math.isfinite(v) for v in fp16["losses"])
    assert fp16["update_finite"] and fp16["adapter_moved"]


def test_generation_and_targets(run):
    gen = run["rows"]["generation"]
    assert list(gen["models"]) == ["base", "lor2c", "peft_lora_merged"]
    assert gen["new_tokens"] == 8 and gen["models"]["base"]["tokens_per_s_ratio_to_base"] == 1.0
    assert gen["lor2c_tokens_per_s_ratio_to_base"] > 0
    whats = [t["what"] for t in run["targets"]]  # the memory target needs CUDA figures: absent on the CPU
    assert whats == ["lor2c step_time / peft_lora", "lor2c step_time / base_block0 (its floor)",
                     "imlor2c step_time / lor2c", "lor2c generation tokens/s / base"]


def test_alpaca_recipe_row_trained_and_saved_an_adapter(run):
    row = run["rows"]["alpaca_recipe"]
    assert row["returncode"] == 0 and row["steps"] == 10
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(row["adapter_files"])
    assert [e["kind"] for e in row["structure"]["events"]] == ["merge", "inject"]
    assert math.isfinite(row["train_results"]["train_loss"]) and math.isfinite(row["eval_results"]["eval_loss"])


def test_an_exhausted_budget_skips_every_phase_and_still_writes_json(tmp_path):
    import gpu

    result = gpu.main(["--tiny", "--budget_s", "0", "--out", str(tmp_path / "gpu.json")])
    with open(tmp_path / "gpu.json", encoding="utf-8") as f:
        assert json.load(f)["rows"] == result["rows"]
    assert result["finished"] is True
    assert all(r["status"] == "skipped" and r["reason"].startswith("budget") for r in result["rows"].values())


def test_sigterm_keeps_what_was_written(tmp_path, monkeypatch):
    """The wrapper's `timeout` sends SIGTERM: the JSON then records the interruption and no row stays running."""
    import gpu

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` would, in the middle of the fp16 phase
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(gpu, "fp16_step", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    result = gpu.main(["--tiny", "--skip", "train,gradient_checkpointing", "--out", str(tmp_path / "gpu.json")])
    assert signal.getsignal(signal.SIGTERM) == previous
    with open(tmp_path / "gpu.json", encoding="utf-8") as f:
        assert json.load(f)["rows"] == result["rows"]
    assert result["interrupted"].startswith("signal") and result["finished"] is False
    rows = result["rows"]
    assert {rows[n]["reason"] for n in TRAIN_ROWS} == {"--skip"}
    assert rows["fp16"]["status"] == "failed" and rows["fp16"]["reason"].startswith("interrupted")
    assert all(rows[n]["status"] == "skipped" and rows[n]["reason"].startswith("interrupted")
               for n in ("generation", "alpaca_recipe", "nf4"))


def test_run_gpu_sh_parses_and_names_only_files_that_exist():
    for script in (RUN_GPU, FETCH):
        assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0, script
    with open(RUN_GPU, encoding="utf-8") as f:
        paths = set(re.findall(r"\b(?:bench|recipes|tests)/[\w./-]+\.(?:py|sh|md)\b", f.read()))
    assert "bench/gpu.py" in paths
    assert all(os.path.isfile(os.path.join(ROOT, p)) for p in paths), paths


@pytest.mark.parametrize("pyarrow_major, carried_pyarrow, chosen", [
    ("26", False, "datasets-5.2.0"), ("22", False, "datasets-4.8.5"), ("15", True, "datasets-5.2.0"),
    ("15", False, None),
])
def test_run_gpu_sh_picks_the_datasets_wheel_for_the_images_pyarrow(tmp_path, pyarrow_major, carried_pyarrow, chosen):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    names = ["datasets-5.2.0-py3-none-any.whl", "datasets-4.8.5-py3-none-any.whl", "dill-0.4.1-py3-none-any.whl"]
    if carried_pyarrow:
        names.append("pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl")
    for name in names:
        (wheels / name).write_bytes(b"")
    fake_python = tmp_path / "python"  # answers the script's pyarrow-version probe
    fake_python.write_text(f"#!/bin/sh\necho {pyarrow_major}\n")
    fake_python.chmod(0o755)
    env = bench_env(WHEEL_DIR=str(wheels), WHEELS_DRY_RUN="1", PYTHON=str(fake_python))
    proc = subprocess.run(["bash", RUN_GPU], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    listed = [line for line in proc.stdout.splitlines() if line.endswith(".whl")]
    assert [w for w in listed if w.startswith("datasets-")] == ([f"{chosen}-py3-none-any.whl"] if chosen else [])
    assert "dill-0.4.1-py3-none-any.whl" in listed
    assert ("note:" in proc.stdout) == (chosen is None)
