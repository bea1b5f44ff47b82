"""The paper's Fig. 7: does LoR2C carry more gradient to the lower blocks than LoRA does?

Same model, data and hyper-parameters as `bench/quality.py` (all-MiniLM-L6-v2 on SST-2). LoRA (PEFT, query and
value) and LoR2C are trained for a few epochs from the same seed and data order; during every backward pass a
tensor hook on each adapter parameter records the mean |grad| (before clipping). Per block and epoch:

    LoR2C  = mean over steps of ( mean|grad A_i| + mean|grad B_i| ) / 2            (the block's connection)
    LoRA   = mean over steps of the mean|grad| of the block's four tensors (q.A, q.B, v.A, v.B)
    ratio  = LoR2C / LoRA

The paper (SPEC §8) says the ratio grows toward the lower blocks (LoR2C eases vanishing gradients). The script
writes `bench/results/grad_flow.csv` (one row per seed, epoch and block), `grad_flow.json` (the matrix and the
verdict) and the heatmap `grad_flow.png`, and says plainly whether the ratio grows toward the lower blocks.

    python bench/grad_flow.py                  # 4 epochs over 1,024 training rows, 1 seed (estimated 3-5 min)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback

import quality
from lor2c_hf.architectures import find_block_stack
from lor2c_hf.plotting import png_figure

METHODS = ("lora", "lor2c")
STRONG_TREND = -0.5  # mean rank correlation of ratio with block index that counts as "grows toward lower blocks"


def block_parameters(model: torch.nn.Module) -> dict[int, list[torch.nn.Parameter]]:
    """The adapter parameters of each block: LoR2C's A_i, B_i, or PEFT LoRA's A, B on the block's projections."""
    if hasattr(model, "lor2c"):
        s = model.structure
        if any(e != b for b, e in s["spans"]) or s["injected"]:
            raise quality.BenchError("grad_flow compares single-block LoR2C connections; use method 'lor2c' (no events).")
        return {b: [model.lor2c.a_of(slot), model.lor2c.lora_B[slot]] for (b, _), slot in zip(s["spans"], s["owners"])}
    blocks_path, _ = find_block_stack(model.get_base_model())
    pattern = re.compile(re.escape(blocks_path) + r"\.(\d+)\..*\.lora_[AB]\.")
    found: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        match = pattern.search(name)
        if match and p.requires_grad:
            found[int(match.group(1))].append(p)
    if not found:
        raise quality.BenchError(f"no LoRA parameters found under {blocks_path!r} in {type(model).__name__}.")
    return dict(found)


class GradientRecorder(TrainerCallback):
    """Mean |grad| per (epoch, block), averaged over the block's adapter tensors and every backward pass."""

    def __init__(self, params: dict[int, list[torch.nn.Parameter]]) -> None:
        self.epoch = 0
        self.sums: dict[tuple[int, int], float] = defaultdict(float)
        self.counts: dict[tuple[int, int], int] = defaultdict(int)
        self.handles = [p.register_hook(self._hook(block)) for block, ps in params.items() for p in ps]

    def _hook(self, block: int):
        def record(grad: torch.Tensor) -> None:
            self.sums[self.epoch, block] += float(grad.detach().abs().float().mean())
            self.counts[self.epoch, block] += 1

        return record

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch += 1

    def means(self) -> dict[tuple[int, int], float]:
        for handle in self.handles:
            handle.remove()
        return {key: self.sums[key] / self.counts[key] for key in self.counts}


def record_method(method: str, seed: int, hp: quality.HParams, epochs: int, model_dir: str, tokenizer: Any,
                  train_ds: Any, work_dir: str) -> dict[tuple[int, int], float]:
    """Train `method` for `epochs` epochs and return mean |grad| per (epoch, block)."""
    trainer = quality.make_trainer(method, model_dir, seed, hp, train_ds, tokenizer,
                                   os.path.join(work_dir, f"{method}-{seed}"), num_train_epochs=epochs)
    recorder = GradientRecorder(block_parameters(trainer.model))
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.means()


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    from scipy.stats import spearmanr

    value = float(spearmanr(xs, ys).statistic)
    return None if value != value else value  # NaN (a constant column) has no rank correlation


def verdict(ratio: dict[tuple[int, int], float], epochs: int, blocks: int) -> dict[str, Any]:
    """Per epoch, the rank correlation of ratio with block index (negative = larger toward block 0)."""
    per_epoch = [spearman(list(range(blocks)), [ratio[e, b] for b in range(blocks)]) for e in range(epochs)]
    lower_larger = [ratio[e, 0] > ratio[e, blocks - 1] for e in range(epochs)]
    defined = [r for r in per_epoch if r is not None]
    mean = statistics.fmean(defined) if defined else 0.0
    grows = bool(defined) and sum(r < 0 for r in defined) > len(defined) / 2 and mean <= STRONG_TREND
    trend = "GROWS" if grows else ("shows at most a WEAK trend" if mean < 0 else "does NOT grow")
    text = (f"The LoR2C/LoRA gradient ratio {trend} toward the lower blocks (criterion: mean Spearman <= "
            f"{STRONG_TREND}, negative in most epochs; mean {mean:+.2f}): "
            f"Spearman correlation of ratio with block index per epoch "
            f"{['n/a' if r is None else round(r, 2) for r in per_epoch]} (negative = larger at lower blocks); "
            f"block 0 above block {blocks - 1} in {sum(lower_larger)} of {epochs} epochs. "
            f"Paper's Fig. 7 claim {'supported' if grows else 'not supported'} on this model and data.")
    return {"grows_toward_lower_blocks": grows, "spearman_mean": mean, "spearman_per_epoch": per_epoch,
            "block0_above_top_per_epoch": lower_larger, "text": text}


