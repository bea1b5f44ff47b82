"""`ResLoRAConfig`: the knobs of ResLoRA (arXiv 2402.18039; SPEC §9), in the style of `LoR2CConfig`.

Defaults: `res_flag="ms"` with `pre_num=4` is the ResLoRA paper's NLU setting (SPEC §9). Rank, alpha and
dropout default to this project's GLUE settings for LoRA-family adapters (r=8, alpha=16, dropout 0.1,
SPEC §1), so ResLoRA compares with LoRA and LoR2C at the same rank; the ResLoRA paper's own NLU run used
RoBERTa-large with r=4: pass `r=4` to reproduce it. Values that need the model (pre_num against depth,
target modules) are checked by `get_reslora_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .config import MAX_ALPHA, AdapterConfigIO, _check, is_int, is_number

RES_FLAGS = ("is", "bs", "ms")
IS_BLOCK0 = ("skip", "self")
OWNER = "ResLoRAConfig"


@dataclass
class ResLoRAConfig(AdapterConfigIO):
    """Configuration of a ResLoRA adapter: LoRA on q and v plus residual paths between consecutive layers."""

    peft_type: ClassVar[str] = "RESLORA"

    method: str = field(default="reslora", metadata={"help": "Name of the method this config describes: always 'reslora'."})
    r: int = field(default=8, metadata={"help": "LoRA rank r of every target projection (A: r x in, B: out x r)."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: every LoRA term is multiplied by lora_alpha / r."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the input a LoRA A matrix reads."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Names (inside a block) of the projections that get LoRA; default: the query and value projections detected for the architecture."})
    res_flag: str = field(default="ms", metadata={"help": "Residual path: 'is' = input shortcut (A reads x_l + x_{l-1}), 'bs' = block shortcut (sum of the B A of the pre_num previous layers), 'ms' = middle shortcut (B_l reads A_l x_l plus the A x of the pre_num previous layers)."})
    is_block0: str = field(default="skip", metadata={"help": "res_flag='is' at block 0, which has no previous layer: 'skip' = plain LoRA there, s B A drop(x_0); 'self' = as LMOps' reference code, the block's own input stands in for the previous one, s B A drop(2 x_0), merged as 2 s B A."})
    pre_num: int = field(default=4, metadata={"help": "p: how many previous layers the 'bs' and 'ms' paths reach (0 = plain LoRA); 'is' always reads exactly one."})
    blocks_path: Optional[str] = field(default=None, metadata={"help": "Dotted path of the transformer block ModuleList (e.g. 'model.layers'); detected when unset."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained and saved with the adapter (task heads); detected for classification models when unset."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model this adapter belongs to (filled in when the adapter is created)."})

    def __post_init__(self) -> None:
        _check(self.method == "reslora", "method", self.method, "'reslora'", OWNER)
        _check(is_int(self.r) and self.r > 0, "r", self.r, "a positive integer", OWNER)
        _check(is_number(self.lora_alpha) and 0 < self.lora_alpha <= MAX_ALPHA, "lora_alpha", self.lora_alpha,
               f"a number in (0, {MAX_ALPHA:g}]", OWNER)
        _check(is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a probability in [0, 1)", OWNER)
        _check(isinstance(self.res_flag, str) and self.res_flag in RES_FLAGS, "res_flag", self.res_flag, f"one of {RES_FLAGS}", OWNER)
        _check(isinstance(self.is_block0, str) and self.is_block0 in IS_BLOCK0, "is_block0", self.is_block0, f"one of {IS_BLOCK0}", OWNER)
        _check(is_int(self.pre_num) and self.pre_num >= 0, "pre_num", self.pre_num, "an integer >= 0", OWNER)
        self._names_as_lists("target_modules", "modules_to_save")
        self._check_optional_names("blocks_path", "base_model_name_or_path")

    @property
    def reach(self) -> int:
        """How many previous layers one layer's residual path reads: 1 for 'is', pre_num for 'bs'/'ms'."""
        return 1 if self.res_flag == "is" else self.pre_num
