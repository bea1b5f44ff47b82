#!/usr/bin/env python
"""GLUE with LoR2C, its variants, or PEFT LoRA on RoBERTa-base: the paper's NLU table (SPEC §8).

    python recipes/glue.py --config recipes/configs/glue_mrpc.yaml --data_dir glue_data
    python recipes/glue.py --config recipes/configs/glue_sst2.yaml --method lora --data_dir glue_data/SST-2
    python recipes/glue.py --config recipes/configs/glue_sst2.yaml --eval_only --adapter out/glue_sst2_imlor2c

Six tasks (sst2, mrpc, cola, qnli, rte, stsb) read from GLUE's own TSV files (`--data_dir`: GLUE's folder or
one task's folder, with train.tsv and dev.tsv) or, without `--data_dir`, from the Hub's `nyu-mll/glue`. Each
is scored on its dev set with its GLUE metric through `evaluate`, offline (`lor2c_hf.extras.glue_metric`), every epoch;
the best checkpoint by the task's metric is kept and saved. `--eval_only --adapter DIR` re-scores a saved
adapter (LoR2C family, ResLoRA or PEFT LoRA). Both write `glue_report.json` and `glue_report.md`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification, DataCollatorWithPadding, EvalPrediction, Trainer, TrainingArguments, set_seed,
)

from common import (
    AdapterArguments, GlueTrainingArguments, ModelArguments, RecipeArgumentParser, RecipeError, check_model_arguments,
    check_positive, check_ranks_agree, resolve_resume, describe_batch, draw_structure, hub_error, load_model, load_tokenizer,
    lor2c_config_from, main_print, one_line, prepare_training_namespace, run_recipe, unwrap_model,
    validate_adapter_arguments, wrap_model,
)

REPORT_NAME = "glue_report"


@dataclass(frozen=True)
class GlueTask:
    """Where a task's fields are in GLUE's TSV files and on the Hub, its labels, and the metric that picks the
    best checkpoint. `columns` maps our fields (sentence1, sentence2, label) to header names, or to column
    indices for files without a header (CoLA)."""

    name: str
    folder: str
    columns: dict[str, Union[str, int]]
    layout: str
    hub_columns: dict[str, str]
    labels: tuple[str, ...] = ()  # raw label values in class-id order; empty for regression
    label_names: tuple[str, ...] = ()
    best_metric: str = "accuracy"

    @property
    def has_header(self) -> bool:
        return all(isinstance(c, str) for c in self.columns.values())

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def is_pair(self) -> bool:
        return "sentence2" in self.columns


ENTAILMENT = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("sst2", "SST-2", {"sentence1": "sentence", "label": "label"},
             "header sentence<TAB>label", {"sentence1": "sentence", "label": "label"},
             ("0", "1"), ("negative", "positive")),
    GlueTask("mrpc", "MRPC", {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
             "header Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String",
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
             ("0", "1"), ("not_equivalent", "equivalent")),
    GlueTask("cola", "CoLA", {"sentence1": 3, "label": 1},
             "no header; source<TAB>label<TAB>original label<TAB>sentence", {"sentence1": "sentence", "label": "label"},
             ("0", "1"), ("unacceptable", "acceptable"), "matthews_correlation"),
    GlueTask("qnli", "QNLI", {"sentence1": "question", "sentence2": "sentence", "label": "label"},
             "header index<TAB>question<TAB>sentence<TAB>label",
             {"sentence1": "question", "sentence2": "sentence", "label": "label"}, ENTAILMENT, ENTAILMENT),
    GlueTask("rte", "RTE", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
             "header index<TAB>sentence1<TAB>sentence2<TAB>label",
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, ENTAILMENT, ENTAILMENT),
    GlueTask("stsb", "STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
             "header index<TAB>genre<TAB>filename<TAB>year<TAB>old_index<TAB>source1<TAB>source2<TAB>sentence1"
             "<TAB>sentence2<TAB>score", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
             best_metric="pearson"),
)}
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
HUB_SPLITS = {"train": "train", "validation": "validation"}


@dataclass
class GlueDataArguments:
    """The task, where its data is, and re-scoring a saved adapter instead of training."""

    task_name: str = field(default="sst2", metadata={"help": f"GLUE task: one of {', '.join(TASKS)}."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "GLUE's TSV files: GLUE's data folder (with e.g. SST-2/train.tsv, SST-2/dev.tsv) or one task's folder. Unset: the Hub's --dataset_name."})
    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub data set with one config per task (used when --data_dir is unset)."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per example (pairs together); longer ones are truncated."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training examples (quick runs)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Score only the first N dev examples (quick runs)."})
    eval_only: bool = field(default=False, metadata={"help": "Do not train: score the adapter in --adapter on the dev set and write the report."})
    adapter: Optional[str] = field(default=None, metadata={"help": "With --eval_only: a saved adapter folder (LoR2C family, ResLoRA, or PEFT LoRA)."})


SECTIONS = {"model": ModelArguments, "adapter": AdapterArguments, "data": GlueDataArguments, "training": GlueTrainingArguments}
SEARCH_REPORT = "mn_search"  # mn_search.json, mn_search.png in the output folder

# SPEC §8 settings shared by all tasks; per-task epochs, batch, lr and M, N live in recipes/configs/glue_<task>.yaml.
RECIPE_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path="roberta-base",
    method="imlor2c", r=8, lora_alpha=16, lora_dropout=0.1, inject_r=4, inject_alpha=16, inject_dropout=0.05,
    num_merges=4, num_injects=4, schedule="epochs",
    seed=17, num_train_epochs=30, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=4e-4,
    lr_scheduler_type="linear", warmup_steps=0.06, optim="adamw_torch", weight_decay=0.01, head_learning_rate_ratio=0.5,
    eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, save_total_limit=1,
    logging_steps=50, report_to="none", dataloader_pin_memory=torch.cuda.is_available(),
)


# --- data ----------------------------------------------------------------------------------------------------


def task_of(name: str) -> GlueTask:
    if name not in TASKS:
        raise RecipeError(f"--task_name {name!r} is unknown: expected one of {', '.join(TASKS)}.")
    return TASKS[name]


def tsv_path(data_dir: str, task: GlueTask, split: str) -> str:
    """`<data_dir>/<Task>/<file>` (GLUE's folder) or `<data_dir>/<file>` (the task's folder)."""
    if not os.path.isdir(data_dir):
        raise RecipeError(f"--data_dir {data_dir}: no such folder; pass GLUE's data folder or its {task.folder} folder.")
    name = SPLIT_FILES[split]
    for folder in (os.path.join(data_dir, task.folder), data_dir):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise RecipeError(f"--data_dir {data_dir} has neither {task.folder}/{name} nor {name}; pass GLUE's data folder "
                      f"or its {task.folder} folder (GLUE's {name} for {task.name}).")


def read_tsv_rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line; tabs only separate fields (GLUE's files are unquoted), and
    fields are stripped (some copies of GLUE carry a carriage return before each tab)."""
    rows = []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise RecipeError(f"--data_dir: {path} line {line} is not UTF-8 text (byte {raw[err.start]:#04x}); GLUE's files "
                          "are UTF-8: convert it, e.g. iconv -f latin1 -t utf-8.") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append((number, [cell.strip() for cell in line.split("\t")]))
    return rows


