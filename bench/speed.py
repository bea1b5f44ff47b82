"""Training-step time, activations saved for backward, and generation speed of LoR2C against PEFT LoRA.

Every method wraps the same base weights (same seed; frozen), trains on the same batch with the same dropout
(0.05, the paper's LLaMA setting) and rank, on the CPU in a worker process of its own (as a training job
would; with `--shared-process`, and always on CUDA, all share this one). The workers are driven one step at a time: each repeat runs one step
of every method in a rotating order, and the median after warm-up is reported as a ratio to PEFT LoRA on q
and v. A naive forward-hook LoR2C written without lor2c_hf runs beside ours as the witness of what the plain
implementation costs on the machine. Activations are counted by `torch.autograd.graph.saved_tensors_hooks`
as the unique storage bytes of the tensors autograd saves, parameters and buffers excluded (plus the CUDA peak on
a GPU). Generation is greedy with KV cache and a fixed number of new tokens.

    python bench/speed.py --threads 1           # CPU, Llama shape d=512, 8 blocks, seq 128, batch 4, r=8
    python bench/speed.py --device cuda         # random-init LLaMA2-7B shape, bf16, seq 256, batch 4, r=64

On a shared CPU use one thread: several threads on an oversubscribed machine spin-wait and time noise, not
work. The CPU-time columns (process time) are the steadier measure there.

Adding a method is one entry in `METHODS` (a label and a function that wraps a base model).
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch
import transformers as tf
from torch import nn

from bench_utils import (ElapsedElsewhere, cuda_step_memory, environment, interleaved_timing, print_targets,
                         synchronize, write_json)
from lor2c_hf import LoR2CConfig, ResLoRAConfig, get_lor2c_model, get_reslora_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DROPOUT = 0.05  # the paper's LLaMA setting, used for LoR2C and LoRA alike
REFERENCE = "peft_lora"
TARGETS = {  # (method, metric): the most it may cost relative to PEFT LoRA (issue: speed and memory)
    ("lor2c", "step_time"): 0.90,
    ("lor2c", "saved_activations"): 0.90,
}
GENERATION_TARGET = 0.97  # LoR2C tokens/s at least this share of the base model's


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped model and the batch it trains on."""

    hidden: int
    intermediate: int
    blocks: int
    heads: int
    vocab: int
    seq: int
    batch: int
    r: int
    alpha: int
    dtype: str

    def llama_config(self) -> tf.LlamaConfig:
        return tf.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                              num_hidden_layers=self.blocks, num_attention_heads=self.heads,
                              num_key_value_heads=self.heads, max_position_embeddings=max(4096, 2 * self.seq),
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


SHAPES = {
    "cpu": Shape(hidden=512, intermediate=1376, blocks=8, heads=8, vocab=32000, seq=128, batch=4, r=8, alpha=16,
                 dtype="float32"),
    "cuda": Shape(hidden=4096, intermediate=11008, blocks=32, heads=32, vocab=32000, seq=256, batch=4, r=64, alpha=32,
                  dtype="bfloat16"),  # LLaMA2-7B; batch = recipes/alpaca.py's per-device batch
    "smoke": Shape(hidden=32, intermediate=64, blocks=4, heads=4, vocab=128, seq=16, batch=2, r=4, alpha=8,
                   dtype="float32"),
}


# --- methods -------------------------------------------------------------------------------------------------

def peft_lora(model: nn.Module, shape: Shape) -> nn.Module:
    """The peer: PEFT's LoRA on the query and value projections, same rank and dropout."""
    import peft

    config = peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=DROPOUT,
                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def lor2c(method: str, **overrides) -> Callable[[nn.Module, Shape], nn.Module]:
    """A builder for the LoR2C-family preset `method` at the benchmark's rank, alpha and dropout."""

    def build(model: nn.Module, shape: Shape) -> nn.Module:
        config = LoR2CConfig.for_method(method, r=shape.r, lora_alpha=shape.alpha, lora_dropout=DROPOUT, **overrides)
        return get_lor2c_model(model, config)

    return build


def imlor2c_after_events(model: nn.Module, shape: Shape) -> nn.Module:
    """IMLoR2C with M = N = blocks/4, its events applied (on random B, so SFS makes real choices)."""
    events = max(1, shape.blocks // 4)
    wrapped = lor2c("imlor2c", num_merges=events, num_injects=events)(model, shape)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in wrapped.lor2c.lora_B:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.02)
    for _ in range(events):
        wrapped.apply_merge()
    for _ in range(events):
        wrapped.apply_inject()
    return wrapped


