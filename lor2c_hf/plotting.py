"""A picture of an adapter's structure: which blocks each connection spans, which blocks carry injected LoRA,
and the SFS scores that decided every merge and inject.

A structure is easier to check at a glance than as JSON, so the quickstart and model cards can show one.
matplotlib is an optional extra (`pip install "lor2c-hf[plot]"`): it is imported only when a plot is drawn,
with the Agg backend, so no screen is needed.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

from .atomic import atomic_write
from .structure import Structure

logger = logging.getLogger("lor2c_hf")
STRUCTURE_PICTURE = "structure.png"  # the file name model cards and recipe reports link to

SPAN_COLOR = "#2b6cb0"
MERGED_COLOR = "#805ad5"
INJECT_COLOR = "#dd6b20"
BLOCK_COLOR = "#edf2f7"


def check_png_path(path: Any, who: str) -> str:
    """`path` as a string, or a ValueError naming `who` when it is not a file path ending in '.png'."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"{who}(path={path!r}): expected a file path ending in '.png'.")
    return os.fspath(path)


@contextmanager
def png_figure(path: str, who: str, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`(fig, axes)` of `plt.subplots(**subplots)` (Agg backend), written to the PNG `path` when the block ends
    (tight layout, atomically: an interrupted save leaves the previous picture) and closed in any case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as err:
        raise ImportError(f'{who} needs matplotlib: pip install "lor2c-hf[plot]"') from err
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        atomic_write(os.fspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _as_structure(model_or_structure: Any) -> tuple[Structure, Optional[list[float]]]:
    """The `Structure` to draw and, for a live model (a `LoR2CModel`: it scores its spans), the current SFS."""
    current = None
    if callable(getattr(model_or_structure, "sfs", None)) and hasattr(model_or_structure, "structure"):
        data = model_or_structure.structure
        current = [float(x) for x in model_or_structure.sfs().sfs.tolist()]
    elif isinstance(model_or_structure, Structure):
        data = model_or_structure.to_dict()
    elif isinstance(model_or_structure, dict):
        data = model_or_structure
    else:
        raise TypeError(
            "plot_structure(model_or_structure=...): expected a LoR2CModel, a Structure or a structure dict "
            f"(model.structure), got {type(model_or_structure).__name__}."
        )
    missing = [k for k in ("num_blocks", "spans") if k not in data]
    if missing:
        raise ValueError(f"plot_structure: the structure dict lacks {missing}; expected the keys of model.structure "
                         "(num_blocks, spans, owners, injected, events).")
    data = {"owners": list(range(len(data["spans"]))), "injected": [], "events": [], **data}
    try:
        structure = Structure.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"plot_structure: not a valid LoR2C structure: {err}") from err
    return structure, current


def _event_label(event: dict[str, Any]) -> str:
    if event.get("skipped"):
        return f"{event['kind']} skipped"
    scores = ", ".join(f"{s:.3f}" for s in event.get("scores", []))
    if event["kind"] == "merge":
        (a, b) = event.get("merged", [[], []])
        return f"merge {a}+{b} -> {event.get('blocks')}  SFS {scores}"
    return f"inject block {event.get('blocks', ['?'])[0]} -> LoRA  SFS {scores}"


def plot_structure(model_or_structure: Union[Any, Structure, dict], path: str, title: Optional[str] = None) -> str:
    """Draw `model_or_structure` (a `LoR2CModel`, a `Structure` or `model.structure`) to the PNG file `path`.

    Left: the blocks as a column (block 0 at the bottom), each connection as a bar from the input of its first
    block to the output of its last (merged spans in another colour), injected blocks marked "LoRA q,v", and,
    for a live model, each span's current SFS. Right: the event timeline, one row per event with its step,
    kind, blocks and the SFS scores that decided it. Returns `path`.
    """
    path = check_png_path(path, "plot_structure")
    structure, current = _as_structure(model_or_structure)
    L, events = structure.num_blocks, structure.events
    height = max(2.8, 0.3 * max(L, len(events)) + 1.3)
    with png_figure(path, "plot_structure", ncols=2, figsize=(10, height),
                    gridspec_kw={"width_ratios": [1, 1.9]}) as (fig, (ax, timeline)):
        from matplotlib.patches import Rectangle

        for b in range(L):
            injected = b in structure.injected
            ax.add_patch(Rectangle((0, b + 0.08), 1.0, 0.84, facecolor=INJECT_COLOR if injected else BLOCK_COLOR,
                                   edgecolor="#4a5568", linewidth=0.8))
            ax.text(0.5, b + 0.5, f"block {b}" + ("  LoRA q,v" if injected else ""), ha="center", va="center",
                    fontsize=8, color="white" if injected else "black")
        for k, (start, end) in enumerate(structure.spans):
            color = MERGED_COLOR if end > start else SPAN_COLOR
            ax.add_patch(Rectangle((1.15, start + 0.12), 0.22, end - start + 0.76, facecolor=color, edgecolor="none"))
            label = f"[{start}, {end}] slot {structure.owners[k]}"
            if current is not None:
                label += f"  SFS {current[k]:.3f}"
            ax.text(1.45, (start + end + 1) / 2, label, va="center", fontsize=7)
        ax.set_xlim(-0.05, 2.9)
        ax.set_ylim(-0.1, L + 0.1)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel("blocks, input at the bottom (bars: connections)", fontsize=8)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"{len(structure.spans)} connections, {len(structure.injected)} injected, {L} blocks", fontsize=9)

        timeline.set_title("structure events (SFS = 1 - top-2 share of singular values)", fontsize=9)
        if not events:
            timeline.text(0.5, 0.5, "no structure events", ha="center", va="center", fontsize=9)
            timeline.set_axis_off()
        else:
            timeline.set_yticks(range(len(events)), [f"#{len(events) - y}" for y in range(len(events))], fontsize=7)
            timeline.set_ylabel("events in training order (first at the top)", fontsize=8)
            timeline.set_xticks([])
            for side in ("top", "right", "bottom"):
                timeline.spines[side].set_visible(False)
            for row, event in enumerate(events):
                y = len(events) - 1 - row
                marker, color = ("s", INJECT_COLOR) if event["kind"] == "inject" else ("D", MERGED_COLOR)
                if event.get("skipped"):
                    marker, color = "x", "#a0aec0"
                timeline.scatter([0], [y], marker=marker, color=color, s=40)
                step = event.get("step")
                where = f"step {step}" if step is not None else f"event {row + 1}"
                timeline.text(0.15, y, f"{where}: {_event_label(event)}", va="center", fontsize=7.5)
            timeline.set_xlim(-0.2, 2.8)
            timeline.set_ylim(-0.8, len(events) - 0.2)
        if title:
            fig.suptitle(title, fontsize=10)
    return path


def save_structure_picture(model: Any, folder: str, title: Optional[str] = None) -> Optional[str]:
    """Draw a `LoR2CModel`'s structure to `folder/structure.png` and return that path.

    None for adapters with no spans to draw (ResLoRA, PEFT LoRA) and, with a log line, when matplotlib (the
    `plot` extra) is not installed: the picture is an extra, never a reason to fail a save or a push.
    """
    if "spans" not in getattr(model, "structure", {}):
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning('lor2c_hf: no structure picture, matplotlib is not installed (pip install "lor2c-hf[plot]").')
        return None
    os.makedirs(folder, exist_ok=True)
    return plot_structure(model, os.path.join(folder, STRUCTURE_PICTURE), title=title)
