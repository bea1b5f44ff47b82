"""bench/report.py renders the README's quality tables from the committed benchmark JSON: the README must hold
exactly what the files render to, and a changed number in a file must show up as a stale README block."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import report  # noqa: E402

README = os.path.join(REPO, "README.md")
BENCHMARKS = os.path.join(REPO, "docs", "benchmarks.md")  # the full tables; the README holds the short one
BENCH_README = os.path.join(REPO, "bench", "README.md")


def test_readme_blocks_are_what_the_committed_json_renders_to(capsys):
    assert report.main(["--check", README, BENCHMARKS, BENCH_README]) == 0, capsys.readouterr().err


def test_long_table_means_and_stds_are_the_runs_own(tmp_path):
    payload = json.loads(open(os.path.join(report.RESULTS, "quality_long.json"), encoding="utf-8").read())
    block = report.quality_long(payload)
    for method in ("lora", "lor2c"):
        accs = [100 * r["accuracy"] for r in payload["runs"] if r["method"] == method]
        expected = f"{statistics.fmean(accs):.2f}" + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
        row = next(line for line in block.splitlines()
                   if line.startswith(f"| {report.label(method, {}, payload['hyperparameters'])} |"))
        assert f"| {expected} | {len(accs)} of " in row


def test_tuned_verdicts_in_the_readme_are_the_runs_own():
    """The README's three tuned sentences, recomputed here from tune_final.json's runs at the rates tune_choice.json
    chose on the validation slice (which that file's own grid must hold as its best): means, stds, gaps, 2 SE."""
    final = json.loads(open(os.path.join(report.RESULTS, "tune_final.json"), encoding="utf-8").read())
    choice = json.loads(open(os.path.join(report.RESULTS, "tune_choice.json"), encoding="utf-8").read())["choice"]
    readme = open(README, encoding="utf-8").read()
    block = report.pattern("tuned_summary").search(readme).group(1)
    rows = {"lora": "lora", "lora_r4": "lora@r=4", "lor2c": "lor2c", "lor2c_r16": "lor2c@r=16", "imlor2c": "imlor2c:official/paper"}
    stats = {}
    for row, name in rows.items():
        grid = {float(r): a for r, a in choice[row]["grid"].items()}
        assert choice[row]["learning_rate"] == max(grid, key=lambda r: (grid[r], -r))  # chosen on validation, not dev
        accs = [100 * r["accuracy"] for r in final["runs"] if r["method"] == f"{name}@learning_rate={choice[row]['learning_rate']:g}"]
        if not accs:
            assert f"{report.TUNED_LABELS[row]} against" in block or f"against {report.TUNED_LABELS[row]}" in block  # "not run yet"
            continue
        stats[row] = (statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs))
    pairs = [(a, b) for a, b in (("lor2c_r16", "lora"), ("lor2c", "lora_r4"), ("lor2c", "lora"), ("imlor2c", "lor2c"))
             if a in stats and b in stats]
    assert pairs
    for a, b in pairs:
        (ma, sa, na), (mb, sb, nb) = stats[a], stats[b]
        assert f"{ma:.2f}" in block and f"{mb:.2f}" in block
        gap, two_se = ma - mb, 2 * (sa ** 2 / na + sb ** 2 / nb) ** 0.5
        word = "ahead of" if gap > two_se else "behind" if gap < -two_se else "level with"
        word = word if min(na, nb) > 1 else "not yet comparable with"
        assert f"**{word}** " in block and f"gap {gap:+.2f} points (2 standard errors {two_se:.2f}" in block


def test_a_changed_number_makes_the_readme_block_stale(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    path = results / "quality_long.json"
    payload = json.loads(path.read_text())
    run = next(r for r in payload["runs"] if r["method"] == "lor2c")
    run["accuracy"] -= 0.05
    path.write_text(json.dumps(payload))
    readme, summary = tmp_path / "benchmarks.md", tmp_path / "README.md"
    shutil.copy(BENCHMARKS, readme)
    shutil.copy(README, summary)
    files = [str(readme), str(summary)]
    assert report.main(["--results", str(results), "--check", *files]) == 1
    err = capsys.readouterr().err
    assert "benchmarks.md: block(s) quality_long differ" in err and "README.md: block(s) quality_summary differ" in err
    assert report.main(["--results", str(results), "--write", *files]) == 0
    assert report.main(["--results", str(results), "--check", *files]) == 0
    text = readme.read_text()
    assert text != open(BENCHMARKS, encoding="utf-8").read()
    outside = report.pattern("quality_long").sub("", text)
    assert outside == report.pattern("quality_long").sub("", open(BENCHMARKS, encoding="utf-8").read())  # nothing else moved


def test_a_block_deleted_from_every_file_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(report.pattern("quality_summary").sub("", open(README, encoding="utf-8").read())
                      + "\n<!-- report:mn_grid -->\n<!-- /report:mn_grid -->\n")
    with pytest.raises(report.quality.BenchError, match="report:quality_summary"):
        report.main(["--check", str(readme), BENCHMARKS])


def test_a_readme_without_the_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no blocks here\n")
    with pytest.raises(report.quality.BenchError, match="report:quality_long"):
        report.main(["--check", str(readme)])