def read_glue_tsv(path: str, task: GlueTask, flag: str = "--data_dir"):
    """One split of `task` from GLUE's TSV file as a `datasets.Dataset` with sentence1 (, sentence2), label."""
    import datasets

    rows = read_tsv_rows(path)
    expected = f"GLUE's {task.folder} layout ({task.layout})"
    if task.has_header:
        if not rows:
            raise RecipeError(f"{flag}: {path} is empty; expected {expected}.")
        header = rows.pop(0)[1]
        missing = [c for c in task.columns.values() if c not in header]
        if missing:
            raise RecipeError(f"{flag}: {path} has columns {header} but lacks {missing}; expected {expected}.")
        index = {name: header.index(column) for name, column in task.columns.items()}
    else:
        index = dict(task.columns)
    width = max(index.values()) + 1
    data: dict[str, list] = {name: [] for name in task.columns}
    for number, cells in rows:
        if len(cells) < width:
            raise RecipeError(f"{flag}: {path} line {number} has {len(cells)} tab-separated fields, fewer than the "
                              f"{width} of {expected}.")
        for name, i in index.items():
            data[name].append(cells[i])
    data["label"] = [parse_label(raw, task, f"{path} line {n}", flag) for raw, (n, _) in zip(data["label"], rows)]
    if not data["label"]:
        raise RecipeError(f"{flag}: {path} has no examples; expected {expected}.")
    return datasets.Dataset.from_dict(data, features=task_features(task))


