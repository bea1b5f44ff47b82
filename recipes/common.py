"""What every recipe shares: arguments (dataclasses + `--config` YAML + command-line overrides), loading models
and data from Hub ids or local paths, wrapping a model with the chosen method, and one-line errors.

Bad input raises `RecipeError` before any training step; `run_recipe` prints it as one line and exits with 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import socket
import sys
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from transformers import HfArgumentParser, PreTrainedModel, Trainer, TrainingArguments

import lor2c_hf
from lor2c_hf import LoR2CConfig, LoR2CTrainer, get_lor2c_model
from lor2c_hf.architectures import default_qv_targets
from lor2c_hf.distributed import gathered

LOR2C_METHODS = tuple(lor2c_hf.METHODS)
MERGE_METHODS = ("mergelor2c", "imlor2c")
INJECT_METHODS = ("injectlor2c", "imlor2c")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RecipeError(Exception):
    """Bad input to a recipe; the message (one line) names the argument and what to pass instead."""


def available_methods() -> tuple[str, ...]:
    """`lora` (PEFT baseline), the LoR2C family, and `reslora` once `lor2c_hf` provides it."""
    reslora = ("reslora",) if hasattr(lor2c_hf, "get_reslora_model") else ()
    return ("lora",) + LOR2C_METHODS + reslora


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


# --- arguments -----------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which base model to load and how (precision, quantization, attention kernel)."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local folder saved with save_pretrained (config.json + weights)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer Hub id or folder (default: the model's)."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "dtype of the base weights: bfloat16, float16 or float32 (default: bfloat16 with --bf16, float16 with --fp16, else float32)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA-style 4-bit base: bitsandbytes NF4, double quantization, bf16 compute (CUDA only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base through bitsandbytes (CUDA only)."})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "Attention kernel: eager, sdpa or flash_attention_2 (default: transformers' choice)."})


RECIPE_ONLY_HELP = {
    "method": "lora (PEFT, on q and v), lor2c, sharelor2c, mergelor2c, injectlor2c, imlor2c, or reslora.",
    "num_merges": "M, for mergelor2c and imlor2c (a recipe's default M is dropped for other methods).",
    "num_injects": "N, for injectlor2c and imlor2c (a recipe's default N is dropped for other methods).",
    "target_modules": "Projections for LoRA and ResLoRA (default: the query and value projections of the architecture); "
                      "LoR2C's injected LoRA takes --inject_target_modules.",
}
NOT_ON_THE_COMMAND_LINE = ("base_model_name_or_path",)  # filled in when the adapter is created


def adapter_arguments_class() -> type:
    """The recipes' `adapter` section, made from the fields of `LoR2CConfig` and then `ResLoRAConfig` (their types
    and help), so a field added to a config is a flag at once. Every value defaults to None, "unset": the config's
    own default or method preset applies."""
    fields_, seen = [], set()
    for config_class in (lor2c_hf.LoR2CConfig, lor2c_hf.ResLoRAConfig):
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if f.name in seen or f.name in NOT_ON_THE_COMMAND_LINE or not f.init:
                continue
            seen.add(f.name)
            kind = hints[f.name]
            optional = kind if type(None) in typing.get_args(kind) else Optional[kind]
            help_text = RECIPE_ONLY_HELP.get(f.name, f.metadata.get("help", ""))
            fields_.append((f.name, optional, field(default=None, metadata={"help": help_text})))
    cls = dataclasses.make_dataclass("AdapterArguments", fields_)
    cls.__module__ = __name__
    cls.__doc__ = "The method and its hyper-parameters: every field of LoR2CConfig and ResLoRAConfig, unset by default."
    return cls


AdapterArguments = adapter_arguments_class()


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the global batch, from which gradient accumulation is derived."""

    global_batch_size: int = field(default=0, metadata={"help": "Examples per optimizer step over all processes; gradient accumulation = global / (per-device batch x processes). 0: use --gradient_accumulation_steps as given."})


