"""LoR2CConfig: validation with field-naming errors, method presets, serialisation, command-line parsing,
and the checks that need a model (done by `get_lor2c_model`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser

from lor2c_hf import METHODS, AdapterLoadError, ConfigError, LoR2CConfig, get_lor2c_model
from lor2c_hf.config import CONFIG_NAME
from tiny_models import tiny_model

# --- construction-time validation ---------------------------------------------------------------------------

INVALID = [
    ("r", 0),
    ("r", -4),
    ("r", 2.5),
    ("inject_r", 0),
    ("inject_r", -1),
    ("merge_criterion", "lowest"),
    ("merge_keep", "higher"),
    ("schedule", "hourly"),
    ("method", "lora"),
    ("lora_alpha", 0),
    ("lora_dropout", 1.0),
    ("inject_dropout", -0.1),
    ("num_merges", -1),
    ("num_injects", -2),
    ("sfs_top_k", 0),
    ("sfs_top_k", 9),  # more than r=8
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_invalid_value_raises_config_error_naming_the_field(name, value):
    with pytest.raises(ConfigError) as info:
        LoR2CConfig(**{name: value})
    message = str(info.value)
    assert f"{name}=" in message, message
    assert "expected" in message, message  # says what is allowed


def test_config_error_is_a_value_error():
    # Code that catches ValueError (e.g. argument parsers) keeps working.
    assert issubclass(ConfigError, ValueError)


def test_unknown_method_in_for_method_names_it_and_the_choices():
    with pytest.raises(ConfigError) as info:
        LoR2CConfig.for_method("reslora2c")
    message = str(info.value)
    assert "reslora2c" in message
    for method in METHODS:
        assert method in message


def test_defaults_are_the_papers_glue_setting():
    # SPEC §1 and §5: GLUE r=8, alpha=16, dropout 0.1; injected LoRA r=4 (r/2), alpha=16, dropout 0.05.
    config = LoR2CConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert (config.inject_r, config.inject_alpha, config.inject_dropout) == (4, 16, 0.05)
    assert config.scaling == 16 / 8
    assert (config.merge_keep, config.sfs_top_k) == ("paper", 2)
    # The merged pair follows the authors' code, not the paper's text (README, quality benchmarks).
    assert (config.merge_criterion, config.zero_b_score) == ("official", "spec")


@pytest.mark.parametrize("r,expected", [(64, 32), (8, 4), (3, 1), (1, 1)])
def test_inject_r_defaults_to_half_of_r_and_at_least_one(r, expected):
    assert LoR2CConfig(r=r, sfs_top_k=1).inject_r == expected


# --- presets -------------------------------------------------------------------------------------------------


def test_presets_cover_every_method():
    assert set(METHODS) == {"lor2c", "sharelor2c", "mergelor2c", "injectlor2c", "imlor2c"}


@pytest.mark.parametrize("method", METHODS)
def test_preset_mechanisms(method):
    config = LoR2CConfig.for_method(method)
    assert config.method == method
    assert config.share_a == (method == "sharelor2c")
    assert (config.num_merges > 0) == (method in ("mergelor2c", "imlor2c"))
    assert (config.num_injects > 0) == (method in ("injectlor2c", "imlor2c"))
    assert config.has_events == (method in ("mergelor2c", "injectlor2c", "imlor2c"))


@pytest.mark.parametrize("method", METHODS)
def test_preset_overrides_win_and_are_validated(method):
    config = LoR2CConfig.for_method(method, r=64, lora_alpha=32, lora_dropout=0.05)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 32, 0.05)
    assert config.inject_r == 32
    if method in ("mergelor2c", "imlor2c"):
        assert LoR2CConfig.for_method(method, num_merges=8).num_merges == 8
    with pytest.raises(ConfigError, match="r="):
        LoR2CConfig.for_method(method, r=0)


# --- one source of truth for the method (issue 20, item 1) ---------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_the_method_name_sets_its_fields(method):
    """`LoR2CConfig(method=...)` trains that method: the name fills share_a, M and N (it used to be a label only)."""
    config = LoR2CConfig(method=method)
    assert (config.share_a, config.num_merges, config.num_injects) == (
        method == "sharelor2c", 4 * (method in ("mergelor2c", "imlor2c")), 4 * (method in ("injectlor2c", "imlor2c")))
    assert config == LoR2CConfig.for_method(method)
    (parsed,) = HfArgumentParser(LoR2CConfig).parse_args_into_dataclasses(args=["--method", method])
    assert parsed == config  # the run_glue pattern: --method alone trains the method it names


@pytest.mark.parametrize("fields,method", [({}, "lor2c"), ({"share_a": True}, "sharelor2c"), ({"num_merges": 2}, "mergelor2c"),
                                           ({"num_injects": 1}, "injectlor2c"), ({"num_merges": 1, "num_injects": 2}, "imlor2c"),
                                           ({"share_a": True, "num_merges": 2, "num_injects": 2}, "imlor2c")])
def test_an_unset_method_follows_from_the_fields(fields, method):
    assert LoR2CConfig(**fields).method == method
    assert LoR2CConfig.from_dict(LoR2CConfig(**fields).to_dict()) == LoR2CConfig(**fields)


CONTRADICTIONS = [("lor2c", {"num_merges": 2}, "num_merges=2"), ("sharelor2c", {"share_a": False}, "share_a=False"),
                  ("imlor2c", {"num_merges": 0}, "num_merges=0"), ("mergelor2c", {"num_injects": 1}, "num_injects=1"),
                  ("injectlor2c", {"num_injects": 0}, "num_injects=0"), ("lor2c", {"share_a": True}, "share_a=True")]


@pytest.mark.parametrize("method,fields,named", CONTRADICTIONS, ids=[f"{m}-{n}" for m, _, n in CONTRADICTIONS])
def test_a_method_that_contradicts_its_fields_is_refused_by_name(method, fields, named):
    with pytest.raises(ConfigError, match=rf"LoR2CConfig.method='{method}' contradicts .*{named}.*describe"):
        LoR2CConfig(method=method, **fields)
    with pytest.raises(ConfigError, match="contradicts"):
        HfArgumentParser(LoR2CConfig).parse_args_into_dataclasses(
            args=["--method", method, *[a for k, v in fields.items() for a in (f"--{k}", str(v))]])


def test_replace_lets_the_method_follow_new_event_counts():
    """A search trial changes M and N: the trial's method follows them (and an explicit one is still checked)."""
    base = LoR2CConfig.for_method("imlor2c", r=4)
    assert base.replace(num_merges=0, num_injects=0).method == "lor2c"
    assert base.replace(num_injects=0).method == "mergelor2c"
    assert base.replace(r=8).method == "imlor2c"
    with pytest.raises(ConfigError, match="contradicts"):
        base.replace(method="lor2c", num_merges=1)


