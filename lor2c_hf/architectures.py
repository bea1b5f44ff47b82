"""Where things live inside a Hugging Face model: the block stack, the q/v projections, the task head.

LoR2C needs three facts about a model and nothing else; this module finds them for encoder and decoder
architectures and says clearly what it looked for when it cannot.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

# Dotted suffixes of the ModuleList holding the transformer blocks, most specific first.
BLOCK_STACK_PATHS = (
    "encoder.layer",  # BERT, RoBERTa, ELECTRA, DeBERTa-v2
    "transformer.layer",  # DistilBERT
    "decoder.layers",  # OPT
    "layers",  # Llama, Mistral, Qwen2, Gemma, Phi, GPT-NeoX
    "h",  # GPT-2, GPT-J, Falcon, BLOOM
    "blocks",
    "layer",
)

# Query and value projections inside one block, by `config.model_type`.
QV_PROJECTIONS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
}
DEFAULT_QV = ["q_proj", "v_proj"]  # Llama, Mistral, Qwen2, Gemma, Phi, OPT and most decoders

# The final LayerNorm inside a post-LN block, `out = LN(h + FFN(h))`, by `config.model_type` (a path inside a block).
OUTPUT_NORMS = {
    "bert": "output.LayerNorm",  # also MiniLM
    "roberta": "output.LayerNorm",
    "xlm-roberta": "output.LayerNorm",
    "electra": "output.LayerNorm",
    "deberta-v2": "output.LayerNorm",
    "distilbert": "output_layer_norm",
}
# Pre-LN blocks, `out = h + FFN(LN(h))`: no norm follows the residual sum (OPT is pre-LN unless do_layer_norm_before=False).
PRE_LN = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "bloom", "opt")

# Heads of task models that are not in the base model: trained and saved with the adapter.
TASK_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


class ArchitectureError(ValueError):
    """The model does not have the structure LoR2C needs; the message says what was looked for."""


def find_block_stack(model: nn.Module, blocks_path: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Return `(dotted_name, module_list)` of the transformer block stack of `model`."""
    modules = dict(model.named_modules())
    if blocks_path is not None:
        stack = modules.get(blocks_path)
        if stack is None:
            stack = next((m for n, m in modules.items() if n.endswith("." + blocks_path)), None)
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            raise ArchitectureError(
                f"blocks_path={blocks_path!r} does not name a non-empty nn.ModuleList in {type(model).__name__}."
            )
        return blocks_path, stack
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        stacks = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and n.endswith(("encoder.layers", "decoder.layers", "encoder.block", "decoder.block", "encoder.layer", "decoder.layer"))]
        raise ArchitectureError(
            f"{type(model).__name__} is an encoder-decoder with the block stacks {stacks}; LoR2C adapts one stack. Pass "
            "LoR2CConfig(blocks_path=...) (or ResLoRAConfig(blocks_path=...)) with the one to adapt, e.g. "
            f"{stacks[-1] if stacks else 'model.decoder.layers'!r}.")
    depth = _config_depth(model)
    for suffix in BLOCK_STACK_PATHS:
        found = [
            (name, m)
            for name, m in modules.items()
            if isinstance(m, nn.ModuleList) and len(m) > 0 and (name == suffix or name.endswith("." + suffix))
        ]
        if depth is not None:
            found = [(n, m) for n, m in found if len(m) == depth] or found
        if found:
            return min(found, key=lambda item: item[0].count("."))
    raise ArchitectureError(
        f"Cannot find the transformer block stack of {type(model).__name__}: looked for an nn.ModuleList named "
        f"{', '.join(repr(p) for p in BLOCK_STACK_PATHS)} (at any depth). Pass LoR2CConfig(blocks_path=...) "
        "with the dotted path of the blocks."
    )


