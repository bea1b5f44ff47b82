"""Every accelerate config and DeepSpeed config is read by the code that reads it for real, so a typo fails here.

- accelerate_configs/*.yaml: accelerate's own loader, then `accelerate launch`'s argument processing and
  environment preparation, then the plugin the Accelerator builds from that environment (`DeepSpeedPlugin`,
  `FullyShardedDataParallelPlugin`). Keys inside `deepspeed_config`/`fsdp_config` must be launch arguments.
- ds_configs/*.json: the Trainer's own "auto"-filling code (transformers' `HfTrainerDeepSpeedConfig` methods,
  which run without DeepSpeed installed) must leave no "auto" behind; where DeepSpeed is installed, its own
  config classes (pydantic, unknown keys forbidden) validate the filled result.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, is_deepspeed_available

from tiny_models import tiny_model
from tiny_pretrained import REPO

ACCELERATE_CONFIGS = {
    "multi_gpu": DistributedType.MULTI_GPU,
    "deepspeed_zero2": DistributedType.DEEPSPEED,
    "deepspeed_zero3": DistributedType.DEEPSPEED,
    "deepspeed_zero3_offload": DistributedType.DEEPSPEED,
    "fsdp": DistributedType.FSDP,
}
# stage, optimizer offload, parameter offload
DS_CONFIGS = {"zero2": (2, "none", "none"), "zero3": (3, "none", "none"), "zero3_offload": (3, "cpu", "cpu")}


def test_the_expected_files_and_nothing_else():
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "accelerate_configs", "*.yaml"))) == sorted(ACCELERATE_CONFIGS)
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "ds_configs", "*.json"))) == sorted(DS_CONFIGS)


def launch_environment(path: str) -> tuple[object, dict[str, str], object]:
    """What `accelerate launch --config_file path` would hand the training processes (nothing is started)."""
    parser = launch_command_parser()
    argv = ["--config_file", path, "recipes/alpaca.py"]
    launch_arguments = set(vars(parser.parse_args(argv)))
    config = load_config_from_file(path)
    nested = {**(config.deepspeed_config or {}),
              **{k if k.startswith("fsdp") else f"fsdp_{k}": v for k, v in (config.fsdp_config or {}).items()}}
    unknown = sorted(k for k in nested if k not in launch_arguments)
    assert not unknown, f"{path}: {unknown} are not accelerate launch arguments (typo?)"
    args, defaults, _ = _validate_launch_command(parser.parse_args(argv))
    if args.use_deepspeed:  # as launch_command() does before the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return config, env, args


@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_launches_and_builds_its_plugin(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the DeepSpeed configs point at ds_configs/ relative to the repository root
    config, env, args = launch_environment(os.path.join("accelerate_configs", f"{name}.yaml"))
    assert config.distributed_type == ACCELERATE_CONFIGS[name]
    assert (config.num_machines, config.mixed_precision, env["ACCELERATE_MIXED_PRECISION"]) == (1, "bf16", "bf16")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if name.startswith("deepspeed"):
        stage, offload_optimizer, offload_param = DS_CONFIGS[name[len("deepspeed_"):]]
        assert os.path.isfile(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        plugin = DeepSpeedPlugin()  # reads the env + the ds json, rejects settings duplicated in the yaml
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
        assert (plugin.zero_stage, plugin.offload_optimizer_device, plugin.offload_param_device) == (stage, offload_optimizer, offload_param)
        assert plugin.zero3_init_flag == (stage == 3)
        assert plugin.deepspeed_config["bf16"]["enabled"] is True and plugin.deepspeed_config["fp16"]["enabled"] is False
    elif name == "fsdp":
        # sync_module_states (forced on by cpu_ram_efficient_loading) needs an accelerator device at
        # construction; on a CPU-only machine those two are set here, everything else comes from the env.
        assert env["FSDP_SYNC_MODULE_STATES"] == env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        plugin = FullyShardedDataParallelPlugin(sync_module_states=False, cpu_ram_efficient_loading=False)
        assert plugin.use_orig_params  # frozen base + trainable adapter in one unit needs it under FSDP1
        assert "FULL_SHARD" in str(plugin.sharding_strategy) and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
        model = tiny_model("llama")
        plugin.set_auto_wrap_policy(model)  # TRANSFORMER_BASED_WRAP resolves the decoder layer class
        assert plugin.auto_wrap_policy is not None
    else:
        assert args.multi_gpu and env.get("ACCELERATE_USE_FSDP") is None and env.get("ACCELERATE_USE_DEEPSPEED") is None


class TrainerDeepSpeedFill(HfDeepSpeedConfig):
    """transformers' own Trainer "auto"-filling (HfTrainerDeepSpeedConfig's methods) on accelerate's config
    holder, for machines without DeepSpeed, where HfTrainerDeepSpeedConfig itself cannot be built."""

    def __init__(self, config_file_or_dict) -> None:
        super().__init__(config_file_or_dict)
        self._dtype, self.mismatches = None, []

    fill_match = HfTrainerDeepSpeedConfig.fill_match
    fill_only = HfTrainerDeepSpeedConfig.__dict__["fill_only"]
    is_auto = HfTrainerDeepSpeedConfig.is_auto
    trainer_config_process = HfTrainerDeepSpeedConfig.trainer_config_process
    trainer_config_finalize = HfTrainerDeepSpeedConfig.trainer_config_finalize


def filled_by_trainer(path: str, args: TrainingArguments, model: torch.nn.Module, steps: int) -> dict:
    holder = HfTrainerDeepSpeedConfig(path) if is_deepspeed_available() else TrainerDeepSpeedFill(path)
    holder.trainer_config_process(args)
    holder.trainer_config_finalize(args, model, steps)
    return holder.config


def autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in autos(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


@pytest.fixture(scope="module")
def recipe_args(tmp_path_factory):
    """The recipe's paper setup on one process: 4 per device x 32 accumulation = 128, AdamW 3e-4, 100 warmup."""
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("ds")), per_device_train_batch_size=4,
                             gradient_accumulation_steps=32, learning_rate=3e-4, warmup_steps=100, bf16=True,
                             use_cpu=True, max_grad_norm=1.0, report_to="none")


