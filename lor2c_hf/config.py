"""`LoR2CConfig`: every knob of LoR2C and its variants, in the style of PEFT's configs.

Each field carries `metadata={"help": ...}` so `transformers.HfArgumentParser` can expose it on a command
line. Values that can be checked without a model are checked at construction; the ones that need the model
(rank against hidden size, merges against depth, target modules) are checked by `get_lor2c_model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional

METHODS = ("lor2c", "sharelor2c", "mergelor2c", "injectlor2c", "imlor2c")
MERGE_CRITERIA = ("paper", "official")
MERGE_KEEP = ("paper", "official")
SCHEDULES = ("epochs", "steps")
ZERO_B_SCORES = ("spec", "official")
CONNECTION_POSITIONS = ("block_output", "before_output_norm")  # = modeling_lor2c.BLOCK_OUTPUT, BEFORE_OUTPUT_NORM
CONFIG_NAME = "adapter_config.json"
MAX_ALPHA = 1e6  # a larger lora_alpha overflows the first forward's activations (float16 at once, float32 soon)
# What each method's name sets when the field is left unset (the paper's defaults); other fields: no share, no events.
PRESETS: dict[str, dict[str, Any]] = {
    "lor2c": {},
    "sharelor2c": {"share_a": True},
    "mergelor2c": {"num_merges": 4},
    "injectlor2c": {"num_injects": 4},
    "imlor2c": {"num_merges": 4, "num_injects": 4},
}
STRUCTURAL = ("share_a", "num_merges", "num_injects")  # the fields a method's name stands for


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and what is allowed."""


def events_problem(num_merges: int, num_injects: int, num_blocks: int) -> Optional[str]:
    """Why M merges and N injects cannot be scheduled on a model of `num_blocks` blocks, or None when they can."""
    L = num_blocks
    if num_merges > L - 1:
        return f"LoR2CConfig.num_merges={num_merges} but the model has {L} blocks: at most {L - 1} merges are possible."
    if num_injects > L:
        return f"LoR2CConfig.num_injects={num_injects} but the model has {L} blocks: at most {L} injects are possible."
    if num_merges + num_injects > L:
        return f"LoR2CConfig.num_merges + num_injects = {num_merges + num_injects} exceeds the {L} blocks of the model."
    if num_merges and num_merges + num_injects == L:
        return (f"LoR2CConfig.num_merges + num_injects = {L} equals the {L} blocks of the model: a merged span always "
                "remains and cannot be injected, so one event would always be skipped; with merges, expected "
                f"num_merges + num_injects <= {L - 1}.")
    return None


def method_of(share_a: bool, num_merges: int, num_injects: int) -> str:
    """The method that `share_a`, M and N describe: events name it, else the shared A."""
    if num_merges and num_injects:
        return "imlor2c"
    if num_merges or num_injects:
        return "mergelor2c" if num_merges else "injectlor2c"
    return "sharelor2c" if share_a else "lor2c"


def method_problem(method: str, share_a: bool, num_merges: int, num_injects: int) -> Optional[str]:
    """Why `method` contradicts the fields, or None (a shared A may go with any method that has events)."""
    needs = {"lor2c": (False, False, False), "sharelor2c": (True, False, False), "mergelor2c": (None, True, False),
             "injectlor2c": (None, False, True), "imlor2c": (None, True, True)}[method]
    have = (share_a, num_merges > 0, num_injects > 0)
    wrong = [f"{name}={value!r}" for name, value, need, got in zip(STRUCTURAL, (share_a, num_merges, num_injects), needs, have)
             if need is not None and need != got]
    if not wrong:
        return None
    return (f"LoR2CConfig.method={method!r} contradicts {', '.join(wrong)}: these fields describe "
            f"{method_of(share_a, num_merges, num_injects)!r}. Leave method unset (it follows from share_a, num_merges "
            "and num_injects), or leave those fields unset (the method's preset fills them).")


def _check(condition: bool, name: str, value: Any, allowed: str, owner: str = "LoR2CConfig") -> None:
    if not condition:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: expected {allowed}.")


