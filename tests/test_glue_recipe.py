"""recipes/glue.py end to end through its command line, on a tiny RoBERTa saved to a folder and tiny GLUE TSV
files written here in GLUE's own layouts, for every method; its YAML configs; its offline GLUE metrics; its
one-line errors on bad input.

Every score the recipe reports is checked against a computation written here: the adapter it saved is
reloaded onto a fresh copy of the base, the dev sentences this file wrote are scored by a plain forward pass,
and scikit-learn / SciPy compute the metric.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lor2c_hf
from tiny_pretrained import REPO, offline_env, run_cli, save_tiny_pretrained

sys.path.insert(0, os.path.join(REPO, "recipes"))
import glue  # noqa: E402  (the recipe module: its task table, parser and TSV reader)
from common import RecipeError, available_methods, run_recipe  # noqa: E402

SCRIPT = os.path.join(REPO, "recipes", "glue.py")
CONFIGS = sorted(glob.glob(os.path.join(REPO, "recipes", "configs", "glue_*.yaml")))
NUM_LAYERS, EPOCHS, TRAIN_ROWS, DEV_ROWS = 4, 2, 32, 24
POSITIVE = "good great fine lovely superb charming".split()
NEGATIVE = "bad awful dull poor boring clumsy".split()
FILLER = "the movie film is was very a plot acting story cast".split()
WORDS = POSITIVE + NEGATIVE + FILLER
ENTAILMENT = ("entailment", "not_entailment")

# --- GLUE files in GLUE's own layouts, written here --------------------------------------------------------


def phrase(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def task_rows(task: str, n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(sentence1, sentence2 or '', raw label as GLUE writes it)."""
    rows = []
    for i in range(n):
        label = i % 2
        if task in ("sst2", "cola"):
            rows.append((phrase(rng, label), "", str(label)))
        elif task == "stsb":
            rows.append((phrase(rng, label), phrase(rng, rng.randint(0, 1)), f"{rng.uniform(0, 5):.3f}"))
        elif task == "mrpc":
            rows.append((phrase(rng, label), phrase(rng, label), str(label)))
        else:
            rows.append((phrase(rng, label), phrase(rng, label), ENTAILMENT[label]))
    return rows


def tsv_lines(task: str, rows: list[tuple[str, str, str]], carriage_return: bool = False) -> list[str]:
    """GLUE's layout of each task (header or not, where each column is)."""
    if task == "sst2":  # one public copy of GLUE's SST-2 train.tsv has a carriage return before each tab
        sep = "\r\t" if carriage_return else "\t"
        return ["sentence\tlabel"] + [f"{a}{sep}{y}" for a, _, y in rows]
    if task == "cola":
        return [f"gj04\t{y}\t{'' if y == '1' else '*'}\t{a}" for a, _, y in rows]
    if task == "mrpc":
        return ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [f"{y}\t{100 + i}\t{200 + i}\t{a}\t{b}" for i, (a, b, y) in enumerate(rows)]
    if task == "qnli":
        return ["index\tquestion\tsentence\tlabel"] + [f"{i}\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(rows)]
    if task == "rte":
        return ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(rows)]
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    return [header] + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(rows)]


