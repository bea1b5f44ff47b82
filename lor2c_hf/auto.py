"""One-line loading of base model + adapter, like PEFT's `AutoPeftModelForCausalLM`, and clear refusals from
the loaders that cannot build ours.

`AutoLoR2CModelForCausalLM.from_pretrained("out/adapter" or "user/repo")` reads the adapter's
`base_model_name_or_path`, loads that base with the matching `transformers` auto class and wraps it with the
adapter (any method: LoR2C family or ResLoRA). `transformers`' own loaders (`AutoModelFor*.from_pretrained` on
an adapter folder, `model.load_adapter`) and `PeftModel.from_pretrained` hand our `adapter_config.json` to PEFT,
which does not know its `peft_type`; once `lor2c_hf` is imported they fail with an error that names the call to
use instead of PEFT's `KeyError`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import transformers

from .adapter_files import read_config_of
from .methods import CONFIG_CLASSES
from .serialization import AdapterLoadError, load_adapter_model

HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only")


class _AutoAdapterModel:
    """Base model by its auto class, then the adapter: `from_pretrained(path_or_repo_id, **base_kwargs)`."""

    auto_class: type

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(path_or_repo_id).")

    @classmethod
    def from_pretrained(cls, adapter_name_or_path: str, is_trainable: bool = False,
                        base_model_name_or_path: Optional[str] = None, allow_base_overwrite: bool = False,
                        allow_nonfinite: bool = False, **kwargs: Any) -> torch.nn.Module:
        """`kwargs` go to the base's `from_pretrained` (`dtype`, `num_labels`, `device_map`, ...); `revision`,
        `token`, `cache_dir`, `force_download` and `local_files_only` also to the adapter's download. The `allow_*`
        opt-ins are the adapter's `from_pretrained`'s."""
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config_file, saved = read_config_of(adapter_name_or_path, **hub_kwargs)
        base_id = base_model_name_or_path or saved.get("base_model_name_or_path")
        if base_id is not None and not isinstance(base_id, str):
            raise AdapterLoadError(f"{config_file}: base_model_name_or_path={base_id!r} is invalid: expected a model id "
                                   "or folder (a string).")
        if not base_id:
            raise AdapterLoadError(f"Adapter {adapter_name_or_path} does not record its base model "
                                   "(base_model_name_or_path is empty): pass base_model_name_or_path=..., or load the "
                                   "base yourself and call lor2c_hf.load_adapter_model(base_model, path).")
        base = cls.auto_class.from_pretrained(base_id, **kwargs)
        return load_adapter_model(base, adapter_name_or_path, is_trainable=is_trainable,
                                  allow_base_overwrite=allow_base_overwrite, allow_nonfinite=allow_nonfinite, **hub_kwargs)


def _auto_class(name: str, auto_class: type) -> type:
    return type(name, (_AutoAdapterModel,), {"auto_class": auto_class, "__module__": __name__, "__doc__":
                f"Base by `transformers.{auto_class.__name__}`, then the adapter (see `_AutoAdapterModel`)."})


AutoLoR2CModel = _auto_class("AutoLoR2CModel", transformers.AutoModel)
AutoLoR2CModelForCausalLM = _auto_class("AutoLoR2CModelForCausalLM", transformers.AutoModelForCausalLM)
AutoLoR2CModelForSequenceClassification = _auto_class("AutoLoR2CModelForSequenceClassification",
                                                      transformers.AutoModelForSequenceClassification)
AutoLoR2CModelForTokenClassification = _auto_class("AutoLoR2CModelForTokenClassification",
                                                   transformers.AutoModelForTokenClassification)
AutoLoR2CModelForQuestionAnswering = _auto_class("AutoLoR2CModelForQuestionAnswering",
                                                 transformers.AutoModelForQuestionAnswering)
AutoLoR2CModelForSeq2SeqLM = _auto_class("AutoLoR2CModelForSeq2SeqLM", transformers.AutoModelForSeq2SeqLM)


def _refusal(peft_type: str) -> type:
    """What PEFT's config registry returns for our `peft_type`: building it (transformers' `load_adapter`,
    `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`) raises the explanation."""
    message = (f"This adapter folder was written by lor2c_hf (peft_type {peft_type!r}), which PEFT and transformers' "
               "adapter loading cannot build. Load it with lor2c_hf instead: "
               "lor2c_hf.AutoLoR2CModelForCausalLM.from_pretrained(path) (or ...ForSequenceClassification, ...), or "
               "lor2c_hf.load_adapter_model(base_model, path).")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AdapterLoadError(message)

    return type(f"{peft_type.title()}PeftConfigRefusal", (), {
        "__init__": refuse, "from_pretrained": classmethod(refuse), "from_peft_type": classmethod(refuse),
        "__doc__": message})


def register_refusals_with_peft() -> None:
    """Teach PEFT's config registry our `peft_type`s, so its loaders refuse them by name (not `KeyError`)."""
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:  # PEFT is a dependency, but nothing here needs it
        return
    for config_class in CONFIG_CLASSES:
        PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(config_class.peft_type, _refusal(config_class.peft_type))


register_refusals_with_peft()
