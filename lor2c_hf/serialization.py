"""Adapters on disk and on the Hub, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

The structure (spans, injected blocks, events) and the base model's shape are stored in the safetensors
metadata, so weights and structure are written by one atomic rename and can never disagree. The metadata also
holds a sha256 of the tensors, structure and base signature (a flipped bit is refused), and the sha256 of the
config saved beside them: a folder holding the weights of one save and the config of another (a save killed
between its two renames, a stale or hand-edited config) is refused rather than loaded wrongly. Loading checks
everything (files, checksums, architecture, hidden size, depth, tensor shapes, structure) before it changes
anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from functools import partial
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from . import architectures as arch
from .adapter_files import (BASE_KEY, CONFIG_DIGEST_KEY, DIGEST_KEY, STRUCTURE_KEY, WEIGHTS_NAME, AdapterFolder,  # noqa: F401
                            AdapterLoadError, config_digest, read_adapter_folder, read_config_data, read_config_of,
                            resolve_adapter_files, tensors_digest)
from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .config import CONFIG_NAME, METHODS, ConfigError, LoR2CConfig
from .distributed import gathered
from .guards import check_tensors, nonfinite_names
from .model_card import write_model_card
from .structure import Structure

ADAPTER_PREFIXES = ("lor2c.", "lor2c_injected.")
ADAPTER_CLASSES: dict[str, type] = {}  # method name -> the model class that loads it (filled by subclasses)
# Task heads (`modules_to_save`) are `model.<name>` in the wrapper and `base_model.<name>` in adapter files (the
# file format predates the wrapper's `model` attribute and stays as it is).
HEAD_PREFIX, HEAD_FILE_PREFIX = "model.", "base_model."


def to_file_key(key: str) -> str:
    return HEAD_FILE_PREFIX + key[len(HEAD_PREFIX):] if key.startswith(HEAD_PREFIX) else key


def from_file_key(key: str) -> str:
    return HEAD_PREFIX + key[len(HEAD_FILE_PREFIX):] if key.startswith(HEAD_FILE_PREFIX) else key


def base_signature(model: torch.nn.Module, blocks_path: Optional[str] = None) -> dict[str, Any]:
    """What an adapter must match: base class, model type, hidden size and number of blocks."""
    _, blocks = arch.find_block_stack(model, blocks_path)
    return {
        "base_model_class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "hidden_size": arch.hidden_size(model, blocks),
        "num_blocks": len(blocks),
    }


def check_signature(expected: dict[str, Any], actual: dict[str, Any], source: str) -> None:
    diffs = [f"{k}: adapter has {expected.get(k)!r}, base has {actual.get(k)!r}"
             for k in ("model_type", "hidden_size", "num_blocks") if expected.get(k) != actual.get(k)]
    if diffs:
        raise AdapterLoadError(f"Adapter {source} was trained on a {expected.get('base_model_class')} and does not fit "
                               f"this {actual.get('base_model_class')}: " + "; ".join(diffs) + ". The model was not changed.")


def adapter_method(data: dict[str, Any], source: str) -> str:
    """The `method` field of an adapter config; a PEFT adapter (or an unknown one) is refused by name."""
    method = data.get("method")
    if method in ADAPTER_CLASSES:
        return method
    peft_type = data.get("peft_type")
    if method is None and peft_type is not None:
        raise AdapterLoadError(f"{source} is a PEFT {peft_type} adapter, not a lor2c_hf one: load it with PEFT, "
                               "e.g. peft.PeftModel.from_pretrained(base_model, path) or "
                               "peft.AutoPeftModelForCausalLM.from_pretrained(path).")
    raise AdapterLoadError(f"Adapter {source} has method {method!r}; known methods: {sorted(ADAPTER_CLASSES)}.")


def check_method(model_class: type, source: str, data: dict[str, Any]) -> None:
    """The config's `method` is one `model_class` loads (checked before the weights are read)."""
    method = adapter_method(data, source)
    if method not in model_class.adapter_methods:
        owner = ADAPTER_CLASSES.get(method)
        hint = f"load it with {owner.__name__}.from_pretrained" if owner else f"known methods: {sorted(ADAPTER_CLASSES)}"
        raise AdapterLoadError(f"Adapter {source} is a {method!r} adapter, which {model_class.__name__} cannot load; {hint}.")


