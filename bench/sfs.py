"""Cost of scoring every LoR2C connection (SFS) by the r x r QR route against a dense SVD of B A.

`lor2c_hf.sfs.sfs_scores` scores all connections in one batched call without forming the d x d product
(SPEC §3). The dense route forms each `B @ A` and takes `torch.linalg.svdvals`; on a 7B shape that is
seconds per connection, so it is timed on the first `--dense-limit` connections and the total for all of
them is extrapolated (and labelled so). Agreement: max |SFS_qr - SFS_dense| over the densely scored ones.

    python bench/sfs.py                 # LLaMA2-7B shape (d=4096, r=64, 32 blocks) and RoBERTa-base (768, 8, 12)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from bench_utils import environment, interleaved_timing, write_json
from lor2c_hf.sfs import sfs_scores

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_7B_QR_S = 0.050  # the issue: SFS for a 7B shape under 50 ms on CPU
TOP_K = 2


@dataclass(frozen=True)
class SFSShape:
    name: str
    d: int
    r: int
    blocks: int
    dense_limit: Optional[int]  # connections scored densely (None: all)


SHAPES = [SFSShape("llama2-7b", 4096, 64, 32, 2), SFSShape("roberta-base", 768, 8, 12, None)]
SMOKE_SHAPES = [SFSShape("smoke", 64, 4, 3, 2)]


def random_connections(shape: SFSShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n, r, d) with LoRA's kaiming-uniform scale and a trained-looking non-zero B (n, d, r), float32."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / shape.d ** 0.5
    a = (torch.rand(shape.blocks, shape.r, shape.d, generator=g) * 2 - 1) * bound
    b = torch.randn(shape.blocks, shape.d, shape.r, generator=g) * 0.01
    return a, b


def dense_sfs(a: torch.Tensor, b: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """SFS from the singular values of each dense d x d product `B @ A`, one connection at a time."""
    scores = []
    for a_i, b_i in zip(a, b):
        sv = torch.linalg.svdvals(b_i @ a_i)
        scores.append(1.0 - sv[:top_k].sum() / sv.sum())
    return torch.stack(scores)


def bench_shape(shape: SFSShape, repeats: int, dense_repeats: int) -> dict:
    a, b = random_connections(shape)
    n_dense = shape.blocks if shape.dense_limit is None else min(shape.dense_limit, shape.blocks)
    qr = interleaved_timing({"qr": lambda: sfs_scores(a, b, TOP_K)}, 2, repeats, "cpu")["qr"]
    dense_out: dict[str, torch.Tensor] = {}
    dense = interleaved_timing({"dense": lambda: dense_out.update(sfs=dense_sfs(a[:n_dense], b[:n_dense]))},
                               0, dense_repeats, "cpu")["dense"]
    qr_scores, dense_scores = sfs_scores(a, b, TOP_K).sfs, dense_out["sfs"]
    dense_all_s = dense["wall"]["median"] * shape.blocks / n_dense
    return {
        **asdict(shape),
        "qr_seconds": qr["wall"]["median"], "qr_q1_seconds": qr["wall"]["q1"], "qr_q3_seconds": qr["wall"]["q3"],
        "qr_cpu_seconds": qr["cpu"]["median"], "qr_repeats": qr["n"],
        "dense_connections_timed": n_dense, "dense_seconds_timed": dense["wall"]["median"],
        "dense_seconds_all": dense_all_s, "dense_all_extrapolated": n_dense < shape.blocks,
        "dense_repeats": dense["n"], "speedup": dense_all_s / qr["wall"]["median"],
        "max_abs_sfs_diff": (qr_scores[:n_dense] - dense_scores).abs().max().item(),
        "sfs_range": [qr_scores.min().item(), qr_scores.max().item()],
    }


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape and few repeats (checks the script runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dense-repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "sfs_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats, args.dense_repeats = 3, 1
    rows = {s.name: bench_shape(s, args.repeats, args.dense_repeats) for s in (SMOKE_SHAPES if args.smoke else SHAPES)}

    print(f"\nSFS of all connections, CPU, {torch.get_num_threads()} threads (top-k={TOP_K}, float32)")
    print(f"{'shape':14s} {'d':>5s} {'r':>3s} {'n':>3s} {'QR ms':>8s} {'IQR ms':>13s} {'dense s':>9s} {'speedup':>9s} {'max |dSFS|':>11s}")
    for name, row in rows.items():
        dense = f"{row['dense_seconds_all']:8.2f}" + ("*" if row["dense_all_extrapolated"] else " ")
        print(f"{name:14s} {row['d']:5d} {row['r']:3d} {row['blocks']:3d} {1e3 * row['qr_seconds']:8.2f} "
              f"{1e3 * row['qr_q1_seconds']:6.2f}-{1e3 * row['qr_q3_seconds']:<6.2f} {dense} {row['speedup']:8.0f}x "
              f"{row['max_abs_sfs_diff']:11.2e}")
    if any(r["dense_all_extrapolated"] for r in rows.values()):
        print("* dense time measured on the first dense_connections_timed connections, scaled to all")
    targets = []
    if "llama2-7b" in rows:
        value = rows["llama2-7b"]["qr_seconds"]
        targets.append({"what": "llama2-7b QR route seconds", "value": value, "target": f"< {TARGET_7B_QR_S}",
                        "met": value < TARGET_7B_QR_S, "miss_by": max(0.0, value - TARGET_7B_QR_S)})
        print(f"target: 7B shape QR route {1e3 * value:.1f} ms (< {1e3 * TARGET_7B_QR_S:.0f} ms): "
              + ("met" if value < TARGET_7B_QR_S else f"MISSED by {1e3 * (value - TARGET_7B_QR_S):.1f} ms"))
    result = {"benchmark": "sfs", "device": "cpu", "smoke": args.smoke, "top_k": TOP_K,
              "environment": environment("cpu"), "rows": rows, "targets": targets}
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
