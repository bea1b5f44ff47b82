"""The paper's Fig. 6: IMLoR2C's dev accuracy over a grid of M (merges) and N (injects).

The paper grid-searched M, N in {0..6} per GLUE task (49 runs each) and calls the choice its weak point. Here:
all-MiniLM-L6-v2 on SST-2 with `bench/quality.py`'s data, model and hyper-parameters (by default its quick
setting: 160 steps of batch 32, lr 5e-4, events on the `steps` schedule in the first quarter; the library's
default merge rule unless told otherwise), one seed, every
(M, N) of `--grid` x `--grid`. M = N = 0 is LoR2C, N = 0 MergeLoR2C, M = 0 InjectLoR2C. Writes
`bench/results/mn_grid.json` after every run (runs already there are skipped: resumable) and the heatmap
`mn_grid.png` (`lor2c_hf.extras.mn_heatmap.plot_mn_heatmap`, the one `recipes/glue.py --search_mn` draws).

    python bench/mn_grid.py --threads 1                       # 16 runs, ~3-5 min each on one core
    python bench/mn_grid.py --merge_criterion paper --merge_keep paper --name mn_grid_paper_rule
    python bench/mn_grid.py --smoke --model_dir <tiny model> --data_dir <folder with train.tsv, dev.tsv>

Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from typing import Any, Optional, Sequence

import transformers

import quality
from lor2c_hf import LoR2CConfig
from lor2c_hf.config import events_problem
from lor2c_hf.extras.mn_heatmap import best_mn, plot_mn_heatmap


# The library's default merge rule (LoR2CConfig's), not quality.py's HParams, which keep the paper's rule that
# its earlier results were measured with: with that rule IMLoR2C does not learn in this budget (event_probe.py).
GRID_DEFAULTS = {name: getattr(LoR2CConfig(), name) for name in ("merge_criterion", "merge_keep")}


def grid_values(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise quality.BenchError(f"--grid {text!r}: expected comma-separated integers such as 0,1,2,3.") from None
    if not values or values[0] < 0:
        raise quality.BenchError(f"--grid {text!r}: expected integers >= 0.")
    return values


def key(m: int, n: int) -> str:
    return f"M={m},N={n}"


def grid_scores(runs: dict[str, Any]) -> dict[tuple[int, int], float]:
    return {(r["M"], r["N"]): 100 * r["accuracy"] for r in runs.values()}


def draw(runs: dict[str, Any], hp: quality.HParams, args: argparse.Namespace, model_dir: str, path: str) -> str:
    return plot_mn_heatmap(grid_scores(runs), path,
                           f"IMLoR2C, SST-2 dev accuracy %, {quality.model_label(model_dir)}, seed {args.seed}\n"
                           f"{quality.budget(hp)} x batch {hp.batch_size}, lr {hp.learning_rate:g}, {hp.schedule} schedule, "
                           f"merge rule {hp.merge_criterion}/{hp.merge_keep}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quality.add_common_arguments(parser)
    parser.add_argument("--grid", default="0,1,2,3", help="Values of M and of N (comma-separated).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="A few steps on little data: checks the script only.")
    parser.add_argument("--no_png", action="store_true")
    parser.add_argument("--name", default=None, help="Base name of the JSON and PNG (default mn_grid, or mn_grid_smoke).")
    args = parser.parse_args(argv)
    try:
        values = grid_values(args.grid)
    except quality.BenchError as err:
        parser.error(str(err))
    for name, value in GRID_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    hp = quality.hparams_from(args, max_steps=8, batch_size=8, eval_batch_size=16)
    if args.smoke:
        args.train_size, args.eval_size = args.train_size or 64, args.eval_size or 32
    model_dir, data_dir, tokenizer = quality.prepare(args)
    train_ds, eval_ds = quality.load_sst2(data_dir, tokenizer, hp.max_length, args.train_size, args.eval_size)
    name = args.name or ("mn_grid_smoke" if args.smoke else "mn_grid")
    json_path = os.path.join(args.output_dir, f"{name}.json")
    data = {"dir": data_dir, "train_rows": len(train_ds), "eval_rows": len(eval_ds), "metric": "accuracy on dev.tsv",
            "sha256": quality.bench_utils.files_sha256(quality.data_files(data_dir))}
    record = quality.bench_utils.run_record(quality.REPO, data["sha256"])
    payload = quality.resumed_payload(json_path, False, hp, data) or {"runs": {}}
    payload.update({"benchmark": "mn_grid", "smoke": args.smoke, "machine": quality.machine(),
                    "model": quality.model_label(model_dir), "data": data, "hyperparameters": dataclasses.asdict(hp),
                    "seed": args.seed, "grid": values})
    runs: dict[str, Any] = payload["runs"]
    blocks = transformers.AutoConfig.from_pretrained(model_dir).num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="lor2c-grid-") as work_dir:
        for m in values:
            for n in values:
                if key(m, n) in runs:
                    continue
                if events_problem(m, n, blocks):
                    continue  # more events than the blocks allow (LoR2CConfig refuses them)
                run = quality.run_one("imlor2c", args.seed, dataclasses.replace(hp, num_merges=m, num_injects=n),
                                      model_dir, tokenizer, train_ds, eval_ds, work_dir)
                runs[key(m, n)] = {"M": m, "N": n, **run, "record": record}
                quality.write_json(json_path, payload)
                if not args.no_png:  # the picture so far, so an interrupted grid still shows its cells
                    draw(runs, hp, args, model_dir, os.path.join(args.output_dir, f"{name}.png"))
                print(f"  M={m} N={n}: accuracy {100 * run['accuracy']:.2f}%, adapter params {run['adapter_params']:,d}, "
                      f"spans {run['spans']}, injected {run['injected']}, {run['seconds']:.0f}s", flush=True)
    scores = grid_scores(runs)
    best = best_mn(scores)
    payload["best"] = {"M": best[0], "N": best[1], "accuracy_percent": scores[best]}
    quality.write_json(json_path, payload)
    print(f"best: M={best[0]} N={best[1]} ({scores[best]:.2f}%) of {len(scores)} runs")
    if not args.no_png:
        png = draw(runs, hp, args, model_dir, os.path.join(args.output_dir, f"{name}.png"))
        print(f"wrote {json_path} and {png}")
    else:
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    quality.run_cli(main)
