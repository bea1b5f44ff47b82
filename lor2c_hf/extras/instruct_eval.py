"""Scoring trained adapters with lm-evaluation-harness (`pip install 'lor2c-hf[eval]'`).

The adapter stays live: the base model with its adapter (LoR2C family, ResLoRA, or a PEFT LoRA for comparison)
is handed to lm-eval's `HFLM` as a model instance, so the tasks, prompts and metrics are lm-eval's own.
Nothing here re-implements a task.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..adapter_files import read_config_of
from ..config import CONFIG_NAME
from ..serialization import ADAPTER_CLASSES, AdapterLoadError, atomic_write_text, load_adapter_model

# The paper's InstructEval suite (SPEC §8, Table II) as lm-eval tasks: name -> (lm-eval task, shots).
PAPER_TASKS: dict[str, tuple[str, int]] = {
    "mmlu": ("mmlu", 5),
    "bbh": ("bbh_fewshot", 3),
    "drop": ("drop", 3),
    "humaneval": ("humaneval", 0),
}
# The metric a score table shows per lm-eval task (prefix of lm-eval's metric name); other tasks show their first.
HEADLINE_METRICS = {"mmlu": "acc", "bbh_fewshot": "exact_match", "drop": "f1", "humaneval": "pass",
                    "local_mmlu": "acc", "local_bbh": "exact_match", "local_drop": "f1", "local_humaneval": "pass"}
REPORT_JSON, REPORT_MARKDOWN = "results.json", "results.md"


class UnsafeCodeError(ValueError):
    """A task executes model-generated code and running it was not confirmed."""


class TaskDataError(ValueError):
    """lm-eval could not load a task: its data or metric is out of reach (no network, a missing local file)."""


def require_lm_eval():
    """The `lm_eval` package, or an error that says how to install it."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as err:
        raise ImportError("Evaluating with lm-evaluation-harness needs the lm-eval package: "
                          "pip install 'lor2c-hf[eval]' (or pip install 'lm-eval>=0.4.5').") from err
    return lm_eval


# --- adapters ------------------------------------------------------------------------------------------------


def read_adapter_config_dict(path_or_repo_id: str, **hub_kwargs: Any) -> dict[str, Any]:
    """The `adapter_config.json` of a local adapter folder or, failing that, of a Hub repo (lor2c_hf or PEFT)."""
    return read_config_of(path_or_repo_id, **hub_kwargs)[1]


def adapter_kind(config: dict[str, Any], source: str = "the adapter") -> str:
    """The lor2c_hf method ('lor2c', ..., 'reslora') or 'peft:<PEFT type>' that an adapter config describes."""
    method = config.get("method")
    if method in ADAPTER_CLASSES:
        return method
    if "peft_type" in config:
        return f"peft:{str(config['peft_type']).lower()}"
    raise AdapterLoadError(f"{source} is neither a lor2c_hf adapter (method {method!r}; known: {sorted(ADAPTER_CLASSES)}) "
                           f"nor a PEFT adapter (no 'peft_type' in {CONFIG_NAME}).")