def parse_label(raw: str, task: GlueTask, where: str, flag: str) -> Union[int, float]:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise RecipeError(f"{flag}: {where}: score {raw!r} is not a number ({task.name} is scored 0-5).") from None
    if raw not in task.labels:
        raise RecipeError(f"{flag}: {where}: label {raw!r} is not one of {list(task.labels)} ({task.name}).")
    return task.labels.index(raw)


def task_features(task: GlueTask):
    import datasets

    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features({**{n: datasets.Value("string") for n in task.columns if n != "label"}, "label": label})


def load_hub_split(data_args: GlueDataArguments, task: GlueTask, split: str):
    """One split from the Hub's GLUE (config = task name), renamed to our fields."""
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        loaded = datasets.load_dataset(data_args.dataset_name, task.name, split=HUB_SPLITS[split])
    except (OSError, ValueError, ConnectionError, DatasetsError) as err:
        raise hub_error("--dataset_name", f"{data_args.dataset_name} ({task.name})", err,
                        f"--data_dir with GLUE's TSV files ({task.folder}/train.tsv, {task.folder}/dev.tsv)") from None
    missing = [c for c in task.hub_columns.values() if c not in loaded.column_names]
    if missing:
        raise RecipeError(f"--dataset_name {data_args.dataset_name} ({task.name}) has columns {loaded.column_names} "
                          f"but lacks {missing}; expected GLUE's columns {list(task.hub_columns.values())}.")
    loaded = loaded.select_columns(list(task.hub_columns.values()))
    return loaded.rename_columns({v: k for k, v in task.hub_columns.items() if k != v}).cast(task_features(task))


def load_split(data_args: GlueDataArguments, task: GlueTask, split: str):
    if data_args.data_dir:
        return read_glue_tsv(tsv_path(data_args.data_dir, task, split), task)
    return load_hub_split(data_args, task, split)


def first(dataset: Any, n: Optional[int]) -> Any:
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def tokenize_split(dataset: Any, tokenizer: Any, task: GlueTask, max_seq_length: int) -> Any:
    """input_ids / attention_mask (/ token_type_ids) of sentence1 (and sentence2), keeping `label`."""
    texts = ["sentence1", "sentence2"] if task.is_pair else ["sentence1"]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*[batch[t] for t in texts], truncation=True, max_length=max_seq_length)

    return dataset.map(tokenize, batched=True, remove_columns=texts, desc=f"tokenize {task.name}")


def load_task_data(data_args: GlueDataArguments, train: bool = True) -> tuple[Optional[Any], Any]:
    """(train, dev) as read (sentence1, sentence2 for pairs, label); train is None when not training."""
    task = task_of(data_args.task_name)
    train_set = first(load_split(data_args, task, "train"), data_args.max_train_samples) if train else None
    return train_set, first(load_split(data_args, task, "validation"), data_args.max_eval_samples)


def tokenize_task_data(splits: Sequence[Optional[Any]], tokenizer: Any, data_args: GlueDataArguments) -> list[Optional[Any]]:
    task = task_of(data_args.task_name)
    return [tokenize_split(d, tokenizer, task, data_args.max_seq_length) if d is not None else None for d in splits]


# --- model, metric, trainer ----------------------------------------------------------------------------------