def write_lines(path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def make_rows() -> dict[str, dict[str, list[tuple[str, str, str]]]]:
    rng = random.Random(0)
    return {name: {split: task_rows(name, n, rng) for split, n in (("train", TRAIN_ROWS), ("dev", DEV_ROWS))}
            for name in glue.TASKS}


ROWS = make_rows()  # what the files say, kept here to check what the recipe read and scored


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny RoBERTa with a tokenizer over WORDS (wide init, so an untrained head already gives varied
    predictions), and GLUE's folder with train.tsv and dev.tsv of every task."""
    root = tmp_path_factory.mktemp("glue")
    for name, task in glue.TASKS.items():
        for split, rows in ROWS[name].items():
            write_lines(root / "glue" / task.folder / f"{split}.tsv", tsv_lines(name, rows, carriage_return=split == "train"))
    save_tiny_pretrained(str(root / "model"), [" ".join(WORDS)], model_type="roberta", head="cls",
                         num_layers=NUM_LAYERS, initializer_range=0.2)
    return root


def tiny_args(workdir, task: str, method: str, out: str) -> list[str]:
    """The task's paper config, shrunk for the tiny model: 2 epochs of 4 steps, M = N = 1."""
    return [
        "--config", os.path.join(REPO, "recipes", "configs", f"glue_{task}.yaml"),
        "--model_name_or_path", str(workdir / "model"), "--data_dir", str(workdir / "glue"), "--method", method,
        "--output_dir", out, "--num_train_epochs", str(EPOCHS), "--per_device_train_batch_size", "8",
        "--global_batch_size", "8", "--per_device_eval_batch_size", "16", "--num_merges", "1", "--num_injects", "1",
        "--max_seq_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--pre_num", "2",
    ]


# --- an independent score of a saved adapter ---------------------------------------------------------------


def reload_adapter(model_dir: str, adapter_dir: str, num_labels: int) -> torch.nn.Module:
    """A fresh base with the saved adapter, by the loader of the adapter's own format."""
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, ignore_mismatched_sizes=True)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type == "LORA":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter_dir).eval()
    return lor2c_hf.load_adapter_model(base, adapter_dir).eval()


def sklearn_metrics(task: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    if task == "stsb":
        return {"pearson": pearsonr(predictions, references)[0], "spearmanr": spearmanr(predictions, references)[0]}
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(references, predictions)}
    if task == "mrpc":
        return {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions)}
    return {"accuracy": accuracy_score(references, predictions)}