def is_int(value: Any) -> bool:
    """A Python int that is not a bool (`True` is an int to Python, never a rank or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool: inf and NaN scalings train to a NaN adapter."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(config: Any, allowed: tuple[type, ...], argument: str) -> None:
    """`argument` is a config object (a dict would fail later, far from the cause)."""
    if not isinstance(config, allowed):
        names = " or ".join(c.__name__ for c in allowed)
        hint = f"; build one with {allowed[0].__name__}(**your_dict)" if isinstance(config, dict) else ""
        raise ConfigError(f"{argument} must be a {names}, got a {type(config).__name__}{hint}.")


class AdapterConfigIO:
    """JSON round trip shared by the adapter configs (`LoR2CConfig`, `ResLoRAConfig`): `adapter_config.json`."""

    peft_type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object (a mapping of fields), got a {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"peft_type"}
        if unknown:
            raise ConfigError(f"adapter config has unknown fields {sorted(unknown)}; known fields: {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any):
        """A copy with `changes`, validated again (what a search trial trains with)."""
        return dataclasses.replace(self, **changes)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def _names_as_lists(self, *names: str) -> None:
        """Module-name fields accept one name or any sequence; store them as lists (JSON-able, comparable).

        Every name must be a non-empty string: "" names the whole model, which would unfreeze every base weight.
        """
        owner = type(self).__name__
        for name in names:
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            elif value is not None:
                _check(isinstance(value, (list, tuple)), name, value, "a module name or a list of module names", owner)
                value = list(value)
            if value is not None:
                bad = [v for v in value if not isinstance(v, str) or not v.strip()]
                _check(not bad, name, value, f"non-empty module names (strings); got {bad}", owner)
            setattr(self, name, value)

    def _check_optional_names(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            _check(value is None or isinstance(value, str) and bool(value.strip()), name, value,
                   "None or a non-empty string", type(self).__name__)

    @classmethod
    def from_pretrained(cls, directory: str):
        """The config saved in `directory`, read by the one adapter-file reader: `AdapterLoadError` names the file
        and what is wrong with it (not JSON, too deep or large, not an object, a field out of range)."""
        from .adapter_files import AdapterLoadError, read_config_data  # torch and safetensors only when a file is read

        path = os.path.join(directory, CONFIG_NAME)
        try:
            return cls.from_dict(read_config_data(path))
        except (ConfigError, TypeError) as e:
            raise AdapterLoadError(f"{path}: {e}") from None


@dataclass
class LoR2CConfig(AdapterConfigIO):
    """Configuration of a LoR2C-family adapter (LoR2C, ShareLoR2C, MergeLoR2C, InjectLoR2C, IMLoR2C)."""

    peft_type: ClassVar[str] = "LOR2C"

    method: Optional[str] = field(default=None, metadata={"help": f"Method, one of {METHODS}. Unset: it follows from share_a, num_merges and num_injects. Set: those fields, when unset, take the method's preset ({PRESETS}), and a field that contradicts it is refused."})
    r: int = field(default=8, metadata={"help": "Rank r of each low-rank residual connection (A: r x d, B: d x r)."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: the connection output is multiplied by lora_alpha / r."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the hidden state entering a connection."})
    share_a: Optional[bool] = field(default=None, metadata={"help": "ShareLoR2C: one A matrix shared by all blocks, one B per block (unset: the method's preset, else False)."})
    num_merges: Optional[int] = field(default=None, metadata={"help": "M: number of MergeLoR2C events (each fuses two adjacent spans); unset: the method's preset, else 0."})
    num_injects: Optional[int] = field(default=None, metadata={"help": "N: number of InjectLoR2C events (each swaps one connection for LoRA on q and v); unset: the method's preset, else 0."})
    sfs_top_k: int = field(default=2, metadata={"help": "k of the SFS score: share of the top-k singular values counted as rho."})
    merge_criterion: str = field(default="official", metadata={"help": "Which adjacent pair merges: 'official' = lowest summed rho, i.e. highest summed SFS (the authors' code, which produced the paper's numbers; the default, see the README's quality benchmarks); 'paper' = lowest summed SFS (the paper's text)."})
    merge_keep: str = field(default="paper", metadata={"help": "Whose A, B survive a merge: 'paper' = the span with higher SFS, 'official' = the lower block's span."})
    zero_b_score: str = field(default="spec", metadata={"help": "How a connection whose B is still all zeros is scored: 'spec' = 0 information (rho = 1, SFS = 0); 'official' = as the authors' code, rho = 0 (SFS = 1): merged first under merge_criterion='official', injected last."})
    inject_r: Optional[int] = field(default=None, metadata={"help": "Rank of the LoRA injected on q and v (default r // 2, at least 1)."})
    inject_alpha: float = field(default=16, metadata={"help": "lora_alpha of the injected LoRA."})
    inject_dropout: float = field(default=0.05, metadata={"help": "Dropout of the injected LoRA."})
    inject_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Names (inside a block) of the projections that receive injected LoRA; default: the query and value projections detected for the architecture."})
    schedule: str = field(default="epochs", metadata={"help": "'epochs' = events at epoch ends per the paper's eqs. 11-12; 'steps' = at fractional epochs k*E/(4M), checked every optimizer step."})
    connection_position: str = field(default="block_output", metadata={"help": "Where a span's connection is added: 'block_output' = to the output of its last block (the paper's form, the default); 'before_output_norm' = to the input of its last block's final LayerNorm, LN(h + FFN(h) + s B A x), so the connection is normalised like the block's own residual. The second needs post-LN blocks (BERT, RoBERTa, ELECTRA, MiniLM, DistilBERT, DeBERTa-v2) and is refused on pre-LN decoders (Llama, GPT-2, ...); an option under evaluation, not a default."})
    output_norm: Optional[str] = field(default=None, metadata={"help": "With connection_position='before_output_norm': the path, inside a block, of the block's final LayerNorm (e.g. 'output.LayerNorm'); detected for known post-LN encoders when unset. Must stay unset with 'block_output'."})
    blocks_path: Optional[str] = field(default=None, metadata={"help": "Dotted path of the transformer block ModuleList (e.g. 'model.layers'); detected when unset."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained and saved with the adapter (task heads); detected for classification models when unset."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model this adapter belongs to (filled in when the adapter is created)."})

    def __post_init__(self) -> None:
        _check(self.method is None or isinstance(self.method, str) and self.method in METHODS, "method", self.method,
               f"None or one of {METHODS}")
        preset = PRESETS.get(self.method, {})
        for name, default in zip(STRUCTURAL, (False, 0, 0)):
            if getattr(self, name) is None:
                setattr(self, name, preset.get(name, default))
        _check(is_int(self.r) and self.r > 0, "r", self.r, "a positive integer")
        _check(is_number(self.lora_alpha) and 0 < self.lora_alpha <= MAX_ALPHA, "lora_alpha", self.lora_alpha, f"a number in (0, {MAX_ALPHA:g}]")
        _check(is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        _check(is_number(self.inject_dropout) and 0.0 <= self.inject_dropout < 1.0, "inject_dropout", self.inject_dropout, "a probability in [0, 1)")
        _check(isinstance(self.share_a, bool), "share_a", self.share_a, "True or False")
        _check(is_int(self.num_merges) and self.num_merges >= 0, "num_merges", self.num_merges, "an integer >= 0")
        _check(is_int(self.num_injects) and self.num_injects >= 0, "num_injects", self.num_injects, "an integer >= 0")
        if self.method is None:
            self.method = method_of(self.share_a, self.num_merges, self.num_injects)
        problem = method_problem(self.method, self.share_a, self.num_merges, self.num_injects)
        if problem:
            raise ConfigError(problem)
        _check(is_int(self.sfs_top_k) and 1 <= self.sfs_top_k <= self.r, "sfs_top_k", self.sfs_top_k, f"an integer in [1, r={self.r}]")
        _check(isinstance(self.merge_criterion, str) and self.merge_criterion in MERGE_CRITERIA, "merge_criterion", self.merge_criterion, f"one of {MERGE_CRITERIA}")
        _check(isinstance(self.merge_keep, str) and self.merge_keep in MERGE_KEEP, "merge_keep", self.merge_keep, f"one of {MERGE_KEEP}")
        _check(isinstance(self.schedule, str) and self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        _check(is_number(self.inject_alpha) and 0 < self.inject_alpha <= MAX_ALPHA, "inject_alpha", self.inject_alpha, f"a number in (0, {MAX_ALPHA:g}]")
        _check(isinstance(self.zero_b_score, str) and self.zero_b_score in ZERO_B_SCORES, "zero_b_score", self.zero_b_score, f"one of {ZERO_B_SCORES}")
        if self.inject_r is None:
            self.inject_r = max(1, self.r // 2)
        _check(is_int(self.inject_r) and self.inject_r >= 1, "inject_r", self.inject_r, "an integer >= 1")
        _check(isinstance(self.connection_position, str) and self.connection_position in CONNECTION_POSITIONS,
               "connection_position", self.connection_position, f"one of {CONNECTION_POSITIONS}")
        self._names_as_lists("inject_target_modules", "modules_to_save")
        self._check_optional_names("blocks_path", "base_model_name_or_path", "output_norm")
        _check(self.output_norm is None or self.connection_position == "before_output_norm", "output_norm", self.output_norm,
               "None with connection_position='block_output' (the block's norm is read only with 'before_output_norm')")

    @property
    def inject_scaling(self) -> float:
        return self.inject_alpha / self.inject_r

    @property
    def has_events(self) -> bool:
        return self.num_merges > 0 or self.num_injects > 0

    def replace(self, **changes: Any) -> "LoR2CConfig":
        """A copy with `changes` (e.g. a search trial's M and N); the method follows the new fields unless given."""
        if "method" not in changes and any(name in changes for name in STRUCTURAL):
            changes["method"] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> "LoR2CConfig":
        """The preset of a named method (paper defaults), with any field overridden (a contradiction is refused)."""
        if method not in METHODS:
            raise ConfigError(f"Unknown method {method!r}: expected one of {METHODS}.")
        return cls(method=method, **overrides)
