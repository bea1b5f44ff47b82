"""The GPU benchmark, prepared for one device call: LoR2C against PEFT LoRA on the LLaMA2-7B shape.

Every training row wraps the same random-init base (hidden 4096, 32 blocks, 32 heads, MLP 11008, vocab 32000,
bf16, built directly on the GPU: no download), trains on the same batch (per-device batch 4 x seq 256, as
recipes/alpaca.py) and is timed one step at a time, interleaved with the other rows of its group in this one
process (`bench_utils.interleaved_timing`), so the ratios to PEFT LoRA come from the same conditions. The
rows share the base's weight tensors (`speed.sharing_copy`): one 13.5 GB copy serves them all. Then: the same
with gradient checkpointing, one fp16 GradScaler step, greedy generation with KV cache, a real run of
recipes/alpaca.py through `accelerate launch`, and 4-bit NF4 LoR2C training when bitsandbytes is there.

    bash bench/run_gpu.sh                            # the one device call: carried wheels, then this script
    python bench/gpu.py --out /tmp/gpu.json          # on a CUDA machine
    python bench/gpu.py --tiny --out /tmp/gpu.json   # anywhere: a tiny Llama, every path but the CUDA-only calls

Every row ends `ok`, `skipped` or `failed` with a reason; a failing row records its traceback and the others
go on. The JSON is rewritten after every phase (a phase being run is marked `running`), so a run stopped by
its time limit keeps what it finished. Phases start only while `--budget_s` leaves them their expected time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for path in (BENCH, ROOT):  # bench helpers and this checkout's lor2c_hf, also when lor2c_hf is not installed
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_utils import (cuda_step_memory, environment, interleaved_timing, print_targets,  # noqa: E402
                         synchronize, write_json)
from speed import (  # noqa: E402
    DROPOUT, SHAPES, Shape, Trainee, active_parameters, batch_input_ids, build_base, build_trainee, check,
    frozen_base, generate_runner, generation_models, imlor2c_after_events, lor2c, peft_lora, trainable,
)
from lor2c_hf import LoR2CConfig, get_lor2c_model  # noqa: E402

REFERENCE = "peft_lora"
GC_REFERENCE = "peft_lora_gc"
ALPACA_SAMPLE = os.path.join(ROOT, "tests", "data", "alpaca_seed_sample.jsonl")
PACKAGES = ("transformers", "peft", "accelerate", "datasets", "evaluate", "bitsandbytes", "pyarrow", "dill",
            "multiprocess", "huggingface_hub", "fsspec")
MEMORY_KEYS = ("cuda_resident_bytes", "cuda_peak_absolute_bytes", "cuda_peak_step_bytes", "own_state_bytes",
               "cuda_peak_standalone_bytes")
# Expected seconds per phase on an H200 at the 7B shape (a phase starts only if this much budget is left),
# and on the CPU at the tiny shape.
PHASE_COST_S = {
    "cuda": {"train": 60, "gradient_checkpointing": 30, "fp16": 20, "generation": 45, "alpaca_recipe": 90, "nf4": 150},
    "cpu": {"train": 2, "gradient_checkpointing": 1, "fp16": 1, "generation": 1, "alpaca_recipe": 20, "nf4": 1},
}
PHASES = ("train", "gradient_checkpointing", "fp16", "generation", "alpaca_recipe", "nf4")  # run in this order
CALL_OVERHEAD_S = {"cuda": 0.2, "cpu": 0.01}  # gc.collect and synchronize around each timed step
MIN_REPEATS = 5


class Interrupted(BaseException):
    """SIGTERM (the wrapper's `timeout`): stop, record where, write what was measured (not an `Exception`, so
    no row's own error handling takes it for that row's failure)."""


# --- rows ------------------------------------------------------------------------------------------------------

def _grad_from_here(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the block's hidden-state output becomes a leaf that requires grad."""
    hidden = output if torch.is_tensor(output) else output[0]
    leaf = hidden.detach().requires_grad_(True)
    return leaf if torch.is_tensor(output) else (leaf, *output[1:])