def independent_score(workdir, task: str, adapter_dir: str) -> dict[str, float]:
    rows = ROWS[task]["dev"]
    model = reload_adapter(str(workdir / "model"), adapter_dir, 1 if task == "stsb" else 2)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    pair = glue.TASKS[task].is_pair
    encoded = tokenizer([a for a, _, _ in rows], [b for _, b, _ in rows] if pair else None, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits
    if task == "stsb":
        return sklearn_metrics(task, logits[:, 0].double().numpy(), np.array([float(y) for _, _, y in rows]))
    labels = np.array([ENTAILMENT.index(y) if task in ("qnli", "rte") else int(y) for _, _, y in rows])
    return sklearn_metrics(task, logits.argmax(-1).numpy(), labels)


# --- every method, through the CLI -------------------------------------------------------------------------

RUNS = [("sst2", "lor2c"), ("sst2", "sharelor2c"), ("sst2", "imlor2c"), ("sst2", "reslora"),
        ("mrpc", "lora"), ("mrpc", "mergelor2c"), ("stsb", "injectlor2c")]
_trained: dict[tuple[str, str], tuple] = {}


def train_once(workdir, task: str, method: str):
    """(CompletedProcess, output folder) of one training run, shared by the tests that read it."""
    if (task, method) not in _trained:
        out = str(workdir / f"out-{task}-{method}")
        result = run_cli([SCRIPT] + tiny_args(workdir, task, method, out), cwd=str(workdir), env=offline_env(str(workdir)))
        _trained[task, method] = (result, out)
    return _trained[task, method]


def read_report(folder: str) -> dict:
    with open(os.path.join(folder, "glue_report.json"), encoding="utf-8") as f:
        return json.load(f)


def final_trainer_state(out: str) -> dict:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def test_runs_cover_every_method_and_each_kind_of_task():
    assert {m for _, m in RUNS} == set(available_methods())
    assert {t for t, _ in RUNS} >= {"sst2", "mrpc", "stsb"}  # single sentence, pair, regression


@pytest.mark.parametrize("task, method", RUNS, ids=[f"{t}-{m}" for t, m in RUNS])
def test_every_method_trains_scores_every_epoch_and_keeps_the_best(workdir, task, method):
    result, out = train_once(workdir, task, method)
    assert result.returncode == 0, result.stderr[-4000:]
    spec = glue.TASKS[task]
    assert f"[glue] {task} with {method}: {TRAIN_ROWS} training and {DEV_ROWS} dev examples" in result.stdout

    report = read_report(out)
    assert (report["task"], report["method"], report["mode"], report["eval_examples"]) == (task, method, "train", DEV_ROWS)
    assert report["eval_data"] == str(workdir / "glue" / spec.folder / "dev.tsv")
    expected = independent_score(workdir, task, out)
    assert set(report["metrics"]) == set(expected) | {"loss"}
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(value, abs=1e-5), name
    assert report["score"] == report["metrics"][spec.best_metric]
    with open(os.path.join(out, "glue_report.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert f"| {spec.best_metric} (best-model metric) | {report['score']:.4f} |" in markdown
    has_structure = method in lor2c_hf.METHODS  # LoR2C family: the structure is drawn and linked; LoRA/ResLoRA: none
    assert os.path.isfile(os.path.join(out, "structure.png")) == has_structure
    assert ("](structure.png)" in markdown) == has_structure

    state = final_trainer_state(out)
    evals = [h for h in state["log_history"] if f"eval_{spec.best_metric}" in h]
    assert [h["epoch"] for h in evals] == [float(e) for e in range(1, EPOCHS + 1)], "one evaluation per epoch"
    assert state["best_metric"] == pytest.approx(max(h[f"eval_{spec.best_metric}"] for h in evals))
    assert report["score"] == pytest.approx(state["best_metric"], abs=1e-6), "the saved adapter is the best epoch's"
    assert os.path.isdir(state["best_model_checkpoint"])

    if method in lor2c_hf.METHODS:  # events at the end of epoch 1 (eqs. 11-12 with E=2, M=N=1): in every checkpoint
        kinds = [e["kind"] for e in report["events"]]
        assert kinds.count("merge") == (1 if method in ("mergelor2c", "imlor2c") else 0)
        assert kinds.count("inject") == (1 if method in ("injectlor2c", "imlor2c") else 0)
        assert len(report["spans"]) + len(report["injected"]) == NUM_LAYERS - kinds.count("merge")
    if method == "imlor2c":  # YAML values the command line did not override
        args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
        assert (args.seed, args.warmup_steps, args.metric_for_best_model, args.load_best_model_at_end) == (17, 0.06, "accuracy", True)
        with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        assert (saved["r"], saved["lora_alpha"], saved["inject_r"], saved["inject_alpha"], saved["schedule"]) == (8, 16, 4, 16, "epochs")


@pytest.mark.parametrize("task, method, via", [("sst2", "imlor2c", "cli"), ("mrpc", "lora", "main")])
def test_eval_only_rescores_a_saved_adapter_into_json_and_markdown(workdir, task, method, via):
    trained, adapter = train_once(workdir, task, method)
    assert trained.returncode == 0, trained.stderr[-4000:]
    out = str(workdir / f"rescore-{task}-{method}")
    argv = ["--config", os.path.join(REPO, "recipes", "configs", f"glue_{task}.yaml"), "--eval_only", "--adapter", adapter,
            "--model_name_or_path", str(workdir / "model"), "--data_dir", str(workdir / "glue" / glue.TASKS[task].folder),
            "--output_dir", out, "--per_device_eval_batch_size", "5", "--max_seq_length", "64"]
    if via == "cli":
        result = run_cli([SCRIPT] + argv, cwd=str(workdir), env=offline_env(str(workdir)))
        assert result.returncode == 0, result.stderr[-4000:]
    else:  # the same entry point in this process (saves a start-up)
        assert run_recipe(glue.main, argv, prog="glue.py") == 0
    rescored, original = read_report(out), read_report(adapter)
    assert (rescored["mode"], rescored["method"], rescored["adapter"]) == ("eval_only", method, adapter)
    for name, value in original["metrics"].items():
        assert rescored["metrics"][name] == pytest.approx(value, abs=1e-5), name
    assert rescored["adapter_parameters"] == original["adapter_parameters"]
    assert not glob.glob(os.path.join(out, "checkpoint-*")) and not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "glue_report.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert markdown.startswith(f"# GLUE {task}: {method} (eval_only)") and f"{rescored['score']:.4f}" in markdown


# --- reading GLUE's TSV files ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(glue.TASKS))
@pytest.mark.parametrize("split", ["train", "dev"])
def test_each_task_is_read_from_its_glue_layout(workdir, task, split):
    spec = glue.TASKS[task]
    data = glue.read_glue_tsv(str(workdir / "glue" / spec.folder / f"{split}.tsv"), spec)
    rows = ROWS[task][split]
    assert data["sentence1"] == [a for a, _, _ in rows]
    if spec.is_pair:
        assert data["sentence2"] == [b for _, b, _ in rows]
    else:
        assert "sentence2" not in data.column_names
    if task == "stsb":
        assert data["label"] == pytest.approx([float(y) for _, _, y in rows], abs=1e-6)
    else:
        assert data["label"] == [spec.labels.index(y) for _, _, y in rows]
        assert data.features["label"].names == list(spec.label_names)


def test_data_dir_may_be_glue_folder_or_the_task_folder(workdir):
    for data_dir in (workdir / "glue", workdir / "glue" / "MRPC"):
        path = glue.tsv_path(str(data_dir), glue.TASKS["mrpc"], "validation")
        assert path == str(workdir / "glue" / "MRPC" / "dev.tsv")


# --- configs -------------------------------------------------------------------------------------------------

# SPEC §8 (epochs, batch, lr, max length) and SPEC §6 (best M, N), copied here from the spec.
SPEC_SETTINGS = {
    "sst2": dict(num_train_epochs=60, per_device_train_batch_size=32, learning_rate=5e-4),
    "mrpc": dict(num_train_epochs=30, per_device_train_batch_size=64, learning_rate=4e-4, num_merges=1, num_injects=4),
    "cola": dict(num_train_epochs=30, per_device_train_batch_size=16, num_merges=1, num_injects=3),
    "qnli": dict(num_train_epochs=30, per_device_train_batch_size=64),
    "rte": dict(num_train_epochs=80, per_device_train_batch_size=32, max_seq_length=512, num_merges=5),
    "stsb": dict(num_train_epochs=40, num_merges=4, num_injects=4),
}
ALL_TASKS = dict(model_name_or_path="roberta-base", method="imlor2c", r=8, lora_alpha=16, lora_dropout=0.1, inject_r=4,
                 inject_alpha=16, seed=17, warmup_steps=0.06, load_best_model_at_end=True, schedule="epochs")


def parse(argv: list[str]):
    return glue.parse_arguments(argv, glue.RECIPE_DEFAULTS, "glue.py")


def test_one_config_per_task():
    assert [os.path.basename(p) for p in CONFIGS] == sorted(f"glue_{t}.yaml" for t in glue.TASKS)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_parses_and_has_the_paper_settings(path, tmp_path):
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert set(raw) == {"model", "adapter", "data", "training"}
    task = raw["data"]["task_name"]
    assert os.path.basename(path) == f"glue_{task}.yaml"
    sections = parse(["--config", path, "--output_dir", str(tmp_path / "out")])
    values = {k: getattr(v, "value", v) for section in sections for k, v in vars(section).items()}
    for key, value in {**ALL_TASKS, **SPEC_SETTINGS[task]}.items():
        assert values[key] == pytest.approx(value) if isinstance(value, float) else values[key] == value, (task, key)
    assert values["global_batch_size"] == values["per_device_train_batch_size"]
    assert (values["eval_strategy"], values["save_strategy"]) == ("epoch", "epoch")
    assert values["metric_for_best_model"] == glue.TASKS[task].best_metric
    assert values["gradient_accumulation_steps"] == 1


def test_output_dir_defaults_to_task_and_method_and_cli_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(REPO, "recipes", "configs", "glue_cola.yaml")
    _, adapter, data, training = parse(["--config", config, "--method", "lora", "--learning_rate", "1e-3"])
    assert (adapter.method, data.task_name, training.learning_rate) == ("lora", "cola", 1e-3)
    assert training.output_dir == os.path.join("out", "glue_cola_lora")
    assert training.metric_for_best_model == "matthews_correlation"


# --- metrics -------------------------------------------------------------------------------------------------

METRIC_PROGRAM = """
import json, sys
from lor2c_hf.extras.glue_metric import load_glue_metric
cases = json.loads(sys.argv[1])
print(json.dumps({task: load_glue_metric(task).compute(predictions=p, references=r) for task, (p, r) in cases.items()}))
"""


def test_offline_glue_metrics_equal_scikit_learn_and_scipy(tmp_path):
    """`evaluate` loads the metric from lor2c_hf/extras/glue_metric.py in a process whose Hub address leads nowhere."""
    rng = np.random.default_rng(3)
    cases = {}
    for task in glue.TASKS:
        if task == "stsb":
            refs = rng.uniform(0, 5, 50)
            cases[task] = ((refs + rng.normal(0, 1.5, 50)).tolist(), refs.tolist())
        else:
            refs = rng.integers(0, 2, 50)
            cases[task] = (np.where(rng.random(50) < 0.7, refs, 1 - refs).tolist(), refs.tolist())
    env = offline_env(str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("HF_HUB_OFFLINE")
    result = run_cli(["-c", METRIC_PROGRAM, json.dumps(cases)], cwd=str(tmp_path), env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    computed = json.loads(result.stdout.strip().splitlines()[-1])
    for task, (predictions, references) in cases.items():
        expected = sklearn_metrics(task, np.array(predictions), np.array(references))
        assert computed[task] == pytest.approx(expected, abs=1e-12), task
        assert 0.2 < abs(list(expected.values())[0]) < 1  # a case where a wrong formula shows


def test_metric_module_rejects_an_unknown_task():
    from lor2c_hf.extras.glue_metric import load_glue_metric

    with pytest.raises(ValueError, match="unknown task 'mnli2'"):
        load_glue_metric("mnli2")


# --- bad input: one line, before training --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(workdir):
    """Folders of GLUE files with one defect each."""
    bad = workdir / "bad"
    good_sst2 = tsv_lines("sst2", ROWS["sst2"]["train"])
    cases = {
        "STS-B-no-score": ("stsb", [line.rsplit("\t", 1)[0] for line in tsv_lines("stsb", ROWS["stsb"]["train"])]),
        "SST-2-word-labels": ("sst2", good_sst2[:3] + ["a fine film\tpositive"]),
        "CoLA-short-row": ("cola", tsv_lines("cola", ROWS["cola"]["train"])[:2] + ["gj04\t1"]),
        "STS-B-word-score": ("stsb", tsv_lines("stsb", ROWS["stsb"]["train"])[:2] + ["9\tg\tf\ty\t0009\tn\tn\ta b\tc d\thigh"]),
    }
    for name, (task, lines) in cases.items():
        write_lines(bad / name / "train.tsv", lines)
        write_lines(bad / name / "dev.tsv", tsv_lines(task, ROWS[task]["dev"]))
    latin1 = bad / "SST-2-latin1"
    latin1.mkdir()
    (latin1 / "train.tsv").write_bytes("sentence\tlabel\na fine film\t1\na caf\u00e9 scene\t0\n".encode("latin-1"))
    write_lines(latin1 / "dev.tsv", tsv_lines("sst2", ROWS["sst2"]["dev"]))
    write_lines(bad / "SST-2-empty" / "train.tsv", [])
    write_lines(bad / "SST-2-empty" / "dev.tsv", tsv_lines("sst2", ROWS["sst2"]["dev"]))
    (bad / "not-an-adapter").mkdir()
    for name, text in {"adapter-not-json": '{"method": "lor2c", ', "adapter-list": '["lor2c"]',
                       "adapter-deep": "[" * 5000 + "]" * 5000}.items():
        (bad / name).mkdir()
        (bad / name / "adapter_config.json").write_text(text)
    return bad


BAD_INPUTS = {
    "unknown-method": ("sst2", ["--method", "dora"], "--method 'dora' is unknown: expected one of lora, lor2c"),
    "unknown-task": ("sst2", ["--task_name", "mnli2"], "--task_name 'mnli2' is unknown: expected one of sst2, mrpc, cola, qnli, rte, stsb"),
    "missing-model-path": ("sst2", ["--model_name_or_path", "/nonexistent/tiny-roberta"], "--model_name_or_path /nonexistent/tiny-roberta: no such file or folder; pass a folder saved with save_pretrained"),
    "missing-data-dir": ("sst2", ["--data_dir", "/nonexistent/glue"], "--data_dir /nonexistent/glue: no such folder; pass GLUE's data folder"),
    "pair-task-on-single-sentence-file": ("mrpc", ["--data_dir", "{glue}/SST-2"], "SST-2/train.tsv has columns ['sentence', 'label'] but lacks ['#1 String', '#2 String', 'Quality']; expected GLUE's MRPC layout"),
    "regression-file-without-score": ("stsb", ["--data_dir", "{bad}/STS-B-no-score"], "lacks ['score']; expected GLUE's STS-B layout"),
    "label-not-of-the-task": ("sst2", ["--data_dir", "{bad}/SST-2-word-labels"], "train.tsv line 4: label 'positive' is not one of ['0', '1'] (sst2)"),
    "row-too-short": ("cola", ["--data_dir", "{bad}/CoLA-short-row"], "train.tsv line 3 has 2 tab-separated fields, fewer than the 4 of GLUE's CoLA layout"),
    "score-not-a-number": ("stsb", ["--data_dir", "{bad}/STS-B-word-score"], "train.tsv line 3: score 'high' is not a number"),
    "task-files-absent": ("qnli", ["--data_dir", "{bad}/not-an-adapter"], "has neither QNLI/train.tsv nor train.tsv"),
    "indivisible-batch": ("sst2", ["--global_batch_size", "6"], "--global_batch_size 6 is not a multiple of --per_device_train_batch_size 8"),
    "eval-only-without-adapter": ("sst2", ["--eval_only"], "--eval_only needs --adapter <folder>"),
    "adapter-without-eval-only": ("sst2", ["--adapter", "{bad}/not-an-adapter"], "--adapter is read only with --eval_only"),
    "adapter-folder-without-config": ("sst2", ["--eval_only", "--adapter", "{bad}/not-an-adapter"], "no adapter_config.json there"),
    "yaml-field-in-cli-typo": ("sst2", ["--lerning_rate", "0.1"], "unrecognized arguments: --lerning_rate 0.1"),
    "latin1-file": ("sst2", ["--data_dir", "{bad}/SST-2-latin1"], "SST-2-latin1/train.tsv line 3 is not UTF-8 text (byte 0xe9)"),
    "empty-file": ("sst2", ["--data_dir", "{bad}/SST-2-empty"], "SST-2-empty/train.tsv is empty; expected GLUE's SST-2 layout"),
    "zero-max-seq-length": ("sst2", ["--max_seq_length", "0"], "--max_seq_length 0 must be a positive integer"),
    "negative-max-train-samples": ("sst2", ["--max_train_samples", "-1"], "--max_train_samples -1 must be a positive integer"),
    "negative-max-eval-samples": ("sst2", ["--max_eval_samples", "-2"], "--max_eval_samples -2 must be a positive integer"),
    "metric-the-task-lacks": ("sst2", ["--metric_for_best_model", "f1"], "--metric_for_best_model 'f1' is not reported for sst2: expected one of loss, accuracy"),
    "negative-epochs": ("sst2", ["--num_train_epochs", "-2"], "--num_train_epochs -2.0 must be a positive number"),
    "lora-rank-zero": ("sst2", ["--method", "lora", "--r", "0"], "--method lora: --r 0 must be a positive integer"),
    "negative-learning-rate": ("sst2", ["--learning_rate", "-1"], "--learning_rate -1.0 must be a finite positive number"),
    "nan-learning-rate": ("sst2", ["--learning_rate", "nan"], "--learning_rate nan must be a finite positive number"),
    "resume-without-checkpoints": ("sst2", ["--resume_from_checkpoint", "True"], "--resume_from_checkpoint True: {out} has no checkpoint-* folder to resume from"),
    "resume-missing-folder": ("sst2", ["--resume_from_checkpoint", "/nonexistent/checkpoint-4"], "--resume_from_checkpoint /nonexistent/checkpoint-4: no such folder"),
    "adapter-config-not-json": ("sst2", ["--eval_only", "--adapter", "{bad}/adapter-not-json"], "adapter_config.json is not valid JSON"),
    "adapter-config-a-list": ("sst2", ["--eval_only", "--adapter", "{bad}/adapter-list"], "adapter_config.json holds a JSON list; expected an object"),
    "adapter-config-too-deep": ("sst2", ["--eval_only", "--adapter", "{bad}/adapter-deep"], "nests its JSON more than"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_training(workdir, bad_files, capsys, case):
    task, extra, expected = BAD_INPUTS[case]
    extra = [a.format(glue=workdir / "glue", bad=bad_files) for a in extra]
    out = workdir / f"bad-{case}"
    rc = run_recipe(glue.main, tiny_args(workdir, task, "lor2c", str(out)) + extra, prog="glue.py")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glue.py: error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert expected.format(out=out) in errors[0]
    assert not out.exists(), "nothing may be written before the error"


def test_adapter_of_another_base_is_one_line(workdir, capsys):
    trained, adapter = train_once(workdir, "sst2", "imlor2c")
    assert trained.returncode == 0, trained.stderr[-4000:]
    other = save_tiny_pretrained(str(workdir / "model-2-layers"), [" ".join(WORDS)], model_type="roberta", head="cls", num_layers=2)
    argv = tiny_args(workdir, "sst2", "lor2c", str(workdir / "bad-base")) + ["--model_name_or_path", other, "--eval_only", "--adapter", adapter]
    assert run_recipe(glue.main, argv, prog="glue.py") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glue.py: error:")]
    assert len(errors) == 1 and f"--adapter {adapter} does not fit --model_name_or_path" in errors[0]
    assert "num_blocks: adapter has 4, base has 2" in errors[0]


def test_default_run_without_hub_says_what_to_pass(workdir):
    """The paper's setup (roberta-base, data from the Hub) on a machine without the Hub: one error line each."""
    config = os.path.join(REPO, "recipes", "configs", "glue_rte.yaml")
    result = run_cli([SCRIPT, "--config", config, "--data_dir", str(workdir / "glue"), "--output_dir", str(workdir / "d1")], cwd=str(workdir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("glue.py: error: --model_name_or_path roberta-base could not be loaded")

    result = run_cli([SCRIPT, "--config", config, "--model_name_or_path", str(workdir / "model"), "--output_dir", str(workdir / "d2")], cwd=str(workdir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("glue.py: error: --dataset_name nyu-mll/glue (rte) could not be loaded")
    assert "Pass --data_dir with GLUE's TSV files (RTE/train.tsv, RTE/dev.tsv)" in errors[0]


def test_recipe_error_is_raised_not_swallowed_by_main(workdir):
    with pytest.raises(RecipeError, match="unknown"):
        glue.main(tiny_args(workdir, "sst2", "nope", str(workdir / "raise")))
