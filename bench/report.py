"""The README's quality tables, rendered from the JSON files the benchmarks wrote, so that its numbers are the files'.

Each table sits in README.md, docs/benchmarks.md or bench/README.md between `<!-- report:NAME -->` and
`<!-- /report:NAME -->`; a CI test fails when a block differs from what the committed JSON renders to, or when a
block is in none of the files (edit the JSON's script run, never the numbers by hand).

    python bench/report.py                       # print every block
    python bench/report.py --write README.md docs/benchmarks.md bench/README.md    # rewrite the blocks in place
    python bench/report.py --check README.md docs/benchmarks.md bench/README.md    # exit 1, naming those that differ
    python bench/report.py --plots               # redraw quality*.png from the committed JSON

Blocks: `quality_long` (`results/quality_long.json`: the table, mean ± std over seeds, and the verdicts),
`quality_summary` (the README's short table from the same file),
`quality_quick` (`results/quality.json` beside `results/quality_lr2e-3.json`), `mn_grid` (`results/mn_grid.json`), and
`tuned` / `tuned_summary` (`bench/tune.py`'s `results/tune_final.json` with `results/tune_choice.json`: each method at
the learning rate it chose on a validation slice, and the verdicts).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import quality
import tune
from lor2c_hf import LoR2CConfig
from lor2c_hf.extras.mn_heatmap import best_mn
from mn_grid import grid_scores as mn_grid_scores

RESULTS = quality.RESULTS_DIR
BASE_LABELS = {"lora": "PEFT LoRA (q, v)", "lor2c": "LoR2C", "sharelor2c": "ShareLoR2C", "reslora": "ResLoRA (ms, p=4)",
               "imlor2c": "IMLoR2C", "mergelor2c": "MergeLoR2C", "injectlor2c": "InjectLoR2C"}
DEFAULT_RULE = (LoR2CConfig().merge_criterion, LoR2CConfig().merge_keep)
RULE_TAGS = {DEFAULT_RULE: "the default", ("official", "official"): "the authors' code", ("paper", "paper"): "the paper's text"}
WHOSE = {"paper": "paper's", "official": "code's"}
# Rows of the long table: the peers, the single-mechanism variants, then IMLoR2C's four merge rules, default first.
LONG_ORDER = ("lora", "lor2c", "sharelor2c", "reslora", "injectlor2c", "mergelor2c:official/paper", "mergelor2c",
              "imlor2c:official/paper", "imlor2c:official/official", "imlor2c:paper/official", "imlor2c:paper/paper")


def rate(value: float) -> str:
    """A learning rate as people write it: 0.0005 -> 5e-4, 0.00025 -> 2.5e-4."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def label(name: str, entry: dict[str, Any], hp: dict[str, Any]) -> str:
    """A reader's name for a method or merge-rule variant: `imlor2c:official/paper` -> IMLoR2C, code's pair, ..."""
    method, *fields = name.split("@")
    method = method.partition(":")[0]
    text = BASE_LABELS.get(method, method)
    if fields:  # a variant's own hyper-parameters: lora@r=4@learning_rate=0.001 -> LoRA [r=4, lr 1e-3]
        shown = [f"lr {rate(float(v))}" if k == "learning_rate" else f"{k}={v}"
                 for k, _, v in (item.partition("=") for item in fields)]
        text += f" [{', '.join(shown)}]"
    if method == "mergelor2c":
        text += f" (M={hp['num_merges']})"
    if method == "injectlor2c":
        text += f" (N={hp['num_injects']})"
    rule = entry.get("merge_rule")
    if rule and method in ("imlor2c", "mergelor2c"):
        criterion, keep = rule.split("/")
        text += f", {WHOSE[criterion]} pair, {WHOSE[keep]} survivor"
        tag = RULE_TAGS.get((criterion, keep))
        if tag:
            text += f" ({tag})"
    return text


def structure(run: dict[str, Any]) -> str:
    """The trained structure of one run: its spans once any event happened, and the blocks LoRA was injected into."""
    if not run.get("events"):
        return "-"
    text = "spans " + " ".join(f"[{a}, {b}]" for a, b in run["spans"])
    if run.get("injected"):
        text += ", LoRA on blocks " + ", ".join(map(str, run["injected"]))
    return text