def load_classifier(model_args: ModelArguments, training_args: TrainingArguments, task: GlueTask, tokenizer: Any):
    """The base model with a fresh head for `task`: one output for STS-B (regression), else one per label."""
    labels = {} if task.is_regression else dict(id2label=dict(enumerate(task.label_names)),
                                                label2id={n: i for i, n in enumerate(task.label_names)})
    # A checkpoint whose head has another size (e.g. trained on another task) gets a fresh head; transformers
    # lists the re-initialised tensors.
    model = load_model(model_args, training_args, AutoModelForSequenceClassification, ignore_mismatched_sizes=True,
                       num_labels=1 if task.is_regression else len(task.labels), **labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def glue_metric(task: GlueTask):
    """The task's GLUE metric, from `evaluate` with no network; scikit-learn computes it."""
    from importlib.util import find_spec

    missing = [m for m in ("sklearn", "scipy") if find_spec(m) is None]
    if missing:
        raise RecipeError(f"the GLUE metrics need scikit-learn and SciPy ({', '.join(missing)} missing): "
                          "pip install 'lor2c-hf[quickstart]' or pip install scikit-learn scipy.")
    from lor2c_hf.extras.glue_metric import load_glue_metric

    return load_glue_metric(task.name)


def compute_metrics_fn(task: GlueTask) -> Callable[[EvalPrediction], dict[str, float]]:
    metric = glue_metric(task)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    return compute


class HeadLearningRate:
    """Trainer mixin: the task head trains at `args.head_learning_rate_ratio` x the learning rate, in param groups
    of its own (as the authors' GLUE script does for RoBERTa's classifier, at lr / 2)."""

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        ratio = getattr(self.args, "head_learning_rate_ratio", 1.0)
        if ratio == 1.0 or getattr(optimizer, "_head_groups_split", False):
            return optimizer
        head = {id(p) for p in head_parameters(model if model is not None else self.model)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in head]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": moved, "lr": group["lr"] * ratio})
        optimizer._head_groups_split = True
        return optimizer


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of the task head(s) (`classifier`, `score`, ...) of a wrapped or PEFT model."""
    from lor2c_hf.architectures import detect_task_heads

    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    heads = set(detect_task_heads(base))
    return [p for name, p in inner.named_parameters() if p.requires_grad and heads & set(name.split("."))]


def build_trainer(trainer_class: type, model: Optional[torch.nn.Module], training_args: TrainingArguments,
                  task: GlueTask, tokenizer: Any, train: Optional[Any], dev: Any, **kwargs: Any) -> Trainer:
    """`trainer_class` (with `HeadLearningRate`) on the task's data, metric and collator; `kwargs` go to it."""
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None)
    cls = type(f"Glue{trainer_class.__name__}", (HeadLearningRate, trainer_class), {})
    return cls(model=model, args=training_args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
               data_collator=collator, compute_metrics=compute_metrics_fn(task), **kwargs)


def load_saved_adapter(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, type, str]:
    """(model with the adapter saved at `path`, Trainer class for it, method): PEFT LoRA or a lor2c_hf adapter."""
    import lor2c_hf
    from lor2c_hf.adapter_files import read_config_data

    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise RecipeError(f"--adapter {path}: no adapter_config.json there; pass a folder written by this recipe "
                          "(its --output_dir) or by save_pretrained.")
    try:
        saved = read_config_data(config_file)
    except lor2c_hf.AdapterLoadError as err:
        raise RecipeError(f"--adapter {path}: {one_line(err)[:400]}") from None
    try:
        if saved.get("peft_type") == "LORA":
            from peft import PeftModel

            return PeftModel.from_pretrained(model, path), Trainer, "lora"
        return lor2c_hf.load_adapter_model(model, path), lor2c_hf.LoR2CTrainer, str(saved.get("method"))
    except (lor2c_hf.AdapterLoadError, ValueError, KeyError, RuntimeError) as err:
        raise RecipeError(f"--adapter {path} does not fit --model_name_or_path: {one_line(err)[:400]}") from None


# --- M x N search ----------------------------------------------------------------------------------------------


def search_space(values: Sequence[int], rules: bool) -> dict[str, list[Any]]:
    """The Optuna grid: M x N (x merge_criterion x merge_keep)."""
    space: dict[str, list[Any]] = {"num_merges": list(values), "num_injects": list(values)}
    if rules:
        space.update(merge_criterion=["paper", "official"], merge_keep=["paper", "official"])
    return space