def frozen_base_from_block0(model: nn.Module, shape: Shape) -> nn.Module:
    """No adapter, and the backward stops at block 0's output: LoR2C's floor.

    LoR2C's gradient path starts at block 0's input but needs no gradient through block 0: that input is the
    embeddings' output (nothing to train below it) and block 0's weights are frozen, so autograd reaches block 0's
    connection and stops; it never enters block 0. This row does the same backward (loss, head, norm, blocks
    L-1..1) with no adapter at all, by making block 0's output a leaf that requires grad. LoR2C can only add its
    connections and its AdamW step to it. `base_embeddings` (speed.py's base row) also goes through block 0 down
    to the embeddings, as LoRA on block 0's q and v must.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].register_forward_hook(_grad_from_here)
    return model


def with_checkpointing(build: Callable[[nn.Module, Shape], nn.Module]) -> Callable[[nn.Module, Shape], nn.Module]:
    """`build`, then the model's own `gradient_checkpointing_enable` (non-reentrant, as transformers 5 defaults).

    use_reentrant is given so that transformers versions with another default measure the same thing. LoR2C's
    wrapper also makes the embeddings' output require grad (for reentrant checkpointing): measured as shipped.
    """

    def build_checkpointed(model: nn.Module, shape: Shape) -> nn.Module:
        wrapped = build(model, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x renamed it activation_checkpointing
            wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wrapped

    return build_checkpointed


@dataclass(frozen=True)
class TrainRow:
    label: str
    build: Callable[[nn.Module, Shape], nn.Module]
    group: str


TRAIN_ROWS: dict[str, TrainRow] = {
    "peft_lora": TrainRow("PEFT LoRA (q,v)", peft_lora, "train"),
    "lor2c": TrainRow("LoR2C", lor2c("lor2c"), "train"),
    "imlor2c": TrainRow("IMLoR2C after M=N=L/4 events", imlor2c_after_events, "train"),
    "base_block0": TrainRow("frozen base, backward stops at block 0's output (LoR2C's floor)",
                            frozen_base_from_block0, "train"),
    "base_embeddings": TrainRow("frozen base, backward to the embeddings", frozen_base, "train"),
    "peft_lora_gc": TrainRow("PEFT LoRA (q,v), gradient checkpointing", with_checkpointing(peft_lora),
                             "gradient_checkpointing"),
    "lor2c_gc": TrainRow("LoR2C, gradient checkpointing", with_checkpointing(lor2c("lor2c")), "gradient_checkpointing"),
}
EXTRA_ROWS = {
    "fp16": "one fp16 step: float16 4-block base, float32 LoR2C, autocast + GradScaler",
    "generation": "greedy generation with KV cache, tokens/s vs the base",
    "alpaca_recipe": "recipes/alpaca.py on a tiny Llama through accelerate launch --num_processes 1",
    "nf4": "4-bit NF4 base (recipes' --load_in_4bit path), LoR2C training steps",
}
ROW_PHASE = {**{n: r.group for n, r in TRAIN_ROWS.items()}, **{n: n for n in EXTRA_ROWS}}


# --- bookkeeping ----------------------------------------------------------------------------------------------

class Budget:
    """A deadline: phases ask how much is left before they start."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def used(self) -> float:
        return time.monotonic() - self.start


def failure(row: dict, exc: BaseException) -> None:
    row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}",
               traceback=traceback.format_exc()[-3000:])


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared weight counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def own_state_bytes(trainee: Trainee) -> int:
    """What one row keeps between steps on top of the base: its trainable parameters and AdamW's state."""
    state = [t for s in (trainee.optimizer.state.values() if trainee.optimizer else ()) for t in s.values()
             if torch.is_tensor(t)]
    return tensor_bytes([*trainee.params, *state])


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return value / reference


# --- training groups ------------------------------------------------------------------------------------------

