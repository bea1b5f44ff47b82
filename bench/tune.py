"""Is LoR2C worth choosing? Each method at its own tuned learning rate, and at equal parameter budgets.

`bench/quality.py --preset long` trains every method at one learning rate (the paper's 5e-4), which answers a
narrower question than "which method should I use". Here each method picks its rate on a validation slice of the
shipped training data (rows 1000..1871 of `recipes/data/SST-2/train.tsv`, which the long preset's 1,000 training
rows do not reach), seed 0, from `--learning_rates`; then 3 seeds at the chosen rate are scored on the
872-sentence dev set, which the choice never saw. Methods: LoRA r=8 and r=4, LoR2C r=8 and r=16, IMLoR2C (the
library's default merge rule) and ShareLoR2C, so that LoR2C r=16 meets LoRA r=8, and LoRA r=4 meets LoR2C r=8,
at equal adapter parameters; and candidate options: rank-stabilised scaling (alpha / sqrt(r)), LoRA+ (B's
learning rate 16x A's), a Gaussian init of A, the connection added before the block's final LayerNorm, and
IMLoR2C under the paper's merge rule.

    python bench/tune.py --stage search --threads 1 [--part 1/2]   # the grid, on the validation slice (resumable)
    python bench/tune.py --stage choose                            # each method's best rate -> results/tune_choice.json
    python bench/tune.py --stage final --threads 1 [--part 1/2]    # 3 seeds at the chosen rates, on dev (resumable)
    python bench/tune.py --stage report                            # fold the parts, print the verdicts, draw the chart
    python bench/tune.py --stage search --rows lora --learning_rates 4e-3 --suffix _extra   # widen one row's grid
    python bench/tune.py --smoke --model_dir <tiny model> --data_dir <folder>   # every stage, a few steps

A best rate at the edge of the grid is reported as such (widen `--learning_rates`). About 6 min per run on one
core: 4 grid runs and 3 final runs a row (11 rows). Not part of CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from typing import Any, Optional, Sequence

import quality
from lor2c_hf.plotting import png_figure

# (row name, variant): the rows of the tuned table. Two candidate options: lor2c_rs, rank-stabilised scaling
# alpha / sqrt(r) (rsLoRA) at r = 8, which is LoR2C's alpha / r scaling with lora_alpha = 16 * sqrt(8) = 45.25; and
# lor2c_plus, LoRA+ (B learns 16x faster than A, PEFT's create_loraplus_optimizer, the LoRA+ paper's ratio);
# lor2c_gauss, A drawn from N(0, 1/r) instead of Kaiming-uniform. imlor2c_paper: the paper's merge rule, so that the
# default rule (chosen earlier on dev) is re-chosen on the validation slice. lor2c_ln: the connection added to the
# input of each post-LN block's final LayerNorm, LN(h + FFN(h) + s B A x), instead of after it. New rows go last:
# --part keeps earlier assignments.
METHODS = {"lora": "lora", "lora_r4": "lora@r=4", "lor2c": "lor2c", "lor2c_r16": "lor2c@r=16",
           "imlor2c": "imlor2c:official/paper", "sharelor2c": "sharelor2c", "lor2c_rs": "lor2c@lora_alpha=45.25",
           "lor2c_plus": "lor2c@loraplus_lr_ratio=16", "lor2c_gauss": "lor2c@a_init=gaussian",
           "imlor2c_paper": "imlor2c:paper/paper", "lor2c_ln": "lor2c@connection_position=before_output_norm"}
ROW_LABELS = {"lora": "LoRA r=8", "lora_r4": "LoRA r=4", "lor2c": "LoR2C r=8", "lor2c_r16": "LoR2C r=16",
              "imlor2c": "IMLoR2C (default merge rule)", "sharelor2c": "ShareLoR2C", "lor2c_rs": "LoR2C, rank-stabilised scaling",
              "lor2c_plus": "LoR2C, LoRA+ (ratio 16)", "lor2c_gauss": "LoR2C, Gaussian A", "imlor2c_paper": "IMLoR2C, paper's merge rule",
              "lor2c_ln": "LoR2C, added before the output LayerNorm"}
SHORT_LABELS = {"imlor2c": "IMLoR2C", "lor2c_rs": "rs scaling", "lor2c_plus": "LoRA+", "lor2c_gauss": "Gaussian A",
                "imlor2c_paper": "IMLoR2C, paper's rule", "lor2c_ln": "before LayerNorm"}  # the chart's point labels
CANDIDATES = ("lor2c_rs", "lor2c_plus", "lor2c_gauss", "imlor2c_paper", "lor2c_ln")  # options under test, drawn apart
LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3)
SEEDS = 3


def variant(base: str, learning_rate: float) -> str:
    return f"{METHODS[base]}@learning_rate={learning_rate:g}"


def part_of(items: list[str], part: Optional[str]) -> tuple[list[str], str]:
    """The items of `--part K/N` (every N-th, from the K-th) and the file-name suffix for it."""
    if not part:
        return items, ""
    try:
        k, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise quality.BenchError(f"--part {part!r}: expected K/N, e.g. 1/2.") from None
    if not 1 <= k <= n:
        raise quality.BenchError(f"--part {part!r}: expected 1 <= K <= N.")
    return items[k - 1::n], f"_part{k}"


def quality_argv(args: argparse.Namespace, methods: list[str], name: str, seeds: str, validation: bool) -> list[str]:
    argv = ["--preset", "long", "--methods", ",".join(methods), "--seed_list", seeds, "--name", name,
            "--output_dir", args.output_dir, "--no_png"]
    for flag in ("model_dir", "data_dir", "threads"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    if validation:
        argv += ["--validation_rows", args.validation_rows]
    return argv + (["--smoke"] if args.smoke else [])


def search_files(args: argparse.Namespace) -> list[str]:
    return sorted(glob.glob(os.path.join(args.output_dir, f"{args.prefix}search*.json")))


def validation_grids(args: argparse.Namespace) -> dict[str, dict[float, float]]:
    """Each row's validation accuracy (%) by learning rate, from every search file: the grid of `--learning_rates`
    plus any rate a row was searched at beyond it (a widened edge)."""
    grids: dict[str, dict[float, float]] = {base: {} for base in METHODS}
    row_of = {name: base for base, name in METHODS.items()}
    for path in search_files(args):
        for run in quality.read_json(path)["runs"]:
            head, _, value = run["method"].rpartition("@learning_rate=")
            if head in row_of:
                grids[row_of[head]][float(value)] = 100 * run["accuracy"]
    return grids


def choose(args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    """Each row's best rate on the validation slice, with its grid and whether it sits at the grid's edge. A row
    not yet searched at every rate of `--learning_rates` is left out (and listed), so the rows that are can go on."""
    choice: dict[str, Any] = {}
    not_searched = {}
    for base, grid in validation_grids(args).items():
        missing = [f"{r:g}" for r in rates if r not in grid]
        if missing:
            not_searched[base] = missing
            continue
        best = max(grid, key=lambda r: (grid[r], -r))  # a tie goes to the smaller rate
        choice[base] = {"learning_rate": best, "validation_accuracy": grid[best],
                        "grid": {f"{r:g}": grid[r] for r in sorted(grid)},
                        "at_edge": best in (min(grid), max(grid))}
    if not choice:
        raise quality.BenchError("--stage choose: no row has a validation run at every learning rate of "
                                 f"--learning_rates {', '.join(f'{r:g}' for r in rates)}; run --stage search "
                                 "(every --part) first.")
    if "imlor2c" in choice and "imlor2c_paper" in choice:
        rules = {b: choice[b]["validation_accuracy"] for b in ("imlor2c", "imlor2c_paper")}
        choice["merge_rule_on_validation"] = {
            "best": "official/paper (the default)" if rules["imlor2c"] >= rules["imlor2c_paper"] else "paper/paper",
            "validation_accuracy": rules}
    if not_searched:
        choice["not_searched"] = not_searched
    return choice


def standing(summary: dict[str, Any], name: str, reference: str, label: str, reference_label: str) -> Optional[dict[str, Any]]:
    """Ahead of, level with or behind: the gap of the two means against 2 standard errors of that gap (each
    side's std over its seeds / sqrt(seeds)); None when either row has not run."""
    if name not in summary or reference not in summary:
        return None
    a, b = summary[name], summary[reference]
    gap = a["accuracy_mean"] - b["accuracy_mean"]
    two_se = 2 * math.sqrt(sum((s["accuracy_std"] or 0.0) ** 2 / s["n_seeds"] for s in (a, b)))
    seeds = min(a["n_seeds"], b["n_seeds"])
    word = "ahead of" if gap > two_se else "behind" if gap < -two_se else "level with"
    if seeds < 2:
        word = "not yet comparable with"  # one seed has no spread to weigh the gap against
    text = (f"{label}, {a['adapter_params']:,d} adapter parameters, is {word} {reference_label}, "
            f"{b['adapter_params']:,d}: {quality._pm(a)} vs {quality._pm(b)} % dev accuracy, gap {gap:+.2f} points "
            f"(2 standard errors: {two_se:.2f}), {a['n_seeds']} vs {b['n_seeds']} seeds."
            + (" Fewer than 3 seeds: not final." if seeds < 3 else ""))
    return {"standing": word, "gap_points": gap, "two_standard_errors": two_se, "seeds": seeds, "text": text}


# (row, reference row, the question): the verdicts of the tuned table (labels from ROW_LABELS).
QUESTIONS = [("lor2c_r16", "lora", "equal parameters"), ("lor2c", "lora_r4", "equal parameters"),
             ("lor2c", "lora", "half of LoRA's parameters"), ("imlor2c", "lor2c", "IMLoR2C's events against none"),
             ("lor2c_rs", "lor2c", "the scaling option"), ("lor2c_plus", "lor2c", "the LoRA+ option"),
             ("lor2c_gauss", "lor2c", "the init option"), ("imlor2c", "imlor2c_paper", "the merge rule"),
             ("lor2c_ln", "lor2c", "the LayerNorm placement")]


def verdicts(summary: dict[str, Any], rates: dict[str, float]) -> list[dict[str, Any]]:
    """The sentences a user needs, each with the rates and budget it holds for."""
    out = []
    for a, b, what in QUESTIONS:
        if a not in rates or b not in rates:
            continue
        v = standing(summary, variant(a, rates[a]), variant(b, rates[b]), f"{ROW_LABELS[a]} (lr {rates[a]:g})",
                     f"{ROW_LABELS[b]} (lr {rates[b]:g})")
        if v:
            out.append({"question": what, "method": a, "reference": b, **v})
    return out


def plot_tuned(payload: dict[str, Any], rates: dict[str, float], path: str) -> None:
    """Dev accuracy against adapter parameters, each row at its tuned rate, mean ± std over its seeds. Rows of one
    size are spread a little sideways so their error bars do not hide each other."""
    summary = payload["summary"]
    rows = [b for b in METHODS if b in rates and variant(b, rates[b]) in summary]
    seeds = sorted({summary[variant(b, rates[b])]["n_seeds"] for b in rows})
    title = (f"SST-2 dev accuracy, {payload['model']['name']}, {quality.budget(quality.HParams(**payload['hyperparameters']))}"
             f" of 1,000 sentences;\neach row at the learning rate (in brackets) it chose on a validation slice; mean ± std over "
             f"{'/'.join(map(str, seeds))} seed(s)")
    with png_figure(path, "tune.plot_tuned", figsize=(9.5, 5.2)) as (fig, ax):
        from matplotlib.ticker import FuncFormatter

        by_size: dict[int, list[str]] = {}
        for b in rows:
            by_size.setdefault(summary[variant(b, rates[b])]["adapter_params"], []).append(b)
        for size, group in by_size.items():
            for k, b in enumerate(group):
                s = summary[variant(b, rates[b])]
                x = size * (1 + 0.015 * (k - (len(group) - 1) / 2))
                style = (("s", "#c05621") if quality.method_of(METHODS[b]) == "lora" else
                         ("^", "#718096") if b in CANDIDATES else ("o", "#2b6cb0"))
                ax.errorbar([x], [s["accuracy_mean"]], yerr=[s["accuracy_std"] or 0.0], fmt=style[0], color=style[1], capsize=4)
                ax.annotate(f"{SHORT_LABELS.get(b, ROW_LABELS[b])} ({rates[b]:g})", (x, s["accuracy_mean"]),
                            textcoords="offset points", xytext=(5, 2), fontsize=7, color=style[1])
        ax.set_xscale("log")
        low, top = ax.get_ylim()
        middle = (low + top) / 2
        ax.set_ylim(min(low, middle - 1.5), max(top, middle + 1.5))  # at least 3 points tall: one seed has no bar
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "2345" else ""))
        ax.tick_params(axis="x", which="both", labelsize=7)
        left, right = ax.get_xlim()
        ax.set_xlim(left / 1.05, right * 1.5)  # room for the labels
        ax.set_xlabel("trainable adapter parameters (log scale)")
        ax.set_ylabel("SST-2 dev accuracy %")
        ax.plot([], [], "s", color="#c05621", label="PEFT LoRA (q, v)")
        ax.plot([], [], "o", color="#2b6cb0", label="LoR2C family")
        ax.plot([], [], "^", color="#718096", label="LoR2C options under test")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=9)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("search", "choose", "final", "report", "all"), default="all",
                        help="all: every stage in one process (hours on the real model; minutes with --smoke).")
    parser.add_argument("--learning_rates", default=",".join(f"{r:g}" for r in LEARNING_RATES))
    parser.add_argument("--validation_rows", default=None, help="START:END of train.tsv (default 1000:1872; --smoke 64:96).")
    parser.add_argument("--rows", default=None,
                        help=f"Comma-separated rows to search or run (default all: {', '.join(METHODS)}).")
    parser.add_argument("--part", default=None, help="K/N: this process runs every N-th run (of --rows) from the K-th.")
    parser.add_argument("--suffix", default=None,
                        help="This process's result file is tune_<stage><suffix>.json (default: _partK from --part, else none). "
                             "Two processes must not share one.")
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output_dir", default=quality.RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="Seeds of the final table (0, 1, ...).")
    parser.add_argument("--smoke", action="store_true", help="A few steps on little data: checks the script only.")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: expected at least 1.")
    rows = [r.strip() for r in (args.rows or ",".join(METHODS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in METHODS]
    if unknown or not rows:
        parser.error(f"--rows {args.rows!r}: unknown row(s) {unknown}; expected some of {', '.join(METHODS)}.")
    if args.suffix is not None and not re.fullmatch(r"[A-Za-z0-9_.-]*", args.suffix):
        parser.error(f"--suffix {args.suffix!r}: expected letters, digits, '_', '-' or '.' (it goes into a file name).")
    args.prefix = "tune_smoke_" if args.smoke else "tune_"
    args.validation_rows = args.validation_rows or ("64:96" if args.smoke else "1000:1872")
    try:
        rates = sorted({float(x) for x in args.learning_rates.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--learning_rates {args.learning_rates!r}: expected comma-separated numbers.")
    if not rates or min(rates) <= 0:
        parser.error(f"--learning_rates {args.learning_rates!r}: expected positive numbers.")
    choice_path = os.path.join(args.output_dir, f"{args.prefix}choice.json")
    final_name = f"{args.prefix}final"

    if args.stage in ("search", "all"):
        runs, suffix = part_of([variant(b, r) for b in METHODS if b in rows for r in rates], args.part)
        suffix = suffix if args.suffix is None else args.suffix
        quality.main(quality_argv(args, runs, f"{args.prefix}search{suffix}", "0", validation=True))
    if args.stage in ("choose", "all"):
        choice = choose(args, rates)
        quality.write_json(choice_path, {"learning_rates": rates, "validation_rows": args.validation_rows,
                                         "choice": choice})
        for base, c in choice.items():
            if base == "not_searched":
                print(f"tune: not searched at every rate yet (left out): {c}")
                continue
            if base not in METHODS:
                print(f"tune: {base}: {c['best']} ({c['validation_accuracy']})")
                continue
            edge = "  (AT THE GRID'S EDGE: widen --learning_rates)" if c["at_edge"] else ""
            print(f"tune: {base:11s} lr {c['learning_rate']:g}  validation {c['validation_accuracy']:.2f}%{edge}")
    if args.stage in ("final", "all", "report"):
        if not os.path.isfile(choice_path):
            parser.error(f"--stage {args.stage}: {choice_path} does not exist; run --stage choose first.")
        chosen = {b: c["learning_rate"] for b, c in quality.read_json(choice_path)["choice"].items() if b in METHODS}
        methods = [variant(b, chosen[b]) for b in METHODS if b in chosen]
    if args.stage in ("final", "all"):
        unchosen = [b for b in rows if b not in chosen]
        if args.rows and unchosen:
            parser.error(f"--rows: {', '.join(unchosen)} has no chosen learning rate in {choice_path} "
                         "(search it at every rate, then --stage choose).")
        mine, suffix = part_of([variant(b, chosen[b]) for b in METHODS if b in chosen and b in rows], args.part)
        suffix = suffix if args.suffix is None else args.suffix
        quality.main(quality_argv(args, mine, f"{final_name}{suffix}", ",".join(map(str, range(args.seeds))), validation=False))
    if args.stage in ("report", "all"):
        parts = sorted(glob.glob(os.path.join(args.output_dir, f"{final_name}_*.json")))
        if parts:
            quality.main(quality_argv(args, methods, final_name, "0", validation=False) + ["--combine", *parts])
        final_path = os.path.join(args.output_dir, f"{final_name}.json")
        payload = quality.read_json(final_path)
        payload["runs"] = [r for r in payload["runs"] if r["method"] in methods]  # a rate no longer chosen is not a row
        payload["methods"] = [m for m in methods if any(r["method"] == m for r in payload["runs"])]
        payload["summary"] = quality.summarize(payload["runs"], payload["methods"])
        payload["tuned_verdicts"] = verdicts(payload["summary"], chosen)
        payload["tuned_learning_rates"] = chosen
        quality.write_json(final_path, payload)
        png = os.path.join(args.output_dir, f"{final_name}.png")
        plot_tuned(payload, chosen, png)
        print(f"tune: wrote {final_path} and {png}")
        for v in payload["tuned_verdicts"]:
            print(f"tune: {v['question']}: {v['text']}")
    return 0


if __name__ == "__main__":
    quality.run_cli(main)
