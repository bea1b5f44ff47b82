#!/usr/bin/env python
"""Score a trained adapter on the paper's InstructEval benchmarks through lm-evaluation-harness (SPEC §8).

    python recipes/evaluate_instruct.py --base meta-llama/Llama-2-7b-hf --adapter out/alpaca-imlor2c --bf16 --with_base

loads the base model and the adapter (LoR2C family or ResLoRA saved by lor2c_hf, or a PEFT LoRA; its
adapter_config.json tells which), hands the live model to lm-eval's HFLM and runs lm-eval's own tasks with the
paper's shots: MMLU 5, BBH 3 (`bbh_fewshot`), DROP 3, HumanEval 0. Writes results.json and results.md (a score
table in percent, the base model's row beside the adapter's with --with_base) to --output_dir.

HumanEval EXECUTES THE CODE THE MODEL GENERATES. lm-eval refuses it unless you pass --confirm_run_unsafe_code;
run it in a sandbox (a container with no credentials or network).

With no internet: pre-cache the Hub data sets (HF_DATASETS_OFFLINE=1), or point task YAMLs at local json/jsonl
files with --include_path recipes/tasks (local_mmlu, local_bbh, local_drop, local_humaneval, and the tiny
tiny_mc and tiny_gen test tasks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM

from common import (
    ModelArguments, RecipeArgumentParser, RecipeError, check_model_arguments, load_model, load_tokenizer, one_line,
    resolve_dtype, run_recipe,
)

import lor2c_hf
from lor2c_hf.extras import instruct_eval as ev

UNSAFE_HELP = ("Allow tasks that EXECUTE the code the model generates (HumanEval); lm-eval's own "
               "confirm_run_unsafe_code flag. Without it such tasks are refused. Run them only in a sandbox.")


@dataclass
class EvalModelArguments(ModelArguments):
    """The base model the adapter was trained on (`--base` or `--model_name_or_path`), and how to load it."""

    model_name_or_path: str = field(metadata={"aliases": ["--base"], "help": "Base model the adapter was trained on: Hub id or a folder saved with save_pretrained."})


@dataclass
class InstructEvalArguments:
    """What to evaluate, on which lm-eval tasks, and where the report goes."""

    adapter: str = field(metadata={"help": "Adapter folder or Hub repo id: LoR2C family or ResLoRA (lor2c_hf), or a PEFT LoRA."})
    tasks: str = field(default="mmlu,bbh,drop", metadata={"help": "Comma-separated tasks: mmlu, bbh, drop, humaneval (the paper's; humaneval needs --confirm_run_unsafe_code) or any lm-eval task, group or tag, including those in --include_path."})
    num_fewshot: Optional[str] = field(default=None, metadata={"help": "Shots: one integer for all tasks, or name=N pairs (mmlu=5,bbh=3). Default: the paper's (MMLU 5, BBH 3, DROP 3, HumanEval 0), else each task's own."})
    limit: Optional[float] = field(default=None, metadata={"help": "Documents per task (N), or a fraction below 1.0; for quick checks, not for reported scores."})
    batch_size: str = field(default="1", metadata={"help": "Batch size: an integer, or 'auto' / 'auto:N' to let lm-eval find the largest that fits."})
    max_batch_size: int = field(default=64, metadata={"help": "Upper bound for --batch_size auto."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Longest input in tokens (default: the model's max_position_embeddings)."})
    bf16: bool = field(default=False, metadata={"help": "Load the base in bfloat16."})
    fp16: bool = field(default=False, metadata={"help": "Load the base in float16."})
    device: Optional[str] = field(default=None, metadata={"help": "cuda, cuda:1, cpu, ... (default: cuda when available). A 4/8-bit base stays where bitsandbytes put it."})
    include_path: Optional[list[str]] = field(default=None, metadata={"help": "Folders of extra lm-eval task YAMLs, e.g. recipes/tasks for tasks on local json/jsonl files."})
    with_base: bool = field(default=False, metadata={"help": "Also score the base model alone and show its row beside the adapter's."})
    confirm_run_unsafe_code: bool = field(default=False, metadata={"help": UNSAFE_HELP})
    output_dir: str = field(default="eval_results", metadata={"help": "Where results.json, results.md (and samples/ with --log_samples) go."})
    log_samples: bool = field(default=False, metadata={"help": "Also write lm-eval's per-document records (prompts, log-likelihoods, generations) as JSON lines."})
    bootstrap_iters: int = field(default=100000, metadata={"help": "Bootstrap resamples for the standard errors (lm-eval's default); 0 skips them."})


def parse_batch_size(text: str) -> Any:
    if text.startswith("auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise RecipeError(f"--batch_size {text!r} is not a positive integer, 'auto' or 'auto:N'.")
    return value


def pick_device(requested: Optional[str]) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError(f"--device {requested}: no CUDA GPU is visible; pass --device cpu.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score(model: torch.nn.Module, tokenizer: Any, manager: Any, loaded: dict[str, Any],
          args: InstructEvalArguments) -> dict[str, Any]:
    """lm-eval's results for the live `model` on the loaded tasks."""
    lm = ev.lm_eval_model(model, tokenizer, batch_size=parse_batch_size(args.batch_size),
                          max_batch_size=args.max_batch_size, max_length=args.max_length)
    try:
        return ev.run_lm_eval(lm, manager, loaded, limit=args.limit, bootstrap_iters=args.bootstrap_iters,
                              log_samples=args.log_samples, confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    except ValueError as err:
        if "unsafe" in str(err):
            raise RecipeError(f"{one_line(err)} Pass --confirm_run_unsafe_code (in a sandbox) to run it.") from None
        raise


def lm_eval_details(results: dict[str, Any]) -> dict[str, Any]:
    """What of lm-eval's results goes into results.json (per-document samples are written apart)."""
    keys = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    return {k: results[k] for k in keys if k in results}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = RecipeArgumentParser({"model": EvalModelArguments, "eval": InstructEvalArguments},
                                  description=" ".join(__doc__.split("\n\n")[0].split()),
                                  epilog="HumanEval executes the code the model generates: it runs only with "
                                         "--confirm_run_unsafe_code (lm-eval's own flag); use a sandbox.")
    model_args, args = parser.parse(argv)
    names = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    if not names:
        raise RecipeError("--tasks is empty; pass e.g. mmlu,bbh,drop (add humaneval with --confirm_run_unsafe_code).")
    if args.bf16 and args.fp16:
        raise RecipeError("--bf16 and --fp16 exclude each other; pass one.")
    check_model_arguments(model_args)
    parse_batch_size(args.batch_size)
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    device = None if quantized else pick_device(args.device)
    try:
        adapter_config = ev.read_adapter_config_dict(args.adapter)
        kind = ev.adapter_kind(adapter_config, args.adapter)
        shots = ev.parse_num_fewshot(args.num_fewshot, names)
        manager = ev.task_manager(names, args.include_path)
        loaded = ev.load_tasks(manager, names, shots, args.confirm_run_unsafe_code)
    except (ValueError, ImportError) as err:  # AdapterLoadError, UnsafeCodeError and TaskDataError are ValueErrors
        raise RecipeError(one_line(err)) from None

    precision = SimpleNamespace(bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=False)
    tokenizer = load_tokenizer(model_args)

    def load_base() -> torch.nn.Module:
        model = load_model(model_args, precision, AutoModelForCausalLM)
        return model if device is None else model.to(device)

    model = load_base()
    print(f"evaluate_instruct: {model_args.model_name_or_path} + {kind} adapter {args.adapter} on {names} "
          f"(shots {ev.effective_shots(loaded)}, limit {args.limit}, {resolve_dtype(model_args, precision)}, "
          f"{device or 'bitsandbytes placement'})", flush=True)

    try:
        adapted, kind = ev.load_adapter_for_evaluation(model, args.adapter)
    except ValueError as err:
        raise RecipeError(one_line(err)) from None
    runs = {"adapter": score(adapted, tokenizer, manager, loaded, args)}
    if args.with_base:  # the same weights with the adapter removed, unless the adapter overwrote some (task heads)
        base = load_base() if adapter_config.get("modules_to_save") else adapted.unload()
        runs["base"] = score(base, tokenizer, manager, loaded, args)
    order = [r for r in ("base", "adapter") if r in runs]

    labels = {"base": f"base: {model_args.model_name_or_path}", "adapter": f"{kind}: {args.adapter}"}
    labels = {r: labels[r] for r in order}
    scores = {r: ev.task_scores(runs[r], loaded) for r in order}
    headline = {n: ev.headline_metric(n, scores["adapter"].get(n, {})) or "n/a" for n in names}
    shots_used = ev.effective_shots(loaded)
    notes = {n: f"{shots_used[n]}-shot" if shots_used[n] is not None else "mixed shots" for n in names}
    meta = {
        "base_model": model_args.model_name_or_path, "adapter": args.adapter, "adapter_kind": kind,
        "tasks": {n: ev.lm_eval_task_name(n) for n in names},
        "num_fewshot": shots_used, "limit": args.limit, "batch_size": args.batch_size,
        "dtype": str(resolve_dtype(model_args, precision)), "load_in_4bit": model_args.load_in_4bit,
        "load_in_8bit": model_args.load_in_8bit, "device": str(device or "bitsandbytes"),
        "lor2c_hf": lor2c_hf.__version__, "lm_eval": _lm_eval_version(),
    }
    from lm_eval.utils import make_table

    details_md = [f"\n## lm-eval: {labels[r]}\n\n{make_table(runs[r])}" for r in order]
    json_path, md_path = ev.write_report(
        args.output_dir, scores, headline, meta, title="InstructEval scores (lm-evaluation-harness)",
        column_notes=notes, labels=labels, details={"lm_eval": {r: lm_eval_details(runs[r]) for r in order}},
        extra_markdown=details_md)
    if args.log_samples:
        for r in order:
            ev.write_samples(os.path.join(args.output_dir, "samples"), r, runs[r].get("samples", {}))
    print(ev.score_table(scores, headline, notes, labels))
    print(f"evaluate_instruct: wrote {json_path} and {md_path}", flush=True)
    return 0


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, prog="evaluate_instruct.py"))