def heatmap(ratio: dict[tuple[int, int], float], epochs: int, blocks: int, path: str, title: str) -> None:
    from matplotlib.colors import LogNorm

    grid = [[ratio[e, b] for e in range(epochs)] for b in range(blocks)]
    with png_figure(path, "heatmap", figsize=(1.0 * epochs + 3, 0.45 * blocks + 1.8)) as (fig, ax):
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                          norm=LogNorm(vmin=min(map(min, grid)), vmax=max(map(max, grid))))
        for b in range(blocks):
            for e in range(epochs):
                bright = image.norm(grid[b][e]) > 0.6  # viridis turns yellow: dark text there
                ax.text(e, b, f"{grid[b][e]:.2f}", ha="center", va="center", fontsize=7, color="black" if bright else "white")
        ax.set_xticks(range(epochs), [str(e + 1) for e in range(epochs)])
        ax.set_yticks(range(blocks), [str(b) for b in range(blocks)])
        ax.set_xlabel("epoch")
        ax.set_ylabel("block (0 = lowest)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label="mean |grad| LoR2C / LoRA")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quality.add_common_arguments(parser)  # with --epochs (whole epochs here)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="Tiny run: checks the script, measures nothing.")
    parser.add_argument("--no_png", action="store_true")
    parser.set_defaults(train_size=1024, epochs=4)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.epochs != int(args.epochs) or args.seeds < 1:
        parser.error("--epochs (a whole number) and --seeds: expected at least 1.")
    if args.smoke:
        args.train_size, args.epochs = min(args.train_size, 32), min(args.epochs, 2)
    args.epochs = int(args.epochs)
    hp = quality.hparams_from(args, batch_size=8)
    model_dir, data_dir, tokenizer = quality.prepare(args)
    train_ds, _ = quality.load_sst2(data_dir, tokenizer, hp.max_length, args.train_size, eval_size=1)
    print(f"grad_flow: LoRA vs LoR2C, {args.epochs} epochs over {len(train_ds)} rows, batch {hp.batch_size}, "
          f"{args.seeds} seed(s), model {model_dir}", flush=True)
    start = time.perf_counter()
    rows, per_seed = [], []
    with tempfile.TemporaryDirectory(prefix="lor2c-gradflow-") as work_dir:
        for seed in range(args.seeds):
            grads = {m: record_method(m, seed, hp, args.epochs, model_dir, tokenizer, train_ds, work_dir) for m in METHODS}
            if set(grads["lor2c"]) != set(grads["lora"]):
                raise RuntimeError(f"LoR2C and LoRA recorded different (epoch, block) cells: "
                                   f"{sorted(set(grads['lor2c']) ^ set(grads['lora']))}")
            ratio = {key: grads["lor2c"][key] / grads["lora"][key] for key in grads["lora"]}
            per_seed.append(ratio)
            for (epoch, block) in sorted(ratio):
                rows.append({"seed": seed, "epoch": epoch + 1, "block": block, "lor2c_mean_abs_grad": grads["lor2c"][epoch, block],
                             "lora_mean_abs_grad": grads["lora"][epoch, block], "ratio": ratio[epoch, block]})
            print(f"  seed {seed} done ({time.perf_counter() - start:.0f}s)", flush=True)
    epochs = 1 + max(e for e, _ in per_seed[0])
    blocks = 1 + max(b for _, b in per_seed[0])
    mean_ratio = {key: statistics.fmean(r[key] for r in per_seed) for key in per_seed[0]}
    result = verdict(mean_ratio, epochs, blocks)

    name = "grad_flow_smoke" if args.smoke else "grad_flow"
    csv_path = os.path.join(args.output_dir, f"{name}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "benchmark": "grad_flow", "smoke": args.smoke, "machine": quality.machine(),
        "model": {"name": quality.model_label(model_dir), "dir": model_dir},
        "data": {"dir": data_dir, "train_rows": len(train_ds)}, "epochs": epochs, "blocks": blocks,
        "seeds": list(range(args.seeds)), "hyperparameters": {k: v for k, v in dataclasses.asdict(hp).items() if k != "max_steps"},
        "ratio": [[mean_ratio[e, b] for b in range(blocks)] for e in range(epochs)],  # [epoch][block]
        "verdict": result, "wall_seconds": round(time.perf_counter() - start, 1),
    }
    quality.write_json(os.path.join(args.output_dir, f"{name}.json"), payload)
    print("\nratio LoR2C / LoRA mean |grad| (rows: block, top = highest; columns: epoch)")
    for b in reversed(range(blocks)):
        print(f"  block {b:2d}: " + "  ".join(f"{mean_ratio[e, b]:7.3f}" for e in range(epochs)))
    print("\n" + result["text"])
    if args.smoke:
        print("(smoke mode: a few steps on a few rows; these numbers measure nothing)")
    if not args.no_png:
        png = os.path.join(args.output_dir, f"{name}.png")
        heatmap(mean_ratio, epochs, blocks, png,
                f"Mean |grad| ratio LoR2C / LoRA per block and epoch ({quality.model_label(model_dir)}, SST-2)")
        print(f"wrote {csv_path}, {name}.json and {png}")
    else:
        print(f"wrote {csv_path} and {name}.json")
    return 0


if __name__ == "__main__":
    quality.run_cli(main)