def search_mn(model_args: ModelArguments, adapter_args: AdapterArguments, training_args: "GlueTrainingArguments",
              task: GlueTask, tokenizer: Any, train: Any, dev: Any) -> dict[str, Any]:
    """Grid-search M, N (and the merge rule) with `LoR2CTrainer.hyperparameter_search`: one fresh model per trial
    (same seed, so the same head init and data order), each scored by its best dev metric over the epochs.
    Writes `mn_search.json` and `mn_search.png` in the output folder; returns the best trial's adapter fields."""
    import optuna
    from lor2c_hf import LoR2CTrainer
    from lor2c_hf.atomic import atomic_write_text
    from lor2c_hf.config import events_problem, method_of
    from lor2c_hf.extras.mn_heatmap import plot_mn_heatmap

    if adapter_args.method != "imlor2c":
        raise RecipeError(f"--search_mn searches IMLoR2C's M and N; got --method {adapter_args.method} "
                          "(M = 0 is InjectLoR2C, N = 0 MergeLoR2C): pass --method imlor2c.")
    args = copy.deepcopy(training_args)
    args.output_dir = os.path.join(training_args.output_dir, SEARCH_REPORT)
    args.save_strategy, args.load_best_model_at_end, args.push_to_hub = "no", False, False
    if training_args.search_epochs:
        args.num_train_epochs = training_args.search_epochs
    space = search_space(training_args.search_values, training_args.search_merge_rules)
    trainer = build_trainer(LoR2CTrainer, None, args, task, tokenizer, train, dev, lor2c_config=lor2c_config_from(adapter_args),
                            model_init=lambda: load_classifier(model_args, training_args, task, tokenizer))
    blocks = trainer.lor2c_model.num_blocks
    trials: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    metric = f"eval_{task.best_metric}"

    def hp_space(trial: Any) -> dict[str, Any]:
        current["trial"] = trial
        values = {name: trial.suggest_categorical(name, choices) for name, choices in space.items()}
        problem = events_problem(values["num_merges"], values["num_injects"], blocks)
        if problem:
            raise optuna.TrialPruned(f"M={values['num_merges']}, N={values['num_injects']}: {problem}")
        return values

    def best_epoch(metrics: dict[str, float]) -> float:
        """The trial's best dev metric so far (what load_best_model_at_end would keep)."""
        score = max(e[metric] for e in trainer.state.log_history if metric in e)
        model, trial = trainer.lor2c_model, current["trial"]
        trials[trial.number] = {**trial.params, "score": score, "adapter_params": model.num_adapter_parameters(),
                                "spans": model.structure["spans"], "injected": model.structure["injected"]}
        return score

    main_print(training_args, f"[glue] --search_mn: {len(space['num_merges']) * len(space['num_injects'])} (M, N) pairs"
                              f"{' x 4 merge rules' if training_args.search_merge_rules else ''} on {task.name} dev")
    best = trainer.hyperparameter_search(hp_space=hp_space, compute_objective=best_epoch, direction="maximize",
                                         backend="optuna", n_trials=math.prod(len(v) for v in space.values()),
                                         sampler=optuna.samplers.GridSampler(space, seed=training_args.seed))
    chosen = {k: best.hyperparameters[k] for k in space}
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        report = {"task": task.name, "metric": task.best_metric, "space": space, "epochs_per_trial": args.num_train_epochs,
                  "trials": [trials[k] for k in sorted(trials)], "best": {**chosen, "score": best.objective}}
        atomic_write_text(os.path.join(training_args.output_dir, f"{SEARCH_REPORT}.json"), json.dumps(report, indent=1))
        cells: dict[tuple[int, int], float] = {}
        for t in trials.values():  # the best merge rule of each (M, N) when rules were searched too
            key = (t["num_merges"], t["num_injects"])
            cells[key] = max(cells.get(key, -math.inf), t["score"])
        plot_mn_heatmap(cells, os.path.join(training_args.output_dir, f"{SEARCH_REPORT}.png"),
                        f"{task.name} dev {task.best_metric} per (M, N), best epoch; best M={chosen['num_merges']}, "
                        f"N={chosen['num_injects']}", metric=task.best_metric)
    main_print(training_args, f"[glue] --search_mn best: {chosen} ({task.best_metric} {best.objective:.4f}); "
                              f"training with it")
    return {**chosen, "method": method_of(False, chosen["num_merges"], chosen["num_injects"])}  # e.g. N = 0: mergelor2c