def read_adapter_config(folder: AdapterFolder, model_class: type):
    """The config of `folder` as a `model_class` config (its method was checked by `check_method`)."""
    try:
        return model_class.config_class.from_dict(folder.config)
    except (ConfigError, TypeError) as e:
        raise AdapterLoadError(f"{folder.config_file}: {e}") from None


def check_heads(model: torch.nn.Module, config: Any, folder: AdapterFolder, allow_base_overwrite: bool) -> None:
    """A downloaded adapter replaces only the base's task heads: other `modules_to_save` (the embeddings, a block)
    would overwrite base weights from the file, which needs `allow_base_overwrite=True`."""
    heads = set(arch.detect_task_heads(model))
    other = [m for m in config.modules_to_save or [] if m not in heads]
    if other and not allow_base_overwrite:
        raise AdapterLoadError(f"{folder.config_file}: modules_to_save={other} are not task heads of this "
                               f"{type(model).__name__} (its heads: {sorted(heads)}); loading would overwrite those base "
                               "weights with the file's. Pass allow_base_overwrite=True if you trust this adapter and "
                               "trained them yourself. The model was not changed.")


def load_adapter_model(model: torch.nn.Module, path_or_repo_id: str, is_trainable: bool = False,
                       allow_base_overwrite: bool = False, allow_nonfinite: bool = False, **hub_kwargs: Any):
    """Wrap `model` with a saved adapter of any method (LoR2C family or ResLoRA), chosen by its `method` field; the
    `allow_*` opt-ins are `from_pretrained`'s."""
    _, data = read_config_of(path_or_repo_id, **hub_kwargs)
    method = adapter_method(data, path_or_repo_id)
    return ADAPTER_CLASSES[method].from_pretrained(model, path_or_repo_id, is_trainable=is_trainable,
                                                   allow_base_overwrite=allow_base_overwrite,
                                                   allow_nonfinite=allow_nonfinite, **hub_kwargs)


