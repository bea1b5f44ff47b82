"""Timing and reporting shared by the bench/ scripts: interleaved medians, environment, atomic JSON."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch


def synchronize(device: str) -> None:
    """Wait for queued GPU work so a timer measures it."""
    if device == "cuda":
        torch.cuda.synchronize()


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": median, "q1": q1, "q3": q3}


class ElapsedElsewhere(NamedTuple):
    """What a callable returns when its work ran in another process: that process's wall and CPU seconds."""

    wall: float
    cpu: float


def interleaved_timing(runs: dict[str, Callable[[], object]], warmup: int, repeats: int,
                       device: str) -> dict[str, dict]:
    """Run every callable `warmup + repeats` times, one of each per round in a rotating order.

    Returns wall-clock and process CPU-time quartiles per callable. On a shared CPU the CPU time (with one
    thread) is the steadier measure of the work done; the wall clock is what a user waits. A callable that
    runs its work in another process returns an `ElapsedElsewhere`, which is used instead of this process's
    clocks; any other return value is ignored.
    """
    names = list(runs)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # collect between calls, never inside a timed one
    try:
        for round_ in range(warmup + repeats):
            k = round_ % len(names)
            for name in names[k:] + names[:k]:
                gc.collect()
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                measured = runs[name]()
                synchronize(device)
                elapsed = (time.perf_counter() - start, time.process_time() - start_cpu)
                if round_ >= warmup:
                    wall_s, cpu_s = measured if isinstance(measured, ElapsedElsewhere) else elapsed
                    wall[name].append(wall_s)
                    cpu[name].append(cpu_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: {"wall": quartiles(wall[n]), "cpu": quartiles(cpu[n]), "n": len(wall[n])} for n in names}


def write_json(result: dict, path: str, indent: int = 2) -> None:
    """Write `result` to `path` atomically (a partial file never replaces a previous result)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def cuda_step_memory(step: Callable[[], object]) -> tuple[int, int]:
    """(bytes allocated before `step`, peak bytes allocated during it): the peak a step adds is their difference."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return before, torch.cuda.max_memory_allocated()


def environment(device: str, packages: tuple[str, ...] = ("transformers", "peft")) -> dict:
    """Versions and machine facts to store beside the numbers (load average: how shared the machine was).

    A package in `packages` that is not installed is left out (read from its metadata, so nothing is imported).
    """
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    env.update({p: v for p, v in package_versions(packages).items() if v is not None})
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def print_targets(targets: list[dict]) -> None:
    """The benchmark's target checks, one line each (`what`, `value`, `target`, `met`, `miss_by`)."""
    print("\nTargets")
    for c in targets:
        verdict = "met" if c["met"] else f"MISSED by {c['miss_by']:.3f}"
        print(f"  {c['what']:42s} {c['value']:.3f} (target {c['target']}): {verdict}")


RECORD_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "lor2c-hf")


def git_state(repo: str) -> dict[str, Optional[object]]:
    """The checkout's commit and whether tracked files (results aside) differ from it (None outside a checkout)."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    # the benchmarks' own results are left out: a resumed run rewrites them
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results") if commit else None
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def files_sha256(paths: Sequence[str]) -> str:
    """One SHA-256 over the files' names and bytes, in the given order: the data a run read."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def package_versions(packages: Sequence[str]) -> dict[str, Optional[str]]:
    """Each package's installed version (None when absent), read from its metadata, so nothing is imported."""
    versions: dict[str, Optional[str]] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run_record(repo: str, data_sha256: str) -> dict:
    """What reproduces a run: code commit (dirty or not), package versions, thread count, data checksum (the
    caller's `files_sha256` of what it read), command."""
    return {**git_state(repo), "versions": package_versions(RECORD_PACKAGES), "threads": torch.get_num_threads(),
            "data_sha256": data_sha256,
            "command": [os.path.relpath(sys.argv[0], repo) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]}
