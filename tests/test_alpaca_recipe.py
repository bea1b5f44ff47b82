"""recipes/alpaca.py end to end through its command line, on a tiny Llama saved to a folder and 20 real
Alpaca seed tasks, for every method; its YAML configs; and its one-line errors on bad input.

The held-out loss the recipe reports is checked against a computation written here: the adapter it saved is
reloaded onto a fresh copy of the base, and the loss is summed token by token over prompts built from this
file's own copy of the Alpaca template.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import types

import datasets
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load as safetensors_load, load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lor2c_hf
from hub_server import HubStandIn
from tiny_pretrained import REPO, offline_env, run_cli, save_tiny_pretrained

sys.path.insert(0, os.path.join(REPO, "recipes"))
import alpaca  # noqa: E402  (the recipe module, for its method list and fixed instructions)
from common import RecipeError, available_methods, derive_gradient_accumulation, load_data, run_recipe  # noqa: E402

SCRIPT = os.path.join(REPO, "recipes", "alpaca.py")
SAMPLE = os.path.join(REPO, "tests", "data", "alpaca_seed_sample.jsonl")
CONFIGS = sorted(glob.glob(os.path.join(REPO, "recipes", "configs", "alpaca_*.yaml")))
NUM_LAYERS, CUTOFF, HELD_OUT, SEED = 6, 64, 4, 42

# The Stanford Alpaca prompt template, copied here from the Alpaca repository (not from the recipe).
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def template(row: dict) -> str:
    return (WITH_INPUT if row.get("input") else NO_INPUT).format(**row)


def read_rows() -> list[dict]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("alpaca")
    texts = [template(r) + r["output"] for r in read_rows()] + [template({"instruction": i, "input": x}) for i, x in alpaca.SHOWCASE]
    save_tiny_pretrained(str(root / "model"), texts, num_layers=NUM_LAYERS)
    return root


def tiny_args(workdir, out: str, method: str) -> list[str]:
    return [
        "--method", method, "--model_name_or_path", str(workdir / "model"), "--dataset_name", SAMPLE,
        "--output_dir", out, "--val_set_size", str(HELD_OUT), "--cutoff_len", str(CUTOFF),
        "--global_batch_size", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", str(HELD_OUT),
        "--max_steps", "8", "--warmup_steps", "0", "--r", "8", "--lora_alpha", "16", "--inject_r", "4",
        "--num_merges", "2", "--num_injects", "2", "--max_new_tokens", "4", "--eval_strategy", "no",
        "--save_strategy", "no", "--logging_steps", "1", "--bf16", "false", "--report_to", "none",
    ]


def reload_adapter(model_dir: str, adapter_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh base with the saved adapter, by the loader of the adapter's own format."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type == "LORA":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter_dir).eval()
    if peft_type == "LOR2C":
        return lor2c_hf.LoR2CModel.from_pretrained(base, adapter_dir).eval()
    return lor2c_hf.ResLoRAModel.from_pretrained(base, adapter_dir).eval()


def held_out_loss(model: torch.nn.Module, tokenizer, rows: list[dict], train_on_inputs: bool) -> float:
    """Mean next-token loss over every label token of the held-out rows (cutoff, EOS and masking per alpaca-lora)."""
    total, count = 0.0, 0
    for row in rows:
        prompt = template(row)
        ids = tokenizer(prompt + row["output"], truncation=True, max_length=CUTOFF)["input_ids"]
        if len(ids) < CUTOFF:
            ids = ids + [tokenizer.eos_token_id]
        first = 1 if train_on_inputs else max(1, len(tokenizer(prompt, truncation=True, max_length=CUTOFF)["input_ids"]))
        if first >= len(ids):
            continue  # nothing to predict: the recipe drops such examples
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(first, len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    return total / count


def expected_events(method: str) -> tuple[int, int]:
    return (2 if method in ("mergelor2c", "imlor2c") else 0, 2 if method in ("injectlor2c", "imlor2c") else 0)


# Precision and memory options, spread over the methods so that each is exercised once.
VARIANTS = {"lor2c": ["--bf16", "true", "--use_cpu", "true"], "lora": ["--gradient_checkpointing"],
            "sharelor2c": ["--gradient_checkpointing"]}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_evaluates_generates_and_saves(workdir, method):
    out = str(workdir / f"out-{method}")
    argv = [SCRIPT] + tiny_args(workdir, out, method) + VARIANTS.get(method, [])
    bf16 = "--bf16" in VARIANTS.get(method, [])
    train_on_inputs = method != "imlor2c"
    if method == "imlor2c":  # the paper's config file, overridden for the tiny model; response-only loss
        argv += ["--config", os.path.join(REPO, "recipes", "configs", "alpaca_imlor2c.yaml"), "--train_on_inputs", "false"]
    result = run_cli(argv, cwd=str(workdir), env=offline_env(str(workdir)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "global batch 4 = 2 per device x 2 accumulation x 1 process(es)" in result.stdout

    with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)
    with open(os.path.join(out, "generations.json"), encoding="utf-8") as f:
        generations = json.load(f)
    assert [(g["instruction"], g["input"]) for g in generations] == [tuple(s) for s in alpaca.SHOWCASE]
    assert all(isinstance(g["response"], str) for g in generations)
    assert result.stdout.count("[alpaca] ### Response:") == len(alpaca.SHOWCASE)

    model = reload_adapter(str(workdir / "model"), out, torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    rows = datasets.Dataset.from_list(read_rows()).train_test_split(test_size=HELD_OUT, shuffle=True, seed=SEED)["test"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected = held_out_loss(model, tokenizer, list(rows), train_on_inputs)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-2 if bf16 else 1e-4)

    if method in lor2c_hf.METHODS:
        events = model.structure["events"]
        merges, injects = expected_events(method)
        assert sum(e["kind"] == "merge" for e in events) == merges
        assert sum(e["kind"] == "inject" for e in events) == injects
        assert len(model.structure["spans"]) + len(model.structure["injected"]) == NUM_LAYERS - merges
    elif method == "reslora":
        assert model.structure["method"] == "reslora"
    if method == "imlor2c":  # values the YAML set and the command line did not override
        args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
        assert (args.learning_rate, args.gradient_accumulation_steps, args.lr_scheduler_type.value) == (3e-4, 2, "linear")
        assert model.lor2c_config.inject_alpha == 16 and model.lor2c_config.schedule == "steps"


def test_push_to_hub_uploads_the_trained_adapter_over_http(workdir, tmp_path):
    """--push_to_hub --hub_model_id: the adapter the run saved, and its model card, reach a Hub (a local stand-in
    of its HTTP API, reached through HF_ENDPOINT as a mirror would be)."""
    out, repo = str(tmp_path / "pushed"), "user/tiny-alpaca-lor2c"
    argv = [SCRIPT] + tiny_args(workdir, out, "lor2c") + ["--max_steps", "2", "--max_new_tokens", "0",
                                                          "--push_to_hub", "--hub_model_id", repo]
    with HubStandIn(tmp_path / "hub") as hub:
        env = offline_env(str(tmp_path), HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                          HF_TOKEN=hub.token, HF_HUB_CACHE=str(tmp_path / "cache"))
        result = run_cli(argv, cwd=str(tmp_path), env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        files = hub.files(repo)
    with open(os.path.join(out, "adapter_config.json"), "rb") as f:
        assert json.loads(files["adapter_config.json"]) == json.loads(f.read())
    pushed, saved = safetensors_load(files["adapter_model.safetensors"]), load_file(os.path.join(out, "adapter_model.safetensors"))
    assert pushed.keys() == saved.keys()
    for key in saved:
        assert torch.equal(pushed[key], saved[key]), key
    (tmp_path / "pushed.safetensors").write_bytes(files["adapter_model.safetensors"])
    metadata = [safe_open(str(p), framework="pt").metadata() for p in (tmp_path / "pushed.safetensors", os.path.join(out, "adapter_model.safetensors"))]
    assert metadata[0] == metadata[1]
    card = files["README.md"].decode()
    assert "lor2c" in card.lower() and "eval_loss" in card
    assert f"[alpaca] pushed to {repo}" in result.stdout


# --- arguments and configs -----------------------------------------------------------------------------------


def parse(argv: list[str]):
    parser = alpaca.RecipeArgumentParser(alpaca.SECTIONS)
    return parser.parse(argv, defaults=alpaca.PAPER_DEFAULTS)


def plain(value):
    return getattr(value, "value", value)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_yaml_config_parses_and_keeps_the_paper_settings(path):
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert set(raw) == {"model", "adapter", "data", "training"}
    parsed = dict(zip(alpaca.SECTIONS, parse(["--config", path, "--bf16", "false"])))
    name = os.path.basename(path)[len("alpaca_"):-len(".yaml")]
    assert parsed["adapter"].method == name.split("_")[0]
    for section, entries in raw.items():
        for key, value in entries.items():
            got = plain(getattr(parsed[section], key))
            if key not in ("bf16", "report_to"):  # bf16 is overridden here; report_to "none" becomes []
                assert got == pytest.approx(value) if isinstance(value, float) else got == value, (section, key)
            if key in alpaca.PAPER_DEFAULTS and key not in ("method", "bf16", "output_dir"):
                assert got == pytest.approx(alpaca.PAPER_DEFAULTS[key]), f"{name}: {key} drifted from the paper default"


def test_defaults_are_the_paper_setup_and_cli_overrides_yaml():
    model, adapter, data, training = parse(["--bf16", "false"])
    assert model.model_name_or_path == "meta-llama/Llama-2-7b-hf" and data.dataset_name == "yahma/alpaca-cleaned"
    assert (data.val_set_size, data.cutoff_len, data.train_on_inputs) == (2000, 256, True)
    assert (adapter.method, adapter.r, adapter.lora_alpha, adapter.lora_dropout) == ("imlor2c", 64, 32, 0.05)
    assert (adapter.inject_r, adapter.inject_alpha, adapter.num_merges, adapter.num_injects, adapter.schedule) == (32, 16, 8, 8, "steps")
    assert (training.num_train_epochs, training.global_batch_size, training.learning_rate, training.warmup_steps) == (3, 128, 3e-4, 100)
    assert (plain(training.lr_scheduler_type), plain(training.optim)) == ("linear", "adamw_torch")

    config = os.path.join(REPO, "recipes", "configs", "alpaca_lora.yaml")
    _, adapter, data, training = parse(["--config", config, "--bf16", "false", "--r", "16", "--val_set_size", "10"])
    assert (adapter.method, adapter.r, adapter.lora_alpha, data.val_set_size) == ("lora", 16, 32, 10)


@pytest.mark.parametrize("per_device, world, accumulation", [(4, 1, 32), (4, 2, 16), (4, 8, 4), (16, 8, 1)])
def test_accumulation_is_derived_from_the_global_batch(per_device, world, accumulation):
    ns = types.SimpleNamespace(per_device_train_batch_size=per_device, global_batch_size=128, gradient_accumulation_steps=1)
    derive_gradient_accumulation(ns, world_size=world)
    assert ns.gradient_accumulation_steps == accumulation
    assert ns.per_device_train_batch_size * ns.gradient_accumulation_steps * world == 128


def write_local_data(rows: list[dict], directory, fmt: str) -> str:
    """`rows` in one of the local forms --dataset_name accepts."""
    ds = datasets.Dataset.from_list(rows)
    if fmt == "json":  # one JSON list, like Stanford Alpaca's alpaca_data.json
        path = directory / "alpaca.json"
        path.write_text(json.dumps(rows))
    elif fmt in ("jsonl", "parquet", "csv"):
        path = directory / f"alpaca.{fmt}"
        {"jsonl": ds.to_json, "parquet": ds.to_parquet, "csv": ds.to_csv}[fmt](str(path))
    elif fmt == "arrow":  # the Arrow file save_to_disk writes, on its own
        ds.save_to_disk(str(directory / "disk"))
        path = directory / "alpaca.arrow"
        path.write_bytes(next((directory / "disk").glob("*.arrow")).read_bytes())
    elif fmt == "save_to_disk":
        path = directory / "saved"
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(path))
    else:  # a folder of data files, as on the Hub
        path = directory / "folder"
        path.mkdir()
        ds.to_json(str(path / "train.jsonl"))
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "arrow", "save_to_disk", "folder"])
def test_local_data_in_every_accepted_form_loads_the_same_rows(tmp_path, fmt):
    rows = read_rows()
    loaded = load_data(write_local_data(rows, tmp_path, fmt))
    normalize = lambda r: {k: r[k] or "" for k in ("instruction", "input", "output")}  # CSV reads "" back as None
    assert [normalize(r) for r in loaded] == [normalize(r) for r in rows]


def test_a_save_to_disk_folder_without_a_train_split_is_a_clear_error(tmp_path):
    path = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(read_rows())}).save_to_disk(str(path))
    with pytest.raises(RecipeError, match=r"has splits \['test'\] but no 'train' split"):
        load_data(str(path))


# --- bad input: one line, before training --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrong_columns(workdir):
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"], "completion": r["output"]}) + "\n" for r in read_rows()))
    return str(path)


@pytest.fixture(scope="module")
def typo_config(workdir):
    path = workdir / "typo.yaml"
    path.write_text("training:\n  lerning_rate: 0.1\n")
    return str(path)


@pytest.fixture(scope="module")
def bad_data(workdir):
    """Data files with one defect each: no rows, latin-1 bytes, numbers as outputs, null instructions."""
    rows = read_rows()[:6]
    files = {
        "empty": "",
        "latin1": None,
        "numeric": "".join(json.dumps({**r, "output": i}) + "\n" for i, r in enumerate(rows)),
        "null": "".join(json.dumps({**r, "instruction": None if i == 3 else r["instruction"]}) + "\n" for i, r in enumerate(rows)),
    }
    paths = {}
    for name, text in files.items():
        path = workdir / f"bad-{name}.jsonl"
        if text is None:
            path.write_bytes("".join(json.dumps({**r, "output": "caf\u00e9"}, ensure_ascii=False) + "\n" for r in rows).encode("latin-1"))
        else:
            path.write_text(text, encoding="utf-8")
        paths[name] = str(path)
    return paths


BNB_ON_GPU = bool(torch.cuda.is_available() and __import__("importlib").util.find_spec("bitsandbytes"))
BAD_INPUTS = {
    "unknown-method": (["--method", "dora"], "--method 'dora' is unknown: expected one of lora, lor2c"),
    "missing-model-path": (["--model_name_or_path", "/nonexistent/tiny-llama"], "--model_name_or_path /nonexistent/tiny-llama: no such file or folder; pass a folder saved with save_pretrained"),
    "missing-data-path": (["--dataset_name", "./no/such/alpaca.jsonl"], "--dataset_name ./no/such/alpaca.jsonl: no such file or folder; pass a json/jsonl/parquet/arrow/csv file"),
    "wrong-columns": (["--dataset_name", "{wrong_columns}"], "lacks ['instruction', 'output']"),
    "indivisible-batch": (["--global_batch_size", "6", "--per_device_train_batch_size", "4"], "--global_batch_size 6 is not a multiple of --per_device_train_batch_size 4 x 1 process(es) = 4"),
    "contradicting-accumulation": (["--gradient_accumulation_steps", "3"], "--gradient_accumulation_steps 3 contradicts --global_batch_size 4"),
    "too-many-held-out": (["--val_set_size", "20"], "--val_set_size 20 leaves no training data"),
    "rank-above-hidden": (["--r", "64"], "--method lor2c: LoR2CConfig.r=64 exceeds the hidden size 32"),
    "push-without-repo": (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    "both-quantizations": (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other"),
    "yaml-typo": (["--config", "{typo_config}"], "'lerning_rate' is not a field of section 'training'"),
    "cli-typo": (["--lerning_rate", "0.1"], "unrecognized arguments: --lerning_rate 0.1"),
    "empty-data-file": (["--dataset_name", "{empty}"], "bad-empty.jsonl is empty; pass a json/jsonl"),
    "latin1-data-file": (["--dataset_name", "{latin1}"], "bad-latin1.jsonl line 1 is not UTF-8 text (byte 0xe9)"),
    "numeric-outputs": (["--dataset_name", "{numeric}"], "row 0 has output=0 (int); expected text (a string) in every row"),
    "null-instruction": (["--dataset_name", "{null}"], "row 3 has instruction=None (NoneType); expected text (a string)"),
    "zero-cutoff": (["--cutoff_len", "0"], "--cutoff_len 0 must be a positive integer"),
    "negative-cutoff": (["--cutoff_len", "-5"], "--cutoff_len -5 must be a positive integer"),
    "every-example-masked": (["--train_on_inputs", "false", "--cutoff_len", "8"], "every training example of --dataset_name"),
    "negative-max-train-samples": (["--max_train_samples", "-3"], "--max_train_samples -3 must be a positive integer"),
    "negative-epochs": (["--max_steps", "-1", "--num_train_epochs", "-1"], "--num_train_epochs -1.0 must be a positive number"),
    "lora-rank-zero": (["--method", "lora", "--r", "0"], "--method lora: --r 0 must be a positive integer"),
    "infinite-alpha": (["--lora_alpha", "inf"], "LoR2CConfig.lora_alpha=inf is invalid: expected a number in (0, 1e+06]"),
    "negative-learning-rate": (["--learning_rate", "-1"], "--learning_rate -1.0 must be a finite positive number"),
    "resume-without-checkpoints": (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: {out} has no checkpoint-* folder"),
}
if not BNB_ON_GPU:
    BAD_INPUTS["4bit-without-bitsandbytes-gpu"] = (["--load_in_4bit"], "--load_in_4bit needs")
    BAD_INPUTS["8bit-without-bitsandbytes-gpu"] = (["--load_in_8bit"], "--load_in_8bit needs")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_training(workdir, wrong_columns, typo_config, bad_data, capsys, case):
    extra, expected = BAD_INPUTS[case]
    extra = [a.format(wrong_columns=wrong_columns, typo_config=typo_config, **bad_data) for a in extra]
    out = workdir / f"bad-{case}"
    rc = run_recipe(alpaca.main, tiny_args(workdir, str(out), "lor2c") + extra, prog="alpaca.py")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alpaca.py: error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert expected.format(out=out) in errors[0]
    assert not out.exists(), "nothing may be written before the error"


def test_default_run_without_hub_says_what_to_pass(workdir):
    """No arguments = the paper's setup; with no Hub the CLI prints the global batch, then one error line."""
    result = run_cli([SCRIPT, "--bf16", "false", "--output_dir", str(workdir / "default")], cwd=str(workdir))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "global batch 128 = 4 per device x 32 accumulation x 1 process(es)" in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("alpaca.py: error: --model_name_or_path meta-llama/Llama-2-7b-hf could not be loaded")
    assert "Pass a folder saved with save_pretrained (config.json + weights) or a Hub id you can reach" in errors[0]