def structures(runs: list[dict[str, Any]]) -> str:
    """Each distinct final structure with the seeds that reached it."""
    seen: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        seen.setdefault(structure(run), []).append(run["seed"])
    if len(seen) == 1:
        return next(iter(seen))
    return "; ".join(f"{s} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" for s, seeds in seen.items())


def pm(entry: Optional[dict[str, Any]]) -> str:
    if not entry:
        return "not run"
    std = entry["accuracy_std"]
    return f"{entry['accuracy_mean']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def verdict_line(name: str, reference: str, verdict: dict[str, Any], summary: dict[str, Any], hp: dict[str, Any]) -> str:
    a, b = summary[name], summary[reference]
    ref = "LoRA" if reference == "lora" else label(reference, b, hp)
    return (f"- {label(name, a, hp)} ({a['adapter_params'] / b['adapter_params']:.2f}x {ref}'s "
            f"parameters) vs {ref}: **{'matches' if verdict['matches'] else 'does not match'}**, "
            f"{pm(a)} vs {pm(b)}, gap {verdict['gap_points']:+.2f} points (tolerance {verdict['tolerance_points']:.2f}), "
            f"{a['n_seeds']} vs {b['n_seeds']} seeds.")


def quality_long(payload: dict[str, Any]) -> str:
    """The long-budget table and its verdicts, recomputed from the runs (not read from the file's own summary)."""
    hp, runs = payload["hyperparameters"], payload["runs"]
    summary = quality.summarize(runs, payload["methods"])
    planned = len(payload["seeds"]) if len(payload["seeds"]) >= 3 else 3
    lines = ["| method | adapter params | x LoRA | dev accuracy % (mean ± std) | seeds | final structure | training loss (mean) |",
             "|---|---|---|---|---|---|---|"]
    names = [m for m in LONG_ORDER if m in payload["methods"]] + [m for m in payload["methods"] if m not in LONG_ORDER]
    for name in names:
        mine = [r for r in runs if r["method"] == name]
        if not mine:
            lines.append(f"| {label(name, {'merge_rule': name.partition(':')[2] or None}, hp)} | | | not run yet | "
                         f"0 of {planned} | | |")
            continue
        s = summary[name]
        ratio = f"{s['params_vs_lora']:.2f}" if s["params_vs_lora"] is not None else "-"
        loss = sum(r["train_loss"] for r in mine) / len(mine)
        lines.append(f"| {label(name, s, hp)} | {s['adapter_params']:,d} | {ratio} | {pm(s)} | {s['n_seeds']} of {planned} | "
                     f"{structures(mine)} | {loss:.3f} |")
    lines += ["", "Verdicts (the script's rule: \"matches\" when the mean is no more than max(1 point, 2 standard errors "
              "of the gap) below the reference's):", ""]
    verdict = quality.lor2c_verdict(summary)
    if verdict:
        lines.append(verdict_line("lor2c", "lora", verdict, summary, hp))
    verdicts = quality.imlor2c_verdicts(summary)
    for name in sorted(verdicts, key=lambda n: LONG_ORDER.index(n) if n in LONG_ORDER else len(LONG_ORDER)):
        lines.append(verdict_line(name, "lor2c", verdicts[name], summary, hp))
    return "\n".join(lines)


SUMMARY_ORDER = ("lora", "reslora", "lor2c", "injectlor2c", "mergelor2c:official/paper", "imlor2c:official/paper", "sharelor2c")


def quality_summary(payload: dict[str, Any]) -> str:
    """The README's short table: each method once, at its default merge rule, from the long benchmark."""
    hp, summary = payload["hyperparameters"], quality.summarize(payload["runs"], payload["methods"])
    lines = ["| method | adapter params | x LoRA | SST-2 dev accuracy % (mean ± std, 3 seeds) |", "|---|---|---|---|"]
    for name in (m for m in SUMMARY_ORDER if m in summary):
        s = summary[name]
        text = label(name, s, hp).replace(", code's pair, paper's survivor (the default)", "")
        lines.append(f"| {text} | {s['adapter_params']:,d} | {s['params_vs_lora']:.2f} | {pm(s)} |")
    return "\n".join(lines)


