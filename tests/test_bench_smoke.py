"""The bench/ scripts run end to end on a tiny shape and write the JSON the README's numbers come from.

Timings are not asserted (they are what the scripts measure); the rows, keys, parameter counts and the
SFS agreement are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = dict(blocks=4, d=32, r=4)  # bench/speed.py's smoke shape


def run_script(name: str, out: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), "--smoke", "--threads", "1", "--out", out,
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def speed(tmp_path_factory) -> dict:
    return run_script("speed.py", str(tmp_path_factory.mktemp("bench") / "speed.json"), "--shared-process")


def test_speed_rows_and_ratios(speed):
    rows = speed["rows"]
    assert list(rows) == ["peft_lora", "lor2c", "naive_hooks", "sharelor2c", "imlor2c", "our_lora", "reslora", "base"]
    assert speed["processes"] == "one for all methods"
    assert speed["reference"] == "peft_lora" and speed["dropout"] == 0.05
    ref = rows["peft_lora"]
    for name, row in rows.items():
        for key in ("step_time_s", "step_cpu_time_s", "saved_activations_bytes", "step_flops"):
            assert row[key] > 0, (name, key)
        assert row["steps_timed"] == speed["repeats"]
        assert row["step_time_ratio"] == pytest.approx(row["step_time_s"] / ref["step_time_s"])
        assert row["saved_activations_ratio"] == pytest.approx(row["saved_activations_bytes"] / ref["saved_activations_bytes"])


def test_speed_builds_the_methods_it_names(speed):
    L, d, r = SMOKE["blocks"], SMOKE["d"], SMOKE["r"]
    rows = speed["rows"]
    assert rows["peft_lora"]["trainable_parameters"] == 4 * L * d * r  # LoRA on q and v
    assert rows["lor2c"]["trainable_parameters"] == rows["naive_hooks"]["trainable_parameters"] == 2 * L * d * r
    assert rows["sharelor2c"]["trainable_parameters"] == (L + 1) * d * r
    assert rows["imlor2c"]["trainable_parameters"] == 2 * (L - 1) * d * r  # one merge (M=L/4), one inject
    assert rows["our_lora"]["trainable_parameters"] == rows["reslora"]["trainable_parameters"] == 4 * L * d * r
    assert "structure" not in rows["our_lora"] and "structure" not in rows["reslora"]
    assert rows["base"]["trainable_parameters"] == 0
    structure = rows["imlor2c"]["structure"]
    assert len(structure["injected"]) == 1 and len(structure["spans"]) == L - 2
    assert rows["lor2c"]["structure"] == {"spans": [[i, i] for i in range(L)], "injected": []}


def test_speed_generation_and_targets(speed):
    gen = speed["generation"]
    assert list(gen["rows"]) == ["base", "lor2c", "peft_lora_merged"]
    for row in gen["rows"].values():
        assert row["tokens_per_s"] == pytest.approx(gen["new_tokens"] / row["seconds"])
    assert gen["rows"]["base"]["tokens_per_s_ratio_to_base"] == 1.0
    whats = [t["what"] for t in speed["targets"]]
    assert whats == ["lor2c step_time / peft_lora", "lor2c saved_activations / peft_lora",
                     "lor2c step_cpu_time / peft_lora", "imlor2c step_time / lor2c", "lor2c generation tokens/s / base"]
    assert all(set(t) == {"what", "value", "target", "met", "miss_by"} for t in speed["targets"])


def test_speed_isolated_workers_measure_the_same_models(speed, tmp_path):
    """The default: one spawned process per method; same parameters, structure and FLOPs as the shared run."""
    names = ["peft_lora", "lor2c", "imlor2c"]
    isolated = run_script("speed.py", str(tmp_path / "speed.json"), "--gen-tokens", "0",
                          "--methods", ",".join(names))
    assert isolated["processes"] == "one per method" and isolated["generation"] is None
    assert list(isolated["rows"]) == names
    for name in names:
        row, shared = isolated["rows"][name], speed["rows"][name]
        assert row["steps_timed"] == isolated["repeats"] and row["step_time_s"] > 0 and row["step_cpu_time_s"] > 0
        for key in ("trainable_parameters", "step_flops", "saved_activations_bytes"):
            assert row[key] == shared[key], (name, key)
        assert row.get("structure") == shared.get("structure")


def test_naive_hook_witness_computes_lor2c(monkeypatch):
    """The benchmark's naive forward-hook LoR2C is the same function as lor2c_hf's LoR2C (same A and B)."""
    import torch

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import speed as bench_speed

    shape = bench_speed.SHAPES["smoke"]
    base = bench_speed.build_base(shape, "cpu")
    ours = bench_speed.lor2c("lor2c")(bench_speed.sharing_copy(base), shape).eval()
    naive = bench_speed.naive_hooks(bench_speed.sharing_copy(base), shape).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for connection, witness in zip(ours.connections, naive.naive_connections):
            connection.lora_B.normal_(0, 0.5)
            witness.lora_A.weight.copy_(connection.lora_A)
            witness.lora_B.weight.copy_(connection.lora_B)
    ids = torch.randint(3, shape.vocab, (2, shape.seq))
    with torch.no_grad():
        expected, got, plain = ours(input_ids=ids).logits, naive(input_ids=ids).logits, base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the connections change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sfs_bench_rows_and_agreement(tmp_path):
    result = run_script("sfs.py", str(tmp_path / "sfs.json"))
    (name, row), = result["rows"].items()
    assert name == "smoke"
    for key in ("qr_seconds", "dense_seconds_timed", "dense_seconds_all", "speedup"):
        assert row[key] > 0, key
    assert row["dense_connections_timed"] == 2 and row["dense_all_extrapolated"]
    assert row["max_abs_sfs_diff"] < 1e-4  # the QR route scores what the dense SVD scores
    assert 0.0 < row["sfs_range"][0] <= row["sfs_range"][1] < 1.0
