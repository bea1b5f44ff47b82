"""Is LoR2C worth choosing? Each method at its own tuned learning rate, and at equal parameter budgets.

`bench/quality.py --preset long` trains every method at one learning rate (the paper's 5e-4), which answers a
narrower question than "which method should I use". Here each method picks its rate on a validation slice of the
shipped training data (rows 1000..1871 of `recipes/data/SST-2/train.tsv`, which the long preset's 1,000 training
rows do not reach), seed 0, from `--learning_rates`; then 3 seeds at the chosen rate are scored on the
872-sentence dev set, which the choice never saw. Methods: LoRA r=8 and r=4, LoR2C r=8 and r=16, IMLoR2C (the
library's default merge rule) and ShareLoR2C, so that LoR2C r=16 meets LoRA r=8, and LoRA r=4 meets LoR2C r=8,
at equal adapter parameters; and three candidate options: rank-stabilised scaling (alpha / sqrt(r)),
LoRA+ (B's learning rate 16x A's) and a Gaussian init of A.

    python bench/tune.py --stage search --threads 1 [--part 1/2]   # the grid, on the validation slice (resumable)
    python bench/tune.py --stage choose                            # each method's best rate -> results/tune_choice.json
    python bench/tune.py --stage final --threads 1 [--part 1/2]    # 3 seeds at the chosen rates, on dev (resumable)
    python bench/tune.py --stage report                            # fold the parts, print the verdicts
    python bench/tune.py --smoke --model_dir <tiny model> --data_dir <folder>   # every stage, a few steps

A best rate at the edge of the grid is reported as such (widen `--learning_rates`). About 10 min per run on one
core: the grid is 40 runs, the final table 30. Not part of CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Optional, Sequence

import quality

# (row name, variant): the rows of the tuned table. Two candidate options: lor2c_rs, rank-stabilised scaling
# alpha / sqrt(r) (rsLoRA) at r = 8, which is LoR2C's alpha / r scaling with lora_alpha = 16 * sqrt(8) = 45.25; and
# lor2c_plus, LoRA+ (B learns 16x faster than A, PEFT's create_loraplus_optimizer, the LoRA+ paper's ratio);
# lor2c_gauss, A drawn from N(0, 1/r) instead of Kaiming-uniform. imlor2c_paper: the paper's merge rule, so that the
# default rule (chosen earlier on dev) is re-chosen on the validation slice. New rows go last: --part keeps
# earlier assignments.
METHODS = {"lora": "lora", "lora_r4": "lora@r=4", "lor2c": "lor2c", "lor2c_r16": "lor2c@r=16",
           "imlor2c": "imlor2c:official/paper", "sharelor2c": "sharelor2c", "lor2c_rs": "lor2c@lora_alpha=45.25",
           "lor2c_plus": "lor2c@loraplus_lr_ratio=16", "lor2c_gauss": "lor2c@a_init=gaussian",
           "imlor2c_paper": "imlor2c:paper/paper"}
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


def choose(args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    """Each method's best rate on the validation slice, with its grid and whether it sits at the grid's edge."""
    scores: dict[str, float] = {}
    for path in search_files(args):
        for run in quality.read_json(path)["runs"]:
            scores[run["method"]] = 100 * run["accuracy"]
    choice = {}
    for base in METHODS:
        grid = {rate: scores[variant(base, rate)] for rate in rates if variant(base, rate) in scores}
        if len(grid) < len(rates):
            missing = [f"{r:g}" for r in rates if r not in grid]
            raise quality.BenchError(f"--stage choose: {base} has no validation run at learning rate(s) {missing}; "
                                     "run --stage search (every --part) first.")
        best = max(grid, key=lambda r: (grid[r], -r))  # a tie goes to the smaller rate
        choice[base] = {"learning_rate": best, "validation_accuracy": grid[best],
                        "grid": {f"{r:g}": a for r, a in grid.items()},
                        "at_edge": best in (min(rates), max(rates))}
    rules = {b: choice[b]["validation_accuracy"] for b in ("imlor2c", "imlor2c_paper")}
    choice["merge_rule_on_validation"] = {"best": "official/paper (the default)" if rules["imlor2c"] >= rules["imlor2c_paper"]
                                          else "paper/paper", "validation_accuracy": rules}
    return choice


def verdicts(summary: dict[str, Any], rates: dict[str, float]) -> list[dict[str, Any]]:
    """The three sentences a user needs, each with the rates and budget it holds for."""
    name = {base: variant(base, rate) for base, rate in rates.items()}
    pairs = [("lor2c_r16", "lora", "LoR2C r=16", "LoRA r=8", "equal parameters"),
             ("lor2c", "lora_r4", "LoR2C r=8", "LoRA r=4", "equal parameters"),
             ("lor2c", "lora", "LoR2C r=8", "LoRA r=8", "half of LoRA's parameters"),
             ("imlor2c", "lor2c", "IMLoR2C", "LoR2C r=8", "IMLoR2C's events against none"),
             ("lor2c_rs", "lor2c", "LoR2C r=8, rank-stabilised scaling", "LoR2C r=8", "the scaling option"),
             ("lor2c_plus", "lor2c", "LoR2C r=8, LoRA+ (ratio 16)", "LoR2C r=8", "the LoRA+ option"),
             ("lor2c_gauss", "lor2c", "LoR2C r=8, Gaussian A", "LoR2C r=8", "the init option"),
             ("imlor2c", "imlor2c_paper", "IMLoR2C, code's merge rule (default)", "IMLoR2C, paper's rule", "the merge rule")]
    out = []
    for a, b, label_a, label_b, what in pairs:
        v = quality.compare(summary, name[a], name[b], f"{label_a} (lr {rates[a]:g})", f"{label_b} (lr {rates[b]:g})")
        if v:
            out.append({"question": what, "method": a, "reference": b, **v})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("search", "choose", "final", "report", "all"), default="all",
                        help="all: every stage in one process (hours on the real model; minutes with --smoke).")
    parser.add_argument("--learning_rates", default=",".join(f"{r:g}" for r in LEARNING_RATES))
    parser.add_argument("--validation_rows", default=None, help="START:END of train.tsv (default 1000:1872; --smoke 64:96).")
    parser.add_argument("--part", default=None, help="K/N: this process runs every N-th run from the K-th.")
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output_dir", default=quality.RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="Seeds of the final table (0, 1, ...).")
    parser.add_argument("--smoke", action="store_true", help="A few steps on little data: checks the script only.")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: expected at least 1.")
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
        runs, suffix = part_of([variant(b, r) for b in METHODS for r in rates], args.part)
        quality.main(quality_argv(args, runs, f"{args.prefix}search{suffix}", "0", validation=True))
    if args.stage in ("choose", "all"):
        choice = choose(args, rates)
        quality.write_json(choice_path, {"learning_rates": rates, "validation_rows": args.validation_rows,
                                         "choice": choice})
        for base, c in choice.items():
            if base not in METHODS:
                print(f"tune: {base}: {c['best']} ({c['validation_accuracy']})")
                continue
            edge = "  (AT THE GRID'S EDGE: widen --learning_rates)" if c["at_edge"] else ""
            print(f"tune: {base:11s} lr {c['learning_rate']:g}  validation {c['validation_accuracy']:.2f}%{edge}")
    if args.stage in ("final", "all", "report"):
        if not os.path.isfile(choice_path):
            parser.error(f"--stage {args.stage}: {choice_path} does not exist; run --stage choose first.")
        chosen = {b: c["learning_rate"] for b, c in quality.read_json(choice_path)["choice"].items() if b in METHODS}
        methods = [variant(b, chosen[b]) for b in METHODS]
    if args.stage in ("final", "all"):
        mine, suffix = part_of(methods, args.part)
        quality.main(quality_argv(args, mine, f"{final_name}{suffix}", ",".join(map(str, range(args.seeds))), validation=False))
    if args.stage in ("report", "all"):
        parts = sorted(glob.glob(os.path.join(args.output_dir, f"{final_name}_part*.json")))
        if parts:
            quality.main(quality_argv(args, methods, final_name, "0", validation=False) + ["--combine", *parts])
        payload = quality.read_json(os.path.join(args.output_dir, f"{final_name}.json"))
        payload["tuned_verdicts"] = verdicts(payload["summary"], chosen)
        payload["tuned_learning_rates"] = chosen
        quality.write_json(os.path.join(args.output_dir, f"{final_name}.json"), payload)
        for v in payload["tuned_verdicts"]:
            print(f"tune: {v['question']}: {v['text']}")
    return 0


if __name__ == "__main__":
    quality.run_cli(main)
