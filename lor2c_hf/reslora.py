"""`ResLoRAModel`: LoRA on the q and v projections with ResLoRA's residual paths (SPEC §9), merged away for
inference by `merge_and_unload()`.

For block l, target projection W (same target name in every block), `s = lora_alpha / r`:

- `is`: h = W x_l + s B_l A_l drop(x_l + x_{l-1}); at block 0 the term is left out (`is_block0="skip"`) or, as
  in LMOps' code, x_{-1} = x_0 (`is_block0="self"`, merged as 2 s B A)
- `bs`: h = W x_l + s sum_{k=0..p} B_{l-k} A_{l-k} drop(x_l)
- `ms`: h = W x_l + s B_l (A_l drop(x_l) + sum_{k=1..p} A_{l-k} drop(x_{l-k}))

where x_{l-k} is the input of the same projection k layers down in the same forward pass (terms for layers
below 0 are left out). The LoRA itself is `layer.LoraLayer`, the same one InjectLoR2C uses, added by a forward
hook on each projection, so the base model's `state_dict`, `generate()` and gradient checkpointing are its own.

`is` and `ms` need, inside block l, tensors computed in earlier blocks of the same forward: each hook stashes
what later blocks read (x_l for `is`; the r-wide A_l drop(x_l) for `ms`) in a per-forward dict. Under
gradient checkpointing (non-reentrant) the backward pass recomputes block l and its hooks read the stash
again; a gradient hook on each block's output re-selects the stash of the forward being differentiated
before that block is recomputed, so two forwards followed by their backwards still get their own residuals.

Merging: `bs` folds exactly into W. `is` and `ms` cannot (the inference model has no x_{l-k}): they replace
x_{l-k} by (f_{l-k} / f_l) x_l, with f the running mean token L2 norm of each projection's input, collected in
training-mode forwards (all of them) and saved with the adapter. LMOps uses the Frobenius norm of each batch's
input averaged over the last 100 training forwards instead; both estimate the same ratio of input scales. `merge_error(inputs)` measures what that costs on a batch.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import architectures as arch
from .config import ConfigError, check_adapter_config
from .distributed import broadcast_buffers, full_numel
from .guards import NonFiniteError
from .layer import InjectedLoRA, LoraLayer, add_scaled_up_projection, merge_into_projection
from .reslora_config import ResLoRAConfig
from .serialization import AdapterIOMixin, AdapterLoadError
from .wrapper import AdapterModelMixin, adapter_placement, check_modules_to_save
from .zero3 import ExternalParameterDeclarations

logger = logging.getLogger("lor2c_hf")


class ResLoRAAdapters(InjectedLoRA):
    """One `LoraLayer` per (block, target) and the running input norms f[block, target] for the is/ms merge."""

    def __init__(self, shapes: list[dict[str, tuple[int, int]]], r: int, alpha: float, dropout: float,
                 device=None, dtype=None) -> None:
        super().__init__(shapes, r, alpha, dropout, device=device, dtype=dtype)
        size = (len(shapes), len(shapes[0]))
        self.register_buffer("input_norm", torch.zeros(size, device=device, dtype=torch.float32))
        self.register_buffer("input_count", torch.zeros(size, device=device, dtype=torch.long))

    @torch.no_grad()
    def record_input(self, block: int, target: int, x: torch.Tensor) -> None:
        """Fold the mean token L2 norm of `x` into the running mean f[block, target] (weighted by tokens)."""
        norms = x.detach().float().norm(dim=-1)
        if norms.numel() == 0 or not bool(torch.isfinite(norms).all()):
            return  # no tokens (mean([]) is NaN), or a diverged input: never folded into the running mean
        count = self.input_count[block, target] + norms.numel()
        mean = self.input_norm[block, target].float()
        self.input_norm[block, target] = mean + (norms.mean() - mean) * (norms.numel() / count)
        self.input_count[block, target] = count


class ResLoRAModel(AdapterIOMixin, AdapterModelMixin, nn.Module):
    """Wraps a `transformers` model; `forward`, `generate` and every other attribute go to the base model."""

    adapter_prefixes = ("reslora.",)
    adapter_modules = ("reslora",)
    adapter_methods = ("reslora",)
    config_class = ResLoRAConfig
    resumable_fields = ("lora_dropout", "base_model_name_or_path")

    def __init__(self, model: nn.Module, config: ResLoRAConfig) -> None:
        super().__init__()
        self._wrap(model)
        self.reslora_config = config
        self.blocks_path, blocks = arch.find_block_stack(model, config.blocks_path)
        self.num_blocks = len(blocks)
        names = config.target_modules or arch.default_qv_targets(model)
        self._targets = [arch.resolve_targets(b, i, names, field="ResLoRAConfig.target_modules") for i, b in enumerate(blocks)]
        self.target_names = list(self._targets[0])
        shapes = [{n: arch.projection_shape(m) for n, m in t.items()} for t in self._targets]
        self._validate_against_model(shapes)
        config.target_modules = list(names)
        if config.modules_to_save is None:
            config.modules_to_save = arch.detect_task_heads(model)
        check_modules_to_save(model, config.modules_to_save, "ResLoRAConfig")
        device, dtype = adapter_placement(model)
        self.reslora = ResLoRAAdapters(shapes, config.r, config.lora_alpha, config.lora_dropout, device=device, dtype=dtype)
        self._set_adapter_extra(None)  # self._layers: per block, its LoRA layers in target order
        self._freeze_base()
        self._active: Optional[dict] = None  # stash of the forward pass being run or differentiated
        self._merged_into_base = False
        self.merge_report: Optional[dict[str, Any]] = None
        self._hooks = [
            self._targets[b][n].register_forward_hook(partial(self._projection_hook, b, t))
            for b in range(self.num_blocks) for t, n in enumerate(self.target_names)
        ]
        self._zero3 = ExternalParameterDeclarations(self._layers[0][0].lora_B.weight, self._external_parameters)
        self._hooks.append(blocks[0].register_forward_pre_hook(self._zero3.declare_once))
        if config.res_flag in ("is", "ms"):
            self._hooks.append(blocks[0].register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            self._hooks += [block.register_forward_hook(partial(self._end_block, b)) for b, block in enumerate(blocks)]
        self.train(model.training)  # new adapter modules follow the base's mode (no dropout on an eval-mode base)

    @property
    def adapter_config(self) -> ResLoRAConfig:
        return self.reslora_config

    def _validate_against_model(self, shapes: list[dict[str, tuple[int, int]]]) -> None:
        c, L, model = self.reslora_config, self.num_blocks, type(self.get_base_model()).__name__
        if c.res_flag == "is" and L < 2:
            raise ConfigError(f"ResLoRAConfig.res_flag='is' reads the previous layer, but {model} has only {L} block.")
        if c.res_flag != "is" and c.pre_num > L - 1:
            raise ConfigError(f"ResLoRAConfig.pre_num={c.pre_num} but {model} has {L} blocks: a layer has at most "
                              f"{L - 1} previous layers; expected 0 <= pre_num <= {L - 1}.")
        problem = arch.layerdrop_problem(self.get_base_model(), "ResLoRA", f"res_flag={c.res_flag!r}") if c.res_flag != "bs" else None
        if problem:
            raise ConfigError(problem)
        for name in self.target_names:
            per_block = [s[name] for s in shapes]
            if any(s != per_block[0] for s in per_block):
                raise ConfigError(f"ResLoRAConfig.target_modules: {name!r} has different shapes across blocks {per_block}; "
                                  "residual paths need one (in, out) shape per target.")
            smallest = min(per_block[0])
            if c.r > smallest:
                raise ConfigError(f"ResLoRAConfig.r={c.r} exceeds the smaller side {smallest} of {name!r} "
                                  f"{per_block[0]}; expected 1 <= r <= {smallest}.")

    # --- forward -------------------------------------------------------------------------------------------

    def _begin_forward(self, module, args, kwargs) -> None:
        self._active = {}
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            # Its gradient arrives once block 0's backward is done: the stash is no longer needed.
            args[0].register_hook(partial(self._release, self._active))

    def _end_block(self, index: int, module, args, output) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        if self._active is not None and torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(partial(self._select, self._active))
        if index == self.num_blocks - 1:
            self._active = None

    def _select(self, stash: dict, grad: torch.Tensor) -> None:
        self._active = stash  # backward reaches this block: its recompute must read this forward's stash

    def _release(self, stash: dict, grad: torch.Tensor) -> None:
        if self._active is stash:
            self._active = None

    def _set_adapter_extra(self, extra: Any) -> None:
        self._layers: list[list[LoraLayer]] = [
            [self.reslora.layers_of(b)[n] for n in self.target_names] for b in range(self.num_blocks)
        ]

    def _projection_hook(self, block: int, target: int, module, args, output):
        if not self._adapter_enabled:
            return output
        x = args[0]
        flag = self.reslora_config.res_flag
        if flag == "bs":
            return self._block_shortcut(block, target, x, output)
        if self._active is None:
            self._active = {}  # a block called outside a full forward: no earlier layer ran
        stash, layer = self._active, self._layers[block][target]
        first_call = (block, target) not in stash  # False while gradient checkpointing recomputes the block
        if flag == "is":
            previous = stash.get((block - 1, target))
            if block == 0 and self.reslora_config.is_block0 == "self":
                previous = x  # LMOps: block 0 reads its own input twice
            dtype = layer.lora_A.weight.dtype
            result = layer(x if previous is None else x.to(dtype) + previous.to(dtype), output)
            keep = x
        else:
            keep = layer.lora_A(layer.dropped_input(x))
            earlier = [stash[(block - k, target)] for k in range(1, self.reslora_config.pre_num + 1) if (block - k, target) in stash]
            result = add_scaled_up_projection(output, keep + sum(earlier) if earlier else keep, layer.lora_B.weight, layer.scaling)
        if first_call:
            stash[(block, target)] = keep
            if module.training:
                self.reslora.record_input(block, target, x)
        return result

    def _external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """What the projection hooks read outside a `LoraLayer` call: `ms` this layer's B, `bs` every A and B
        of the shortcut (see `zero3.py`); plus each `LoraLayer`'s own B."""
        reads = self.reslora.external_parameters()
        flag = self.reslora_config.res_flag
        for b in range(self.num_blocks):
            for t, name in enumerate(self.target_names):
                projection = self._targets[b][name]
                if flag == "ms":
                    reads.append((projection, self._layers[b][t].lora_B.weight))
                elif flag == "bs" and len(shortcut := self._shortcut_layers(b, t)) > 1:
                    reads += [(projection, p) for layer in shortcut for p in (layer.lora_A.weight, layer.lora_B.weight)]
        return reads

    def _shortcut_layers(self, block: int, target: int) -> list[LoraLayer]:
        """The LoRA of this block and of the pre_num blocks below it (bs)."""
        return [self._layers[block - k][target] for k in range(min(self.reslora_config.pre_num, block) + 1)]

    def _block_shortcut(self, block: int, target: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output + s * sum_k B_{l-k} A_{l-k} dropout(x)` as one rank-(k*r) product instead of k small ones."""
        layers = self._shortcut_layers(block, target)
        if len(layers) == 1:
            return layers[0](x, output)
        a = torch.cat([m.lora_A.weight for m in layers])  # (k r, in)
        b = torch.cat([m.lora_B.weight for m in layers], dim=1)  # (out, k r)
        return add_scaled_up_projection(output, F.linear(layers[0].dropped_input(x), a), b, layers[0].scaling)

    def _check_checkpointing(self, kwargs: Optional[dict]) -> None:
        if (kwargs or {}).get("use_reentrant") and self.reslora_config.res_flag in ("is", "ms"):
            raise ValueError(f"ResLoRA res_flag={self.reslora_config.res_flag!r} sends gradients between layers, which "
                             "reentrant checkpointing cuts; use gradient_checkpointing_kwargs={'use_reentrant': False} (the default).")

    # --- structure and counts ------------------------------------------------------------------------------

    @property
    def structure(self) -> dict[str, Any]:
        """JSON-able description saved with the adapter: fixed by the config and the model."""
        c = self.reslora_config
        return {"method": "reslora", "num_blocks": self.num_blocks, "res_flag": c.res_flag, "pre_num": c.pre_num,
                "targets": list(self.target_names)}

    def parse_structure(self, data: dict[str, Any]) -> dict[str, Any]:
        if data != self.structure:
            raise AdapterLoadError(f"Saved ResLoRA structure {data} does not match this model's {self.structure}. "
                                   "The model was not changed.")
        return data

    def set_structure(self, structure: dict[str, Any]) -> None:
        self.parse_structure(structure)

    def num_adapter_parameters(self) -> int:
        """LoRA parameters (the norms are statistics, not parameters): sum over blocks and targets of r (in + out)."""
        return sum(full_numel(p) for p in self.reslora.parameters())

    def adapter_state_dict(self, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """The adapter tensors. Called on every rank (no `state_dict`), it first puts rank 0's running input norms
        on every rank, a collective (DDP keeps buffers in step, DeepSpeed does not, and each rank sees other data).
        With the `state_dict` `Trainer` gathered, it runs on the main process only, so it takes no collective:
        the norms are buffers, read from this rank's module (rank 0's, as under DDP)."""
        if state_dict is None:
            broadcast_buffers(self.reslora)
        else:
            own = {k: v for k, v in self.state_dict(keep_vars=True).items() if k.startswith(self.adapter_prefixes)}
            state_dict = {**state_dict, **{k: v for k, v in own.items() if not isinstance(v, nn.Parameter)}}
        return super().adapter_state_dict(state_dict)

    # --- merging -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weights(self) -> dict[tuple[int, str], torch.Tensor]:
        """The float32 update (out x in) merged into each (block, target) projection (see the module docstring)."""
        c = self.reslora_config
        if c.res_flag in ("is", "ms"):
            counts, norms = self.reslora.input_count, self.reslora.input_norm.float()
            if bool((counts == 0).any()) or not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
                raise RuntimeError(f"ResLoRA res_flag={c.res_flag!r} merges with the running input norms collected in "
                                   "training-mode forward passes, and this adapter has none (or non-finite ones: "
                                   f"{norms.flatten().tolist()[:4]}...); run some training-mode forwards (or train) before "
                                   "merging. The model was not changed.")
        deltas = {}
        for block in range(self.num_blocks):
            for t, name in enumerate(self.target_names):
                layer = self._layers[block][t]
                a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
                if c.res_flag == "bs":
                    delta = sum(m.delta_weight().float() for m in self._shortcut_layers(block, t))
                elif c.res_flag == "is":
                    ratio = norms[block - 1, t] / norms[block, t] if block > 0 else float(c.is_block0 == "self")
                    delta = (1 + ratio) * layer.scaling * (b @ a)
                else:
                    mixed = a + sum((norms[block - k, t] / norms[block, t]) * self._layers[block - k][t].lora_A.weight.float()
                                    for k in range(1, min(c.pre_num, block) + 1))
                    delta = layer.scaling * (b @ mixed)
                deltas[(block, name)] = delta
        return deltas

    def _add_to_weights(self, deltas: dict[tuple[int, str], torch.Tensor]) -> None:
        for (block, name), delta in deltas.items():
            merge_into_projection(self._targets[block][name], delta)

    @torch.no_grad()
    def merge_error(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """How far the merged model's outputs are from the adapter's on `inputs` (eval mode; nothing is changed).

        `relative_error` = |merged - adapted| / |adapted|; `error_vs_adapter_effect` = |merged - adapted| /
        |adapted - base|: the share of what the adapter changes that the merge gets wrong (0 = exact).
        """
        self._refuse_if_merged("measure the merge error")
        was_training, deltas = self.training, self.delta_weights()
        originals = {key: self._targets[key[0]][key[1]].weight.detach().clone() for key in deltas}
        self.eval()
        try:
            adapted = _main_output(self.get_base_model()(**inputs))
            self._adapter_enabled = False
            base = _main_output(self.get_base_model()(**inputs))
            self._add_to_weights(deltas)
            merged = _main_output(self.get_base_model()(**inputs))
        finally:
            for (block, name), weight in originals.items():
                self._targets[block][name].weight.copy_(weight)
            self._adapter_enabled = True
            self.train(was_training)
        error = (merged - adapted).norm()
        return {"res_flag": self.reslora_config.res_flag, "exact": self.reslora_config.res_flag == "bs",
                "relative_error": float(error / adapted.norm().clamp_min(1e-30)),
                "error_vs_adapter_effect": float(error / (adapted - base).norm().clamp_min(1e-30))}

    def merge_and_unload(self, check_inputs: Optional[dict[str, Any]] = None) -> nn.Module:
        """Merge the adapter into the q/v weights and return the base model with no hooks or extra modules.

        `bs` is exact. `is`/`ms` are approximations (see the module docstring): pass `check_inputs` (a batch of
        model inputs) to measure their error first; the result is kept in `self.merge_report` and logged.
        """
        self._refuse_if_merged("merge again")
        report: dict[str, Any] = {"res_flag": self.reslora_config.res_flag, "exact": self.reslora_config.res_flag == "bs"}
        if check_inputs is not None:
            report = self.merge_error(check_inputs)
        deltas = self.delta_weights()
        bad = [key for key, delta in deltas.items() if not bool(torch.isfinite(delta).all())]
        if bad:
            raise NonFiniteError(f"merge_and_unload() refused: the ResLoRA update of (block, projection) {bad[:6]} holds NaN "
                                 "or Inf values; folding it would make the model's output NaN. The model was not changed.")
        self._add_to_weights(deltas)
        self._merged_into_base = True
        self.merge_report = report
        if report["exact"]:
            logger.info("[ResLoRA] merged bs adapter into the base weights (exact): %s", report)
        elif check_inputs is None:
            logger.warning("[ResLoRA] merged %s adapter with running input norms: an approximation whose error was not "
                           "measured (pass check_inputs= to merge_and_unload to measure it).", report["res_flag"])
        else:
            logger.warning("[ResLoRA] merged %s adapter with running input norms: relative output error %.3g, "
                           "%.3g of the adapter's effect.", report["res_flag"], report["relative_error"],
                           report["error_vs_adapter_effect"])
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every hook and return the base model (unmerged unless merge_and_unload ran)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._active = [], None
        return self.get_base_model()


def _main_output(output: Any) -> torch.Tensor:
    """Logits of a task model, else the last hidden state, in float32."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value.float()
    return (output if isinstance(output, torch.Tensor) else output[0]).float()


def get_reslora_model(model: nn.Module, config: ResLoRAConfig) -> ResLoRAModel:
    """Add ResLoRA (LoRA on the target projections with residual paths) to `model`; freeze its base."""
    if isinstance(model, AdapterIOMixin):
        raise ValueError(f"The model already has an adapter ({type(model).__name__}); pass its base model (model.get_base_model()).")
    check_adapter_config(config, (ResLoRAConfig,), "config")
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return ResLoRAModel(model, config)