@pytest.mark.parametrize("name", ["lora_alpha", "inject_alpha"])
def test_an_alpha_that_would_overflow_the_forward_is_refused(name):
    with pytest.raises(ConfigError, match=rf"LoR2CConfig.{name}=1e\+308 is invalid: expected a number in \(0, 1e\+06\]"):
        LoR2CConfig(**{name: 1e308})


# --- serialisation -------------------------------------------------------------------------------------------


def _non_default_config() -> LoR2CConfig:
    return LoR2CConfig.for_method(
        "imlor2c", r=16, lora_alpha=32.0, lora_dropout=0.05, num_merges=3, num_injects=2, sfs_top_k=3,
        merge_criterion="official", merge_keep="official", inject_r=6, inject_alpha=12.0, inject_dropout=0.0,
        inject_target_modules=["q_proj", "v_proj"], schedule="steps", blocks_path="model.layers",
        modules_to_save=["score"], base_model_name_or_path="some/model",
    )


def test_to_dict_from_dict_round_trip():
    config = _non_default_config()
    data = config.to_dict()
    assert data["peft_type"] == "LOR2C"
    assert {f.name for f in dataclasses.fields(LoR2CConfig)} <= set(data)
    assert LoR2CConfig.from_dict(data) == config


def test_json_round_trip_through_a_file(tmp_path):
    config = _non_default_config()
    (tmp_path / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
    assert json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))["method"] == "imlor2c"
    assert LoR2CConfig.from_pretrained(str(tmp_path)) == config


@pytest.mark.parametrize("content, reason", [(b'{"method": "lor2c", "r": 8', "not valid JSON"),
                                             (b"\xff\xfe{}", "not UTF-8 text"), (b"[1, 2]", "holds a JSON list; expected an object"),
                                             (b"[" * 100_000 + b"]" * 100_000, "nests its JSON more than 16 levels deep"),
                                             (b'{"r": "8"}', "LoR2CConfig.r='8' is invalid")])
def test_from_pretrained_names_the_file_and_what_is_wrong_with_it(tmp_path, content, reason):
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(AdapterLoadError, match=reason) as failure:
        LoR2CConfig.from_pretrained(str(tmp_path))
    assert str(tmp_path / CONFIG_NAME) in str(failure.value)


def test_from_dict_rejects_unknown_fields_by_name():
    data = LoR2CConfig().to_dict()
    data["rank"] = 8
    with pytest.raises(ConfigError, match="rank"):
        LoR2CConfig.from_dict(data)


def test_from_dict_validates_values():
    data = LoR2CConfig().to_dict()
    data["merge_keep"] = "newest"
    with pytest.raises(ConfigError, match="merge_keep="):
        LoR2CConfig.from_dict(data)


def test_single_string_target_becomes_a_list():
    config = LoR2CConfig(inject_target_modules="q_proj", modules_to_save="classifier")
    assert config.inject_target_modules == ["q_proj"]
    assert config.modules_to_save == ["classifier"]


# --- command line --------------------------------------------------------------------------------------------


def test_every_field_has_help():
    missing = [f.name for f in dataclasses.fields(LoR2CConfig) if not f.metadata.get("help")]
    assert missing == []


