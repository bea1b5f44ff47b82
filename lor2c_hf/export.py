"""From a trained `LoR2CModel` to a plain transformers model: `merge_and_unload`, `unload` and the export folder.

Injected LoRA folds into its q/v weights as in PEFT. The connections cannot be folded (they add across blocks),
so the base is turned, in place, into the class that `modeling_lor2c.py` defines for it: the base's own
transformers class with the connections as a submodule. Its `save_pretrained` writes a folder that
`AutoModelFor...from_pretrained(folder, trust_remote_code=True)` loads without lor2c_hf.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .guards import NonFiniteError
from .layer import merge_into_projection
from .modeling_lor2c import CONFIG_KEY, LoR2CSpans, serving_classes


def blocks_name(model: nn.Module, blocks: list[nn.Module]) -> str:
    """The full dotted name, inside `model`, of the ModuleList holding `blocks`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(blocks) and all(a is b for a, b in zip(module, blocks)):
            return name
    raise ValueError(f"the adapted blocks are not a ModuleList of {type(model).__name__}.")


def injected_deltas(adapter: Any) -> dict[tuple[int, str], torch.Tensor]:
    """(block, projection name) -> the dense update of its injected LoRA."""
    s = adapter._structure
    return {(block, name): layer.delta_weight().detach()
            for block in s.injected for name, layer in adapter.lor2c_injected.layers_of(block).items()}


def span_tensors(adapter: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every span, aligned with `structure["spans"]` (a ShareLoR2C A is copied into each span)."""
    conn = adapter.lor2c
    return [(conn.a_of(slot).detach().clone(), conn.lora_B[slot].detach().clone()) for slot in adapter._structure.owners]


def check_finite(adapter: Any, deltas: dict[tuple[int, str], torch.Tensor],
                 spans: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse to fold NaN or Inf into a model: nothing has changed when this raises."""
    bad = [f"injected LoRA of block {block} ({name})" for (block, name), d in deltas.items() if not bool(torch.isfinite(d).all())]
    bad += [f"connection span {span}" for span, (a, b) in zip(adapter._structure.spans, spans)
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()))]
    if bad:
        raise NonFiniteError(f"merge_and_unload() refused: {', '.join(bad)} hold NaN or Inf values; folding them would make "
                             "the model's output NaN. The model was not changed.")


def merge_and_unload(adapter: Any) -> nn.Module:
    """Fold the injected LoRA into q/v, turn the base into its serving class in place and return it."""
    base = adapter.get_base_model()
    if adapter._merged_into_base:
        return base
    config_cls, model_cls = serving_classes(type(base), type(base.config))  # refuses a non-transformers base first
    deltas, spans = injected_deltas(adapter), span_tensors(adapter)
    check_finite(adapter, deltas, spans)
    c = adapter.lor2c_config
    spec = {"blocks_path": blocks_name(base, adapter._blocks), "spans": [list(s) for s in adapter._structure.spans],
            "r": c.r, "scaling": c.lora_alpha / c.r, "hidden_size": adapter.hidden_size, "method": c.method,
            "folded_injected_blocks": list(adapter._structure.injected),
            "connection_position": c.connection_position, "output_norm": adapter._output_norm}
    adapter._unmerged_weights = {}
    for (block, name), delta in deltas.items():
        module = adapter._targets[block][name]
        adapter._unmerged_weights[(block, name)] = module.weight.detach().clone()
        merge_into_projection(module, delta)
    adapter.remove_hooks()
    adapter._merged_into_base = True
    base.config.__class__ = config_cls
    setattr(base.config, CONFIG_KEY, spec)
    base.__class__ = model_cls
    layer = LoR2CSpans(spec["spans"], adapter.hidden_size, c.r, spec["scaling"])
    with torch.no_grad():
        for i, (a, b) in enumerate(spans):
            layer.lora_A[i] = nn.Parameter(a, requires_grad=False)
            layer.lora_B[i] = nn.Parameter(b, requires_grad=False)
    base.attach_lor2c(layer)
    return base


def unload_merged(adapter: Any) -> nn.Module:
    """Undo `merge_and_unload`: the base's own class and config again, and the q/v weights as they were, exactly."""
    base = adapter.get_base_model()
    base.detach_lor2c()
    base.__class__ = type(base).__mro__[2]
    config = base.config
    for key in (CONFIG_KEY, "auto_map"):
        if key in config.__dict__:
            delattr(config, key)
    config.__class__ = type(config).__mro__[1]
    with torch.no_grad():
        for (block, name), weight in adapter._unmerged_weights.items():
            adapter._targets[block][name].weight.copy_(weight)
    adapter._unmerged_weights = {}
    adapter._merged_into_base = False
    return base


def export_for_transformers(adapter: Any, save_directory: str, tokenizer: Optional[Any] = None,
                            **save_kwargs: Any) -> str:
    """Write a folder that plain transformers loads with `trust_remote_code=True`; `adapter` itself is unchanged
    (a copy is merged, so this needs memory for a second copy of the model)."""
    merged = copy.deepcopy(adapter).merge_and_unload()
    merged.save_pretrained(save_directory, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory
