"""bench/quality.py and bench/grad_flow.py run end to end (--smoke, real CLI, real Trainer) on a tiny random
RoBERTa saved to a folder and generated SST-2-style TSV files; their JSON and CSV have the documented shape and
their numbers agree with independent computations from the same files."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from tiny_pretrained import REPO, offline_env, save_tiny_pretrained

NUM_BLOCKS, HIDDEN, RANK = 5, 32, 8  # the tiny model (IMLoR2C M = N = 2 needs 5 blocks); HParams' default rank
METHODS = ("lora", "lor2c", "sharelor2c", "imlor2c", "reslora")
POSITIVE, NEGATIVE = "good great fun moving lovely".split(), "bad dull boring awful flat".split()
FILLER = "the a movie film plot is was and".split()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sentences(n: int, rng: random.Random) -> list[tuple[str, int]]:
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.tsv", 80), ("dev.tsv", 40)):
        # \r before the tab, as in the source copy of GLUE's SST-2 train.tsv: the reader must cope
        lines = ["sentence\tlabel"] + [f"{s}\r\t{y}" for s, y in _sentences(n, rng)]
        (data / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = save_tiny_pretrained(str(root / "model"), POSITIVE + NEGATIVE + FILLER, model_type="roberta", head="cls",
                                 num_layers=NUM_BLOCKS)
    return root, str(data), model


def _run(script: str, root, data: str, model: str, *extra: str) -> subprocess.CompletedProcess:
    out = root / "out"
    command = [sys.executable, os.path.join(REPO, "bench", script), "--smoke", "--model_dir", model,
               "--data_dir", data, "--output_dir", str(out), "--threads", "1", *extra]
    result = subprocess.run(command, cwd=REPO, env=offline_env(str(root)), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_quality_smoke_json(workspace):
    root, data, model = workspace
    result = _run("quality.py", root, data, model, "--seeds", "2")
    payload = json.loads((root / "out" / "quality_smoke.json").read_text())
    assert (root / "out" / "quality_smoke.png").read_bytes()[:8] == PNG_SIGNATURE

    ran = [m for m in METHODS if m not in payload["unavailable"]]
    assert set(ran) >= {"lora", "lor2c", "sharelor2c", "imlor2c"} and payload["smoke"] is True
    assert [(r["seed"], r["method"]) for r in payload["runs"]] == [(s, m) for s in (0, 1) for m in ran]
    max_steps = payload["hyperparameters"]["max_steps"]
    for run in payload["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["steps"] == max_steps
        assert run["trainable_params"] == run["adapter_params"] + HIDDEN * HIDDEN + HIDDEN + 2 * HIDDEN + 2  # RoBERTa head

    by_method = {m: [r for r in payload["runs"] if r["method"] == m] for m in ran}
    lora_params = 2 * NUM_BLOCKS * 2 * HIDDEN * RANK  # A and B on query and value, every block
    assert by_method["lora"][0]["adapter_params"] == lora_params
    assert by_method["lor2c"][0]["adapter_params"] == 2 * NUM_BLOCKS * HIDDEN * RANK == lora_params // 2
    assert by_method["sharelor2c"][0]["adapter_params"] == (NUM_BLOCKS + 1) * HIDDEN * RANK
    for run in by_method["imlor2c"]:  # each span one connection (2dr), each injected block LoRA r/2 on q, v (2dr)
        assert {e["kind"] for e in run["events"]} == {"merge", "inject"} and run["injected"]
        assert run["adapter_params"] == 2 * HIDDEN * RANK * (len(run["spans"]) + len(run["injected"]))
    if "reslora" in ran:
        assert by_method["reslora"][0]["adapter_params"] == lora_params

    for method, runs in by_method.items():
        summary = payload["summary"][method]
        accs = [100 * r["accuracy"] for r in runs]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
        assert summary["n_seeds"] == 2
        assert summary["accuracy_mean"] == pytest.approx(mean) and summary["accuracy_std"] == pytest.approx(std, abs=1e-9)
        assert summary["params_vs_lora"] == pytest.approx(runs[0]["adapter_params"] / lora_params)
    verdict = payload["verdict"]
    gap = payload["summary"]["lor2c"]["accuracy_mean"] - payload["summary"]["lora"]["accuracy_mean"]
    assert verdict["gap_points"] == pytest.approx(gap) and verdict["matches"] == (gap >= -verdict["tolerance_points"])
    assert verdict["text"] in result.stdout and ("MATCHES" in verdict["text"]) == verdict["matches"]

    # Each run records what reproduces it, checked against git, the package metadata and the files themselves.
    import hashlib
    import importlib.metadata

    digest = hashlib.sha256()
    for name in ("train.tsv", "dev.tsv"):
        digest.update(name.encode() + b"\0" + open(os.path.join(data, name), "rb").read())
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert payload["data"]["sha256"] == digest.hexdigest()
    for run in payload["runs"]:
        record = run["record"]
        assert record["commit"] == (head or None) and isinstance(record["dirty"], bool) == bool(head)
        assert record["versions"]["peft"] == importlib.metadata.version("peft")
        assert record["versions"]["datasets"] == importlib.metadata.version("datasets")
        assert record["threads"] == 1 and record["data_sha256"] == digest.hexdigest()
        assert record["command"][0] == os.path.join("bench", "quality.py") and "--seeds" in record["command"]


def test_combine_refuses_other_data_and_names_differing_commits(workspace, tmp_path, capsys):
    quality = _bench_module("quality")
    root, data, _ = workspace
    mine = json.loads((root / "out" / "quality_smoke.json").read_text())  # written by test_quality_smoke_json
    hp = quality.HParams(**mine["hyperparameters"])
    other = dict(mine, runs=[dict(r, seed=r["seed"] + 10, record=dict(r["record"], commit="0" * 40))
                             for r in mine["runs"]])
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    payload = json.loads(json.dumps(mine))
    quality.combine_runs(payload, [str(path)], hp, mine["data"])
    assert len(payload["runs"]) == 2 * len(mine["runs"])
    note = [line for line in capsys.readouterr().out.splitlines() if "code states" in line]
    assert note and all(f"{c} (" in note[0] for c in quality.code_commits(payload["runs"])) and "000000000000" in note[0]
    path.write_text(json.dumps(dict(other, data=dict(mine["data"], sha256="f" * 64))))
    with pytest.raises(quality.BenchError, match="other data"):
        quality.combine_runs(json.loads(json.dumps(mine)), [str(path)], hp, mine["data"])
    path.write_text(json.dumps(dict(other, hyperparameters=dict(mine["hyperparameters"], learning_rate=1.0))))
    with pytest.raises(quality.BenchError, match=r"other hyper-parameters \['learning_rate'\]"):
        quality.combine_runs(json.loads(json.dumps(mine)), [str(path)], hp, mine["data"])


def test_grad_flow_smoke_csv_and_json(workspace):
    root, data, model = workspace
    result = _run("grad_flow.py", root, data, model)
    with open(root / "out" / "grad_flow_smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    payload = json.loads((root / "out" / "grad_flow_smoke.json").read_text())
    assert (root / "out" / "grad_flow_smoke.png").read_bytes()[:8] == PNG_SIGNATURE
    epochs = payload["epochs"]
    assert epochs == 2 and payload["blocks"] == NUM_BLOCKS
    assert sorted((int(r["epoch"]), int(r["block"])) for r in rows) == [(e, b) for e in (1, 2) for b in range(NUM_BLOCKS)]
    for r in rows:
        lor2c, lora, ratio = float(r["lor2c_mean_abs_grad"]), float(r["lora_mean_abs_grad"]), float(r["ratio"])
        assert lor2c > 0 and lora > 0 and math.isfinite(ratio)
        assert ratio == pytest.approx(lor2c / lora)
        assert payload["ratio"][int(r["epoch"]) - 1][int(r["block"])] == pytest.approx(ratio)  # one seed: mean = itself
    verdict = payload["verdict"]
    assert isinstance(verdict["grows_toward_lower_blocks"], bool) and len(verdict["spearman_per_epoch"]) == epochs
    assert verdict["text"] in result.stdout


def _bench_module(name: str):
    """bench/<name>.py imported as the scripts import each other (bench/ on sys.path)."""
    bench = os.path.join(REPO, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_grad_flow_verdict_reads_the_trend():
    grad_flow = _bench_module("grad_flow")
    epochs, blocks = 3, 6
    falling = {(e, b): 10.0 - b + 0.1 * e for e in range(epochs) for b in range(blocks)}  # larger at lower blocks
    result = grad_flow.verdict(falling, epochs, blocks)
    assert result["grows_toward_lower_blocks"] and result["spearman_per_epoch"] == [pytest.approx(-1.0)] * epochs
    assert "GROWS" in result["text"] and all(result["block0_above_top_per_epoch"])
    rising = {key: 1.0 / value for key, value in falling.items()}
    result = grad_flow.verdict(rising, epochs, blocks)
    assert not result["grows_toward_lower_blocks"] and "does NOT grow" in result["text"]
    assert result["spearman_mean"] == pytest.approx(1.0) and not any(result["block0_above_top_per_epoch"])


def test_glue_tsv_reader_and_its_errors(tmp_path):
    quality = _bench_module("quality")
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nit 's a charming , tab-free film \r\t1\nawful\t0\n", encoding="utf-8")
    assert quality.read_glue_tsv(str(path)) == (["it 's a charming , tab-free film", "awful"], [1, 0])
    path.write_text("text\tlabel\nx\t1\n", encoding="utf-8")
    with pytest.raises(quality.BenchError, match="header.*sentence<TAB>label"):
        quality.read_glue_tsv(str(path))
    path.write_text("sentence\tlabel\nx\tpositive\n", encoding="utf-8")
    with pytest.raises(quality.BenchError, match=r"train.tsv:2: label 'positive' is not an integer"):
        quality.read_glue_tsv(str(path))
    with pytest.raises(quality.BenchError, match="--data_dir.*does not exist"):
        quality.read_glue_tsv(str(tmp_path / "missing" / "dev.tsv"))


def test_tune_picks_each_rate_on_validation_rows_and_reports_equal_budget_verdicts(workspace):
    """bench/tune.py, every stage: the grid is scored on train.tsv rows the training never reads (not on dev), each
    method's rate is the grid's best there, the final table runs each method at its rate, and the verdicts compare
    the equal-parameter pairs."""
    root, data, model = workspace
    out = root / "tune"
    command = [sys.executable, os.path.join(REPO, "bench", "tune.py"), "--smoke", "--model_dir", model, "--data_dir", data,
               "--output_dir", str(out), "--threads", "1", "--learning_rates", "1e-3,5e-3", "--validation_rows", "64:80",
               "--seeds", "2"]
    result = subprocess.run(command, cwd=REPO, env=offline_env(str(root)), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    search = json.loads((out / "tune_smoke_search.json").read_text())
    assert search["data"]["eval_rows"] == 16 and "train.tsv rows 64..79" in search["data"]["metric"]
    assert len(search["runs"]) == 2 * len(TUNE_ROWS) and {r["seed"] for r in search["runs"]} == {0}
    choice = json.loads((out / "tune_smoke_choice.json").read_text())["choice"]
    rule = choice.pop("merge_rule_on_validation")
    assert rule["validation_accuracy"] == {b: choice[b]["validation_accuracy"] for b in ("imlor2c", "imlor2c_paper")}
    assert rule["best"].startswith("official") == (choice["imlor2c"]["validation_accuracy"] >= choice["imlor2c_paper"]["validation_accuracy"])
    for base, c in choice.items():
        grid = {rate: 100 * r["accuracy"] for r in search["runs"] for rate in ("0.001", "0.005")
                if r["method"] == f"{TUNE_ROWS[base]}@learning_rate={rate}"}
        assert len(grid) == 2
        assert c["grid"] == pytest.approx(grid) and c["validation_accuracy"] == max(grid.values())
        assert c["at_edge"]  # a two-point grid: the best is always at an edge, and said so
    final = json.loads((out / "tune_smoke_final.json").read_text())
    assert final["data"]["metric"] == "accuracy on dev.tsv" and final["data"]["eval_rows"] == 32
    assert {r["method"] for r in final["runs"]} == {f"{s}@learning_rate={choice[b]['learning_rate']:g}"
                                                    for b, s in TUNE_ROWS.items()}
    assert {r["seed"] for r in final["runs"]} == {0, 1}
    params = {r["method"].split("learning_rate")[0]: r["adapter_params"] for r in final["runs"]}
    assert params["lor2c@r=16@"] == params["lora@"] and params["lora@r=4@"] == params["lor2c@"]  # the equal budgets
    questions = [v["question"] for v in final["tuned_verdicts"]]
    assert questions == ["equal parameters", "equal parameters", "half of LoRA's parameters", "IMLoR2C's events against none",
                         "the scaling option", "the LoRA+ option", "the init option", "the merge rule",
                         "the LayerNorm placement"]
    for v in final["tuned_verdicts"]:
        a, b = (final["summary"][f"{TUNE_ROWS[k]}@learning_rate={choice[k]['learning_rate']:g}"]
                for k in (v["method"], v["reference"]))
        gap = a["accuracy_mean"] - b["accuracy_mean"]
        two_se = 2 * math.sqrt(a["accuracy_std"] ** 2 / 2 + b["accuracy_std"] ** 2 / 2)
        assert v["gap_points"] == pytest.approx(gap) and v["two_standard_errors"] == pytest.approx(two_se)
        assert v["standing"] == ("ahead of" if gap > two_se else "behind" if gap < -two_se else "level with")
        assert v["text"] in result.stdout and "Fewer than 3 seeds" in v["text"]
    assert (out / "tune_smoke_final.png").stat().st_size > 10_000  # the chart: accuracy against parameters

    # A row whose best rate sat at the edge is searched further; choose folds the new rate into that row's grid only.
    def tune(*argv):
        return subprocess.run(command[:2] + ["--smoke", "--model_dir", model, "--data_dir", data, "--output_dir", str(out),
                                             "--threads", "1", "--validation_rows", "64:80", *argv],
                              cwd=REPO, env=offline_env(str(root)), capture_output=True, text=True, timeout=600)
    widen = tune("--stage", "search", "--rows", "lora", "--learning_rates", "2e-2", "--suffix", "_extra")
    assert widen.returncode == 0, widen.stdout[-3000:] + widen.stderr[-3000:]
    assert [r["method"] for r in json.loads((out / "tune_smoke_search_extra.json").read_text())["runs"]] == ["lora@learning_rate=0.02"]
    rechosen = tune("--stage", "choose", "--learning_rates", "1e-3,5e-3")
    assert rechosen.returncode == 0, rechosen.stderr[-3000:]
    again = json.loads((out / "tune_smoke_choice.json").read_text())["choice"]
    assert set(again["lora"]["grid"]) == {"0.001", "0.005", "0.02"}
    assert again["lora"]["at_edge"] == (again["lora"]["learning_rate"] in (1e-3, 2e-2))
    assert all(set(again[b]["grid"]) == {"0.001", "0.005"} for b in TUNE_ROWS if b != "lora")

    # Unknown rows are refused by name; a row never searched is left out of the choice, listed, and refused by final.
    bad = tune("--stage", "search", "--rows", "lora,lorra")
    assert bad.returncode == 2 and "--rows 'lora,lorra': unknown row(s) ['lorra']" in bad.stderr
    bad = tune("--stage", "final", "--suffix", "../x")
    assert bad.returncode == 2 and "--suffix '../x': expected letters" in bad.stderr
    partial = root / "tune_partial"
    partial.mkdir()
    searched = json.loads((out / "tune_smoke_search.json").read_text())
    searched["runs"] = [r for r in searched["runs"] if not r["method"].startswith("imlor2c:paper/paper@")]
    (partial / "tune_smoke_search.json").write_text(json.dumps(searched))
    chose = tune("--stage", "choose", "--learning_rates", "1e-3,5e-3", "--output_dir", str(partial))
    assert chose.returncode == 0, chose.stderr[-3000:]
    left = json.loads((partial / "tune_smoke_choice.json").read_text())["choice"]
    assert left["not_searched"] == {"imlor2c_paper": ["0.001", "0.005"]} and "merge_rule_on_validation" not in left
    assert left["lora_r4"] == choice["lora_r4"]
    refused = tune("--stage", "final", "--rows", "imlor2c_paper", "--output_dir", str(partial))
    assert refused.returncode == 2 and "--rows: imlor2c_paper has no chosen learning rate" in refused.stderr


TUNE_ROWS = {"lora": "lora", "lora_r4": "lora@r=4", "lor2c": "lor2c", "lor2c_r16": "lor2c@r=16",
             "imlor2c": "imlor2c:official/paper", "sharelor2c": "sharelor2c", "lor2c_rs": "lor2c@lora_alpha=45.25",
             "lor2c_plus": "lor2c@loraplus_lr_ratio=16", "lor2c_gauss": "lor2c@a_init=gaussian",
             "imlor2c_paper": "imlor2c:paper/paper", "lor2c_ln": "lor2c@connection_position=before_output_norm"}


def test_validation_rows_must_lie_past_the_training_rows():
    quality = _bench_module("quality")
    assert quality.validation_slice("1000:1872", 1000) == (1000, 1872)
    for text, train_size, match in (("500:600", 1000, "overlaps the training rows, rows 0..999"),
                                    ("1000:1872", None, "no --train_size"), ("9:3", 1, "START < END"), ("a:b", 1, "START:END")):
        with pytest.raises(quality.BenchError, match=match):
            quality.validation_slice(text, train_size)
    _, overrides = quality.parse_variant("lor2c@r=16@learning_rate=1e-3")
    assert overrides == {"r": 16, "learning_rate": 1e-3}
    with pytest.raises(quality.BenchError, match="'rank=16' is not <field>=<value>"):
        quality.parse_variant("lor2c@rank=16")


def test_loraplus_variant_trains_b_at_the_ratio_times_a(workspace, tmp_path):
    """`lor2c@loraplus_lr_ratio=16`: PEFT's LoRA+ optimizer, handed to LoR2CTrainer, gives every connection's B 16x
    the learning rate of its A, and the schedule still decays both (checked after a step)."""
    quality = _bench_module("quality")
    root, data, model = workspace
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    hp = quality.HParams(learning_rate=1e-3, loraplus_lr_ratio=16, max_steps=2, batch_size=8, warmup_ratio=0.0)
    train_ds, _ = quality.load_sst2(data, tokenizer, hp.max_length, 32, 8)
    trainer = quality.make_trainer("lor2c", model, 0, hp, train_ds, tokenizer, str(tmp_path))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    a = {n: lr for n, lr in lr_of.items() if ".lora_A." in n}
    b = {n: lr for n, lr in lr_of.items() if ".lora_B." in n}
    assert a and b and set(a.values()) == {1e-3} and set(b.values()) == {16e-3}
    from transformers import TrainerCallback

    after: dict[str, float] = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 1:
                after.update({names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]})

    trainer.add_callback(FirstStep())
    trainer.train()
    assert trainer.state.global_step == 2 and after
    for name in a:
        assert 0 < after[name] < 1e-3 and after[name.replace(".lora_A.", ".lora_B.")] == pytest.approx(16 * after[name])
    with pytest.raises(quality.BenchError, match="LoRA\\+ is wired for methods without events"):
        quality.make_trainer("imlor2c", model, 0, hp, train_ds, tokenizer, str(tmp_path))


def test_gaussian_a_init_variant_draws_a_from_n0_1_over_r(workspace):
    quality = _bench_module("quality")
    _, _, model_dir = workspace
    hp = quality.HParams(r=8)
    stds = {}
    for init in ("kaiming", "gaussian"):
        model, _ = quality.build_adapter("lor2c", quality.load_classifier(model_dir, 0), quality.dataclasses.replace(hp, a_init=init))
        a = torch.cat([p.flatten() for p in model.lor2c.lora_A])
        stds[init] = float(a.std())
        assert all(float(b.abs().max()) == 0 for b in model.lor2c.lora_B)  # B starts at zero either way
    bound = 1 / math.sqrt(HIDDEN)  # Kaiming-uniform with a = sqrt(5) on fan-in d: U(-1/sqrt(d), 1/sqrt(d))
    assert stds["kaiming"] == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert stds["gaussian"] == pytest.approx(1 / 8, rel=0.1)
    with pytest.raises(quality.BenchError, match="expected kaiming or gaussian"):
        quality.build_adapter("lor2c", quality.load_classifier(model_dir, 0), quality.dataclasses.replace(hp, a_init="orthogonal"))


def test_connection_position_variant_reaches_the_model(workspace):
    """`lor2c@connection_position=before_output_norm` builds a LoR2C config with it (the norm of each block hooked);
    LoRA and ResLoRA, which have no connections, and an unknown position are refused by name."""
    quality = _bench_module("quality")
    _, _, model_dir = workspace
    method, hp = quality.variant_hparams("sharelor2c@connection_position=before_output_norm", quality.HParams())
    model, _ = quality.build_adapter(method, quality.load_classifier(model_dir, 0), hp)
    assert model.lor2c_config.connection_position == "before_output_norm"
    assert model.lor2c_config.output_norm == "output.LayerNorm"
    assert model.get_base_model().roberta.encoder.layer[0].output.LayerNorm._forward_pre_hooks
    default, _ = quality.build_adapter("lor2c", quality.load_classifier(model_dir, 0), quality.HParams())
    assert default.lor2c_config.connection_position == "block_output"
    for method in ("lora", "reslora"):
        with pytest.raises(quality.BenchError, match=f"{method}@connection_position=before_output_norm: the connection"):
            quality.build_adapter(method, quality.load_classifier(model_dir, 0), hp)
    with pytest.raises(quality.BenchError, match="expected one of block_output, before_output_norm"):
        quality.build_adapter("lor2c", quality.load_classifier(model_dir, 0),
                              quality.dataclasses.replace(hp, connection_position="after_norm"))