@dataclass
class GlueTrainingArguments(RecipeTrainingArguments):
    """`RecipeTrainingArguments` plus recipes/glue.py's task-head learning rate and M x N grid search (defined here,
    not in glue.py, so the `training_args.bin` it pickles loads wherever `common` imports)."""

    head_learning_rate_ratio: float = field(default=1.0, metadata={"help": "Learning rate of the task head (e.g. RoBERTa's classifier) as a multiple of --learning_rate; the authors' GLUE script trains it at 0.5 (lr / 2)."})
    search_mn: bool = field(default=False, metadata={"help": "Before training, grid-search M (merges) x N (injects) over --search_values on the dev set (LoR2CTrainer.hyperparameter_search with Optuna, a fresh model per trial, each scored by its best epoch), write mn_search.json and the heatmap mn_search.png to --output_dir, then train with the best pair. Needs --method imlor2c."})
    search_values: list[int] = field(default_factory=lambda: [0, 1, 2, 3], metadata={"help": "With --search_mn: the values of M and of N (pairs with more events than the model allows are skipped)."})
    search_merge_rules: bool = field(default=False, metadata={"help": "With --search_mn: also search merge_criterion x merge_keep (paper / official each), 4 times the trials."})
    search_epochs: Optional[float] = field(default=None, metadata={"help": "With --search_mn: epochs per trial (default: --num_train_epochs)."})


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line (no usage dump) and which reads `--config <yaml>`.

    The YAML has one mapping per section (e.g. `model:`, `adapter:`, `data:`, `training:`), each holding fields
    of that section's dataclass. Precedence: command line > YAML > the recipe's defaults > dataclass defaults.
    """

    def __init__(self, sections: dict[str, type], **kwargs: Any) -> None:
        super().__init__(list(sections.values()), **kwargs)
        self.sections = sections
        self.add_argument("--config", default=None, help="YAML file with sections " + ", ".join(sections) + "; command-line flags override it.")

    def error(self, message: str) -> None:  # argparse's own errors (unknown flag, bad type)
        raise RecipeError(f"{message} (see --help)")

    def load_yaml(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise RecipeError(f"--config {path} does not exist; pass a YAML file such as recipes/configs/alpaca_imlor2c.yaml.")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise RecipeError(f"--config {path} is not valid YAML: {one_line(err)}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"--config {path} must be a mapping of sections {list(self.sections)}.")
        values: dict[str, Any] = {}
        for section, entries in data.items():
            if section not in self.sections:
                raise RecipeError(f"--config {path}: unknown section {section!r}; expected sections {list(self.sections)}.")
            known = {f.name for f in dataclasses.fields(self.sections[section]) if f.init}
            for key, value in (entries or {}).items():
                if key not in known:
                    raise RecipeError(f"--config {path}: {key!r} is not a field of section {section!r} ({self.sections[section].__name__}).")
                values[key] = value
        return values

    def parse(self, argv: Optional[Sequence[str]] = None, defaults: Optional[dict[str, Any]] = None,
              prepare: Optional[Callable[[Any], None]] = None) -> tuple:
        """Parse into one instance per section, in section order.

        `defaults` are the recipe's own defaults (shown by --help); `prepare(namespace)` may derive values
        before the dataclasses are built (e.g. gradient accumulation, which DeepSpeed reads at construction).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        given = dict(defaults or {})
        config_path = self._config_path(argv)
        if config_path:
            given.update(self.load_yaml(config_path))
        self.set_defaults(**given)
        for action in self._actions:  # a field with a recipe or YAML default is no longer required
            if action.dest in given:
                action.required = False
        namespace, remaining = self.parse_known_args(argv)
        if remaining:
            raise RecipeError(f"unrecognized arguments: {' '.join(remaining)} (see --help)")
        if prepare is not None:
            prepare(namespace)
        outputs = []
        for section, dtype in self.sections.items():
            keys = {f.name for f in dataclasses.fields(dtype) if f.init}
            try:
                outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
            except (ValueError, TypeError) as err:
                raise RecipeError(f"invalid {section} arguments: {one_line(err)}") from None
        return tuple(outputs)

    @staticmethod
    def _config_path(argv: list[str]) -> Optional[str]:
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--config="):
                return arg.split("=", 1)[1]
        return None


def draw_structure(model: torch.nn.Module, output_dir: str, title: str) -> Optional[str]:
    """`lor2c_hf.plotting.save_structure_picture` for the adapter inside a Trainer's (possibly wrapped) model."""
    from lor2c_hf.wrapper import unwrap_adapter
    from lor2c_hf.plotting import save_structure_picture

    try:
        adapter = unwrap_adapter(model)
    except TypeError:  # PEFT LoRA: no structure
        return None
    return save_structure_picture(adapter, output_dir, title=title)