# --- report --------------------------------------------------------------------------------------------------


def adapter_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Adapter parameters (task head excluded; the same whether or not they still train) and, for the LoR2C
    family, the structure (spans, injected blocks, events)."""
    inner = unwrap_model(model)
    if hasattr(inner, "num_adapter_parameters"):  # lor2c_hf adapters: what the current structure reads
        count = inner.num_adapter_parameters()
    else:  # PEFT LoRA
        count = sum(p.numel() for n, p in inner.named_parameters() if ".lora_" in n)
    summary: dict[str, Any] = {"adapter_parameters": int(count)}
    structure = getattr(inner, "structure", None)
    if isinstance(structure, dict) and "spans" in structure:
        summary["spans"] = structure["spans"]
        summary["injected"] = structure["injected"]
        summary["events"] = [{k: e.get(k) for k in ("kind", "step", "epoch", "blocks")} for e in structure["events"]]
    return summary


def build_report(task: GlueTask, method: str, model_name: str, adapter_dir: str, metrics: dict[str, float],
                 model: torch.nn.Module, eval_file: str, num_examples: int, mode: str) -> dict[str, Any]:
    from lor2c_hf.extras.glue_metric import TASK_METRICS

    scores = {k: metrics[f"eval_{k}"] for k in ("loss",) + TASK_METRICS[task.name] if f"eval_{k}" in metrics}
    return {"task": task.name, "mode": mode, "method": method, "base_model": model_name, "adapter": adapter_dir,
            "eval_data": eval_file, "eval_examples": num_examples, "best_metric": task.best_metric,
            "score": scores.get(task.best_metric), "metrics": scores, **adapter_summary(model)}


def write_report(report: dict[str, Any], output_dir: str) -> tuple[str, str]:
    """`glue_report.json` and a readable `glue_report.md` in `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, md_path = (os.path.join(output_dir, f"{REPORT_NAME}.{ext}") for ext in ("json", "md"))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GLUE {report['task']}: {report['method']} ({report['mode']})", "",
             f"- base model: `{report['base_model']}`", f"- adapter: `{report['adapter']}`",
             f"- dev data: `{report['eval_data']}` ({report['eval_examples']} examples)",
             f"- adapter parameters (task head excluded): {report['adapter_parameters']:,d}"]
    if "spans" in report:
        lines.append(f"- structure: spans {report['spans']}, injected blocks {report['injected']}, "
                     f"{len(report['events'])} event(s)")
    if report.get("structure_picture"):
        lines += ["", f"![structure: connections, injected blocks, SFS of every event]({report['structure_picture']})"]
    lines += ["", "| metric | value |", "|---|---|"]
    for name, value in report["metrics"].items():
        mark = " (best-model metric)" if name == report["best_metric"] else ""
        lines.append(f"| {name}{mark} | {value:.4f} |" if isinstance(value, float) else f"| {name}{mark} | {value} |")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return json_path, md_path


def eval_data_source(data_args: GlueDataArguments, task: GlueTask) -> str:
    return tsv_path(data_args.data_dir, task, "validation") if data_args.data_dir else f"{data_args.dataset_name}:{task.name}/validation"


# --- main ----------------------------------------------------------------------------------------------------


def check_best_metric(name: str, task: GlueTask) -> None:
    """--metric_for_best_model is one the task reports (with or without eval_), else Trainer fails after epoch 1."""
    from lor2c_hf.extras.glue_metric import TASK_METRICS

    known = ("loss",) + TASK_METRICS[task.name]
    if name.removeprefix("eval_") not in known:
        raise RecipeError(f"--metric_for_best_model {name!r} is not reported for {task.name}: expected one of "
                          f"{', '.join(known)} (optionally with eval_).")


def parse_arguments(argv: Optional[Sequence[str]], defaults: dict[str, Any], prog: str,
                    sections: Optional[dict[str, type]] = None, description: Optional[str] = None) -> tuple:
    """(model, adapter, data, training, *any further sections) arguments, checked before anything is loaded."""

    def prepare(namespace: Any) -> None:
        task = task_of(namespace.task_name)
        prepare_training_namespace(namespace)
        if namespace.output_dir is None:
            namespace.output_dir = os.path.join("out", f"glue_{task.name}_{namespace.method}")
        resolve_resume(namespace)
        if namespace.metric_for_best_model is None:
            namespace.metric_for_best_model = task.best_metric
        if namespace.eval_only:
            namespace.load_best_model_at_end = False
        check_best_metric(namespace.metric_for_best_model, task)
        check_positive(namespace.max_seq_length, "--max_seq_length")
        for flag in ("max_train_samples", "max_eval_samples"):
            check_positive(getattr(namespace, flag), f"--{flag}", allow_none=True)

    parser = RecipeArgumentParser(sections or SECTIONS, prog=prog, description=description or __doc__.split("\n\n")[0])
    parsed = parser.parse(argv, defaults=defaults, prepare=prepare)
    model_args, adapter_args, data_args, training_args = parsed[:4]
    if data_args.eval_only and not data_args.adapter:
        raise RecipeError("--eval_only needs --adapter <folder> (an adapter saved by this recipe's --output_dir).")
    if data_args.adapter and not data_args.eval_only:
        raise RecipeError("--adapter is read only with --eval_only; drop it to train a new adapter.")
    if data_args.data_dir is not None and not os.path.isdir(data_args.data_dir):
        raise RecipeError(f"--data_dir {data_args.data_dir}: no such folder; pass GLUE's data folder or one task's folder.")
    if not data_args.eval_only:
        validate_adapter_arguments(adapter_args, training_args)
    check_model_arguments(model_args)
    return parsed


def main(argv: Optional[Sequence[str]] = None) -> int:
    model_args, adapter_args, data_args, training_args = parse_arguments(argv, RECIPE_DEFAULTS, "glue.py")
    task = task_of(data_args.task_name)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="load and tokenize data"):
        splits = load_task_data(data_args, train=not data_args.eval_only)  # bad data fails before any loading
        tokenizer = load_tokenizer(model_args)
        train, dev = tokenize_task_data(splits, tokenizer, data_args)
    model = load_classifier(model_args, training_args, task, tokenizer)

    if data_args.eval_only:
        model, trainer_class, method = load_saved_adapter(model, data_args.adapter)
        trainer = build_trainer(trainer_class, model, training_args, task, tokenizer, None, dev)
        metrics = trainer.evaluate()
        adapter_dir, mode = data_args.adapter, "eval_only"
    else:
        if training_args.search_mn:
            for name, value in search_mn(model_args, adapter_args, training_args, task, tokenizer, train, dev).items():
                setattr(adapter_args, name, value)
            set_seed(training_args.seed)
        main_print(training_args, f"[glue] {task.name} with {adapter_args.method}: {len(train)} training and {len(dev)} "
                                  f"dev examples; {describe_batch(training_args)}; output {training_args.output_dir}")
        model, trainer_class = wrap_model(model, adapter_args, "SEQ_CLS")
        if training_args.process_index == 0:
            model.print_trainable_parameters()
        trainer = build_trainer(trainer_class, model, training_args, task, tokenizer, train, dev)
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()  # trainer_state.json: every epoch's scores and the best checkpoint
        trainer.save_model(training_args.output_dir)  # the best checkpoint's adapter (load_best_model_at_end)
        metrics = trainer.evaluate()
        check_ranks_agree(trainer.model, training_args)
        adapter_dir, method, mode = training_args.output_dir, adapter_args.method, "train"
    trainer.log_metrics("eval", metrics)
    if training_args.process_index == 0:
        report = build_report(task, method, model_args.model_name_or_path, adapter_dir, metrics, trainer.model,
                              eval_data_source(data_args, task), len(dev), mode)
        picture = draw_structure(trainer.model, training_args.output_dir, f"{task.name} {method}: {report['score']:.4f}")
        if picture:
            report["structure_picture"] = os.path.basename(picture)
        paths = write_report(report, training_args.output_dir)
        print(f"[glue] {task.name} {task.best_metric} {report['score']:.4f}; report in {paths[0]} and {paths[1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, prog="glue.py"))