def layerdrop_problem(model: nn.Module, owner: str, what: str) -> Optional[str]:
    """Why LayerDrop breaks `what` on `model` (a dropped block would leave a stale hidden state), or None."""
    dropping = {name: m.layerdrop for name, m in model.named_modules()
                if isinstance(getattr(m, "layerdrop", None), (int, float)) and m.layerdrop > 0}
    if not dropping:
        return None
    return (f"{type(model).__name__} trains with LayerDrop ({', '.join(f'{n}.layerdrop={v}' for n, v in dropping.items())}), "
            f"which skips random blocks in training; {owner} {what} reads a hidden state saved in an earlier block, so a "
            "skipped block would leave it stale (a later forward would add the previous batch's). Turn LayerDrop off "
            "before wrapping: " + "; ".join(f"model.{n}.layerdrop = 0.0" for n in dropping) + ".")


def detect_output_norm(model: nn.Module) -> Optional[str]:
    """The path, inside a block, of the final LayerNorm of a known post-LN architecture, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "opt" and getattr(config, "do_layer_norm_before", True) is False:
        return "final_layer_norm"  # OPT-350m: post-LN
    return OUTPUT_NORMS.get(getattr(config, "model_type", None))


def output_norm_problem(model: nn.Module, blocks: list[nn.Module], path: Optional[str], option: str) -> Optional[str]:
    """Why the connection cannot be added before the final norm `path` of every block (None: detect it), or None.

    `option` names the setting in the message (e.g. "LoR2CConfig.connection_position='before_output_norm'").
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    what = f"{type(model).__name__} (model_type={model_type!r})"
    expected = (f"expected a post-LN block, out = LayerNorm(h + FFN(h)), whose final LayerNorm is detected for "
                f"{sorted(OUTPUT_NORMS)} or named by LoR2CConfig.output_norm (a path inside a block); use "
                "connection_position='block_output' for this model")
    pre_ln = model_type in PRE_LN and detect_output_norm(model) is None
    if pre_ln:
        return (f"{option} does not apply to {what}: its blocks are pre-LN (out = h + FFN(LN(h))), so no LayerNorm follows "
                f"the residual sum; {expected}.")
    if path is None:
        return f"{option}: {what} is not a known post-LN architecture and LoR2CConfig.output_norm is unset; {expected}."
    for k, block in enumerate(blocks):
        norm = dict(block.named_modules()).get(path)
        if norm is None or not ("norm" in type(norm).__name__.lower()):
            norms = [n for n, m in block.named_modules() if n and "norm" in type(m).__name__.lower()]
            found = "no module" if norm is None else f"a {type(norm).__name__}, not a norm"
            return (f"{option}: LoR2CConfig.output_norm={path!r} names {found} in block {k} ({type(block).__name__}) of "
                    f"{what}; its norm modules are {norms}; {expected}.")
    return None


def _config_depth(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size(model: nn.Module, blocks: nn.ModuleList) -> int:
    """Width d of the hidden states passed between blocks."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.embedding_dim
    raise ArchitectureError(f"Cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size.")


def default_qv_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(QV_PROJECTIONS.get(model_type, DEFAULT_QV))


def resolve_targets(block: nn.Module, block_index: int, targets: list[str],
                    field: str = "inject_target_modules") -> dict[str, nn.Module]:
    """Map each target name to the module inside `block` whose dotted name equals it or ends with it.

    `field` is the config field the names came from, so the error names it.
    """
    names = dict(block.named_modules())
    resolved = {}
    for target in targets:
        matches = [n for n in names if n == target or n.endswith("." + target)]
        if len(matches) != 1:
            linear_names = [n for n, m in names.items() if hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2]
            what = "no module" if not matches else f"{len(matches)} modules ({matches})"
            raise ArchitectureError(
                f"{field}: {target!r} matches {what} in block {block_index} "
                f"({type(block).__name__}); its projection modules are {linear_names}."
            )
        resolved[matches[0]] = names[matches[0]]
    return resolved


def detect_task_heads(model: nn.Module) -> list[str]:
    """Top-level modules of a classification model that its base model lacks (e.g. `classifier`, `score`)."""
    if not type(model).__name__.endswith(TASK_HEAD_SUFFIXES):
        return []
    base_name = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != base_name and any(True for _ in child.parameters())
    ]


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a GPT-2 Conv1D or a quantized linear layer."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers' Conv1D stores weight as (in, out)
        return module.weight.shape[0], module.nf
    raise ArchitectureError(f"{type(module).__name__} is not a linear projection LoRA can be injected into.")