def timed_step(trainee: Trainee, input_ids: torch.Tensor, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    trainee.step(input_ids)
    synchronize(device)
    return time.perf_counter() - start


def memory_fields(trainee: Trainee, input_ids: torch.Tensor, device: str, base_bytes: int) -> dict:
    """One more step with the peak reset before it; null on the CPU.

    `cuda_peak_step_bytes` is what the step adds above what was resident before it (activations, gradients,
    AdamW's temporaries); `cuda_peak_absolute_bytes` is this process's peak, every row's resident state
    included; `cuda_peak_standalone_bytes` = base weights + this row's parameters and AdamW state + the step's
    peak: what `max_memory_allocated` reads in a process that trains this row alone.
    """
    if device != "cuda":
        return dict.fromkeys(MEMORY_KEYS)
    resident, peak = cuda_step_memory(lambda: trainee.step(input_ids))
    return memory_row(resident, peak, own_state_bytes(trainee), base_bytes)


def memory_row(resident: int, peak: int, own: int, base_bytes: int) -> dict:
    return {"cuda_resident_bytes": resident, "cuda_peak_absolute_bytes": peak, "cuda_peak_step_bytes": peak - resident,
            "own_state_bytes": own, "cuda_peak_standalone_bytes": base_bytes + own + peak - resident}


def fit_repeats(args: argparse.Namespace, round_s: float, available_s: float) -> int:
    """Timed repeats that fit `available_s` after the warm-up and the memory step (at most --repeats)."""
    rounds = int(available_s // max(round_s, 1e-9))
    return min(args.repeats, rounds - (args.warmup - 1) - 1)


def run_training_group(group: str, reference: str, args: argparse.Namespace, base: nn.Module, shape: Shape,
                       base_bytes: int, rows: dict, budget: Budget, reserve_s: float) -> None:
    """Build the group's rows on the shared base, time them interleaved, then take each one's memory step."""
    names = [n for n, r in TRAIN_ROWS.items() if r.group == group and rows[n]["status"] == "running"]
    input_ids = batch_input_ids(shape, args.device)
    tokens = shape.batch * shape.seq
    trainees: dict[str, Trainee] = {}
    probe_s: dict[str, float] = {}
    for name in names:  # build and take the first warm-up step one by one: a row that fails drops out alone
        try:
            trainees[name] = build_trainee(name, base, shape, TRAIN_ROWS[name].build)
            probe_s[name] = timed_step(trainees[name], input_ids, args.device)
            rows[name]["trainable_parameters"] = active_parameters(trainees[name])
            if "spans" in getattr(trainees[name].model, "structure", {}):
                rows[name]["structure"] = {k: trainees[name].model.structure[k] for k in ("spans", "injected")}
        except Exception as exc:  # noqa: BLE001 (any failure of one row is recorded, the others go on)
            failure(rows[name], exc)
            trainees.pop(name, None)
            free_memory(args.device)
    if not trainees:
        return
    round_s = sum(probe_s.values()) + CALL_OVERHEAD_S[args.device] * len(trainees)
    repeats = fit_repeats(args, round_s, budget.left() - reserve_s)
    if repeats < min(MIN_REPEATS, args.repeats):
        for name in trainees:
            rows[name].update(status="skipped", reason=f"budget: {budget.left():.0f} s left, {reserve_s:.0f} s kept "
                                                       f"for later phases, a round takes {round_s:.2f} s")
        return
    try:
        timing = interleaved_timing({n: (lambda t=t: t.step(input_ids)) for n, t in trainees.items()},
                                    args.warmup - 1, repeats, args.device)
    except Exception as exc:  # noqa: BLE001
        for name in trainees:
            failure(rows[name], exc)
        return
    for name, trainee in trainees.items():
        wall = timing[name]["wall"]
        row = rows[name]
        row.update(step_time_s=wall["median"], step_time_q1_s=wall["q1"], step_time_q3_s=wall["q3"],
                   steps_timed=timing[name]["n"], warmup=args.warmup, tokens_per_s=tokens / wall["median"])
        if repeats < args.repeats:
            row["note"] = f"{repeats} timed steps instead of {args.repeats}, to fit the budget"
        try:
            row.update(memory_fields(trainee, input_ids, args.device, base_bytes))
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            failure(row, exc)
    ref = rows[reference]
    for name in trainees:
        row = rows[name]
        if row["status"] != "ok":
            continue
        ok_ref = ref if ref["status"] == "ok" else {}
        row["ratio_reference"] = reference if ok_ref else None
        row["step_time_ratio"] = ratio(row["step_time_s"], ok_ref.get("step_time_s"))
        row["tokens_per_s_ratio"] = ratio(row["tokens_per_s"], ok_ref.get("tokens_per_s"))
        for key in ("cuda_peak_step_bytes", "cuda_peak_standalone_bytes"):
            row[key.replace("_bytes", "_ratio")] = ratio(row[key], ok_ref.get(key))
    del trainees
    free_memory(args.device)


# --- extra rows -----------------------------------------------------------------------------------------------

def fp16_step(args: argparse.Namespace, shape: Shape) -> dict:
    """A float16 4-block base, a float32 LoR2C adapter, float16 autocast and a GradScaler, as Trainer's fp16.

    A few steps, because a first scale of 2**16 may overflow and make the scaler skip that step's update.
    """
    small = replace(shape, blocks=min(4, shape.blocks), dtype="float16")
    torch.manual_seed(1)
    model = lor2c("lor2c")(build_base(small, args.device), small).train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(args.device)
    input_ids = batch_input_ids(small, args.device)
    before = [p.detach().clone() for p in params]
    losses, scales, skipped, seconds = [], [], [], []
    for _ in range(args.fp16_steps):
        synchronize(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.float16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        scales.append(scale)
        skipped.append(scaler.get_scale() < scale)  # the scaler lowers its scale when it skips a step
    update = torch.cat([(p.detach() - b).flatten().float() for p, b in zip(params, before)])
    base_dtype = str(next(p for p in model.get_base_model().parameters()).dtype)
    row = {"blocks": small.blocks, "base_dtype": base_dtype, "adapter_dtypes": sorted({str(p.dtype) for p in params}),
           "losses": losses, "loss_finite": all(math.isfinite(v) for v in losses), "loss_scales": scales,
           "steps_skipped_by_scaler": skipped, "update_finite": bool(torch.isfinite(update).all()),
           "adapter_moved": bool(update.abs().max() > 0), "step_time_s": seconds,
           "loss_dtype": str(loss.dtype), "trainable_parameters": sum(p.numel() for p in params)}
    problems = [what for what, bad in (("loss not finite", not row["loss_finite"]),
                                       ("adapter not float32", row["adapter_dtypes"] != ["torch.float32"]),
                                       ("update not finite", not row["update_finite"]),
                                       ("no step updated the adapter", not row["adapter_moved"])) if bad]
    row.update(status="failed" if problems else "ok", reason="; ".join(problems) or None)
    return row


def generation(args: argparse.Namespace, base: nn.Module, shape: Shape) -> dict:
    """speed.py's generation rows (base, LoR2C with random B, PEFT LoRA merged) at this run's length."""
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, shape.vocab, (1, args.gen_prompt), generator=generator).to(args.device)
    models = generation_models(base, shape)
    timing = interleaved_timing({n: generate_runner(m, prompt, args.gen_tokens) for n, m in models.items()},
                                1, args.gen_repeats, args.device)
    del models
    per_model = {n: {"seconds": t["wall"]["median"], "tokens_per_s": args.gen_tokens / t["wall"]["median"]}
                 for n, t in timing.items()}
    for row in per_model.values():
        row["tokens_per_s_ratio_to_base"] = row["tokens_per_s"] / per_model["base"]["tokens_per_s"]
    return {"status": "ok", "batch": 1, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_tokens,
            "repeats": args.gen_repeats, "models": per_model,
            "lor2c_tokens_per_s_ratio_to_base": per_model["lor2c"]["tokens_per_s_ratio_to_base"]}


def recipe_modules() -> tuple[Any, Any]:
    """recipes/common.py and tests/tiny_pretrained.py, imported from this checkout."""
    for path in (os.path.join(ROOT, "recipes"), os.path.join(ROOT, "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import common
    import tiny_pretrained

    return common, tiny_pretrained


def alpaca_recipe(args: argparse.Namespace, budget: Budget) -> dict:
    """recipes/alpaca.py as a user runs it, for --alpaca_steps steps on a tiny Llama saved to a temporary folder.

    IMLoR2C with one merge and one inject (the `steps` schedule puts both at step ceil(T/4)), bf16, the Alpaca
    seed sample as data, through `accelerate launch --num_processes 1`; the row checks the adapter it saved.
    """
    _, tiny = recipe_modules()
    import alpaca  # recipes/alpaca.py, for its prompt template

    with open(ALPACA_SAMPLE, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    texts = [alpaca.alpaca_prompt(e["instruction"], e.get("input")) + e["output"] for e in examples]
    texts += [alpaca.alpaca_prompt(i, x) for i, x in alpaca.SHOWCASE]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-alpaca-") as tmp:
        model_dir, out = os.path.join(tmp, "model"), os.path.join(tmp, "adapter")
        tiny.save_tiny_pretrained(model_dir, texts, num_layers=4)
        argv = [os.path.join(ROOT, "recipes", "alpaca.py"), "--method", "imlor2c", "--num_merges", "1",
                "--num_injects", "1", "--model_name_or_path", model_dir, "--dataset_name", ALPACA_SAMPLE,
                "--output_dir", out, "--val_set_size", "4", "--cutoff_len", "64", "--global_batch_size", "4",
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--max_steps", str(args.alpaca_steps), "--warmup_steps", "0", "--r", "8", "--lora_alpha", "16",
                "--inject_r", "4", "--max_new_tokens", "4", "--eval_strategy", "no", "--save_strategy", "no",
                "--logging_steps", "1", "--bf16", "true", "--report_to", "none"]
        if args.device == "cpu":
            argv += ["--use_cpu", "true"]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "bf16", "--dynamo_backend", "no"]
        env = tiny.offline_env(tmp)
        env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
        start = time.perf_counter()
        proc = tiny.run_cli(argv, cwd=tmp, env=env, launcher=launcher, timeout=max(10.0, min(300.0, budget.left())))
        row: dict[str, Any] = {"seconds": time.perf_counter() - start, "returncode": proc.returncode,
                               "command": " ".join(["accelerate launch --num_processes 1", *argv[:1], "..."])}
        files = sorted(os.listdir(out)) if os.path.isdir(out) else []
        row["adapter_files"] = [f for f in files if f.startswith("adapter_")]
        for name in ("train_results.json", "eval_results.json"):
            if name in files:
                with open(os.path.join(out, name), encoding="utf-8") as f:
                    row[name[:-len(".json")]] = json.load(f)
        output = proc.stdout + proc.stderr
        row.update(steps=args.alpaca_steps, output_tail=output[-2000:])
        complete = {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
        if complete:  # the structure and its events, from the metadata lor2c_hf writes beside the weights
            from safetensors import safe_open

            with safe_open(os.path.join(out, "adapter_model.safetensors"), framework="pt") as f:
                structure = json.loads(f.metadata()["lor2c_structure"])
            row["structure"] = {"spans": structure["spans"], "injected": structure["injected"],
                                "events": [{k: e.get(k) for k in ("kind", "step", "blocks")} for e in structure["events"]]}
        if proc.returncode == 0 and complete:
            row.update(status="ok", reason=None)
        else:
            row.update(status="failed", reason=f"exit code {proc.returncode}, adapter files {row['adapter_files']}",
                       output_tail=output[-3000:])
    return row


def nf4_training(args: argparse.Namespace, base: nn.Module, shape: Shape, budget: Budget) -> dict:
    """LoR2C on an NF4 base loaded the way `recipes/alpaca.py --load_in_4bit` loads it (recipes' `load_model`).

    The random-init base is saved to a scratch folder and loaded back with its BitsAndBytesConfig (NF4, double
    quant, bf16 compute) and peft's `prepare_model_for_kbit_training`, then trained --nf4_steps steps.
    """
    if args.device != "cuda":
        return {"status": "skipped", "reason": "4-bit NF4 needs a CUDA GPU (bitsandbytes' CPU backend is not the "
                                               "recipe's path)"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed: its wheel was not carried "
                                               "(bench/fetch_gpu_wheels.sh; see bench/README.md)"}
    from transformers import AutoModelForCausalLM, TrainingArguments

    common, _ = recipe_modules()
    small = replace(shape, blocks=min(args.nf4_blocks or shape.blocks, shape.blocks))
    with tempfile.TemporaryDirectory(prefix="gpu-bench-nf4-", dir=args.scratch) as tmp:
        start = time.perf_counter()
        source = base if small.blocks == shape.blocks else build_base(small, args.device)
        source.save_pretrained(tmp)
        if source is not base:
            del source
        saved_s = time.perf_counter() - start
        if budget.left() < 60:
            return {"status": "skipped", "reason": f"budget: {budget.left():.0f} s left after saving the base"}
        free_memory("cuda")
        before = torch.cuda.memory_allocated()
        model_args = common.ModelArguments(model_name_or_path=tmp, load_in_4bit=True)
        training_args = TrainingArguments(output_dir=os.path.join(tmp, "out"), bf16=True, report_to=[])
        model = common.load_model(model_args, training_args, AutoModelForCausalLM)
        loaded_s = time.perf_counter() - start - saved_s
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model_bytes = torch.cuda.memory_allocated() - before
    model.config.use_cache = False
    torch.manual_seed(1)
    config = LoR2CConfig.for_method("lor2c", r=small.r, lora_alpha=small.alpha, lora_dropout=DROPOUT)
    trainee = Trainee("nf4", get_lor2c_model(model, config))
    input_ids = batch_input_ids(small, args.device)
    losses, seconds = [], []

    def step() -> None:
        synchronize("cuda")
        start = time.perf_counter()
        loss = trainee.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        synchronize("cuda")
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())

    for _ in range(args.nf4_steps - 1):
        step()
    resident, peak = cuda_step_memory(step)  # the last step, with the peak reset before it
    memory = memory_row(resident, peak, own_state_bytes(trainee), model_bytes)
    row = {"blocks": small.blocks, "quantized_linear_layers": quantized, "nf4_model_bytes": model_bytes,
           "save_seconds": saved_s, "load_seconds": loaded_s, "losses": losses, "step_time_s": seconds,
           "trainable_parameters": active_parameters(trainee),
           "adapter_dtypes": sorted({str(p.dtype) for p in trainee.params}), **memory,
           "loss_finite": all(math.isfinite(v) for v in losses), "steps": args.nf4_steps}
    row.update(status="ok" if row["loss_finite"] and quantized else "failed",
               reason=None if row["loss_finite"] and quantized else "loss not finite or no Linear4bit layer")
    del trainee, model
    free_memory("cuda")
    return row


# --- report ---------------------------------------------------------------------------------------------------

def target_checks(rows: dict) -> list[dict]:
    """The issue's targets, from the rows that finished (a target whose rows did not is left out)."""
    ok = {n: r for n, r in rows.items() if r.get("status") == "ok"}
    checks = []

    def add(what: str, names: tuple[str, ...], value: Callable[[], float], limit: float, at_most: bool = True) -> None:
        if all(n in ok for n in names):
            v = value()
            if v is not None:
                checks.append(check(what, v, limit, at_most))

    add("lor2c step_time / peft_lora", ("lor2c", "peft_lora"), lambda: ok["lor2c"]["step_time_ratio"], 1.0)
    add("lor2c step_time / base_block0 (its floor)", ("lor2c", "base_block0"),
        lambda: ok["lor2c"]["step_time_s"] / ok["base_block0"]["step_time_s"], 1.03)
    add("lor2c cuda_peak_standalone / peft_lora", ("lor2c", "peft_lora"),
        lambda: ok["lor2c"]["cuda_peak_standalone_ratio"], 0.95)
    add("imlor2c step_time / lor2c", ("imlor2c", "lor2c"),
        lambda: ok["imlor2c"]["step_time_s"] / ok["lor2c"]["step_time_s"], 1.0)
    add("lor2c generation tokens/s / base", ("generation",),
        lambda: ok["generation"]["lor2c_tokens_per_s_ratio_to_base"], 0.97, at_most=False)
    return checks


def fmt(value: Optional[float], scale: float = 1.0, spec: str = "8.1f") -> str:
    return format(value * scale, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def print_report(result: dict) -> None:
    rows = result["rows"]
    print(f"\nGPU benchmark ({result['device']}, {'tiny' if result['tiny'] else 'LLaMA2-7B'} shape {result['shape']})")
    print(f"{'row':66s} {'status':8s} {'step ms':>8s} {'x ref':>6s} {'tok/s':>9s} {'step peak MiB':>13s} "
          f"{'x ref':>6s} {'alone GiB':>9s} {'x ref':>6s}")
    for name, spec in TRAIN_ROWS.items():
        r = rows[name]
        print(f"{spec.label:66s} {r['status']:8s} {fmt(r.get('step_time_s'), 1e3)} {fmt(r.get('step_time_ratio'), 1, '6.3f')} "
              f"{fmt(r.get('tokens_per_s'), 1, '9.0f')} {fmt(r.get('cuda_peak_step_bytes'), 2**-20, '13.0f')} "
              f"{fmt(r.get('cuda_peak_step_ratio'), 1, '6.3f')} {fmt(r.get('cuda_peak_standalone_bytes'), 2**-30, '9.2f')} "
              f"{fmt(r.get('cuda_peak_standalone_ratio'), 1, '6.3f')}")
    print("  ratios: train rows to PEFT LoRA, gradient-checkpointing rows to PEFT LoRA with checkpointing")
    for name, label in EXTRA_ROWS.items():
        r = rows[name]
        detail = r.get("reason") or ""
        if name == "fp16" and r["status"] == "ok":
            detail = f"losses {[round(v, 3) for v in r['losses']]}, adapter {r['adapter_dtypes']}, base {r['base_dtype']}"
        elif name == "generation" and r["status"] == "ok":
            detail = ", ".join(f"{n} {m['tokens_per_s']:.1f} tok/s ({m['tokens_per_s_ratio_to_base']:.3f}x)"
                               for n, m in r["models"].items())
        elif name == "alpaca_recipe" and r["status"] == "ok":
            events = [(e["kind"], e["step"]) for e in r.get("structure", {}).get("events", [])]
            detail = (f"{r['steps']} steps in {r['seconds']:.0f} s, train loss "
                      f"{r.get('train_results', {}).get('train_loss')}, events {events}")
        elif name == "nf4" and r["status"] == "ok":
            detail = (f"losses {[round(v, 3) for v in r['losses']]}, standalone peak "
                      f"{r['cuda_peak_standalone_bytes'] / 2**30:.2f} GiB")
        print(f"{label:82s} {r['status']:8s} {detail}")
    print_targets(result["targets"])


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="speed.py's smoke shape (4 blocks, hidden 32) and few steps: "
                   "checks every code path on any machine")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", default=os.path.join(BENCH, "results", "gpu.json"))
    p.add_argument("--budget_s", type=float, default=440.0, help="seconds for all phases (run_gpu.sh's default: the "
                   "whole device call, wheels' install and imports included, then stays under 9 minutes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--gen_tokens", type=int, default=128)
    p.add_argument("--gen_prompt", type=int, default=32)
    p.add_argument("--gen_repeats", type=int, default=3)
    p.add_argument("--fp16_steps", type=int, default=3)
    p.add_argument("--nf4_steps", type=int, default=5)
    p.add_argument("--nf4_blocks", type=int, default=None, help="blocks of the NF4 model (default: all)")
    p.add_argument("--alpaca_steps", type=int, default=10)
    p.add_argument("--scratch", default=None, help="folder for the NF4 row's saved base (default: the system's temp)")
    p.add_argument("--skip", default="", help=f"comma-separated phases not to run, of {list(PHASES)}")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and not args.tiny:
        p.error("the LLaMA2-7B shape needs a GPU; pass --tiny on a CPU")
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - set(PHASES):
        p.error(f"--skip: unknown {sorted(args.skip - set(PHASES))}; known: {list(PHASES)}")
    if args.tiny:
        args.warmup, args.repeats, args.gen_tokens, args.gen_prompt = min(args.warmup, 2), min(args.repeats, 3), \
            min(args.gen_tokens, 8), min(args.gen_prompt, 4)
        args.gen_repeats = min(args.gen_repeats, 2)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1")
    return args


def new_result(args: argparse.Namespace, shape: Shape) -> dict:
    rows = {n: {"label": r.label, "group": r.group, "status": "pending", "reason": None} for n, r in TRAIN_ROWS.items()}
    rows.update({n: {"label": label, "group": n, "status": "pending", "reason": None} for n, label in EXTRA_ROWS.items()})
    return {"benchmark": "gpu", "device": args.device, "tiny": args.tiny, "shape": asdict(shape), "dropout": DROPOUT,
            "reference": REFERENCE, "gc_reference": GC_REFERENCE, "warmup": args.warmup, "repeats": args.repeats,
            "budget_s": args.budget_s, "wheel_note": os.environ.get("GPU_BENCH_WHEEL_NOTE") or None,
            "environment": environment(args.device, PACKAGES), "finished": False, "phases": {}, "rows": rows,
            "targets": []}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    shape = SHAPES["smoke" if args.tiny else "cuda"]
    result = new_result(args, shape)
    rows = result["rows"]
    if args.device == "cuda":
        result["environment"].update(cuda=torch.version.cuda,
                                     gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)

    def save() -> None:
        result["targets"] = target_checks(rows)
        result["seconds"] = budget.used()
        write_json(result, args.out)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum} after {budget.used():.0f} s")

    previous = signal.signal(signal.SIGTERM, on_term)
    cost = PHASE_COST_S[args.device]
    base = None
    try:
        save()
        start = time.perf_counter()
        base = build_base(shape, args.device)
        base_bytes = tensor_bytes([*base.parameters(), *base.buffers()])
        result.update(base_build_seconds=time.perf_counter() - start, base_weight_bytes=base_bytes)
        for i, phase in enumerate(PHASES):
            names = [n for n, p in ROW_PHASE.items() if p == phase]
            reserve = sum(cost[p] for p in PHASES[i + 1:] if p not in args.skip and p != "nf4")
            if phase in args.skip:
                reason = "--skip"
            elif budget.left() < cost[phase]:
                reason = f"budget: {budget.left():.0f} s left, this phase expects {cost[phase]} s"
            else:
                reason = None
            if reason:
                for n in names:
                    rows[n].update(status="skipped", reason=reason)
                save()
                continue
            for n in names:
                rows[n]["status"] = "running"
            save()
            print(f"[gpu] {phase} ({budget.left():.0f} s of the budget left)", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                if phase in ("train", "gradient_checkpointing"):
                    reference = REFERENCE if phase == "train" else GC_REFERENCE
                    run_training_group(phase, reference, args, base, shape, base_bytes, rows, budget, reserve)
                elif phase == "fp16":
                    rows["fp16"].update(fp16_step(args, shape))
                elif phase == "generation":
                    rows["generation"].update(generation(args, base, shape))
                elif phase == "alpaca_recipe":
                    rows["alpaca_recipe"].update(alpaca_recipe(args, budget))
                elif phase == "nf4":
                    rows["nf4"].update(nf4_training(args, base, shape, budget))
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 (one phase failing must not stop the others)
                for n in names:
                    if rows[n]["status"] == "running":
                        failure(rows[n], exc)
            free_memory(args.device)
            result["phases"][phase] = {"seconds": time.perf_counter() - start}
            save()
        result["finished"] = True
    except Interrupted as exc:
        result["interrupted"] = str(exc)
        for row in rows.values():
            if row["status"] in ("pending", "running"):
                row.update(status="skipped" if row["status"] == "pending" else "failed", reason=f"interrupted ({exc})")
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()
    print_report(result)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