def load_adapter_for_evaluation(model: nn.Module, path_or_repo_id: str, **hub_kwargs: Any) -> tuple[nn.Module, str]:
    """(model with the saved adapter, in eval mode with nothing trainable, and its kind).

    lor2c_hf adapters come back as their wrapper (`LoR2CModel`, `ResLoRAModel`), PEFT ones as a `PeftModel`.
    """
    kind = adapter_kind(read_adapter_config_dict(path_or_repo_id, **hub_kwargs), path_or_repo_id)
    if kind.startswith("peft:"):
        from peft import PeftModel

        try:
            wrapped = PeftModel.from_pretrained(model, path_or_repo_id, is_trainable=False, **hub_kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise AdapterLoadError(f"PEFT could not load {path_or_repo_id} onto {type(model).__name__}: "
                                   f"{type(err).__name__}: {err}") from err
    else:
        wrapped = load_adapter_model(model, path_or_repo_id, is_trainable=False, **hub_kwargs)
    wrapped.eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped, kind


# --- lm-eval -------------------------------------------------------------------------------------------------


def lm_eval_model(model: nn.Module, tokenizer: Any, batch_size: Union[int, str] = 1, max_batch_size: int = 64,
                  max_length: Optional[int] = None, **hflm_kwargs: Any):
    """lm-eval's `HFLM` around the live `model` (an adapter wrapper or a plain `transformers` model).

    HFLM takes the instance as it is: put it on its device and dtype first.
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
                max_length=max_length, **hflm_kwargs)


def lm_eval_task_name(name: str) -> str:
    """The lm-eval task for a paper name (`bbh` -> `bbh_fewshot`); any other name is lm-eval's own."""
    return PAPER_TASKS[name][0] if name in PAPER_TASKS else name


def parse_num_fewshot(spec: Optional[str], names: Sequence[str]) -> dict[str, Optional[int]]:
    """Shots per task name: the paper's for its tasks, the task's own (None) otherwise, then `spec` on top.

    `spec` is one integer for every task, or `name=N` pairs separated by commas (`mmlu=0,bbh=3`).
    """
    shots: dict[str, Optional[int]] = {n: PAPER_TASKS[n][1] if n in PAPER_TASKS else None for n in names}
    if not spec:
        return shots
    spec = spec.strip()
    if "=" not in spec:
        value = _non_negative_int(spec, "--num_fewshot")
        return {n: value for n in names}
    for pair in spec.split(","):
        name, _, value = pair.partition("=")
        name = name.strip()
        if name not in shots:
            raise ValueError(f"--num_fewshot names {name!r}, which is not among --tasks {list(names)}.")
        shots[name] = _non_negative_int(value.strip(), f"--num_fewshot {name}")
    return shots


def _non_negative_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{what}={text!r} is not a non-negative integer; pass N, or name=N pairs like mmlu=5,bbh=3.")
    return value


def task_manager(names: Sequence[str], include_path: Optional[Sequence[str]] = None):
    """lm-eval's `TaskManager`. When every task is in `include_path`, lm-eval's own ~15,000 configs are not
    indexed (that takes half a minute); otherwise both are, and a local YAML overrides a built-in one."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    missing = [p for p in paths if not os.path.isdir(p) and not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--include_path {missing}: no such folder or file; pass a folder of lm-eval task YAMLs.")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(lm_eval_task_name(n) in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if lm_eval_task_name(n) not in manager.all_tasks]
    if unknown:
        where = f" or in {paths}" if paths else ""
        raise ValueError(f"--tasks {unknown}: no such lm-eval task, group or tag{where}. "
                         "Add a folder of task YAMLs with --include_path, or see `lm-eval ls tasks`.")
    return manager


def unsafe_code_message(name: str, unsafe: Sequence[str]) -> str:
    return (f"--tasks {name}: {list(unsafe)[:3]} execute the code the model generates on this machine (lm-eval marks "
            "them unsafe_code). Run them only in a sandbox, and pass --confirm_run_unsafe_code to confirm.")


def unsafe_task_names(manager: Any, name: str, _seen: Optional[set] = None) -> list[str]:
    """Tasks under `name` whose config says `unsafe_code`, read from lm-eval's index: no data set is loaded and
    no task code is imported, so the refusal comes first (HumanEval's metric module reaches the Hub on import)."""
    seen = _seen if _seen is not None else set()
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    cfg = entry.cfg or {}
    kind = getattr(entry.kind, "name", str(entry.kind))
    if kind == "GROUP":
        children = cfg.get("task", [])
        children = children if isinstance(children, list) else [children]
        found = []
        for child in children:
            if isinstance(child, str):
                found += unsafe_task_names(manager, child, seen)
            elif isinstance(child, dict) and child.get("unsafe_code"):  # an inline task config
                found.append(str(child.get("task", name)))
            elif isinstance(child, dict) and isinstance(child.get("task"), str):  # a named task with overrides
                found += unsafe_task_names(manager, child["task"], seen)
        return found
    if kind == "TAG":
        members = [n for n, e in manager.task_index.items() if name in (e.tags or ())]
        return [n for m in members for n in unsafe_task_names(manager, m, seen)]
    return [name] if cfg.get("unsafe_code") else []


def check_unsafe_code(manager: Any, names: Sequence[str], confirm_run_unsafe_code: bool) -> None:
    """Refuse, before anything is loaded, tasks that run generated code unless the user confirmed it.

    Once confirmed, `evaluate`'s code_eval metric (HumanEval's pass@k, run once when lm-eval imports the task's
    module) is allowed too: it asks for HF_ALLOW_CODE_EVAL=1 on its own.
    """
    if confirm_run_unsafe_code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
        return
    for name in names:
        unsafe = unsafe_task_names(manager, lm_eval_task_name(name))
        if unsafe:
            raise UnsafeCodeError(unsafe_code_message(name, unsafe))


def leaf_tasks(obj: Any) -> list[Any]:
    """The lm-eval `Task` objects under a loaded task, group or tag."""
    if isinstance(obj, list):
        return [t for item in obj for t in leaf_tasks(item)]
    if hasattr(obj, "get_all_tasks"):
        return list(obj.get_all_tasks())
    return [obj]


def load_tasks(manager: Any, names: Sequence[str], shots: dict[str, Optional[int]],
               confirm_run_unsafe_code: bool = False) -> dict[str, Any]:
    """name -> loaded lm-eval task/group (datasets read), shots set per task, unsafe tasks refused up front.

    lm-eval itself refuses a task marked `unsafe_code` unless `confirm_run_unsafe_code`; checking here means the
    refusal comes before the model is loaded.
    """
    check_unsafe_code(manager, names, confirm_run_unsafe_code)
    loaded: dict[str, Any] = {}
    for name in names:
        task_name = lm_eval_task_name(name)
        try:
            result = manager.load([task_name])
        except OSError as err:  # ConnectionError offline, FileNotFoundError from a local YAML
            raise TaskDataError(
                f"--tasks {name}: lm-eval could not load {task_name!r} ({type(err).__name__}: {err}). With no "
                "internet, lm-eval needs the Hub data sets (and for HumanEval, the `evaluate` package's code_eval "
                "metric) in the local Hugging Face cache with HF_DATASETS_OFFLINE=1, or a task YAML on local files "
                "(recipes/tasks/README.md).") from err
        if task_name in result["groups"]:
            obj = result["groups"][task_name]
        elif task_name in result["tasks"]:
            obj = result["tasks"][task_name]
        else:  # a tag: the tasks it names
            obj = list(result["tasks"].values())
        for task in leaf_tasks(obj):
            if shots.get(name) is not None:
                task.set_config(key="num_fewshot", value=shots[name])
        unsafe = [t.task_name for t in leaf_tasks(obj)
                  if getattr(t, "UNSAFE_CODE", False) or getattr(getattr(t, "config", None), "unsafe_code", False)]
        if unsafe and not confirm_run_unsafe_code:
            raise UnsafeCodeError(unsafe_code_message(name, unsafe))
        loaded[name] = obj
    return loaded


def effective_shots(loaded: dict[str, Any]) -> dict[str, Optional[int]]:
    """name -> the shots its tasks will use (None where its subtasks differ)."""
    shots: dict[str, Optional[int]] = {}
    for name, obj in loaded.items():
        values = {t.get_config("num_fewshot") or 0 for t in leaf_tasks(obj)}
        shots[name] = values.pop() if len(values) == 1 else None
    return shots


def run_lm_eval(lm: Any, manager: Any, loaded: dict[str, Any], limit: Optional[float] = None,
                bootstrap_iters: int = 100000, log_samples: bool = False, confirm_run_unsafe_code: bool = False,
                **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on tasks loaded by `manager` (see `load_tasks`); returns lm-eval's results.

    The manager is passed on: without one, simple_evaluate indexes all of lm-eval's task configs again.
    """
    lm_eval = require_lm_eval()
    return lm_eval.simple_evaluate(model=lm, tasks=list(loaded.values()), task_manager=manager, num_fewshot=None,
                                   limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                   confirm_run_unsafe_code=confirm_run_unsafe_code, **kwargs)


def task_scores(results: dict[str, Any], loaded: dict[str, Any]) -> dict[str, dict[str, float]]:
    """name -> {metric: value} for each requested task or group (lm-eval's ',none' filter suffix dropped)."""
    scores: dict[str, dict[str, float]] = {}
    for name in loaded:
        entry = results.get("results", {}).get(lm_eval_task_name(name))
        if entry is None:
            entry = results.get("groups", {}).get(lm_eval_task_name(name), {})
        scores[name] = {key.removesuffix(",none"): float(value) for key, value in entry.items()
                        if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return scores


def headline_metric(name: str, metrics: dict[str, float]) -> Optional[str]:
    """The metric a score table shows for a task: see `HEADLINE_METRICS`, else its first (never a stderr)."""
    candidates = [k for k in metrics if "_stderr" not in k]
    wanted = HEADLINE_METRICS.get(lm_eval_task_name(name))
    preferred = [k for k in candidates if wanted and k.split(",")[0].startswith(wanted)]
    return (preferred or candidates or [None])[0]


def json_safe(obj: Any) -> Any:
    """lm-eval results made JSON-able (numpy scalars, tensors, sets, callables to plain values or strings)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    return str(obj)


# --- reports -------------------------------------------------------------------------------------------------


def score_table(scores: dict[str, dict[str, dict[str, float]]], headline: dict[str, str],
                column_notes: Optional[dict[str, str]] = None, labels: Optional[dict[str, str]] = None,
                percent: bool = True) -> str:
    """A markdown table: one row per model (`labels` names them), one column per task (its headline metric),
    and their average."""
    notes, labels = column_notes or {}, labels or {}
    tasks = list(headline)
    header = ["model"] + [f"{t} {headline[t]}{' (' + notes[t] + ')' if notes.get(t) else ''}" for t in tasks]
    header += ["average"] if len(tasks) > 1 else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row, by_task in scores.items():
        values = [by_task.get(t, {}).get(headline[t]) for t in tasks]
        cells = [_fmt(v, percent) for v in values]
        if len(tasks) > 1:
            present = [v for v in values if v is not None]
            cells.append(_fmt(sum(present) / len(present), percent) if len(present) == len(values) else "n/a")
        lines.append("| " + " | ".join([labels.get(row, row)] + cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def write_report(output_dir: str, scores: dict[str, dict[str, dict[str, float]]], headline: dict[str, str],
                 meta: dict[str, Any], title: str, column_notes: Optional[dict[str, str]] = None,
                 labels: Optional[dict[str, str]] = None, details: Optional[dict[str, Any]] = None,
                 extra_markdown: Iterable[str] = ()) -> tuple[str, str]:
    """Write `results.json` (meta, row labels, headline metrics, every score, details) and `results.md` (the
    score table first, in percent) to `output_dir`, each atomically; returns their paths.

    `scores` is row (e.g. 'base', 'adapter') -> task -> metric -> value in [0, 1]; `labels` says what each row is.
    """
    os.makedirs(output_dir, exist_ok=True)
    report = {"meta": meta, "rows": labels or {r: r for r in scores}, "headline": headline, "scores": scores,
              **(details or {})}
    text = json.dumps(json_safe(report), indent=2)
    json_path, md_path = os.path.join(output_dir, REPORT_JSON), os.path.join(output_dir, REPORT_MARKDOWN)
    atomic_write_text(json_path, text)
    markdown = [f"# {title}\n", score_table(scores, headline, column_notes, labels), *extra_markdown]
    atomic_write_text(md_path, "\n".join(markdown))
    return json_path, md_path


def write_samples(directory: str, row: str, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
    """lm-eval's per-document records (prompt, per-choice log-likelihoods or generations) as JSON lines, one
    file per task under `directory/<row>/`."""
    paths = []
    folder = os.path.join(directory, row)
    os.makedirs(folder, exist_ok=True)
    for task, records in samples.items():
        path = os.path.join(folder, f"{task}.jsonl")
        lines = "".join(json.dumps(json_safe(r)) + "\n" for r in records)
        atomic_write_text(path, lines)
        paths.append(path)
    return paths
