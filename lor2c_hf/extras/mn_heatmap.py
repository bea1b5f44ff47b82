"""The paper's Fig. 6, the M x N heatmap of a grid search, and the rule that picks the best (M, N).

Used by `recipes/glue.py --search_mn` and the benchmarks; the core library never imports it.
"""

from __future__ import annotations

from typing import Optional

from ..plotting import check_png_path, png_figure


def best_mn(scores: dict[tuple[int, int], float]) -> tuple[int, int]:
    """The (M, N) with the highest score; ties go to fewer merges, then fewer injects (the smaller search result)."""
    return max(scores, key=lambda key: (scores[key], -key[0], -key[1]))


def plot_mn_heatmap(scores: dict[tuple[int, int], float], path: str, title: Optional[str] = None,
                    metric: str = "dev accuracy %") -> str:
    """The paper's Fig. 6: the dev metric of every (M merges, N injects) pair of a grid search, as a heatmap
    (rows M, columns N, each cell annotated; pairs not run are left blank, the best is outlined). Returns `path`."""
    path = check_png_path(path, "plot_mn_heatmap")
    if not scores:
        raise ValueError("plot_mn_heatmap(scores={}): expected at least one (M, N) -> score entry.")
    import numpy as np

    ms, ns = sorted({m for m, _ in scores}), sorted({n for _, n in scores})
    grid = np.full((len(ms), len(ns)), np.nan)
    for (m, n), value in scores.items():
        grid[ms.index(m), ns.index(n)] = value
    best_m, best_n = best_mn(scores)
    with png_figure(path, "plot_mn_heatmap", figsize=(max(6.5, 1.0 * len(ns) + 2.4),
                                                       max(4.0, 0.8 * len(ms) + 1.8))) as (fig, ax):
        from matplotlib.patches import Rectangle

        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        for i, m in enumerate(ms):
            for j, n in enumerate(ns):
                if not np.isnan(grid[i, j]):
                    light = grid[i, j] < np.nanmin(grid) + 0.6 * (np.nanmax(grid) - np.nanmin(grid))
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if light else "black")
        ax.add_patch(Rectangle((ns.index(best_n) - 0.5, ms.index(best_m) - 0.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=2))
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_yticks(range(len(ms)), [str(m) for m in ms])
        ax.set_xlabel("N (injects)")
        ax.set_ylabel("M (merges)")
        fig.colorbar(image, ax=ax, label=metric)
        ax.set_title(title or f"{metric} per (M, N); best M={best_m}, N={best_n}", fontsize=8)
    return path