def test_hf_argument_parser_parses_a_command_line():
    parser = HfArgumentParser(LoR2CConfig)
    (config,) = parser.parse_args_into_dataclasses(
        args=[
            "--method", "imlor2c", "--r", "64", "--lora_alpha", "32", "--lora_dropout", "0.05",
            "--num_merges", "8", "--num_injects", "8", "--merge_criterion", "official", "--share_a", "false",
            "--inject_target_modules", "q_proj", "v_proj", "--schedule", "steps", "--inject_r", "32",
        ]
    )
    assert isinstance(config, LoR2CConfig)
    assert config == LoR2CConfig(
        method="imlor2c", r=64, lora_alpha=32, lora_dropout=0.05, num_merges=8, num_injects=8,
        merge_criterion="official", inject_target_modules=["q_proj", "v_proj"], schedule="steps", inject_r=32,
    )


def test_hf_argument_parser_help_shows_field_help():
    help_text = " ".join(HfArgumentParser(LoR2CConfig).format_help().split())
    for f in dataclasses.fields(LoR2CConfig):
        assert f"--{f.name}" in help_text
    assert "Rank r of each low-rank residual connection" in help_text


def test_hf_argument_parser_rejects_invalid_value_with_config_error():
    parser = HfArgumentParser(LoR2CConfig)
    with pytest.raises(ConfigError, match="schedule="):
        parser.parse_args_into_dataclasses(args=["--schedule", "weekly"])


# --- checks that need the model (get_lor2c_model) -----------------------------------------------------------


def _requires_grad(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def _assert_rejected(model: nn.Module, config: LoR2CConfig, *fragments: str) -> str:
    """get_lor2c_model fails with a message holding every fragment, and leaves the model as it was."""
    before_grad, before_hooks = _requires_grad(model), _count_hooks(model)
    with pytest.raises(ValueError) as info:
        get_lor2c_model(model, config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert _requires_grad(model) == before_grad
    assert _count_hooks(model) == before_hooks
    return message


def _count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_rank_above_hidden_size():
    model = tiny_model("llama", num_layers=4)  # hidden size 32
    message = _assert_rejected(model, LoR2CConfig(r=33), "r=33", "32", "LlamaForCausalLM")
    get_lor2c_model(tiny_model("llama", num_layers=4), LoR2CConfig(r=32))  # the boundary is allowed
    assert message


def test_rank_error_is_a_config_error():
    with pytest.raises(ConfigError):
        get_lor2c_model(tiny_model("bert", num_layers=2), LoR2CConfig(r=64))


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"num_merges": 4}, "num_merges=4"),  # 4 blocks allow at most 3 merges
        ({"num_injects": 5}, "num_injects=5"),
        ({"num_merges": 2, "num_injects": 3}, "num_merges + num_injects"),
        ({"num_merges": 3, "num_injects": 1}, "num_merges + num_injects = 4 equals"),  # the inject would always be skipped
    ],
)
def test_too_many_events_for_the_depth(overrides, fragment):
    model = tiny_model("roberta", num_layers=4)
    _assert_rejected(model, LoR2CConfig(**overrides), fragment, "4 blocks")
    with pytest.raises(ConfigError):
        get_lor2c_model(tiny_model("roberta", num_layers=4), LoR2CConfig(**overrides))


def test_events_that_fit_the_depth_are_accepted():
    model = get_lor2c_model(tiny_model("roberta", num_layers=4), LoR2CConfig(num_merges=2, num_injects=1))
    assert model.num_blocks == 4


def test_inject_target_modules_that_do_not_exist_name_the_block():
    model = tiny_model("llama", num_layers=3)
    config = LoR2CConfig(num_injects=1, inject_target_modules=["q_proj", "query"])
    message = _assert_rejected(model, config, "inject_target_modules", "'query'", "block 0", "LlamaDecoderLayer")
    assert "q_proj" in message  # lists the projections that do exist


def test_ambiguous_inject_target_is_rejected():
    # 'proj' is the suffix of nothing, 'dense' matches several modules of a BERT block.
    _assert_rejected(tiny_model("bert", num_layers=2), LoR2CConfig(num_injects=1, inject_target_modules=["dense"]),
                     "inject_target_modules", "'dense'", "block 0")


def test_missing_modules_to_save_is_rejected():
    _assert_rejected(tiny_model("bert", num_layers=2), LoR2CConfig(modules_to_save=["score"]), "modules_to_save", "score")


class NoBlockStack(nn.Module):
    """A model whose blocks live in an nn.Sequential, so there is no ModuleList to find."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.trunk = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.embed(ids))


def test_model_without_block_stack_names_class_and_attributes_looked_for():
    message = _assert_rejected(NoBlockStack(), LoR2CConfig(r=4), "NoBlockStack", "blocks_path")
    for attribute in ("encoder.layer", "layers", "h", "decoder.layers", "transformer.layer"):
        assert repr(attribute) in message, message


def test_wrong_blocks_path_is_named():
    _assert_rejected(tiny_model("llama", num_layers=2), LoR2CConfig(blocks_path="model.stack"),
                     "blocks_path='model.stack'", "LlamaForCausalLM")


def test_explicit_blocks_path_is_used():
    model = get_lor2c_model(tiny_model("llama", num_layers=3), LoR2CConfig(blocks_path="model.layers"))
    assert model.blocks_path == "model.layers" and model.num_blocks == 3
