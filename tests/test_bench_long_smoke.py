"""The issue-14 benchmarks end to end (--smoke, real CLI, real Trainer) on the tiny RoBERTa of
test_quality_smoke.py: quality.py's long preset with merge-rule variants and its run-by-run resume,
event_probe.py's event measurements, and mn_grid.py's M x N heatmap."""

from __future__ import annotations

import json

import pytest

from test_quality_smoke import NUM_BLOCKS, PNG_SIGNATURE, _run, workspace  # noqa: F401  (the fixture)


def _load(root, name: str) -> dict:
    return json.loads((root / "out" / f"{name}.json").read_text())


def test_long_preset_runs_rule_variants_on_the_epoch_schedule_and_resumes(workspace):  # noqa: F811
    root, data, model = workspace
    methods = "lor2c,imlor2c:paper/paper,imlor2c:official/official"
    result = _run("quality.py", root, data, model, "--preset", "long", "--methods", methods, "--seeds", "1", "--no_png")
    payload = _load(root, "quality_smoke")
    assert payload["preset"] == "long" and payload["hyperparameters"]["schedule"] == "epochs"
    assert payload["hyperparameters"]["epochs"] == 3  # the preset's 12, capped for the smoke run
    runs = {r["method"]: r for r in payload["runs"]}
    assert list(runs) == methods.split(",")
    for name, rule in (("imlor2c:paper/paper", "paper"), ("imlor2c:official/official", "official")):
        run = runs[name]
        assert (run["config"]["merge_criterion"], run["config"]["merge_keep"]) == (rule, rule)
        # eqs. 11-12 with E = 3, M = N = 2: interval floor(3 / 8) + 1 = 1, events at the ends of epochs 1 and 2
        assert [(e["kind"], e["epoch"]) for e in run["events"]] == [("merge", 1.0), ("inject", 1.0), ("merge", 2.0), ("inject", 2.0)]
        assert run["loss_curve"] and all(len(point) == 2 for point in run["loss_curve"])
    verdicts = payload["imlor2c_verdicts"]
    assert set(verdicts) == {"imlor2c:paper/paper", "imlor2c:official/official"}
    assert all(v["text"] in result.stdout for v in verdicts.values())

    _run("quality.py", root, data, model, "--preset", "long", "--methods", methods, "--seeds", "2", "--no_png")
    resumed = _load(root, "quality_smoke")
    assert resumed["runs"][:3] == payload["runs"]  # seed 0 kept as it was, not rerun
    assert [(r["method"], r["seed"]) for r in resumed["runs"][3:]] == [(m, 1) for m in methods.split(",")]
    assert resumed["summary"]["lor2c"]["n_seeds"] == 2

    other = _run_failing(root, data, model, "--preset", "long", "--methods", "lor2c", "--learning_rate", "1e-3")
    assert "other hyper-parameters" in other

    # one seed in another process under another name, then folded into the first file
    _run("quality.py", root, data, model, "--preset", "long", "--methods", methods, "--seed_list", "2",
         "--name", "seed2", "--no_png")
    seed2 = _load(root, "seed2")
    assert [(r["method"], r["seed"]) for r in seed2["runs"]] == [(m, 2) for m in methods.split(",")]
    combined = _run("quality.py", root, data, model, "--preset", "long", "--combine", str(root / "out" / "seed2.json"),
                    "--no_png")
    assert "added 3 run(s)" in combined.stdout
    merged = _load(root, "quality_smoke")
    assert merged["runs"][:6] == resumed["runs"] and merged["runs"][6:] == seed2["runs"]
    assert merged["seeds"] == [0, 1, 2] and merged["summary"]["lor2c"]["n_seeds"] == 3
    accs = [100 * r["accuracy"] for r in merged["runs"] if r["method"] == "lor2c"]
    assert merged["summary"]["lor2c"]["accuracy_mean"] == pytest.approx(sum(accs) / 3)
    assert "not conclusive" not in merged["imlor2c_verdicts"]["imlor2c:paper/paper"]["text"]
    again = _run("quality.py", root, data, model, "--preset", "long", "--combine", str(root / "out" / "seed2.json"),
                 "--no_png")
    assert "added 0 run(s)" in again.stdout and _load(root, "quality_smoke")["runs"] == merged["runs"]

    seed2["runs"][0]["accuracy"] += 0.5  # a file claiming another result for the same run
    (root / "out" / "seed2.json").write_text(json.dumps(seed2))
    conflict = _run_failing(root, data, model, "--preset", "long", "--combine", str(root / "out" / "seed2.json"))
    assert "lor2c seed 2 scored" in conflict
    missing = _run_failing(root, data, model, "--preset", "long", "--combine", str(root / "out" / "nothing.json"))
    assert "--combine" in missing and "does not exist" in missing


def _run_failing(root, data, model, *extra: str) -> str:
    with pytest.raises(AssertionError) as failure:
        _run("quality.py", root, data, model, *extra)
    return str(failure.value)


def test_event_probe_measures_each_event_and_the_fixed_structure(workspace):  # noqa: F811
    root, data, model = workspace
    _run("event_probe.py", root, data, model, "--variants", "imlor2c:paper/paper,fixed:imlor2c:paper/paper")
    runs = _load(root, "event_probe_smoke")["runs"]
    dynamic, fixed = runs["imlor2c:paper/paper"], runs["fixed:imlor2c:paper/paper"]
    assert [e["kind"] for e in dynamic["events"]] == ["merge", "inject", "merge", "inject"]
    for event in dynamic["events"]:
        assert {"loss", "accuracy"} <= set(event["before"])
        assert {"loss", "accuracy", "rel_logit_change", "kl_before_after", "flips"} <= set(event["after"])
        assert event["after"]["kl_before_after"] >= -1e-6 and 0 <= event["after"]["flips"] <= 1
        if event["kind"] == "merge" and not event["skipped"]:  # the other slot surviving; the merged connection off
            assert event["after_other_slot_kept"]["slot"] != event["kept_slot"]
            assert "kl_before_after" in event["after_merged_connection_off"]
    assert any(e["kind"] == "merge" and not e["skipped"] for e in dynamic["events"])
    assert fixed["events"] == [] and (fixed["spans"], fixed["injected"]) == (dynamic["spans"], dynamic["injected"])
    assert fixed["adapter_params"] == dynamic["adapter_params"]
    steps = [p["step"] for p in dynamic["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and all("b_norm_by_span" in p for p in dynamic["curve"][1:])
    again = _run("event_probe.py", root, data, model, "--variants", "imlor2c:paper/paper")
    assert "already in" in again.stdout


def test_mn_grid_runs_every_pair_and_draws_the_heatmap(workspace):  # noqa: F811
    root, data, model = workspace
    _run("mn_grid.py", root, data, model, "--grid", "0,1")
    payload = _load(root, "mn_grid_smoke")
    assert (root / "out" / "mn_grid_smoke.png").read_bytes()[:8] == PNG_SIGNATURE
    runs = payload["runs"]
    assert sorted((r["M"], r["N"]) for r in runs.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for run in runs.values():
        assert (run["config"]["num_merges"], run["config"]["num_injects"]) == (run["M"], run["N"])
        assert run["config"]["merge_criterion"] == "official"  # the grid's default rule
        assert len(run["spans"]) + len(run["injected"]) == NUM_BLOCKS - run["M"]
    best = max(runs.values(), key=lambda r: r["accuracy"])
    assert payload["best"]["accuracy_percent"] == pytest.approx(100 * best["accuracy"])
