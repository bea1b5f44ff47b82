"""`LoR2CModel`: a Hugging Face model with low-rank residual connections between its blocks.

The base model keeps its own forward, modules and `state_dict` keys: connections are added by one forward
hook per block (outside any gradient-checkpointed region) and injected LoRA by forward hooks on the q/v
projections. With `connection_position="before_output_norm"` a forward pre-hook on each block's final LayerNorm
adds the connection to that norm's input instead (inside the block, so a checkpointed block recomputes it).
Merges and injects change only which slots those hooks read (see `layer.py`).
"""

from __future__ import annotations

import copy
import json
import logging
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import nn

from . import architectures as arch
from .adapter_files import parse_json
from .config import ConfigError, LoR2CConfig, check_adapter_config, events_problem
from .guards import NonFiniteError
from .distributed import broadcast_decision, full_numel, gathered
from .layer import InjectedLoRA, LoR2CConnections, LoraLayer, merge_into_projection
from .modeling_lor2c import (BEFORE_OUTPUT_NORM, norm_input, register_span_hooks, span_output, span_starts,
                             stash_span_input)
from .serialization import AdapterIOMixin
from .wrapper import AdapterModelMixin, adapter_placement, check_modules_to_save
from .zero3 import ExternalParameterDeclarations
from .sfs import SFSScores, finite_modules, sfs_scores
from .structure import Structure, StructureError

logger = logging.getLogger("lor2c_hf")


class Connection:
    """A read-only view of one span's connection: its blocks and its `lora_A` (r x d) and `lora_B` (d x r)."""

    def __init__(self, span: list[int], slot: int, connections: LoR2CConnections) -> None:
        self.span, self.slot = list(span), slot
        self.lora_A = connections.a_of(slot)
        self.lora_B = connections.lora_B[slot]

    def __repr__(self) -> str:
        return f"Connection(span={self.span}, slot={self.slot}, r={self.lora_A.shape[0]}, d={self.lora_A.shape[1]})"


