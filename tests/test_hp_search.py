"""`LoR2CTrainer` with `model_init` and `hyperparameter_search` (Optuna): every trial trains a freshly wrapped
model whose adapter config carries the trial's M, N (and merge rule), the transformers convention."""

from __future__ import annotations

import pytest
import torch

from lor2c_hf import LoR2CConfig, LoR2CModel, LoR2CTrainer, ResLoRAConfig, ResLoRAModel, get_lor2c_model
from test_trainer import cls_data, training_args
from tiny_models import tiny_model

optuna = pytest.importorskip("optuna")


def fresh_classifier() -> torch.nn.Module:
    return tiny_model("bert", head="cls")


def test_model_init_is_wrapped_with_the_config_and_reinitialised_by_train(tmp_path):
    config = LoR2CConfig.for_method("imlor2c", r=4, num_merges=1, num_injects=1, schedule="steps")
    trainer = LoR2CTrainer(model_init=fresh_classifier, args=training_args(tmp_path, max_steps=4),
                           train_dataset=cls_data(32), lor2c_config=config)
    first = trainer.model
    assert isinstance(first, LoR2CModel) and first.lor2c_config.num_merges == 1
    assert first.lor2c_config is not config  # each model gets its own copy (wrapping fills in fields)
    trainer.train()
    assert trainer.model is not first and isinstance(trainer.model, LoR2CModel)
    assert [e["kind"] for e in trainer.model.structure["events"]] == ["merge", "inject"]
    assert config.modules_to_save is None and config.base_model_name_or_path is None


def test_model_init_wraps_reslora_too(tmp_path):
    trainer = LoR2CTrainer(model_init=fresh_classifier, args=training_args(tmp_path, max_steps=2),
                           train_dataset=cls_data(16), lor2c_config=ResLoRAConfig(r=4, res_flag="bs", pre_num=1))
    assert isinstance(trainer.model, ResLoRAModel)


def test_hyperparameter_search_sets_adapter_fields_per_trial(tmp_path):
    config = LoR2CConfig(r=4, schedule="steps")  # M = N = 0: LoR2C; each trial's method follows its M and N
    trainer = LoR2CTrainer(model_init=fresh_classifier, args=training_args(tmp_path, max_steps=4),
                           train_dataset=cls_data(32), eval_dataset=cls_data(16, seed=1), lor2c_config=config)
    seen = []

    def hp_space(trial):
        return {"num_merges": trial.suggest_int("num_merges", 0, 1), "num_injects": trial.suggest_int("num_injects", 0, 1),
                "merge_criterion": trial.suggest_categorical("merge_criterion", ["paper", "official"]),
                "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-3)}

    def objective(metrics):
        model = trainer.lor2c_model
        c, structure = model.lor2c_config, model.structure
        seen.append((c.num_merges, c.num_injects, c.merge_criterion, trainer.args.learning_rate))
        assert structure["events"] == [] or {e["kind"] for e in structure["events"]} <= {"merge", "inject"}
        assert sum(e["kind"] == "merge" for e in structure["events"]) == c.num_merges
        assert sum(e["kind"] == "inject" for e in structure["events"]) == c.num_injects
        return 10 * c.num_merges + c.num_injects + (c.merge_criterion == "official")

    grid = {"num_merges": [0, 1], "num_injects": [0, 1], "merge_criterion": ["paper", "official"],
            "learning_rate": [1e-3]}
    best = trainer.hyperparameter_search(hp_space=hp_space, compute_objective=objective, n_trials=8, direction="maximize",
                                         backend="optuna", sampler=optuna.samplers.GridSampler(grid, seed=0))
    assert sorted(seen) == sorted((m, n, rule, 1e-3) for m in (0, 1) for n in (0, 1) for rule in ("paper", "official"))
    assert best.objective == 12 and best.hyperparameters["num_merges"] == 1
    assert best.hyperparameters["merge_criterion"] == "official"
    assert trainer.args.learning_rate == 1e-3  # TrainingArguments fields are still set by the trial
    trainer.train()  # outside a search, the base config again
    assert trainer.lor2c_model.lor2c_config.num_merges == 0


def test_searched_adapter_fields_need_a_plain_model_from_model_init(tmp_path):
    config = LoR2CConfig(r=4)
    trainer = LoR2CTrainer(model_init=lambda: get_lor2c_model(fresh_classifier(), LoR2CConfig(r=4)),
                           args=training_args(tmp_path, max_steps=1), train_dataset=cls_data(8), lor2c_config=config)
    with pytest.raises(ValueError, match="cannot be applied"):
        trainer.hyperparameter_search(hp_space=lambda t: {"num_merges": t.suggest_int("num_merges", 1, 1)},
                                      n_trials=1, direction="maximize", backend="optuna",
                                      compute_objective=lambda metrics: 0.0)


def test_a_model_or_a_model_init_is_needed():
    with pytest.raises(ValueError, match="model_init"):
        LoR2CTrainer(lor2c_config=LoR2CConfig())