def world_size_from_env() -> int:
    """Number of processes the launcher started (accelerate, torchrun and deepspeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_gradient_accumulation(namespace: Any, world_size: Optional[int] = None) -> None:
    """Set `gradient_accumulation_steps` so that per-device batch x accumulation x processes = global batch."""
    world = world_size or world_size_from_env()
    per_device, wanted = namespace.per_device_train_batch_size, namespace.global_batch_size
    if per_device is None or per_device < 1:
        raise RecipeError(f"--per_device_train_batch_size {per_device} must be a positive integer.")
    if not wanted:
        return
    step = per_device * world
    if wanted < 1 or wanted % step:
        raise RecipeError(f"--global_batch_size {wanted} is not a multiple of --per_device_train_batch_size {per_device} "
                          f"x {world} process(es) = {step}; pick sizes with global = per-device x accumulation x processes.")
    accumulation = wanted // step
    given = namespace.gradient_accumulation_steps
    if given not in (1, accumulation):
        raise RecipeError(f"--gradient_accumulation_steps {given} contradicts --global_batch_size {wanted} "
                          f"(= {per_device} per device x {accumulation} x {world} process(es)); pass one of them, "
                          "or --global_batch_size 0 to use the accumulation as given.")
    namespace.gradient_accumulation_steps = accumulation


def check_training_length(namespace: Any) -> None:
    """Some training must happen: a positive finite --num_train_epochs, unless --max_steps (> 0) sets the length."""
    epochs, max_steps = namespace.num_train_epochs, namespace.max_steps
    if not math.isfinite(epochs) or epochs < 0 or (epochs == 0 and (max_steps is None or max_steps <= 0)):
        raise RecipeError(f"--num_train_epochs {epochs} must be a positive number (or set --max_steps > 0); "
                          "it would save an untrained adapter.")


def check_positive(value: Optional[int], flag: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise RecipeError(f"{flag} {value} must be a positive integer.")


def check_learning_rate(namespace: Any) -> None:
    """torch's optimizer would refuse it only at the first step, after the output folder was made."""
    lr = namespace.learning_rate
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise RecipeError(f"--learning_rate {lr} must be a finite positive number (the papers use 1e-4 to 5e-3).")


def resolve_resume(namespace: Any) -> None:
    """`--resume_from_checkpoint True` means the newest checkpoint in --output_dir (the command line gives the
    string 'True'; `Trainer.train` wants the boolean); a path must be a folder. Checked once --output_dir is known."""
    value = namespace.resume_from_checkpoint
    if value is None or value is True:
        return
    flag = f"--resume_from_checkpoint {value}"
    if str(value).lower() in ("false", "no", "0", ""):
        namespace.resume_from_checkpoint = None
    elif str(value).lower() in ("true", "yes", "1"):
        out = namespace.output_dir
        found = os.path.isdir(out) and any(n.startswith("checkpoint-") for n in os.listdir(out))
        if not found:
            raise RecipeError(f"{flag}: {out} has no checkpoint-* folder to resume from; pass --output_dir of the "
                              "interrupted run, or a checkpoint folder.")
        namespace.resume_from_checkpoint = True
    elif not os.path.isdir(value):
        raise RecipeError(f"{flag}: no such folder; pass a checkpoint-* folder of an earlier run, or True for the "
                          "newest one in --output_dir.")


def prepare_training_namespace(namespace: Any) -> None:
    """Derive what `TrainingArguments` must see at construction: the accumulation for the global batch, and
    CPU processes (gloo) when a launcher started several processes on a machine without CUDA."""
    check_training_length(namespace)
    check_learning_rate(namespace)
    derive_gradient_accumulation(namespace)
    if world_size_from_env() > 1 and not torch.cuda.is_available():
        namespace.use_cpu = True


def describe_batch(args: TrainingArguments) -> str:
    p, a, w = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
    return f"global batch {p * a * w} = {p} per device x {a} accumulation x {w} process(es)"


