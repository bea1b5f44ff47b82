"""recipes/glue.py's M x N search (`--search_mn`) end to end on the tiny RoBERTa, the task head's own learning
rate (`--head_learning_rate_ratio`, the authors' lr / 2), and the configs' sources for both."""

from __future__ import annotations

import json
import os

import pytest

from test_glue_recipe import CONFIGS, parse, tiny_args, workdir  # noqa: F401  (the fixture; puts recipes/ on the path)
import glue  # noqa: E402
from common import run_recipe  # noqa: E402

pytest.importorskip("optuna")


def test_search_mn_grids_m_and_n_writes_the_heatmap_and_trains_the_best(workdir, tmp_path):  # noqa: F811
    out = str(tmp_path / "out")
    argv = tiny_args(workdir, "sst2", "imlor2c", out) + ["--search_mn", "--search_values", "0", "1", "--search_epochs", "1"]
    assert run_recipe(glue.main, argv, prog="glue.py") == 0
    with open(os.path.join(out, "mn_search.json"), encoding="utf-8") as f:
        search = json.load(f)
    assert sorted((t["num_merges"], t["num_injects"]) for t in search["trials"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    best = max(search["trials"], key=lambda t: t["score"])
    assert search["best"]["score"] == best["score"]
    for trial in search["trials"]:  # each trial's own structure: M merges and N injects happened
        assert len(trial["injected"]) == trial["num_injects"]
        assert len(trial["spans"]) == glue_blocks(workdir) - trial["num_merges"] - trial["num_injects"]
    assert open(os.path.join(out, "mn_search.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "glue_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    kinds = [e["kind"] for e in report["events"]]
    assert (kinds.count("merge"), kinds.count("inject")) == (search["best"]["num_merges"], search["best"]["num_injects"])


def glue_blocks(workdir) -> int:  # noqa: F811
    with open(workdir / "model" / "config.json", encoding="utf-8") as f:
        return json.load(f)["num_hidden_layers"]


def test_search_mn_needs_imlor2c(workdir, tmp_path, capsys):  # noqa: F811
    argv = tiny_args(workdir, "sst2", "lor2c", str(tmp_path / "out")) + ["--search_mn"]
    assert run_recipe(glue.main, argv, prog="glue.py") == 2
    assert "--search_mn searches IMLoR2C" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "lor2c"])
def test_head_trains_at_its_own_learning_rate(workdir, tmp_path, method):  # noqa: F811
    argv = tiny_args(workdir, "sst2", method, str(tmp_path / "out"))
    model_args, adapter_args, data_args, training_args = parse(argv)
    assert training_args.head_learning_rate_ratio == 0.5 and training_args.weight_decay == 0.01  # the config's
    task, training_args.eval_strategy = glue.task_of("sst2"), "no"  # no dev set needed to build the optimizer
    tokenizer = glue.load_tokenizer(model_args)
    model, trainer_class = glue.wrap_model(glue.load_classifier(model_args, training_args, task, tokenizer), adapter_args, "SEQ_CLS")
    trainer = glue.build_trainer(trainer_class, model, training_args, task, tokenizer, None, None)
    optimizer = trainer.create_optimizer()
    lr = training_args.learning_rate
    head = {id(p) for p in glue.head_parameters(model)}
    assert head and all(p.requires_grad for p in glue.head_parameters(model))
    trained = [p for p in model.parameters() if p.requires_grad]
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in trained)  # every trainable tensor once
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) <= 1
        if in_head == {True}:
            assert group["lr"] == pytest.approx(lr / 2)
        elif in_head == {False}:
            assert group["lr"] == pytest.approx(lr)
    assert trainer.create_optimizer() is optimizer  # created once


def test_every_glue_config_takes_the_authors_optimizer_settings():
    for path in CONFIGS:
        sections = parse(["--config", path, "--output_dir", "unused"])
        training, data = sections[3], sections[2]
        assert (training.weight_decay, training.head_learning_rate_ratio) == (0.01, 0.5), path
        assert data.max_seq_length == (512 if data.task_name == "rte" else 256), path
        with open(path, encoding="utf-8") as f:
            assert "run_glue_lor2c.py" in f.read()


def test_quickstart_keeps_its_short_run_optimizer():
    import quickstart

    assert quickstart.QUICKSTART_DEFAULTS["weight_decay"] == 0.0
    assert quickstart.QUICKSTART_DEFAULTS["head_learning_rate_ratio"] == 1.0