def reslora(res_flag: str, pre_num: int) -> Callable[[nn.Module, Shape], nn.Module]:
    """A builder for lor2c_hf's ResLoRA on q and v; `pre_num=0` with the block shortcut is plain LoRA."""

    def build(model: nn.Module, shape: Shape) -> nn.Module:
        config = ResLoRAConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=DROPOUT, res_flag=res_flag,
                               pre_num=min(pre_num, shape.blocks - 1))
        return get_reslora_model(model, config)

    return build


class NaiveConnection(nn.Module):
    """LoR2C written the obvious way: `nn.Linear` A and B and `nn.Dropout`, added by a forward hook."""

    def __init__(self, hidden: int, r: int, alpha: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(DROPOUT)
        self.lora_A = nn.Linear(hidden, r, bias=False)
        self.lora_B = nn.Linear(r, hidden, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def hook(self, block: nn.Module, args: tuple, kwargs: dict, output):
        x = args[0] if args else kwargs["hidden_states"]
        delta = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return output + delta if torch.is_tensor(output) else (output[0] + delta, *output[1:])


def naive_hooks(model: nn.Module, shape: Shape) -> nn.Module:
    """The naive forward-hook LoR2C the issue's speed target refers to; it uses nothing from lor2c_hf.

    It is here as the floor's witness: what the plain implementation costs on this machine and shape, in
    the same run as lor2c_hf's LoR2C and PEFT LoRA.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    connections = nn.ModuleList(NaiveConnection(shape.hidden, shape.r, shape.alpha) for _ in model.model.layers)
    for block, connection in zip(model.model.layers, connections):
        block.register_forward_hook(connection.hook, with_kwargs=True)
    model.naive_connections = connections  # registers A and B as the model's (trainable) parameters
    return model


def frozen_base(model: nn.Module, shape: Shape) -> nn.Module:
    """No adapter: forward and backward down to the embeddings' output.

    What LoRA on every block must at least do. It is not a floor for LoR2C: nothing below block 0 needs a
    gradient there, so LoR2C's backward stops at block 0's output and never enters block 0.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    return model


@dataclass(frozen=True)
class Method:
    label: str
    build: Callable[[nn.Module, Shape], nn.Module]


METHODS: dict[str, Method] = {
    "peft_lora": Method("PEFT LoRA (q,v)", peft_lora),
    "lor2c": Method("LoR2C", lor2c("lor2c")),
    "naive_hooks": Method("naive hook LoR2C (not lor2c_hf)", naive_hooks),
    "sharelor2c": Method("ShareLoR2C", lor2c("sharelor2c")),
    "imlor2c": Method("IMLoR2C after events (M=N=L/4)", imlor2c_after_events),
    "our_lora": Method("our LoRA (q,v; ResLoRA p=0)", reslora("bs", 0)),
    "reslora": Method("ResLoRA (ms, p=4)", reslora("ms", 4)),
    "base": Method("frozen base, no adapter", frozen_base),
}


# --- measurement ------------------------------------------------------------------------------------------

def build_base(shape: Shape, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = shape.llama_config()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(shape.torch_dtype)  # build a 7B shape directly in bf16 on the GPU
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def sharing_copy(base: nn.Module) -> nn.Module:
    """A copy of `base` with its own modules (adapters may hook or replace them) but the same weight tensors."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainee:
    """One method's model and optimizer, and its training step (forward, backward, AdamW step, zero_grad)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model.train()
        self.params = trainable(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None

    def step(self, input_ids: torch.Tensor) -> None:
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def active_parameters(trainee: Trainee) -> int:
    """Parameters the current structure trains (IMLoR2C allocates every slot up front but reads fewer)."""
    count = getattr(trainee.model, "num_adapter_parameters", None)
    return count() if count else sum(p.numel() for p in trainee.params)


def parameter_storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def saved_activation_bytes(trainee: Trainee, input_ids: torch.Tensor) -> int:
    """Unique storage bytes of the tensors autograd saves for backward in one forward (no parameters, buffers)."""
    excluded = parameter_storages(trainee.model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainee.model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_flops(trainee: Trainee, input_ids: torch.Tensor) -> int:
    """FLOPs of one forward and backward as counted by `FlopCounterMode` (matmuls; CPU attention is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainee.model(input_ids=input_ids, labels=input_ids).loss.backward()
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cuda_step_peak_bytes(trainee: Trainee, input_ids: torch.Tensor) -> int:
    """Peak CUDA memory allocated during one training step above what was allocated before it."""
    before, peak = cuda_step_memory(lambda: trainee.step(input_ids))
    return peak - before


def batch_input_ids(shape: Shape, device: str) -> torch.Tensor:
    """The one batch every method trains on (the same in every process)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)


def build_trainee(name: str, base: nn.Module, shape: Shape,
                  build: Optional[Callable[[nn.Module, Shape], nn.Module]] = None) -> Trainee:
    """Method `name` (or `build`, for a row `METHODS` does not list) on a sharing copy of `base`."""
    torch.manual_seed(1)  # each adapter's init (and so IMLoR2C's SFS decisions) independent of the others
    return Trainee(name, (build or METHODS[name].build)(sharing_copy(base), shape))


def measure(trainee: Trainee, input_ids: torch.Tensor, device: str) -> dict:
    """Everything but the step time: saved activations, FLOPs, parameters, structure, CUDA peak."""
    row = {"saved_activations_bytes": saved_activation_bytes(trainee, input_ids),
           "step_flops": step_flops(trainee, input_ids),
           "trainable_parameters": active_parameters(trainee),
           "allocated_trainable_parameters": sum(p.numel() for p in trainee.params)}
    if "spans" in getattr(trainee.model, "structure", {}):  # the LoR2C family (ResLoRA's structure has no spans)
        row["structure"] = {k: trainee.model.structure[k] for k in ("spans", "injected")}
    if device == "cuda":
        row["cuda_peak_step_bytes"] = cuda_step_peak_bytes(trainee, input_ids)
    return row


def shared_process_timing(args: argparse.Namespace, shape: Shape, base: nn.Module) -> tuple[dict, dict]:
    """Every method in this process, on views of the same base weights."""
    input_ids = batch_input_ids(shape, args.device)
    trainees = {name: build_trainee(name, base, shape) for name in args.methods}
    timing = interleaved_timing({n: (lambda t=t: t.step(input_ids)) for n, t in trainees.items()},
                                args.warmup, args.repeats, args.device)
    return timing, {n: measure(t, input_ids, args.device) for n, t in trainees.items()}


def method_worker(connection, name: str, shape: Shape, device: str, threads: Optional[int]) -> None:
    """One method in a process of its own: build (same seed, so the same base weights), then serve steps."""
    if threads:
        torch.set_num_threads(threads)
    trainee = build_trainee(name, build_base(shape, device), shape)
    input_ids = batch_input_ids(shape, device)
    connection.send("ready")
    while (command := connection.recv()) != "stop":
        if command == "step":
            gc.collect()
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            trainee.step(input_ids)
            synchronize(device)
            connection.send((time.perf_counter() - start, time.process_time() - start_cpu))
        else:  # "measure"
            connection.send(measure(trainee, input_ids, device))


def isolated_timing(args: argparse.Namespace, shape: Shape) -> tuple[dict, dict]:
    """One worker process per method, driven one step at a time in the same rotating order.

    Each process holds one model, as a training job does, so no method runs on a heap or allocator state
    left by the others; the step times are taken inside the workers.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a process whose thread pools have run
    workers = {}
    for name in args.methods:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=method_worker, args=(child_end, name, shape, args.device, args.threads),
                                  daemon=True)
        process.start()
        workers[name] = (parent_end, process)
    try:
        for name, (connection, _) in workers.items():
            if connection.recv() != "ready":
                raise RuntimeError(f"worker for {name} did not start")

        def step(connection) -> ElapsedElsewhere:
            connection.send("step")
            return ElapsedElsewhere(*connection.recv())

        timing = interleaved_timing({n: (lambda c=c: step(c)) for n, (c, _) in workers.items()},
                                    args.warmup, args.repeats, args.device)
        measured = {}
        for name, (connection, _) in workers.items():
            connection.send("measure")
            measured[name] = connection.recv()
        return timing, measured
    finally:
        for connection, process in workers.values():
            try:
                connection.send("stop")
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=60)


# --- generation ------------------------------------------------------------------------------------------

def generation_models(base: nn.Module, shape: Shape) -> dict[str, nn.Module]:
    """Base, LoR2C (hooks; random B so the connections compute), PEFT LoRA merged into its own weight copy."""
    lor2c_model = lor2c("lor2c")(sharing_copy(base), shape)
    with torch.no_grad():
        for b in lor2c_model.lor2c.lora_B:
            b.normal_(0, 0.02)
    lora = peft_lora(copy.deepcopy(base), shape)  # merging writes into the weights: give it its own
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return {"base": base, "lor2c": lor2c_model.eval(), "peft_lora_merged": lora.merge_and_unload().eval()}


def generate_runner(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + new_tokens

    return run


# --- report ------------------------------------------------------------------------------------------------

def check(what: str, value: float, limit: float, at_most: bool = True) -> dict:
    met = value <= limit if at_most else value >= limit
    return {"what": what, "value": value, "target": f"{'<=' if at_most else '>='} {limit}", "met": met,
            "miss_by": max(0.0, value - limit if at_most else limit - value)}


def target_checks(rows: dict[str, dict], generation: Optional[dict], device: str) -> list[dict]:
    """Each target of the issue, measured; on CPU also the step's CPU time (steadier on a shared machine)."""
    metrics = [(m, metric, limit) for (m, metric), limit in TARGETS.items()]
    if device == "cpu":
        metrics += [(m, "step_cpu_time", limit) for (m, metric), limit in TARGETS.items() if metric == "step_time"]
    checks = [check(f"{m} {metric} / {REFERENCE}", rows[m][f"{metric}_ratio"], limit)
              for m, metric, limit in metrics if m in rows]
    if "imlor2c" in rows and "lor2c" in rows:
        checks.append(check("imlor2c step_time / lor2c", rows["imlor2c"]["step_time_s"] / rows["lor2c"]["step_time_s"], 1.0))
    if generation and "lor2c" in generation["rows"]:
        checks.append(check("lor2c generation tokens/s / base", generation["rows"]["lor2c"]["tokens_per_s_ratio_to_base"],
                            GENERATION_TARGET, at_most=False))
    return checks


def print_report(result: dict) -> None:
    print(f"\nTraining step ({result['device']}, {result['shape']}); ratios to {METHODS[REFERENCE].label}")
    header = (f"{'method':32s} {'step ms':>8s} {'IQR ms':>13s} {'x LoRA':>7s} {'cpu ms':>8s} {'x LoRA':>7s} "
              f"{'saved MiB':>9s} {'x LoRA':>7s} {'GFLOP':>7s} {'x LoRA':>7s} {'trainable':>10s}")
    extra = "cuda_peak_step_bytes" in next(iter(result["rows"].values()))
    print(header + (f" {'peak MiB':>9s} {'x LoRA':>7s}" if extra else ""))
    for name, row in result["rows"].items():
        line = (f"{METHODS[name].label:32s} {1e3 * row['step_time_s']:8.1f} "
                f"{1e3 * row['step_time_q1_s']:6.1f}-{1e3 * row['step_time_q3_s']:<6.1f} {row['step_time_ratio']:7.3f} "
                f"{1e3 * row['step_cpu_time_s']:8.1f} {row['step_cpu_time_ratio']:7.3f} "
                f"{row['saved_activations_bytes'] / 2**20:9.1f} {row['saved_activations_ratio']:7.3f} "
                f"{row['step_flops'] / 1e9:7.1f} {row['step_flops_ratio']:7.3f} {row['trainable_parameters']:10,d}")
        if extra:
            line += f" {row['cuda_peak_step_bytes'] / 2**20:9.1f} {row['cuda_peak_step_ratio']:7.3f}"
        print(line)
    for name, row in result["rows"].items():
        if "structure" in row:
            print(f"  {name} structure: spans {row['structure']['spans']}, LoRA-injected blocks {row['structure']['injected']}")
    print("  GFLOP: forward + backward as counted by torch.utils.flop_counter (matmuls; CPU attention kernels are "
          "not counted, dropout's RNG is not a FLOP)")
    gen = result.get("generation")
    if gen:
        print(f"\nGeneration (greedy, KV cache, batch {gen['batch']}, prompt {gen['prompt_tokens']}, "
              f"{gen['new_tokens']} new tokens); ratios to the base model")
        print(f"{'model':22s} {'tokens/s':>10s} {'x base':>7s} {'cpu s':>8s} {'x base':>7s}")
        for name, row in gen["rows"].items():
            print(f"{name:22s} {row['tokens_per_s']:10.1f} {row['tokens_per_s_ratio_to_base']:7.3f} "
                  f"{row['cpu_seconds']:8.3f} {row['cpu_time_ratio_to_base']:7.3f}")
    print_targets(result["targets"])


# --- main ---------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="a tiny model and few repeats (checks the script runs)")
    p.add_argument("--shape", choices=tuple(SHAPES), default=None,
                   help="model shape (default: the device's; e.g. --shape cuda --blocks 2 on a CPU counts the "
                        "activations of 7B-sized blocks)")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default: the shape's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--shared-process", action="store_true",
                   help="train every method in this one process (faster to start, but the methods then share a heap "
                        "and allocator state, which moved PEFT LoRA's step by up to 16%%); by default each method "
                        "trains in its own worker process, as a user's job would, still interleaved step by step "
                        "(on CUDA always one process: each worker would need its own copy of the weights)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: Llama's 32000; the LM head "
                   "and loss are a cost every method shares)")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generate() call (0: skip generation)")
    p.add_argument("--gen-prompt", type=int, default=32)
    p.add_argument("--gen-repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/speed_<device>.json)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    # On CUDA every worker would hold its own copy of the 7B weights (13 GB each): share one process there.
    args.isolate = not args.shared_process and args.device == "cpu"
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    if REFERENCE not in args.methods:
        p.error(f"--methods must include the reference {REFERENCE!r} (ratios are to it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.smoke:
        args.warmup, args.repeats, args.gen_prompt, args.gen_repeats = 1, 2, 4, 2
        args.gen_tokens = min(args.gen_tokens, 4)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES["smoke" if args.smoke else args.shape or args.device]
    shape = replace(shape, batch=args.batch or shape.batch, seq=args.seq or shape.seq, vocab=args.vocab or shape.vocab,
                    blocks=args.blocks or shape.blocks)
    device = args.device

    base = None if args.isolate else build_base(shape, device)  # isolated: the workers build their own
    print(f"[speed] {device}, {shape}, threads {torch.get_num_threads()}, methods {args.methods}, "
          f"{'one process per method' if args.isolate else 'all methods in one process'}", file=sys.stderr)

    if args.isolate:
        timing, measured = isolated_timing(args, shape)
    else:
        timing, measured = shared_process_timing(args, shape, base)
    rows: dict[str, dict] = {}
    for name in args.methods:
        rows[name] = {
            "label": METHODS[name].label,
            "step_time_s": timing[name]["wall"]["median"], "step_time_q1_s": timing[name]["wall"]["q1"],
            "step_time_q3_s": timing[name]["wall"]["q3"], "step_cpu_time_s": timing[name]["cpu"]["median"],
            "steps_timed": timing[name]["n"], **measured[name],
        }
    ref = rows[REFERENCE]
    for row in rows.values():
        for metric, key in (("step_time", "step_time_s"), ("step_cpu_time", "step_cpu_time_s"),
                            ("saved_activations", "saved_activations_bytes"), ("step_flops", "step_flops"),
                            ("cuda_peak_step", "cuda_peak_step_bytes")):
            if key in row:
                row[f"{metric}_ratio"] = row[key] / ref[key]
    gc.collect()

    generation = None
    if args.gen_tokens > 0:
        if base is None:
            base = build_base(shape, device)  # the same seed, so the same weights the workers trained on
        generator = torch.Generator().manual_seed(1)
        torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=generator)  # past the training batch
        prompt = torch.randint(3, shape.vocab, (1, args.gen_prompt), generator=generator).to(device)
        models = generation_models(base, shape)
        gen_timing = interleaved_timing({n: generate_runner(m, prompt, args.gen_tokens) for n, m in models.items()},
                                        1, args.gen_repeats, device)
        gen_rows = {n: {"seconds": t["wall"]["median"], "tokens_per_s": args.gen_tokens / t["wall"]["median"],
                        "cpu_seconds": t["cpu"]["median"]} for n, t in gen_timing.items()}
        for row in gen_rows.values():
            row["tokens_per_s_ratio_to_base"] = row["tokens_per_s"] / gen_rows["base"]["tokens_per_s"]
            row["cpu_time_ratio_to_base"] = row["cpu_seconds"] / gen_rows["base"]["cpu_seconds"]
        generation = {"batch": 1, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_tokens,
                      "repeats": args.gen_repeats, "rows": gen_rows}

    result = {
        "benchmark": "speed", "device": device, "smoke": args.smoke, "shape": asdict(shape), "dropout": DROPOUT,
        "reference": REFERENCE, "warmup": args.warmup, "repeats": args.repeats, "environment": environment(device),
        "processes": "one per method" if args.isolate else "one for all methods",
        "rows": rows, "generation": generation,
    }
    result["targets"] = target_checks(rows, generation, device)
    print_report(result)
    out = args.out or os.path.join(RESULTS, f"speed_{device}.json")
    write_json(result, out)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