def validate_adapter_arguments(adapter: AdapterArguments, training_args: Optional[TrainingArguments] = None) -> None:
    """The method exists here, and its structure events can run under the chosen parallelism."""
    methods = available_methods()
    if adapter.method not in methods:
        hint = "; reslora needs the ResLoRA implementation in lor2c_hf" if adapter.method == "reslora" else ""
        raise RecipeError(f"--method {adapter.method!r} is unknown: expected one of {', '.join(methods)}{hint}.")
    fsdp = bool(training_args is not None and training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and adapter.method in MERGE_METHODS + INJECT_METHODS:
        raise RecipeError(f"--method {adapter.method} scores the whole adapter at each merge/inject, which FSDP shards; "
                          "use DDP (accelerate_configs/multi_gpu.yaml) or DeepSpeed ZeRO (deepspeed_zero*.yaml) instead.")


# --- models --------------------------------------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (`owner/name` has exactly one slash and no file extension)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS)


def check_source(name: str, flag: str, what: str) -> str:
    """The local path (expanded) or Hub id to load from; a path-like name that does not exist is an error."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    if looks_like_path(name):
        raise RecipeError(f"{flag} {name}: no such file or folder; pass {what}.")
    return name


MODEL_HINT = "a folder saved with save_pretrained (config.json + weights) or a Hub id you can reach"
MODEL_HINT_EXTRA: list[str] = []  # a recipe's own way out, e.g. alpaca.py's "--tiny"


def model_hint() -> str:
    return "; ".join([MODEL_HINT, *MODEL_HINT_EXTRA])


def hub_error(flag: str, name: str, err: Any, what: str) -> RecipeError:
    return RecipeError(f"{flag} {name} could not be loaded: it is not a local path and the Hugging Face Hub could not "
                       f"provide it ({one_line(err)[:300]}). Pass {what}.")


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hub cannot serve a download right now (offline mode, or no connection to its endpoint), else None.

    Checked once before loading: otherwise every file transformers asks for is retried with back-off, minutes
    of silence before the same error."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as err:
        return f"no connection to {constants.ENDPOINT}: {err.strerror or err}"
    return None


def check_hub_model(source: str, flag: str, what: str) -> None:
    """A Hub id that is neither in the local cache nor downloadable now is refused at once, by one line."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.exists(source) or isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    reason = hub_unreachable()
    if reason:
        raise hub_error(flag, source, reason, what)


def resolve_dtype(model_args: ModelArguments, training_args: TrainingArguments) -> torch.dtype:
    if model_args.torch_dtype is not None:
        if model_args.torch_dtype not in DTYPES:
            raise RecipeError(f"--torch_dtype {model_args.torch_dtype!r} is not one of {', '.join(DTYPES)}.")
        return DTYPES[model_args.torch_dtype]
    precision = getattr(training_args, "mixed_precision", "no")
    if training_args.bf16 or precision == "bf16":
        return torch.bfloat16
    if training_args.fp16 or precision == "fp16":
        return torch.float16
    return torch.float32


def quantization_config(model_args: ModelArguments):
    """A `BitsAndBytesConfig` for --load_in_4bit / --load_in_8bit (bitsandbytes imported only then), else None."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise RecipeError("--load_in_4bit and --load_in_8bit exclude each other; pass one.")
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(f"{flag} needs bitsandbytes and a CUDA GPU: pip install 'lor2c-hf[bnb]' on a GPU machine, "
                          "or drop the flag.")
    if not torch.cuda.is_available():  # bitsandbytes' CPU backend (0.50) fails in eval mode on double-quantized NF4
        raise RecipeError(f"{flag} needs a CUDA GPU and none is visible; drop the flag to train in full precision.")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def check_model_arguments(model_args: ModelArguments) -> None:
    """Errors that need no loading: conflicting flags, missing bitsandbytes/GPU, a model path that is not there."""
    quantization_config(model_args)
    check_source(model_args.model_name_or_path, "--model_name_or_path", MODEL_HINT)
    if model_args.tokenizer_name_or_path:
        check_source(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path", "a tokenizer folder or Hub id")


def load_tokenizer(model_args: ModelArguments, **kwargs: Any):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    source = check_source(name, flag, MODEL_HINT)
    check_hub_model(source, flag, model_hint())
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.exists(source):
            raise RecipeError(f"{flag} {name} has no usable tokenizer ({one_line(err)[:300]}); pass --tokenizer_name_or_path.") from None
        raise hub_error(flag, name, err, model_hint()) from None


def load_model(model_args: ModelArguments, training_args: TrainingArguments, auto_class: Any, **kwargs: Any) -> PreTrainedModel:
    """Load the base model (Hub id or folder) in the requested dtype, quantized and k-bit-prepared if asked."""
    source = check_source(model_args.model_name_or_path, "--model_name_or_path", MODEL_HINT)
    check_hub_model(source, "--model_name_or_path", model_hint())
    quantization = quantization_config(model_args)
    load_kwargs: dict[str, Any] = {"dtype": resolve_dtype(model_args, training_args), **kwargs}
    if model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    if quantization is not None:  # each process holds its own quantized copy on its own device
        load_kwargs.update(quantization_config=quantization, device_map={"": str(training_args.device)}, dtype=torch.bfloat16)
    try:
        model = auto_class.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError) as err:
        if os.path.exists(source):
            raise RecipeError(f"--model_name_or_path {source} is not a loadable model folder ({one_line(err)[:300]}); pass {MODEL_HINT}.") from None
        raise hub_error("--model_name_or_path", model_args.model_name_or_path, err, model_hint()) from None
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    return model


# --- data ----------------------------------------------------------------------------------------------------

DATA_HINT = "a json/jsonl/parquet/arrow/csv file, a folder written by Dataset.save_to_disk, or a Hub id you can reach"


def load_data(name: str, flag: str = "--dataset_name", split: str = "train"):
    """One split of a data set from a local file, a `save_to_disk` folder, a folder of data files or the Hub."""
    import datasets
    from datasets.exceptions import DatasetsError

    source = check_source(name, flag, DATA_HINT)
    try:
        if os.path.isfile(source):
            builder = DATA_FILE_BUILDERS.get(os.path.splitext(source)[1].lower())
            if builder is None:
                raise RecipeError(f"{flag} {name}: unsupported file type; pass {DATA_HINT}.")
            check_data_file(source, flag, name, text=builder in ("json", "csv"))
            loaded = datasets.load_dataset(builder, data_files=source, split="train")
        elif os.path.isdir(source) and any(os.path.exists(os.path.join(source, m)) for m in SAVE_TO_DISK_MARKERS):
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except (OSError, ValueError, DatasetsError) as err:
        if os.path.exists(source):
            raise RecipeError(f"{flag} {name} could not be read ({one_line(err)[:300]}); pass {DATA_HINT}.") from None
        raise hub_error(flag, name, err, DATA_HINT) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise RecipeError(f"{flag} {name} has splits {sorted(loaded)} but no {split!r} split.")
        loaded = loaded[split]
    return loaded


def check_data_file(path: str, flag: str, name: str, text: bool) -> None:
    """An empty file, or a text file (json, jsonl, csv) that is not UTF-8, is named before `datasets` reads it
    (which fails on them with a raw StopIteration or UnicodeDecodeError)."""
    if os.path.getsize(path) == 0:
        raise RecipeError(f"{flag} {name} is empty; pass {DATA_HINT}.")
    if not text:
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecipeError(f"{flag} {name} line {number} is not UTF-8 text (byte {line[err.start]:#04x}); "
                                  "convert it, e.g. iconv -f latin1 -t utf-8.") from None


def require_columns(dataset: Any, required: Sequence[str], flag: str, name: str, example: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise RecipeError(f"{flag} {name} has columns {dataset.column_names} but lacks {missing}; "
                          f"expected {list(required)}, as in {example}.")
    if len(dataset) == 0:
        raise RecipeError(f"{flag} {name} has no rows; expected examples with columns {list(required)}, as in {example}.")


def require_text(dataset: Any, columns: Sequence[str], flag: str, name: str, nullable: Sequence[str] = ()) -> None:
    """Every value of `columns` is a string (None only in `nullable` ones): a number or a null would otherwise be
    trained on as the text "42" or "None", or crash the tokenizer mid-run."""
    for column in [c for c in columns if c in dataset.column_names]:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str) and not (value is None and column in nullable):
                allowed = "text (a string) or null" if column in nullable else "text (a string)"
                raise RecipeError(f"{flag} {name}: row {row} has {column}={value!r} ({type(value).__name__}); "
                                  f"expected {allowed} in every row.")


# --- adapters ------------------------------------------------------------------------------------------------


def lor2c_config_from(adapter: Any) -> LoR2CConfig:
    """`LoR2CConfig.for_method(method)` with every `LoR2CConfig` field that was set (M and N only where the method
    uses them: the recipes' defaults are IMLoR2C's)."""
    names = {f.name for f in dataclasses.fields(LoR2CConfig) if f.init} - {"method"}
    overrides = {n: getattr(adapter, n) for n in names if getattr(adapter, n, None) is not None}
    if adapter.method not in MERGE_METHODS:
        overrides.pop("num_merges", None)
    if adapter.method not in INJECT_METHODS:
        for name in ("num_injects", "inject_r"):
            overrides.pop(name, None)
    return LoR2CConfig.for_method(adapter.method, **overrides)


def peft_lora_config(adapter: AdapterArguments, model: torch.nn.Module, task_type: str):
    from peft import LoraConfig

    r = 8 if adapter.r is None else adapter.r
    alpha = 16 if adapter.lora_alpha is None else adapter.lora_alpha
    if r < 1 or not (math.isfinite(alpha) and alpha > 0):
        raise RecipeError(f"--method lora: --r {r} must be a positive integer and --lora_alpha {alpha} a finite positive number.")
    return LoraConfig(r=r, lora_alpha=alpha,
                      lora_dropout=adapter.lora_dropout if adapter.lora_dropout is not None else 0.05,
                      target_modules=adapter.target_modules or default_qv_targets(model), task_type=task_type)


def reslora_config(adapter: AdapterArguments, model: torch.nn.Module):
    """`lor2c_hf.ResLoRAConfig` from the arguments it has fields for (unset ones keep its defaults)."""
    config_cls = lor2c_hf.ResLoRAConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: getattr(adapter, k, None) for k in known - {"method"}}
    return config_cls(**{k: v for k, v in values.items() if v is not None})


def wrap_model(model: torch.nn.Module, adapter: AdapterArguments, task_type: str = "CAUSAL_LM") -> tuple[torch.nn.Module, type]:
    """(model with the method's adapter, Trainer class to train it): PEFT LoRA with `Trainer`, the others with
    `LoR2CTrainer`. `task_type` is PEFT's ("CAUSAL_LM", "SEQ_CLS")."""
    validate_adapter_arguments(adapter)
    try:
        if adapter.method == "lora":
            from peft import get_peft_model

            return get_peft_model(model, peft_lora_config(adapter, model, task_type)), Trainer
        if adapter.method == "reslora":
            return lor2c_hf.get_reslora_model(model, reslora_config(adapter, model)), LoR2CTrainer
        return get_lor2c_model(model, lor2c_config_from(adapter)), LoR2CTrainer
    except (lor2c_hf.ConfigError, ValueError) as err:
        raise RecipeError(f"--method {adapter.method}: {one_line(err)}") from None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter model inside DDP / DeepSpeed / compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state a run produces: LoR2C-family adapter tensors, or PEFT's adapter state dict."""
    model = unwrap_model(model)
    if hasattr(model, "adapter_state_dict"):
        return model.adapter_state_dict()
    from peft import get_peft_model_state_dict

    with gathered([p for p in model.parameters() if p.requires_grad]):  # full values under ZeRO-3
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def adapter_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Structure (spans, injected blocks, event kinds/blocks/steps) and a sha256 of every adapter tensor."""
    state = adapter_state(model)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    structure = getattr(unwrap_model(model), "structure", None)
    if structure is not None and "events" in structure:  # events carry rank-local float scores: keep the decisions
        structure = {**structure, "events": [(e["kind"], e.get("blocks"), e.get("step")) for e in structure["events"]]}
    return {"structure": structure, "sha256": digest.hexdigest()}


def check_ranks_agree(model: torch.nn.Module, args: TrainingArguments) -> dict[str, Any]:
    """Print this rank's fingerprint; under several processes, fail unless every rank has the same one."""
    mine = adapter_fingerprint(model)
    line = (f"[rank {args.process_index}/{args.world_size}] adapter sha256={mine['sha256']} "
            f"structure={json.dumps(mine['structure'])}\n")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())  # one write: lines of several ranks on one pipe never interleave
    import torch.distributed as dist

    if args.world_size > 1 and dist.is_available() and dist.is_initialized():
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        differing = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
        if differing:
            raise RuntimeError(f"ranks {differing} ended with another adapter structure or weights than rank 0.")
    return mine


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def main_print(args: TrainingArguments, *parts: Any) -> None:
    if args.process_index == 0:
        print(*parts, flush=True)


def run_recipe(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, prog: str = "") -> int:
    """Run `main`; a `RecipeError` becomes one line on stderr and exit status 2. The process group is taken
    down before exit: left to the interpreter's teardown, gloo's threads can abort a finished run (SIGABRT)."""
    try:
        status = main(argv)
    except RecipeError as err:
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {one_line(err)}", file=sys.stderr, flush=True)
        status = 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return status
