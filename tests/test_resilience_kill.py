"""Issue 13, resume: a training process killed with SIGKILL at any moment, mid-save included, resumes to exactly
the adapter and events of an uninterrupted run, on both schedules.

Each case starts `resilience_worker.py` in a real subprocess, lets it reach a named point (after a step, after a
complete checkpoint, inside a checkpoint's adapter write, halfway through a checkpoint), kills it with
`kill -9`, starts it again to resume from the last complete checkpoint, and compares with an uninterrupted run
(max abs diff <= 1e-6, same events). The long randomized sweep (`-m slow`) is what the README reports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lor2c_hf.training.checkpoints import MANIFEST_NAME, checkpoint_problem
from resilience_worker import run
from tiny_pretrained import offline_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resilience_worker.py")
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of each schedule, in this process (same code, seeds and single thread as the workers)."""
    return {schedule: run({"out": str(tmp_path_factory.mktemp(f"full-{schedule}")), "schedule": schedule})
            for schedule in ("epochs", "steps")}


def start(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=offline_env(spec["out"]))


def kill_when_paused(spec: dict) -> None:
    """Run the worker until it reaches `spec["pause"]`, then SIGKILL it (no handler, no cleanup)."""
    proc = start(spec)
    for line in proc.stdout:
        if line.startswith("PAUSED"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    proc.stderr.close()
    proc.stdout.close()


def resume(spec: dict) -> dict:
    """Start the worker again on the same output folder; it resumes from the last complete checkpoint."""
    result_file = os.path.join(spec["out"], "final.safetensors")
    proc = start({**spec, "pause": None, "result": result_file})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    with safe_open(result_file, framework="pt") as f:
        return {"adapter": {k: f.get_tensor(k) for k in f.keys()},
                "events": [tuple(e) for e in json.loads(f.metadata()["events"])], "log": err}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_resumes_exactly(tmp_path, uninterrupted, schedule: str, pause: list) -> dict:
    spec = {"out": str(tmp_path), "schedule": schedule, "pause": pause}
    kill_when_paused(spec)
    resumed = resume(spec)
    expected = uninterrupted[schedule]
    assert resumed["events"] == [tuple(e) for e in expected["events"]]
    assert max_diff(resumed["adapter"], expected["adapter"]) <= TOLERANCE
    return resumed


# (schedule, pause point, what it exercises)
KILLS = {
    "epochs-after-epoch-boundary-checkpoint": ("epochs", ["saved", 4]),  # saved before epoch 1's merge and inject
    "epochs-halfway-through-a-checkpoint": ("epochs", ["rng", 8]),  # checkpoint-8 incomplete: back to checkpoint-4
    "steps-inside-the-adapter-write": ("steps", ["adapter", 6]),  # checkpoint-6 has a temp file only
}


@pytest.mark.parametrize("case", KILLS)
def test_a_killed_run_resumes_exactly(tmp_path, uninterrupted, case):
    schedule, pause = KILLS[case]
    resumed = assert_resumes_exactly(tmp_path, uninterrupted, schedule, pause)
    if pause[0] in ("rng", "adapter"):  # the half-written checkpoint was skipped with a warning, then rewritten
        assert f"{tmp_path}/checkpoint-{pause[1]} is incomplete" in resumed["log"]
    checkpoints = [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]
    assert checkpoints and all(checkpoint_problem(str(tmp_path / d)) is None for d in checkpoints)
    assert all(os.path.isfile(tmp_path / d / MANIFEST_NAME) for d in checkpoints)


# --- the long randomized sweep (README, "Reliability") -------------------------------------------------------

POINTS = ("step", "saved", "adapter", "rng")


@pytest.mark.slow
def test_random_kills_resume_exactly(tmp_path, uninterrupted):
    """SWEEP_KILLS random (schedule, point, step) kills, some of them twice in a row; prints the counts."""
    rng = random.Random(int(os.environ.get("SWEEP_SEED", "13")))
    kills, exact = 0, 0
    for trial in range(int(os.environ.get("SWEEP_KILLS", "40"))):
        schedule = rng.choice(("epochs", "steps"))
        spec = {"out": str(tmp_path / f"trial-{trial}"), "schedule": schedule}
        steps = sorted(rng.sample(range(1, 16), rng.choice((1, 1, 2))))
        for step in steps:  # a second kill lands in the resumed run
            point = rng.choice(POINTS if step % (4 if schedule == "epochs" else 3) == 0 else ("step",))
            kill_when_paused({**spec, "pause": [point, step]})
            kills += 1
        resumed = resume(spec)
        expected = uninterrupted[schedule]
        same = resumed["events"] == [tuple(e) for e in expected["events"]]
        exact += same and max_diff(resumed["adapter"], expected["adapter"]) <= TOLERANCE
        assert same, (schedule, steps, resumed["events"])
    print(f"\n[sweep] kills tried: {kills}, runs: {trial + 1}, resumed exactly: {exact}")
    assert exact == trial + 1


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["epochs", "steps"])
def test_every_checkpoint_position_resumes_exactly(tmp_path, uninterrupted, schedule):
    """A checkpoint after every optimizer step; resuming from each one (in this process) ends like the
    uninterrupted run."""
    full = run({"out": str(tmp_path / "full"), "schedule": schedule, "args": {"save_steps": 1}})
    assert full["events"] == uninterrupted[schedule]["events"] and max_diff(full["adapter"], uninterrupted[schedule]["adapter"]) == 0
    positions = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path / "full") if d.startswith("checkpoint-"))
    assert positions == list(range(1, 17))
    for step in positions[:-1]:
        out = tmp_path / f"from-{step}"
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", out / f"checkpoint-{step}")
        resumed = run({"out": str(out), "schedule": schedule, "args": {"save_steps": 1}})
        assert resumed["events"] == full["events"], step
        assert max_diff(resumed["adapter"], full["adapter"]) <= TOLERANCE, step
    print(f"\n[sweep] {schedule}: resumed exactly from all {len(positions) - 1} checkpoint positions")
