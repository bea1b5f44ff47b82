"""The README.md pushed with an adapter: base model, method, trainable parameters, structure, metrics, usage."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from .atomic import atomic_write_text
from .plotting import save_structure_picture

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_base_id(name: Optional[str]) -> Optional[str]:
    """`name` if it can be a Hub model id; None for unknown bases and local paths (the Hub rejects them as base_model)."""
    if not name or os.path.exists(name) or not HUB_ID.match(name) or ".." in name or "--" in name:
        return None
    return name


def usage_snippet(model: Any, base_id: Optional[str], repo_id: str) -> str:
    """Python that rebuilds this adapter: the base's own class (task head included) and its number of labels."""
    import transformers

    cls = type(model.get_base_model()).__name__
    cls = cls if hasattr(transformers, cls) else "AutoModel"
    num_labels = getattr(getattr(model.get_base_model(), "config", None), "num_labels", None)
    extra = f", num_labels={num_labels}" if cls.endswith("ForSequenceClassification") and num_labels else ""
    source = json.dumps(base_id or "<path or Hub id of the base model>")
    wrapper = type(model).__name__  # LoR2CModel or ResLoRAModel
    return (f"from transformers import {cls}\nfrom lor2c_hf import {wrapper}\n\n"
            f"base = {cls}.from_pretrained({source}{extra})\nmodel = {wrapper}.from_pretrained(base, {json.dumps(repo_id)})")


def describe_adapter(model: Any, base: str, picture: Optional[str] = None) -> str:
    """The card's description of the method, its settings, parameters and (for LoR2C) structure and events."""
    config = model.adapter_config
    trainable, total = model.get_nb_trainable_parameters()
    params = f"- Trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)"
    if config.method == "reslora":
        return f"""A **reslora** adapter (ResLoRA: LoRA with residual paths between the LoRA blocks of consecutive layers,
merged into the weights for inference) for `{base}`, trained with the lor2c_hf library.

- Method: `reslora` (r={config.r}, alpha={config.lora_alpha}, res_flag={config.res_flag}, pre_num={config.pre_num},
  target_modules={config.target_modules})
{params}
- `model.merge_and_unload()` folds it into the base weights (exact for `bs`; `is`/`ms` use running input norms)
"""
    structure = model.structure
    events = "\n".join(
        f"| {e.get('step')} | {e['kind']} | {e.get('blocks')} | {', '.join(f'{x:.4f}' for x in e.get('scores', []))} "
        f"| {e.get('params_before', '')} -> {e.get('params_after', '')} |"
        for e in structure["events"]
    ) or "| - | - | - | - | - |"
    picture_line = f"\n![Structure: connections, injected blocks and the SFS scores of every event]({picture})\n" if picture else ""
    return f"""A **{config.method}** adapter (LoR2C: low-rank residual connections between transformer blocks) for
`{base}`, trained with the lor2c_hf library.

- Method: `{config.method}` (r={config.r}, alpha={config.lora_alpha}, share_a={config.share_a},
  merges={config.num_merges}, injects={config.num_injects}, schedule={config.schedule})
{params}
- Spans (first block, last block): `{json.dumps(structure['spans'])}`
- Blocks with injected LoRA: `{json.dumps(structure['injected'])}`
{picture_line}
## Structure events

| step | kind | blocks | SFS scores | adapter params |
|---|---|---|---|---|
{events}
"""


def metrics_table(metrics: Optional[dict[str, Any]]) -> str:
    """The metrics the run recorded (eval loss, accuracy, perplexity...), one row each, or a plain statement of none."""
    if not metrics:
        return "No evaluation was recorded with this adapter."
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    return f"| metric | value |\n|---|---|\n{rows}"


def model_card(model: Any, repo_id: str, metrics: Optional[dict[str, float]] = None, picture: Optional[str] = None) -> str:
    """The card's Markdown; `picture` is the file name of a structure picture stored next to it.

    `library_name: lor2c-hf`, and no `peft` tag: the files load with lor2c_hf, which PEFT's loaders cannot do."""
    config = model.adapter_config
    base_id = hub_base_id(config.base_model_name_or_path)
    base = config.base_model_name_or_path or type(model.get_base_model()).__name__
    yaml_base = f"base_model: {base_id}\n" if base_id else ""
    family = "reslora" if config.method == "reslora" else "lor2c"
    serving = ("" if config.method == "reslora" else
               "\nTo serve it without lor2c_hf, `model.export_for_transformers(folder)` writes a folder that "
               "`transformers` loads with `trust_remote_code=True`.\n")
    return f"""---
library_name: lor2c-hf
{yaml_base}tags:
- {family}
- {config.method}
- adapter
---

# {repo_id}

{describe_adapter(model, base, picture)}
## Metrics

{metrics_table(metrics)}

## Usage

This is an adapter, not a full model: it loads with the lor2c_hf library onto its base model (PEFT's and
transformers' adapter loaders cannot build it).

```python
{usage_snippet(model, base_id, repo_id)}
```
{serving}"""


def write_model_card(model: Any, folder: str, repo_id: str, metrics: Optional[dict[str, float]] = None) -> list[str]:
    """Write `README.md` into `folder` and, for a LoR2C adapter, the structure picture it shows; the file names.

    The picture needs matplotlib (the `plot` extra); without it the card simply has no picture.
    """
    path = save_structure_picture(model, folder, title=f"{repo_id} ({model.adapter_config.method})")
    picture = os.path.basename(path) if path else None
    atomic_write_text(os.path.join(folder, "README.md"), model_card(model, repo_id, metrics, picture))
    return ["README.md", *([picture] if picture else [])]
