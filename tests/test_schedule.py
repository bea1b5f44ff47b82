"""The event schedule (SPEC §6, the paper's eqs. 11-12) against cases derived by hand from the formulas."""

from __future__ import annotations

import pytest

from lor2c_hf.schedule import due_events, epoch_interval, epoch_points, step_points


# Δ = floor(E / (4M + 1e-9)) + 1, worked out by hand:
@pytest.mark.parametrize(
    ("epochs", "count", "interval"),
    [
        (30, 1, 8),  # MRPC, M=1: floor(30 / 4) = 7
        (3, 8, 1),  # LLaMA, M=8: floor(3 / 32) = 0
        (30, 4, 2),  # floor(30 / 16) = 1
        (40, 4, 3),  # STS-B, M=N=4: floor(40 / 16) = 2
        (60, 1, 15),  # SST-2: 60 / 4.000000001 is just under 15, floor 14
        (61, 1, 16),  # floor(61 / 4) = 15
        (16, 4, 1),  # E = 4M exactly: the epsilon makes floor(16 / 16.000000001) = 0, not 1
        (80, 5, 4),  # RTE, M=5: 80 / 20.000000001 just under 4, floor 3
        (17, 4, 2),  # just above 4M: floor(17 / 16) = 1
    ],
)
def test_epoch_interval_eqs_11_12(epochs, count, interval):
    assert epoch_interval(epochs, count) == interval


@pytest.mark.parametrize(
    ("epochs", "count", "points"),
    [
        (30, 1, [8]),
        (40, 4, [3, 6, 9, 12]),
        (30, 4, [2, 4, 6, 8]),
        (3, 8, [1, 2, 3, 4, 5, 6, 7, 8]),  # points past the last epoch: the callback warns they will not happen
        (80, 5, [4, 8, 12, 16, 20]),
        (10, 0, []),
    ],
)
def test_epoch_points(epochs, count, points):
    assert epoch_points(epochs, count) == points


def test_epoch_events_end_early_in_training():
    # SPEC §6: events end within roughly the first quarter to half of training. With Δ <= E/(4M) + 1 the last
    # event (M * Δ) is at most E/4 + M epochs in; when E >= 4M that is within the first half.
    for epochs in range(4, 100):
        for count in range(1, 7):
            last = epoch_points(epochs, count)[-1]
            assert last <= epochs / 4 + count, (epochs, count)
            if epochs >= 4 * count:
                assert last <= epochs / 2, (epochs, count)


@pytest.mark.parametrize(
    ("max_steps", "count", "points"),
    [
        (100, 5, [5, 10, 15, 20, 25]),  # k * 100 / 20: exact integers stay put (no off-by-one from eps)
        (16, 4, [1, 2, 3, 4]),
        (14, 2, [2, 4]),  # 1.75 -> 2, 3.5 -> 4: the first optimizer step at or after the point
        (3, 8, [1, 1, 1, 1, 1, 1, 1, 1]),  # k * 3 / 32 < 1 for every k: all after the first step
        (1170, 8, [37, 74, 110, 147, 183, 220, 256, 293]),  # LLaMA run: 1170 steps, k * 36.5625 rounded up
        (50, 0, []),
    ],
)
def test_step_points_fractional_epochs(max_steps, count, points):
    assert step_points(max_steps, count) == points


def test_step_points_are_first_step_at_or_after_k_T_over_4M():
    # Independent definition: the smallest integer s >= 1 with s >= k * T / (4M), found by scanning.
    for max_steps in (7, 12, 33, 100):
        for count in (1, 3, 4, 6):
            expected = [next(s for s in range(1, max_steps + 1) if 4 * count * s >= k * max_steps)
                        for k in range(1, count + 1)]
            assert step_points(max_steps, count) == expected, (max_steps, count)


def test_merge_goes_before_inject_on_the_same_point():
    assert due_events([2, 4], [2, 4], 0, 0, now=2) == ["merge", "inject"]
    assert due_events([2, 4], [2, 4], 1, 1, now=4) == ["merge", "inject"]


def test_due_events_in_time_order_across_kinds():
    # Catching up several points at once (e.g. all on step 1, or a late check) keeps time order, merges first on ties.
    assert due_events([1, 3], [2, 3], 0, 0, now=3) == ["merge", "inject", "merge", "inject"]
    assert due_events([4], [3], 0, 0, now=4) == ["inject", "merge"]


def test_nothing_due_before_the_first_point():
    assert due_events([5, 10], [6], 0, 0, now=4) == []
    assert due_events([], [], 0, 0, now=100) == []


def test_due_events_skip_events_already_done_after_resume():
    # A run resumed at step 7 whose checkpoint already holds 2 merges and 1 inject: only what is left and due.
    merges, injects = [2, 4, 6, 8], [3, 6, 9]
    assert due_events(merges, injects, merges_done=2, injects_done=1, now=7) == ["merge", "inject"]
    assert due_events(merges, injects, merges_done=3, injects_done=2, now=7) == []
    assert due_events(merges, injects, merges_done=3, injects_done=2, now=8) == ["merge"]
    assert due_events(merges, injects, merges_done=4, injects_done=3, now=100) == []


def test_fractional_now_for_epoch_boundaries():
    # Exactly on the point counts as due; a float a hair below it (rounding) too, within eps.
    assert due_events([2], [], 0, 0, now=2.0 - 1e-12) == ["merge"]
    assert due_events([2], [], 0, 0, now=1.99) == []