@pytest.mark.parametrize("name", list(DS_CONFIGS))
def test_deepspeed_config_is_completed_by_the_trainer(name, recipe_args):
    path = os.path.join(REPO, "ds_configs", f"{name}.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    stage, offload_optimizer, offload_param = DS_CONFIGS[name]
    zero = raw["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == offload_optimizer
    assert zero.get("offload_param", {}).get("device", "none") == offload_param
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert raw[key] == "auto", f"{name}: {key} must be 'auto' so the recipe's batch arithmetic decides it"
    if stage == 3:  # the adapter is saved from full weights at the end
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True

    model = tiny_model("llama")
    filled = filled_by_trainer(path, recipe_args, model, steps=1164)
    assert autos(filled) == [], f"{name}: the Trainer leaves {autos(filled)} unfilled (a misspelt key?)"
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (128, 4, 32)
    assert (filled["bf16"]["enabled"], filled["fp16"]["enabled"], filled["gradient_clipping"]) == (True, False, 1.0)
    if "optimizer" in filled:
        assert filled["optimizer"]["params"]["lr"] == 3e-4
        assert filled["scheduler"]["params"]["warmup_num_steps"] == 100
        assert filled["scheduler"]["params"]["total_num_steps"] == 1164
    plugin = DeepSpeedPlugin(hf_ds_config=filled)  # accelerate accepts the completed config as it is
    assert plugin.zero_stage == stage


@pytest.mark.parametrize("name", list(DS_CONFIGS))
def test_deepspeed_validates_the_completed_config(name, recipe_args):
    """DeepSpeed's own config classes: unknown ZeRO keys are errors; top-level keys must be ones it knows."""
    pytest.importorskip("deepspeed", reason="pip install 'lor2c-hf[deepspeed]' to validate against DeepSpeed itself")
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import config as zero_config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    filled = filled_by_trainer(os.path.join(REPO, "ds_configs", f"{name}.json"), recipe_args, tiny_model("llama"), steps=1164)
    known = {v for m in (constants, zero_config) for v in vars(m).values() if isinstance(v, str)}
    assert sorted(set(filled) - known) == [], f"{name}: top-level keys DeepSpeed does not read"
    DeepSpeedZeroConfig(**filled["zero_optimization"])
    config = DeepSpeedConfig(filled)
    assert (config.zero_optimization_stage, config.train_batch_size) == (DS_CONFIGS[name][0], 128)


def test_yaml_headers_name_a_runnable_command():
    """Each accelerate config's comment shows the launch command, with the file's own path."""
    for name in ACCELERATE_CONFIGS:
        path = os.path.join(REPO, "accelerate_configs", f"{name}.yaml")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert f"accelerate launch --config_file accelerate_configs/{name}.yaml recipes/alpaca.py" in text
        assert isinstance(yaml.safe_load(text), dict)