class LoR2CModel(AdapterIOMixin, AdapterModelMixin, nn.Module):
    """Wraps a `transformers` model; `forward`, `generate` and every other attribute go to the base model."""

    adapter_modules = ("lor2c", "lor2c_injected")

    def __init__(self, model: nn.Module, config: LoR2CConfig) -> None:
        super().__init__()
        self._wrap(model)
        self.lor2c_config = config
        self.blocks_path, blocks = arch.find_block_stack(model, config.blocks_path)
        self._blocks = list(blocks)  # a plain list: the blocks are the base's, and its state_dict has them once
        self.num_blocks = len(self._blocks)
        self.hidden_size = arch.hidden_size(model, self._blocks)
        self._output_norm = self._validate_against_model()  # the path of each block's final norm, or None
        device, dtype = adapter_placement(model)  # like PEFT, train adapters in fp32
        self.lor2c = LoR2CConnections(self.num_blocks, self.hidden_size, config.r, config.lora_alpha,
                                      config.lora_dropout, config.share_a, device=device, dtype=dtype)
        self._targets: list[dict[str, nn.Module]] = []
        if config.num_injects > 0:
            names = config.inject_target_modules or arch.default_qv_targets(model)
            self._targets = [arch.resolve_targets(b, i, names) for i, b in enumerate(self._blocks)]
            shapes = [{n: arch.projection_shape(m) for n, m in t.items()} for t in self._targets]
            self._check_inject_rank(shapes)
            self.lor2c_injected = InjectedLoRA(shapes, config.inject_r, config.inject_alpha, config.inject_dropout,
                                               device=device, dtype=dtype)
        if config.modules_to_save is None:
            config.modules_to_save = arch.detect_task_heads(model)
        if self._output_norm is not None:
            config.output_norm = self._output_norm  # saved with the adapter: where its connections are added
        self._freeze_base()
        self._structure = Structure.initial(self.num_blocks)
        self._stash: dict[int, torch.Tensor] = {}
        self._inject_hooks: list[Any] = []
        self._merged_into_base = False
        # Hooks are bound methods and partials, never closures, so `copy.deepcopy` of this model hooks the copy.
        self._zero3 = ExternalParameterDeclarations(self.lor2c.lora_B[0], self._external_parameters)
        self._block_hooks = [
            self._blocks[0].register_forward_pre_hook(self._zero3.declare_once),
            *register_span_hooks(self._blocks, self._output_norm, self._block_hook, self._span_input_hook, self._norm_hook),
        ]
        self._rebuild_plan()
        self.train(model.training)  # new adapter modules follow the base's mode (no dropout on an eval-mode base)

    @property
    def adapter_config(self) -> LoR2CConfig:
        return self.lor2c_config

    # --- construction ------------------------------------------------------------------------------------

    def _validate_against_model(self) -> Optional[str]:
        """Refuse a config that does not fit the model (nothing is changed yet); the path of the blocks' final norm
        when connections are added before it, else None."""
        c, d, L = self.lor2c_config, self.hidden_size, self.num_blocks
        if c.r > d:
            raise ConfigError(f"LoR2CConfig.r={c.r} exceeds the hidden size {d} of {type(self.get_base_model()).__name__}; expected 1 <= r <= {d}.")
        problem = events_problem(c.num_merges, c.num_injects, L)
        if not problem and c.num_merges:
            problem = arch.layerdrop_problem(self.get_base_model(), "MergeLoR2C", f"(num_merges={c.num_merges}): a merged span")
        if problem:
            raise ConfigError(problem)
        check_modules_to_save(self.get_base_model(), c.modules_to_save, "LoR2CConfig")
        if c.connection_position != BEFORE_OUTPUT_NORM:
            return None
        path = c.output_norm or arch.detect_output_norm(self.get_base_model())
        problem = arch.output_norm_problem(self.get_base_model(), self._blocks, path,
                                           f"LoR2CConfig.connection_position={BEFORE_OUTPUT_NORM!r}")
        if problem:
            raise ConfigError(problem)
        return path

    def _check_inject_rank(self, shapes: list[dict[str, tuple[int, int]]]) -> None:
        """inject_r fits every target projection, checked before its LoRA is allocated (a crafted config with
        inject_r=2000000 would otherwise allocate gigabytes first)."""
        smallest = min(min(shape) for block in shapes for shape in block.values())
        if self.lor2c_config.inject_r > smallest:
            raise ConfigError(f"LoR2CConfig.inject_r={self.lor2c_config.inject_r} exceeds the smallest side {smallest} of the "
                              f"injected projections; expected 1 <= inject_r <= {smallest}.")

    # --- forward -------------------------------------------------------------------------------------------

    def _rebuild_plan(self) -> None:
        """Per block: the span ending there (start, slot), and which blocks' inputs are kept for a later hook."""
        s = self._structure
        self._ends = {e: (b, slot) for (b, e), slot in zip(s.spans, s.owners)}
        self._starts = span_starts(s.spans, self.lor2c_config.connection_position)
        for handle in self._inject_hooks:
            handle.remove()
        self._inject_hooks = []
        for block in [] if self._merged_into_base else s.injected:
            for name, layer in self.lor2c_injected.layers_of(block).items():
                module = self._targets[block][name]
                self._inject_hooks.append(module.register_forward_hook(partial(self._inject_hook, layer)))

    def _inject_hook(self, layer: LoraLayer, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of an injected projection: its output with `layer`'s LoRA delta added."""
        return layer(args[0], output) if self._adapter_enabled else output

    def _block_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._adapter_enabled:
            return output
        return span_output(index, args, kwargs, output, self._starts, self._ends, self._stash, self.lor2c,
                           self._output_norm is not None)

    def _span_input_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a block (before the output norm only): keep a span's input for its last block's norm."""
        if self._adapter_enabled:
            stash_span_input(index, args, kwargs, self._starts, self._stash)

    def _norm_hook(self, index: int, module: nn.Module, args: tuple) -> Optional[tuple]:
        """Forward pre-hook of block `index`'s final norm: its input with the connection of the span ending there added
        (each slot's call still runs once per forward pass, here instead of in the block hook)."""
        return norm_input(index, args, self._ends, self._stash, self.lor2c) if self._adapter_enabled else None

    def _check_checkpointing(self, kwargs: Optional[dict]) -> None:
        if (kwargs or {}).get("use_reentrant") and self._output_norm is not None:
            raise ValueError(f"LoR2CConfig.connection_position={BEFORE_OUTPUT_NORM!r} adds each connection inside its last "
                             "block, from a hidden state saved before that block, which reentrant checkpointing cannot "
                             "recompute; use gradient_checkpointing_kwargs={'use_reentrant': False} (the default).")

    def _external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Adapter parameters read outside their owner's forward (for ZeRO-3, see `zero3.py`)."""
        modules = [self.lor2c, self.lor2c_injected] if self._targets else [self.lor2c]
        return [pair for module in modules for pair in module.external_parameters()]

    # --- structure -----------------------------------------------------------------------------------------

    @property
    def structure(self) -> dict[str, Any]:
        """JSON-able: `spans`, `owners`, `injected`, `events` (a copy; change it through events only)."""
        return self._structure.to_dict()

    def parse_structure(self, data: Union[Structure, dict[str, Any]]) -> Structure:
        """A validated `Structure` that fits this model (depth, injected LoRA allocated); nothing is changed."""
        structure = copy.deepcopy(data) if isinstance(data, Structure) else Structure.from_dict(data)
        structure.validate()
        if structure.num_blocks != self.num_blocks:
            raise StructureError(f"Structure is for {structure.num_blocks} blocks; this model has {self.num_blocks}.")
        if structure.injected and not self._targets:
            raise StructureError(f"Structure has injected blocks {structure.injected} but this adapter was created with "
                                 "num_injects=0 (no injected LoRA is allocated).")
        return structure

    def check_saved_structure(self, structure: Structure, config: LoR2CConfig) -> None:
        """A saved structure is what its events produce, with no more events of a kind than its config schedules
        (the schedule counts them: crafted records would mark events done that never happened)."""
        structure.check_replay()
        for kind, allowed in (("merge", config.num_merges), ("inject", config.num_injects)):
            if structure.count(kind) > allowed:
                raise StructureError(f"structure field events holds {structure.count(kind)} {kind} records, but the "
                                     f"config allows num_{kind}s={allowed}.")

    def set_structure(self, structure: Union[Structure, dict[str, Any]]) -> None:
        self._set_adapter_extra(self.parse_structure(structure))

    def _adapter_extra(self) -> Structure:
        return self._structure

    def _set_adapter_extra(self, extra: Structure) -> None:
        self._structure = extra
        self._stash.clear()
        self._rebuild_plan()

    def get_extra_state(self) -> torch.Tensor:
        """The structure in `state_dict()` (key `_extra_state`, JSON as uint8), so whatever saves and loads the
        model's state dict carries it: DeepSpeed's own checkpoints resume with their structure through it."""
        return torch.tensor(list(json.dumps(self.structure).encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """`load_state_dict` calls this before it loads any adapter weight (the root loads first)."""
        try:
            data = (parse_json(bytes(state.tolist()).decode("utf-8"), "_extra_state", "a LoR2C structure")
                    if isinstance(state, torch.Tensor) else state)
        except (ValueError, UnicodeDecodeError) as e:
            raise StructureError(f"The state dict's LoR2C structure (_extra_state) is unreadable: {e}.") from None
        self.set_structure(data)

    @property
    def connections(self) -> list[Connection]:
        """One `Connection` per span, aligned with `structure["spans"]`."""
        return [Connection(span, slot, self.lor2c) for span, slot in zip(self._structure.spans, self._structure.owners)]

    def sfs(self):
        """SFS scores (and rho) of every current connection, aligned with the spans; float32.

        A connection with a NaN or Inf weight has no score: `NonFiniteError` names its span.
        """
        slots = self._structure.owners
        if not slots:
            return SFSScores(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.bool))
        with gathered(list(self.lor2c.parameters())):
            a = self.lor2c.lora_A[0] if self.lor2c.share_a else torch.stack([self.lor2c.lora_A[s] for s in slots])
            b = torch.stack([self.lor2c.lora_B[s] for s in slots])
            finite = finite_modules(a, b).tolist()
            if not all(finite):
                spans = [span for span, ok in zip(self._structure.spans, finite) if not ok]
                raise NonFiniteError(f"LoR2C connection span(s) {spans} hold NaN or Inf weights: they have no SFS, so no "
                                     "merge or inject can be chosen from them. Training diverged before this event.")
            scores = sfs_scores(a, b, self.lor2c_config.sfs_top_k)
        if not bool(torch.isfinite(scores.sfs).all()):  # unreachable for finite weights; never decide from NaN
            raise NonFiniteError(f"SFS of the connections {self._structure.spans} is not finite: {scores.sfs.tolist()}.")
        if self.lor2c_config.zero_b_score == "official":  # the authors' code: an all-zero B A has rho = 0
            rho = torch.where(scores.zero, torch.zeros_like(scores.rho), scores.rho)
            scores = SFSScores(sfs=1.0 - rho, rho=rho, zero=scores.zero)
        return scores

    # --- events --------------------------------------------------------------------------------------------

    def apply_merge(self, step: Optional[int] = None, epoch: Optional[float] = None) -> dict[str, Any]:
        """Perform one MergeLoR2C event (SPEC §4) and return its record."""
        return self._apply_event("merge", step, epoch)

    def apply_inject(self, step: Optional[int] = None, epoch: Optional[float] = None) -> dict[str, Any]:
        """Perform one InjectLoR2C event (SPEC §5) and return its record."""
        if not self._targets:
            raise ValueError("apply_inject() needs an adapter created with num_injects > 0 (its LoRA is allocated up front).")
        if self._merged_into_base:
            raise ValueError("apply_inject() after merge_and_unload(): the injected LoRA is already in the base weights.")
        return self._apply_event("inject", step, epoch)

    def _apply_event(self, kind: str, step: Optional[int], epoch: Optional[float]) -> dict[str, Any]:
        s, c = self._structure, self.lor2c_config
        scores = self.sfs()
        sfs, rho = scores[0].tolist(), scores[1].tolist()
        zero_blocks = [s.spans[i] for i, z in enumerate(scores[2].tolist()) if z]
        if zero_blocks:
            logger.info("LoR2C SFS: connections %s have B = 0 (no defined SFS); scored as %s.", zero_blocks,
                        "rho = 0, as the authors' code" if c.zero_b_score == "official" else "0 information")
        before = self.num_adapter_parameters()
        if kind == "merge":
            choice = broadcast_decision(s.choose_merge(sfs, rho, c.merge_criterion, c.merge_keep))
        else:
            choice = broadcast_decision(s.choose_inject(sfs))
        record: dict[str, Any] = {"kind": kind, "step": step, "epoch": epoch}
        if choice is None:
            record.update(skipped=True, reason=f"no {kind} candidate left", blocks=[])
        elif kind == "merge":
            k, kept = choice
            pair = [list(s.spans[k]), list(s.spans[k + 1])]
            record.update(
                merged=pair, scores=[sfs[k], sfs[k + 1]], rho=[rho[k], rho[k + 1]], kept_slot=kept,
                blocks=s.merge(k, kept), criterion=c.merge_criterion,
            )
        else:
            block = s.inject(choice)
            record.update(scores=[sfs[choice]], rho=[rho[choice]], blocks=[block], targets=sorted(self._targets[block]))
        self._rebuild_plan()
        record.update(params_before=before, params_after=self.num_adapter_parameters())
        s.events.append(record)
        logger.warning(describe_event(record))
        return dict(record)

    # --- counts --------------------------------------------------------------------------------------------

    def adapter_state_dict(self, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """The adapter tensors, with the slots a merge or inject retired saved as zeros: no forward reads them
        again, and under DeepSpeed (one flat optimizer buffer) they keep moving on their momentum, differently
        in a run resumed from DeepSpeed's own checkpoint, so their values would make equal runs' files differ."""
        state = super().adapter_state_dict(state_dict)
        owners = set(self._structure.owners)
        retired = [f"lor2c.lora_B.{slot}" for slot in range(len(self.lor2c.lora_B)) if slot not in owners]
        if not self.lor2c.share_a:
            retired += [f"lor2c.lora_A.{slot}" for slot in range(len(self.lor2c.lora_A)) if slot not in owners]
        for key in retired:
            if key in state:
                state[key] = torch.zeros_like(state[key])
        return state

    def num_adapter_parameters(self) -> int:
        """Parameters of the connections and injected LoRA the current structure reads (task heads excluded)."""
        s, conn = self._structure, self.lor2c
        total = sum(full_numel(conn.lora_B[slot]) for slot in s.owners)
        if conn.share_a:
            total += full_numel(conn.lora_A[0])
        else:
            total += sum(full_numel(conn.lora_A[slot]) for slot in s.owners)
        for block in [] if self._merged_into_base else s.injected:
            total += sum(full_numel(p) for p in self.lor2c_injected.blocks[block].parameters())
        return total

    def merge_and_unload(self) -> nn.Module:
        """The trained model as a plain transformers model, as PEFT's `merge_and_unload` gives one.

        Injected LoRA is folded into its q/v weights; the connections, which no weight can absorb, stay as a
        submodule of the base, whose class becomes the serving class of `modeling_lor2c.py` (a subclass of the
        base's own class). Its `save_pretrained` writes a folder that `AutoModelFor...from_pretrained(folder,
        trust_remote_code=True)` loads without lor2c_hf. NaN or Inf weights are refused before anything changes.
        The base is changed in place; save the adapter first, or use `export_for_transformers`.
        """
        from .export import merge_and_unload

        return merge_and_unload(self)

    def export_for_transformers(self, save_directory: str, tokenizer: Optional[Any] = None, **save_kwargs: Any) -> str:
        """Write a model folder (weights, config, `modeling_lor2c.py`, and `tokenizer` if given) that runs with plain
        transformers and `trust_remote_code=True`, with the same outputs as this model; this model is unchanged."""
        from .export import export_for_transformers

        return export_for_transformers(self, save_directory, tokenizer, **save_kwargs)

    def remove_hooks(self) -> None:
        """Take this adapter's hooks off the base (the base then computes its bare function)."""
        for handle in self._block_hooks + self._inject_hooks:
            handle.remove()
        self._block_hooks, self._inject_hooks = [], []

    def unload(self) -> nn.Module:
        """Remove the adapter and return the untouched base model, also after `merge_and_unload()` (whose q/v folds
        are undone exactly from the weights it kept); the adapter is discarded."""
        if self._merged_into_base:
            from .export import unload_merged

            return unload_merged(self)
        self.remove_hooks()
        return self.get_base_model()


def describe_event(record: dict[str, Any]) -> str:
    """One readable console line for an event record."""
    where = f"step {record['step']}" if record.get("step") is not None else "manual"
    if record.get("epoch") is not None:
        where += f" (epoch {record['epoch']:.2f})"
    if record.get("skipped"):
        return f"[LoR2C] {where} {record['kind']} skipped: {record['reason']}"
    params = f"trainable adapter params {record['params_before']:,d} -> {record['params_after']:,d}"
    if record["kind"] == "merge":
        (a, b), (sa, sb) = record["merged"], record["scores"]
        return (f"[LoR2C] {where} merge: span {a} + span {b} -> {record['blocks']} "
                f"(SFS {sa:.4f} + {sb:.4f}, criterion {record['criterion']}, kept slot {record['kept_slot']}); {params}")
    return (f"[LoR2C] {where} inject: block {record['blocks'][0]} LoR2C -> LoRA on {record['targets']} "
            f"(SFS {record['scores'][0]:.4f}); {params}")


def get_lor2c_model(model: nn.Module, config: LoR2CConfig) -> LoR2CModel:
    """Add LoR2C connections (and, for InjectLoR2C/IMLoR2C, dormant LoRA) to `model`; freeze its base."""
    if isinstance(model, LoR2CModel):
        raise ValueError("The model already has a LoR2C adapter; pass its base model (model.get_base_model()).")
    check_adapter_config(config, (LoR2CConfig,), "config")
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return LoR2CModel(model, config)
