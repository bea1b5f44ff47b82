"""When structure events happen (SPEC §6, the paper's eqs. 11-12).

`epochs`: with E epochs and M events, the interval is floor(E / (4M + eps)) + 1 epochs and event k happens at
the end of epoch k * interval. `steps`: event k at fractional epoch k * E / (4M), i.e. at optimizer step
k * T / (4M) of T steps, checked after every optimizer step. On the same point a merge goes before an inject.
"""

from __future__ import annotations

import math

EPS = 1e-9


def epoch_interval(num_epochs: float, count: int) -> int:
    """Eq. 11/12: floor(E / (4 * count + eps)) + 1."""
    return math.floor(num_epochs / (4 * count + EPS)) + 1


def epoch_points(num_epochs: float, count: int) -> list[int]:
    """Epochs at whose end events 1..count happen (`epochs` schedule)."""
    interval = epoch_interval(num_epochs, count) if count else 0
    return [k * interval for k in range(1, count + 1)]


def step_points(max_steps: int, count: int) -> list[int]:
    """Optimizer steps after which events 1..count happen (`steps` schedule): the first step >= k*T/(4M)."""
    return [max(1, math.ceil(k * max_steps / (4 * count) - EPS)) for k in range(1, count + 1)]


def due_events(merge_points: list[int], inject_points: list[int], merges_done: int, injects_done: int, now: float) -> list[str]:
    """Kinds of the events not yet done whose point is <= now, in time order, merges first on ties."""
    pending = [(p, 0, "merge") for p in merge_points[merges_done:]] + [(p, 1, "inject") for p in inject_points[injects_done:]]
    return [kind for p, _, kind in sorted(pending) if p <= now + EPS]