def quality_quick(first: dict[str, Any], second: dict[str, Any]) -> str:
    """The quick benchmark at two learning rates, one column each, rows in the first file's order."""
    rates = [rate(p["hyperparameters"]["learning_rate"]) for p in (first, second)]
    summaries = [quality.summarize(p["runs"], p["methods"]) for p in (first, second)]
    names = list(first["methods"]) + [m for m in second["methods"] if m not in first["methods"]]
    lines = [f"| method | adapter params | x LoRA | accuracy %, lr {rates[0]} | accuracy %, lr {rates[1]} |",
             "|---|---|---|---|---|"]
    for name in names:
        entry = summaries[0].get(name) or summaries[1].get(name)
        if not entry:
            continue
        ratio = f"{entry['params_vs_lora']:.2f}" if entry["params_vs_lora"] is not None else "-"
        lines.append(f"| {label(name, entry, first['hyperparameters'])} | {entry['adapter_params']:,d} | {ratio} | "
                     f"{pm(summaries[0].get(name))} | {pm(summaries[1].get(name))} |")
    return "\n".join(lines)


def mn_grid(payload: dict[str, Any]) -> str:
    """The M x N accuracy grid (the paper's Fig. 6) with its best cell in bold."""
    grid, scores = payload["grid"], mn_grid_scores(payload["runs"])
    best = best_mn(scores)
    lines = ["| M \\ N | " + " | ".join(map(str, grid)) + " |", "|---" * (len(grid) + 1) + "|"]
    for m in grid:
        cells = []
        for n in grid:
            value = scores.get((m, n))
            cells.append("-" if value is None else (f"**{value:.2f}**" if (m, n) == best else f"{value:.2f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TUNED_LABELS = tune.ROW_LABELS


def tuned_rows(final: dict[str, Any], choice: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """(summary recomputed from the runs, each row's chosen rate, the verdicts recomputed) of the tuned table."""
    rates = {b: c["learning_rate"] for b, c in choice["choice"].items() if b in tune.METHODS}
    names = [tune.variant(b, r) for b, r in rates.items()]
    summary = quality.summarize([r for r in final["runs"] if r["method"] in names], names)
    return summary, rates, {(v["method"], v["reference"]): v for v in tune.verdicts(summary, rates)}


def tuned(final: dict[str, Any], choice: dict[str, Any]) -> str:
    """The tuned table: each row at the rate it chose on the validation slice, scored on dev; then every verdict."""
    summary, rates, verdicts = tuned_rows(final, choice)
    grid_rates = sorted({float(r) for c in choice["choice"].values() if "grid" in c for r in c["grid"]})
    lines = ["| row | adapter params | validation accuracy % at " + " / ".join(rate(r) for r in grid_rates)
             + " | chosen lr | dev accuracy % (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    for base in tune.METHODS:
        c = choice["choice"].get(base)
        if not c:
            lines.append(f"| {TUNED_LABELS[base]} | | not searched yet | | | |")
            continue
        cells = " / ".join(f"**{c['grid'][f'{r:g}']:.2f}**" if r == c["learning_rate"] else
                           (f"{c['grid'][f'{r:g}']:.2f}" if f"{r:g}" in c["grid"] else "-") for r in grid_rates)
        s = summary.get(tune.variant(base, c["learning_rate"]))
        params = f"{s['adapter_params']:,d}" if s else ""
        edge = " (grid's edge)" if c["at_edge"] else ""
        lines.append(f"| {TUNED_LABELS[base]} | {params} | {cells} | {rate(c['learning_rate'])}{edge} | {pm(s)} | "
                     f"{s['n_seeds'] if s else 0} of 3 |")
    lines += ["", "Verdicts (\"ahead\" or \"behind\" when the gap of the means exceeds 2 standard errors of the gap, "
              "else \"level\"):", ""]
    lines += [f"- {v['question']}: {v['text']}" for v in verdicts.values()]
    return "\n".join(lines)


def tuned_summary(final: dict[str, Any], choice: dict[str, Any]) -> str:
    """The README's three sentences: equal parameters, half the parameters, IMLoR2C's events."""
    summary, rates, verdicts = tuned_rows(final, choice)

    def side(base: str) -> str:
        s = summary[tune.variant(base, rates[base])]
        return f"{TUNED_LABELS[base].split(' (')[0]} ({s['adapter_params']:,d} params, lr {rate(rates[base])}: {pm(s)} %)"

    def said(a: str, b: str) -> str:
        v = verdicts.get((a, b))
        if not v:
            return f"{TUNED_LABELS[a]} against {TUNED_LABELS[b]}: not run yet"
        final_ = "" if v["seeds"] >= 3 else f", only {v['seeds']} seed(s) so far"
        return (f"{side(a)} is **{v['standing']}** {side(b)}, gap {v['gap_points']:+.2f} points "
                f"(2 standard errors {v['two_standard_errors']:.2f}{final_})")

    return "\n".join([
        f"- **At equal parameters**: {said('lor2c_r16', 'lora')}; and {said('lor2c', 'lora_r4')}.",
        f"- **At half the parameters**: {said('lor2c', 'lora')}.",
        f"- **IMLoR2C's merge and inject events**: {said('imlor2c', 'lor2c')}."])


def read(name: str, results: str) -> dict[str, Any]:
    return quality.read_json(os.path.join(results, f"{name}.json"))


BLOCKS: dict[str, Callable[[str], str]] = {
    "quality_long": lambda results: quality_long(read("quality_long", results)),
    "quality_summary": lambda results: quality_summary(read("quality_long", results)),
    "quality_quick": lambda results: quality_quick(read("quality", results), read("quality_lr2e-3", results)),
    "mn_grid": lambda results: mn_grid(read("mn_grid", results)),
    "tuned": lambda results: tuned(read("tune_final", results), read("tune_choice", results)),
    "tuned_summary": lambda results: tuned_summary(read("tune_final", results), read("tune_choice", results)),
}


PLOTTED = ("quality", "quality_lr2e-3", "quality_long")  # the JSON files whose PNG `--plots` redraws


def pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- report:{name} -->\n(.*?)\n?<!-- /report:{name} -->", re.S)


def render(results: str = RESULTS) -> dict[str, str]:
    return {name: make(results) for name, make in BLOCKS.items()}


def rewrite(text: str, blocks: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """`text` with every block it holds replaced, the names of those that changed, and the names it holds."""
    changed, found_names = [], []
    for name, body in blocks.items():
        found = pattern(name).search(text)
        if not found:
            continue
        found_names.append(name)
        if found.group(1) != body:
            changed.append(name)
        text = text[:found.start()] + f"<!-- report:{name} -->\n{body}\n<!-- /report:{name} -->" + text[found.end():]
    return text, changed, found_names


def check_coverage(found: dict[str, list[str]], blocks: dict[str, str]) -> None:
    """Every file holds at least one block, and every block is in one of the files (none was deleted)."""
    for path, names in found.items():
        if not names:
            raise quality.BenchError(f"{path} holds no <!-- report:NAME --> block (expected some of: "
                                     f"{', '.join(f'report:{n}' for n in blocks)}).")
    missing = [n for n in blocks if not any(n in names for names in found.values())]
    if missing:
        raise quality.BenchError(f"no <!-- report:{missing[0]} --> ... <!-- /report:{missing[0]} --> block in "
                                 f"{', '.join(found)}.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=RESULTS, help="Folder of the benchmark JSON files.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", nargs="+", metavar="MARKDOWN", help="Rewrite the blocks of these files in place.")
    group.add_argument("--check", nargs="+", metavar="MARKDOWN", help="Exit 1 when a block of these files differs from the JSON.")
    group.add_argument("--plots", action="store_true", help="Redraw the quality PNGs from their JSON (no training).")
    args = parser.parse_args(argv)
    if args.plots:
        for name in PLOTTED:
            payload = read(name, args.results)
            path = os.path.join(args.results, f"{name}.png")
            quality.plot(quality.summarize(payload["runs"], payload["methods"]), path,
                         quality.plot_title(payload, payload["model"]["name"]), quality.readable_labels(payload))
            print(f"wrote {path}")
        return 0
    blocks = render(args.results)
    if not (args.write or args.check):
        for name, body in blocks.items():
            print(f"<!-- report:{name} -->\n{body}\n<!-- /report:{name} -->\n")
        return 0
    status, found = 0, {}
    for path in args.write or args.check:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, changed, found[path] = rewrite(text, blocks)
        if args.check:
            if changed:
                print(f"{path}: block(s) {', '.join(changed)} differ from {args.results}; run python bench/report.py "
                      f"--write {path}", file=sys.stderr)
                status = 1
            else:
                print(f"{path}: every block matches {args.results}")
            continue
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, path)
        print(f"{path}: rewrote {', '.join(changed) or 'nothing (already current)'}")
    check_coverage(found, blocks)
    return status


if __name__ == "__main__":
    quality.run_cli(main)
