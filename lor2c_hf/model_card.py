"""The README.md pushed with an adapter: base model, method, trainable parameters, structure, metrics, usage."""

from __future__ import annotations

import json
from typing import Any, Optional


def model_card(model: Any, repo_id: str, metrics: Optional[dict[str, float]] = None) -> str:
    config = model.lor2c_config
    base = config.base_model_name_or_path or type(model.base_model).__name__
    trainable, total = model.get_nb_trainable_parameters()
    structure = model.structure
    events = "\n".join(
        f"| {e.get('step')} | {e['kind']} | {e.get('blocks')} | {', '.join(f'{x:.4f}' for x in e.get('scores', []))} "
        f"| {e.get('params_before', '')} -> {e.get('params_after', '')} |"
        for e in structure["events"]
    ) or "| - | - | - | - | - |"
    metric_lines = "\n".join(f"- **{k}**: {v}" for k, v in (metrics or {}).items()) or "- (none recorded)"
    return f"""---
library_name: lor2c-hf
base_model: {base}
tags:
- lor2c
- {config.method}
- peft
---

# {repo_id}

A **{config.method}** adapter (LoR2C: low-rank residual connections between transformer blocks) for
`{base}`, trained with [lor2c-hf](https://github.com/lor2c-hf/lor2c-hf).

- Method: `{config.method}` (r={config.r}, alpha={config.lora_alpha}, share_a={config.share_a},
  merges={config.num_merges}, injects={config.num_injects}, schedule={config.schedule})
- Trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)
- Spans (first block, last block): `{json.dumps(structure['spans'])}`
- Blocks with injected LoRA: `{json.dumps(structure['injected'])}`

## Structure events

| step | kind | blocks | SFS scores | adapter params |
|---|---|---|---|---|
{events}

## Metrics

{metric_lines}

## Usage

```python
from transformers import AutoModel
from lor2c_hf import LoR2CModel

base = AutoModel.from_pretrained("{base}")
model = LoR2CModel.from_pretrained(base, "{repo_id}")
```
"""
