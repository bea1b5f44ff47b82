"""Reading an adapter folder (`adapter_config.json` + `adapter_model.safetensors`): the one reader every loader
uses (`from_pretrained`, `load_adapter`, `AutoLoR2C*`, `load_adapter_model`, the evaluation and export paths), with
one error, `AdapterLoadError`, whose message names the file, the field and what was expected.

A downloaded folder is untrusted input, so everything is bounded before it is built from: JSON size and nesting
depth, and both checksums are required (a file without them is refused, never read on trust).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
DIGEST_KEY, CONFIG_DIGEST_KEY = "lor2c_sha256", "lor2c_config_sha256"
STRUCTURE_KEY, BASE_KEY = "lor2c_structure", "lor2c_base"
MAX_JSON_BYTES = 1 << 20  # a config or a structure of any supported model is a few kilobytes
MAX_JSON_DEPTH = 16  # a structure nests 5 deep (events, a merge record, its spans)


class AdapterLoadError(ValueError):
    """An adapter folder cannot be loaded (damaged, crafted, or for another model); nothing was changed."""


def tensors_digest(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """sha256 of `texts` and of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_digest(data: dict[str, Any]) -> str:
    """sha256 of a config's fields (key order and whitespace do not count)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def parse_json(text: str, where: str, what: str) -> Any:
    """`text` parsed, or an `AdapterLoadError` naming `where` when it is too large, too deep or not JSON."""
    if len(text) > MAX_JSON_BYTES:
        raise AdapterLoadError(f"{where} is {len(text):,d} characters long; expected {what} of at most {MAX_JSON_BYTES:,d}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected {what}.") from None
    except RecursionError:
        data, depth = None, MAX_JSON_DEPTH + 1
    else:
        depth = _depth(data)
    if depth > MAX_JSON_DEPTH:
        raise AdapterLoadError(f"{where} nests its JSON more than {MAX_JSON_DEPTH} levels deep; expected {what}.")
    return data


def read_json(path: str, what: str) -> Any:
    """The JSON in `path` (bounded as `parse_json`), or an `AdapterLoadError` naming the file and what is wrong."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise AdapterLoadError(f"{path} is {size:,d} bytes; expected {what} of at most {MAX_JSON_BYTES:,d}.")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AdapterLoadError(f"{path} cannot be read ({type(e).__name__}: {e}); expected {what}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); expected {what}.") from None
    return parse_json(text, path, what)


def read_config_data(config_file: str) -> dict[str, Any]:
    """The fields of an `adapter_config.json` (a JSON object), or an `AdapterLoadError` naming the file."""
    data = read_json(config_file, "an adapter_config.json")
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{config_file} holds a JSON {type(data).__name__}; expected an object of config fields "
                               "(an adapter_config.json written by save_pretrained).")
    return data


def _download(path_or_repo_id: str, names: tuple[str, ...], **hub_kwargs: Any) -> list[str]:
    from huggingface_hub import hf_hub_download

    try:
        return [hf_hub_download(path_or_repo_id, name, **hub_kwargs) for name in names]
    except Exception as e:
        raise AdapterLoadError(f"{path_or_repo_id} is not a local directory, and fetching it as a Hub repo id failed: "
                               f"{type(e).__name__}: {e}") from e


def resolve_adapter_files(path_or_repo_id: str, config_only: bool = False, **hub_kwargs: Any) -> list[str]:
    """Local paths of [config, weights] (or [config]) from a directory or, failing that, a Hub repo id."""
    names = (CONFIG_NAME,) if config_only else (CONFIG_NAME, WEIGHTS_NAME)
    if not os.path.isdir(path_or_repo_id):
        return _download(path_or_repo_id, names, **hub_kwargs)
    files = [os.path.join(path_or_repo_id, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise AdapterLoadError(f"{path_or_repo_id} is not an adapter directory: missing {missing}; pass a folder written "
                               "by save_pretrained or a Hub repo id.")
    return files


def read_config_of(path_or_repo_id: str, **hub_kwargs: Any) -> tuple[str, dict[str, Any]]:
    """(path, fields) of the `adapter_config.json` of a folder or Hub repo (also a PEFT adapter's)."""
    (config_file,) = resolve_adapter_files(path_or_repo_id, config_only=True, **hub_kwargs)
    return config_file, read_config_data(config_file)


def read_weights(weights_file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter weights file, refused unless it is a lor2c_hf file whose sha256 holds."""
    try:
        with safe_open(weights_file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                               "truncated or damaged. Save the adapter again.") from None
    missing = [k for k in (STRUCTURE_KEY, BASE_KEY, DIGEST_KEY, CONFIG_DIGEST_KEY) if k not in metadata]
    if STRUCTURE_KEY in missing or BASE_KEY in missing:
        raise AdapterLoadError(f"{weights_file} has no LoR2C structure metadata; it was not written by lor2c_hf.")
    if missing:
        raise AdapterLoadError(f"{weights_file} lacks the metadata field(s) {missing}: every lor2c_hf save records the "
                               "sha256 of its tensors and of its config, and a file without them cannot be checked. "
                               "Save the adapter again.")
    actual = tensors_digest(tensors, metadata[STRUCTURE_KEY], metadata[BASE_KEY])
    if actual != metadata[DIGEST_KEY]:
        raise AdapterLoadError(f"{weights_file} fails its checksum: the tensors or the structure changed after it was "
                               f"written (sha256 {actual[:12]}..., recorded {metadata[DIGEST_KEY][:12]}...). The file is damaged.")
    return tensors, metadata


@dataclass
class AdapterFolder:
    """A checked adapter folder: its config fields, tensors, structure (JSON, validated by the model) and the
    signature of the base it was trained on."""

    source: str
    config_file: str
    weights_file: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    structure: Any
    signature: dict[str, Any]


def read_adapter_folder(path_or_repo_id: str, check_config: Optional[Callable[[dict[str, Any]], Any]] = None,
                        **hub_kwargs: Any) -> AdapterFolder:
    """Both files of an adapter, read once and checked against each other: JSON bounds, checksums, and the config
    being the one saved with the weights (a folder holding parts of two saves, or an edited config, is refused).
    `check_config` sees the config's fields before the weights are read (e.g. to name a PEFT adapter as such)."""
    config_file, weights_file = resolve_adapter_files(path_or_repo_id, **hub_kwargs)
    config = read_config_data(config_file)
    if check_config is not None:
        check_config(config)
    tensors, metadata = read_weights(weights_file)
    actual = config_digest(config)
    if actual != metadata[CONFIG_DIGEST_KEY]:
        raise AdapterLoadError(f"Adapter {path_or_repo_id}: {config_file} is not the config saved with {weights_file} (sha256 "
                               f"{actual[:12]}..., the weights record {metadata[CONFIG_DIGEST_KEY][:12]}...): the folder holds "
                               "parts of two saves (one was interrupted) or the config was edited. Save the adapter again. "
                               "The model was not changed.")
    structure = parse_json(metadata[STRUCTURE_KEY], f"{weights_file} metadata {STRUCTURE_KEY}", "a LoR2C structure")
    signature = parse_json(metadata[BASE_KEY], f"{weights_file} metadata {BASE_KEY}", "a base signature")
    if not isinstance(signature, dict):
        raise AdapterLoadError(f"{weights_file}: its {BASE_KEY} metadata is a {type(signature).__name__}, expected an object.")
    return AdapterFolder(path_or_repo_id, config_file, weights_file, config, tensors, structure, signature)
