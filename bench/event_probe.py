"""Why does IMLoR2C collapse? What each merge and inject does to the function, measured during training.

Same model, data and hyper-parameters as `bench/quality.py` (all-MiniLM-L6-v2 on SST-2, 160 steps of batch 32,
lr 5e-4, M = N = 2 on the `steps` schedule). For each variant (IMLoR2C under a merge rule, or a structure fixed
from step 0) the script trains one seed and records:

- at every event, on a fixed probe batch (the first 128 dev sentences, eval mode): loss, accuracy and logits
  just before and just after the event: the loss change, the mean |logit change| relative to the mean |logit|,
  KL(before || after) and the share of predictions that flip;
- at every merge, the same for the counterfactuals: the *other* slot of the pair survives, and the merged
  connection is switched off (its B zeroed), so the cost of which slot survives is measured, not argued;
- every `--curve_every` steps: the probe batch's loss and accuracy, and ||B|| of every slot (the learning
  curves of the spans before and after they merge).

Variants: `imlor2c:<criterion>/<keep>` (criterion, keep in {paper, official}), `fixed:<variant>` (the final
structure of that variant's run, fixed from step 0, no events: does the structure or the transition hurt?)
and any plain method of `bench/quality.py` (for its learning curve).

    python bench/event_probe.py --threads 1                       # ~3 min per variant on one core
    python bench/event_probe.py --variants imlor2c:paper/paper,lor2c --name event_probe_lr2e-3 --learning_rate 2e-3
    python bench/event_probe.py --smoke --model_dir <tiny model> --data_dir <folder with train.tsv, dev.tsv>

Writes `bench/results/<name>.json` after every variant (variants already in that file are skipped: resumable)
and `<name>.png`, the probe loss curves and each final span's ||B||.
Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.nn import functional as F
from transformers import DataCollatorWithPadding, TrainerCallback

import quality
from lor2c_hf import LoR2CModel
from lor2c_hf.plotting import png_figure

DEFAULT_VARIANTS = ("imlor2c:paper/paper", "imlor2c:official/official", "imlor2c:paper/official",
                    "imlor2c:official/paper", "fixed:imlor2c:paper/paper", "lor2c")
PROBE_ROWS = 128


class Probe:
    """Logits of the model on a fixed batch in eval mode, and how two sets of logits differ."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.batch = model, batch

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(**{k: v for k, v in self.batch.items() if k != "labels"})
        finally:
            self.model.train(was_training)
        return out.logits.float()

    def score(self, logits: torch.Tensor) -> dict[str, float]:
        labels = self.batch["labels"]
        return {"loss": float(F.cross_entropy(logits, labels)), "accuracy": float((logits.argmax(-1) == labels).float().mean())}

    def change(self, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
        """After's loss and accuracy, and how far it moved from `before`."""
        kl = F.kl_div(F.log_softmax(after, -1), F.log_softmax(before, -1), log_target=True, reduction="batchmean")
        return {**self.score(after),
                "rel_logit_change": float((after - before).abs().mean() / before.abs().mean().clamp_min(1e-12)),
                "kl_before_after": float(kl), "flips": float((after.argmax(-1) != before.argmax(-1)).float().mean())}


@contextlib.contextmanager
def slot_override(model: LoR2CModel, span_index: int, slot: Optional[int] = None, zero_b: bool = False) -> Iterator[None]:
    """Temporarily let span `span_index` read `slot`, or zero its B (the connection switched off)."""
    structure = model._structure
    kept = structure.owners[span_index]
    saved = model.lor2c.lora_B[kept].detach().clone()
    try:
        if slot is not None:
            structure.owners[span_index] = slot
            model._rebuild_plan()
        if zero_b:
            with torch.no_grad():
                model.lor2c.lora_B[kept].zero_()
        yield
    finally:
        structure.owners[span_index] = kept
        model._rebuild_plan()
        with torch.no_grad():
            model.lor2c.lora_B[kept].copy_(saved)


def measure_events(model: LoR2CModel, probe: Probe, records: list[dict[str, Any]]) -> None:
    """Wrap the model's `apply_merge`/`apply_inject` so every event is measured before and after on the probe."""

    def wrap(kind: str, original: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def measured(*args: Any, **kwargs: Any) -> dict[str, Any]:
            before = probe.logits()
            b_norms = slot_norms(model)
            slot_of = {tuple(span): slot for span, slot in zip(model._structure.spans, model._structure.owners)}
            record = original(*args, **kwargs)
            entry = {k: record.get(k) for k in ("kind", "step", "blocks", "merged", "scores", "rho", "kept_slot", "skipped")}
            entry.update(before=probe.score(before), after=probe.change(before, probe.logits()), b_norms_before=b_norms)
            if kind == "merge" and not record.get("skipped"):
                k = model._structure.spans.index(record["blocks"])
                other = [slot_of[tuple(span)] for span in record["merged"] if slot_of[tuple(span)] != record["kept_slot"]][0]
                with slot_override(model, k, slot=other):
                    entry["after_other_slot_kept"] = dict(slot=other, **probe.change(before, probe.logits()))
                with slot_override(model, k, zero_b=True):
                    entry["after_merged_connection_off"] = probe.change(before, probe.logits())
            records.append(entry)
            return record

        return measured

    for kind in ("merge", "inject"):
        setattr(model, f"apply_{kind}", wrap(kind, getattr(model, f"apply_{kind}")))


def slot_norms(model: LoR2CModel) -> dict[int, float]:
    """||B|| of the slot each current span reads, keyed by the span's first block."""
    s = model._structure
    return {span[0]: float(model.lor2c.lora_B[slot].detach().norm()) for span, slot in zip(s.spans, s.owners)}


class CurveCallback(TrainerCallback):
    """Every `every` optimizer steps: probe loss/accuracy, the structure and ||B|| per span."""

    def __init__(self, probe: Probe, every: int) -> None:
        self.probe, self.every, self.points = probe, every, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            point = {"step": state.global_step, **self.probe.score(self.probe.logits())}
            if isinstance(self.probe.model, LoR2CModel):
                point["b_norm_by_span"] = slot_norms(self.probe.model)
                point["spans"] = self.probe.model.structure["spans"]
            self.points.append(point)


def fix_structure(model: LoR2CModel, spans: list[list[int]], injected: list[int]) -> None:
    """Give `model` this final structure from step 0, with its events marked done so none fires."""
    c = model.lor2c_config
    fixed = {"skipped": True, "reason": "structure fixed from step 0 (event_probe)", "step": None, "epoch": None}
    done = [{"kind": "merge", **fixed}] * c.num_merges + [{"kind": "inject", **fixed}] * c.num_injects
    model.set_structure({"num_blocks": model.num_blocks, "spans": spans, "owners": [s for s, _ in spans],
                         "injected": injected, "events": done})


def run_variant(variant: str, done: dict[str, dict[str, Any]], hp: quality.HParams, seed: int, model_dir: str,
                tokenizer: Any, train_ds: Any, eval_ds: Any, probe_batch: dict[str, torch.Tensor], every: int,
                work_dir: str) -> dict[str, Any]:
    source = variant[len("fixed:"):] if variant.startswith("fixed:") else None
    if source is not None and source not in done:
        raise quality.BenchError(f"--variants {variant!r} needs the run of {source!r} first (list it earlier).")
    method, run_hp = quality.variant_hparams(source or variant, hp)
    curve = CurveCallback(None, every)  # type: ignore[arg-type]
    start = time.perf_counter()
    trainer = quality.make_trainer(method, model_dir, seed, run_hp, train_ds, tokenizer,
                                   os.path.join(work_dir, variant.replace(":", "_").replace("/", "_")), callbacks=[curve])
    model = trainer.model
    probe = curve.probe = Probe(model, probe_batch)
    events: list[dict[str, Any]] = []
    if isinstance(model, LoR2CModel):
        if source is not None:
            fix_structure(model, done[source]["spans"], done[source]["injected"])
        measure_events(model, probe, events)
    curve.points.append({"step": 0, **probe.score(probe.logits())})
    train_output = trainer.train()
    structure = getattr(model, "structure", None) or {}
    return {"variant": variant, "method": method, "seed": seed,
            "overrides": {k: getattr(run_hp, k) for k in ("merge_criterion", "merge_keep")},
            "accuracy": quality.accuracy(trainer, eval_ds), "train_loss": float(train_output.training_loss),
            "adapter_params": quality.adapter_parameters(model), "spans": structure.get("spans"),
            "injected": structure.get("injected"), "events": events, "curve": curve.points,
            "seconds": round(time.perf_counter() - start, 1)}


def summary_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| variant | dev acc % | final spans | injected | event: probe loss before -> after, rel. logit change, flips |",
             "|---|---|---|---|---|"]
    for name, run in runs.items():
        events = "; ".join(
            f"{e['kind']}@{e['step']} {e['blocks']}: {e['before']['loss']:.3f}->{e['after']['loss']:.3f}, "
            f"{e['after']['rel_logit_change']:.2f}, {e['after']['flips']:.2f}" for e in run["events"] if not e.get("skipped"))
        lines.append(f"| {name} | {100 * run['accuracy']:.2f} | {run['spans']} | {run['injected']} | {events or '-'} |")
    return lines


def plot_curves(runs: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """Probe-batch loss per variant over the steps (events marked), and ||B|| of each span at the end."""
    with png_figure(path, "plot_curves", ncols=2, figsize=(12, 4.2)) as (fig, (loss_ax, norm_ax)):
        for name, run in runs.items():
            line, = loss_ax.plot([p["step"] for p in run["curve"]], [p["loss"] for p in run["curve"]], label=name)
            for e in run["events"]:
                if not e.get("skipped"):
                    loss_ax.axvline(e["step"], color=line.get_color(), alpha=0.25, linestyle=":")
            last = {int(k): v for k, v in (run["curve"][-1].get("b_norm_by_span") or {}).items()}
            for start, end in run.get("spans") or []:  # a bar over the blocks the span covers, at its ||B||
                norm_ax.plot([start - 0.4, end + 0.4], [last[start]] * 2, color=line.get_color(), linewidth=3,
                             alpha=0.8, label=name if start == run["spans"][0][0] else None)
        loss_ax.set_xlabel("optimizer step")
        loss_ax.set_ylabel("loss on the probe batch (eval mode)")
        loss_ax.legend(fontsize=7)
        norm_ax.set_xlabel("blocks the span covers (LoRA-injected blocks have none)")
        norm_ax.legend(fontsize=7)
        norm_ax.set_ylabel("||B|| of the span's connection at the end")
        fig.suptitle(title, fontsize=9)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quality.add_common_arguments(parser)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="Comma-separated (see the module doc).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curve_every", type=int, default=10, help="Optimizer steps between learning-curve points.")
    parser.add_argument("--smoke", action="store_true", help="A few steps on little data: checks the script only.")
    parser.add_argument("--name", default=None, help="Base name of the JSON (default event_probe, or event_probe_smoke).")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        for v in variants:
            quality.parse_variant(v[len("fixed:"):] if v.startswith("fixed:") else v)
    except quality.BenchError as err:
        parser.error(str(err))
    hp = quality.hparams_from(args, max_steps=8, batch_size=8, eval_batch_size=16)
    if args.smoke:
        args.train_size, args.eval_size, args.curve_every = args.train_size or 64, args.eval_size or 32, 2
    model_dir, data_dir, tokenizer = quality.prepare(args)
    train_ds, eval_ds = quality.load_sst2(data_dir, tokenizer, hp.max_length, args.train_size, args.eval_size)
    probe_rows = eval_ds.select(range(min(PROBE_ROWS, len(eval_ds))))
    probe_batch = DataCollatorWithPadding(tokenizer)([probe_rows[i] for i in range(len(probe_rows))])
    name = args.name or ("event_probe_smoke" if args.smoke else "event_probe")
    path = os.path.join(args.output_dir, f"{name}.json")
    data = {"dir": data_dir, "train_rows": len(train_ds), "eval_rows": len(eval_ds)}
    payload = quality.resumed_payload(path, False, hp, data) or {}
    payload.update({"benchmark": "event_probe", "smoke": args.smoke, "machine": quality.machine(),
                    "model": quality.model_label(model_dir), "data": data, "probe_rows": len(probe_rows),
                    "hyperparameters": quality.dataclasses.asdict(hp), "seed": args.seed})
    runs = payload.setdefault("runs", {})
    with tempfile.TemporaryDirectory(prefix="lor2c-probe-") as work_dir:
        for variant in variants:
            if variant in runs:
                print(f"  {variant}: already in {path}, skipped", flush=True)
                continue
            run = run_variant(variant, runs, hp, args.seed, model_dir, tokenizer, train_ds, eval_ds, probe_batch,
                              args.curve_every, work_dir)
            runs[variant] = run
            quality.write_json(path, payload)
            print(f"  {variant}: dev accuracy {100 * run['accuracy']:.2f}%, spans {run['spans']}, injected "
                  f"{run['injected']}, {run['seconds']:.0f}s", flush=True)
    print("\n".join(summary_lines(runs)))
    png = os.path.join(args.output_dir, f"{name}.png")
    plot_curves(runs, png, f"{quality.model_label(model_dir)}, SST-2, {quality.budget(hp)} x batch {hp.batch_size}, "
                f"lr {hp.learning_rate:g}, seed {args.seed}; dotted: events")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    quality.run_cli(main)