class AdapterIOMixin:
    """save_pretrained / from_pretrained / load_adapter / push_to_hub for the adapter models.

    The class attributes say what a model saves; their defaults are `LoR2CModel`'s. A subclass also provides
    `adapter_config`, `structure` (JSON-able), `set_structure` and `blocks_path`.
    """

    adapter_prefixes: tuple[str, ...] = ADAPTER_PREFIXES  # state_dict prefixes of the adapter's tensors
    adapter_methods: tuple[str, ...] = METHODS  # values of the config's `method` field this class loads
    config_class: type = LoR2CConfig
    resumable_fields: tuple[str, ...] = ("lora_dropout", "inject_dropout", "base_model_name_or_path")  # may differ on load_adapter

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in cls.adapter_methods:
            ADAPTER_CLASSES.setdefault(method, cls)

    def parse_structure(self, data: dict[str, Any]) -> Any:
        """Check a saved structure before anything changes; the result goes to `set_structure`."""
        return Structure.from_dict(data)

    def check_saved_structure(self, structure: Any, config: Any) -> None:
        """Checks a saved structure must also pass (LoR2C: its events replay to it)."""

    def _parse_saved_structure(self, data: Any, config: Any, weights_file: str) -> Any:
        try:
            structure = self.parse_structure(data)
            self.check_saved_structure(structure, config)
            return structure
        except ValueError as e:  # StructureError, or a subclass's own AdapterLoadError
            tail = "" if "not changed" in str(e) else " The model was not changed."
            raise AdapterLoadError(f"{weights_file}: {e}{tail}") from None

    def _refuse_if_merged(self, action: str) -> None:
        if getattr(self, "_merged_into_base", False):
            raise RuntimeError(f"Cannot {action}: merge_and_unload() already folded this adapter into the base weights. "
                               "Save the adapter before merging.")

    def _adapter_key_prefixes(self) -> tuple[str, ...]:
        """`state_dict` prefixes of what an adapter file holds: the adapter's modules and `modules_to_save`."""
        return self.adapter_prefixes + tuple(f"{HEAD_PREFIX}{m}." for m in self.adapter_config.modules_to_save or [])

    def adapter_state_dict(self, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Every adapter tensor (all allocated slots, so a resumed run is exact) plus `modules_to_save`, under
        the names of the adapter file. From `state_dict` when it holds them all (`Trainer` under DeepSpeed ZeRO-3
        passes the gathered trainable tensors, on the main process only: gathering again would hang)."""
        names = self._adapter_key_prefixes()
        if state_dict:
            own = [k for k in self.state_dict(keep_vars=True) if k.startswith(names)]
            if own and all(k in state_dict for k in own):
                return {to_file_key(k): state_dict[k].detach().cpu().contiguous().clone() for k in own}
        params = [p for n, p in self.named_parameters() if n.startswith(names)]
        with gathered(params):
            return {to_file_key(k): v.detach().cpu().contiguous().clone()
                    for k, v in self.state_dict().items() if k.startswith(names)}

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, allow_nonfinite: bool = False,
                        state_dict: Optional[dict[str, torch.Tensor]] = None, **_: Any) -> None:
        """Write `adapter_model.safetensors` (with the structure and checksums), then `adapter_config.json`,
        each atomically; a NaN or Inf tensor is refused unless `allow_nonfinite` (e.g. to inspect a diverged run)."""
        self._refuse_if_merged("save the adapter")
        try:  # what load would refuse is not written (a structure set by hand that its events do not produce)
            self.check_saved_structure(self._adapter_extra(), self.adapter_config)
        except ValueError as e:
            raise ValueError(f"Cannot save the adapter to {save_directory}: its {e} Loading would refuse it; change the "
                             "structure through apply_merge / apply_inject.") from None
        state = self.adapter_state_dict(state_dict)  # without it, every rank takes part in a ZeRO-3 gather
        if not is_main_process:
            return
        if not allow_nonfinite:
            check_tensors(self, ((from_file_key(k), v) for k, v in state.items()), f"save the adapter to {save_directory}",
                          "Training diverged; pass save_pretrained(..., allow_nonfinite=True) to write it anyway.")
        os.makedirs(save_directory, exist_ok=True)
        remove_stale_temporaries(save_directory)
        structure = json.dumps(self.structure)
        signature = json.dumps(base_signature(self.get_base_model(), self.blocks_path))
        metadata = {
            "format": "pt",
            STRUCTURE_KEY: structure,
            BASE_KEY: signature,
            DIGEST_KEY: tensors_digest(state, structure, signature),
            CONFIG_DIGEST_KEY: config_digest(self.adapter_config.to_dict()),
        }
        atomic_write(os.path.join(save_directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata=metadata))
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.adapter_config.to_json_string())

    def load_adapter(self, path_or_repo_id: str, adapter_name: str = "default", is_trainable: bool = True,
                     allow_nonfinite: bool = False, **hub_kwargs: Any) -> None:
        """Restore weights and structure from a saved adapter onto this model (checked first, then applied).

        PEFT's signature, which `Trainer` calls to resume and to reload the best checkpoint: the adapter loads into
        the trained adapter ("default"); its parameters keep their trainable flags. A `Trainer` checkpoint that is
        not complete (no valid manifest) is refused, and so is every config field but `resumable_fields` that
        differs from this model's. NaN or Inf tensors are refused unless `allow_nonfinite` (to inspect a diverged run).
        """
        self._refuse_if_merged("load an adapter")
        if adapter_name != "default":
            raise ValueError(f"load_adapter(..., adapter_name={adapter_name!r}): {type(self).__name__} loads into its "
                             "trained adapter ('default'); a frozen copy of it is made with add_adapter(name, config).")
        if os.path.isdir(path_or_repo_id):
            from .training.checkpoints import refuse_incomplete  # the training package imports this module

            refuse_incomplete(path_or_repo_id)
        folder = read_adapter_folder(path_or_repo_id, partial(check_method, type(self), path_or_repo_id), **hub_kwargs)
        saved = read_adapter_config(folder, type(self))
        tensors = folder.tensors
        check_signature(folder.signature, base_signature(self.get_base_model(), self.blocks_path), path_or_repo_id)
        mismatched = [f"{f.name}: adapter {getattr(saved, f.name)!r}, model {getattr(self.adapter_config, f.name)!r}"
                      for f in dataclasses.fields(saved) if f.name not in self.resumable_fields
                      and getattr(saved, f.name) != getattr(self.adapter_config, f.name)]
        if mismatched:
            raise AdapterLoadError(f"Adapter {path_or_repo_id} was made with other settings ({'; '.join(mismatched)}); only "
                                   f"{list(self.resumable_fields)} may differ when loading into (or resuming) a model. Use "
                                   f"{type(self).__name__}.from_pretrained(base_model, path) to build the model from it. "
                                   "The model was not changed.")
        own = {to_file_key(k): v for k, v in self.state_dict().items() if k.startswith(self._adapter_key_prefixes())}
        bad = [f"{k} (adapter only)" for k in sorted(set(tensors) - set(own))]
        bad += [f"{k} (model only)" for k in sorted(set(own) - set(tensors))]
        bad += [f"{k}: adapter {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
                for k in sorted(tensors) if k in own and own[k].shape != tensors[k].shape]
        if bad:
            raise AdapterLoadError(f"Adapter {path_or_repo_id} tensors do not fit this model: {bad[:5]}. The model was not changed.")
        nonfinite = [] if allow_nonfinite else nonfinite_names((from_file_key(k), v) for k, v in tensors.items())
        if nonfinite:
            raise AdapterLoadError(f"{folder.weights_file} holds NaN or Inf values in {nonfinite[:6]}: it was saved from a "
                                   "diverged run (save_pretrained(..., allow_nonfinite=True)), and its outputs would be NaN. "
                                   "Pass allow_nonfinite=True to load it anyway (e.g. to inspect it). The model was not changed.")
        structure = self._parse_saved_structure(folder.structure, saved, folder.weights_file)  # the last check: nothing changed before it
        with torch.no_grad():
            targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
            for k, v in tensors.items():
                targets[from_file_key(k)].copy_(v)
        self.set_structure(structure)

    @classmethod
    def from_pretrained(cls, model: torch.nn.Module, path_or_repo_id: str, is_trainable: bool = False,
                        allow_base_overwrite: bool = False, allow_nonfinite: bool = False, **hub_kwargs: Any):
        """Wrap `model` with the adapter saved at `path_or_repo_id` (a directory or a Hub repo id).

        The file may replace the base's task heads only; `allow_base_overwrite=True` lets its other `modules_to_save`
        (e.g. embeddings you trained) overwrite the base's weights. NaN or Inf tensors are refused unless
        `allow_nonfinite=True`."""
        if isinstance(model, AdapterIOMixin):
            raise AdapterLoadError(f"The model already carries a {type(model).__name__} adapter: pass its base model "
                                   "(model.get_base_model()), or call model.load_adapter(path) to replace its weights.")
        folder = read_adapter_folder(path_or_repo_id, partial(check_method, cls, path_or_repo_id), **hub_kwargs)
        config = read_adapter_config(folder, cls)
        check_signature(folder.signature, base_signature(model, config.blocks_path), path_or_repo_id)
        check_heads(model, config, folder, allow_base_overwrite)
        trainable = {p: p.requires_grad for p in model.parameters()}
        modes = {m: m.training for m in model.modules()}
        try:
            wrapped = cls(model, config)  # checks the config against the model before it allocates or hooks anything
        except ConfigError as e:
            raise AdapterLoadError(f"{folder.config_file} does not fit this model: {e} The model was not changed.") from None
        try:
            wrapped.load_adapter(os.path.dirname(folder.weights_file), allow_nonfinite=allow_nonfinite)
        except BaseException:  # leave `model` as it came: no hooks, same trainable flags and modes
            wrapped.unload()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            for m, mode in modes.items():
                m.training = mode
            raise
        if not is_trainable:
            wrapped.eval()
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped

    def push_to_hub(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: str = "Upload LoR2C adapter", metrics: Optional[dict[str, float]] = None,
                    create_pr: bool = False) -> str:
        """Upload the adapter and a generated model card to `repo_id`; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            write_model_card(self, tmp, repo_id, metrics)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, create_pr=create_pr)
        return str(info)