def test_dataset_not_on_disk_and_no_hub_says_what_to_pass(workdir):
    argv = [SCRIPT, "--model_name_or_path", str(workdir / "model"), "--bf16", "false", "--output_dir", str(workdir / "nodata")]
    result = run_cli(argv, cwd=str(workdir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("alpaca.py: error: --dataset_name yahma/alpaca-cleaned could not be loaded")
    assert "Pass a json/jsonl/parquet/arrow/csv file, a folder written by Dataset.save_to_disk" in errors[0]


def test_recipe_error_is_raised_not_swallowed_by_main(workdir):
    """`main` raises RecipeError itself (the one-line printing is run_recipe's job), so callers can catch it."""
    with pytest.raises(RecipeError, match="unknown"):
        alpaca.main(tiny_args(workdir, str(workdir / "raise"), "nope"))


def test_resume_from_checkpoint_true_on_the_command_line_resumes_exactly(workdir, tmp_path, caplog):
    """`--resume_from_checkpoint True` (the string 'True' on a command line) resumes from the newest checkpoint in
    --output_dir: with the last checkpoint and the final adapter removed, the resumed run ends where the whole run did."""
    out = str(tmp_path / "run")
    argv = tiny_args(workdir, out, "imlor2c") + ["--save_strategy", "steps", "--save_steps", "4", "--max_new_tokens", "1"]
    assert run_recipe(alpaca.main, argv, prog="alpaca.py") == 0
    whole = load_file(os.path.join(out, "adapter_model.safetensors"))
    steps = [e["step"] for e in reload_adapter(str(workdir / "model"), out).structure["events"]]
    for name in glob.glob(os.path.join(out, "checkpoint-8")) + glob.glob(os.path.join(out, "adapter_*")):
        shutil.rmtree(name) if os.path.isdir(name) else os.remove(name)
    assert sorted(os.listdir(out)).count("checkpoint-4") == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="lor2c_hf"):
        assert run_recipe(alpaca.main, argv + ["--resume_from_checkpoint", "True"], prog="alpaca.py") == 0
    logged = [r.getMessage() for r in caplog.records if " merge: " in r.getMessage() or " inject: " in r.getMessage()]
    assert min(steps) <= 4 and len(logged) == sum(step > 4 for step in steps)  # events before checkpoint-4 came from it
    resumed = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)
