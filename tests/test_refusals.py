"""Issue 20: inputs and files that passed unnoticed, now refused by name with nothing changed (or done right).

Adapter folders are crafted the way a hostile upload would be (checksums recomputed, so the checks themselves must
catch them) and every refusal is checked to leave the model as it was. Config and wrapping refusals are in
`test_config.py`; the ones that need a model are here.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lor2c_hf import (AdapterLoadError, AutoLoR2CModelForSequenceClassification, LoR2CConfig, LoR2CModel, LoR2CTrainer,
                      ResLoRAConfig, get_lor2c_model, get_reslora_model)
from lor2c_hf.serialization import CONFIG_DIGEST_KEY, DIGEST_KEY
from lor2c_hf.training.checkpoints import MANIFEST_NAME, CheckpointError, checkpoint_problem, mark_complete
from test_resilience import CONFIG, WEIGHTS, rewrite
from test_serialization import _adapted, _assert_unchanged, _base, _outputs, _snapshot
from test_trainer import cls_data, training_args
from tiny_models import random_ids, tiny_model


@pytest.fixture(scope="module")
def trained():
    return _adapted("roberta", "cls", "imlor2c")  # share_a, 2 merges, 2 injects, a trained classifier head


def _refused(folder, match: str, **kwargs) -> None:
    """`from_pretrained` of `folder` raises `AdapterLoadError` matching `match` and leaves the base as it was."""
    base = _base("roberta", "cls")
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match=match):
        LoR2CModel.from_pretrained(base, str(folder), **kwargs)
    _assert_unchanged(base, before)


# --- item 3: a NaN adapter does not load silently -----------------------------------------------------------


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_nonfinite_adapter_is_refused_on_load(tmp_path, trained, is_trainable):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model.lor2c.lora_B[model.structure["owners"][0]][0, 0] = float("nan")
    model.save_pretrained(tmp_path, allow_nonfinite=True)
    _refused(tmp_path, r"holds NaN or Inf values in \['lor2c.lora_B.\d+'\].*allow_nonfinite=True", is_trainable=is_trainable)
    target = get_lor2c_model(_base("roberta", "cls"), LoR2CConfig.from_dict(trained.lor2c_config.to_dict())).eval()
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError, match="NaN or Inf"):
        target.load_adapter(str(tmp_path))
    _assert_unchanged(target, before)
    loaded = LoR2CModel.from_pretrained(_base("roberta", "cls"), str(tmp_path), allow_nonfinite=True)  # on request
    assert _outputs(loaded).isnan().any()
    base_dir = tmp_path / "base"
    _base("roberta", "cls").save_pretrained(base_dir)
    with pytest.raises(AdapterLoadError, match="NaN or Inf"):  # the Auto classes refuse it too, and forward the opt-in
        AutoLoR2CModelForSequenceClassification.from_pretrained(str(tmp_path), base_model_name_or_path=str(base_dir))
    auto = AutoLoR2CModelForSequenceClassification.from_pretrained(str(tmp_path), base_model_name_or_path=str(base_dir),
                                                                   allow_nonfinite=True)
    assert _outputs(auto).isnan().any()


# --- item 5: resuming under a changed config -----------------------------------------------------------------

CHANGED = [("merge_criterion", "paper"), ("sfs_top_k", 1), ("schedule", "steps"), ("num_merges", 1), ("num_injects", 1),
           ("merge_keep", "official"), ("zero_b_score", "official")]


@pytest.mark.parametrize("name,value", CHANGED, ids=[n for n, _ in CHANGED])
def test_load_adapter_refuses_a_model_whose_structure_fields_differ(tmp_path, trained, name, value):
    trained.save_pretrained(tmp_path)
    config = LoR2CConfig.from_dict({**trained.lor2c_config.to_dict(), name: value, "method": None})
    target = get_lor2c_model(_base("roberta", "cls"), config).eval()
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError, match=rf"other settings \(.*{name}: adapter .*only \['lora_dropout'"):
        target.load_adapter(str(tmp_path))
    _assert_unchanged(target, before)


def test_dropout_may_change_on_resume(tmp_path):
    """The documented exception (docs/reliability.md): dropout is not structure; a run resumes with another one."""
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1)
    config = LoR2CConfig(r=4, num_merges=1, schedule="steps", lora_dropout=0.1)
    first = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path / "a", **args), train_dataset=cls_data(16),
                         lor2c_config=config)
    first.train()
    changed = LoR2CConfig(r=4, num_merges=1, schedule="steps", lora_dropout=0.0, inject_dropout=0.0)
    resumed = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path / "b", **args), train_dataset=cls_data(16),
                           lor2c_config=changed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.lor2c_model.lor2c_config.lora_dropout == 0.0
    assert resumed.lor2c_model.structure["spans"] == first.lor2c_model.structure["spans"]  # the checkpoint's merge, kept


# --- item 6: integrity checks are required; events must produce the structure -------------------------------


@pytest.mark.parametrize("key", [DIGEST_KEY, CONFIG_DIGEST_KEY])
def test_a_file_without_its_checksums_is_refused(tmp_path, trained, key):
    trained.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del metadata[key]
    save_file(tensors, path, metadata=metadata)
    _refused(tmp_path, rf"{WEIGHTS} lacks the metadata field\(s\) \['{key}'\]")


def test_a_retired_owner_with_a_new_alpha_and_no_checksums_is_refused(tmp_path, trained):
    """The issue's attack: an owner moved to a retired slot, lora_alpha 16 -> 64, checksums deleted."""
    trained.save_pretrained(tmp_path)
    structure = copy.deepcopy(trained.structure)
    k = next(i for i, (a, b) in enumerate(structure["spans"]) if a != b)
    structure["owners"][k] = next(b for b in range(*structure["spans"][k]) if b != structure["owners"][k])
    rewrite(tmp_path, structure=structure, config={"lora_alpha": 64})
    _refused(tmp_path, re.escape(f"owners={structure['owners']} is invalid") + ".*what the events replayed produce")  # checksums recomputed
    path = os.path.join(tmp_path, WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key in (DIGEST_KEY, CONFIG_DIGEST_KEY):
        del metadata[key]
    save_file(tensors, path, metadata=metadata)
    _refused(tmp_path, "lacks the metadata field")


EVENT_EDITS = {
    "merge-record-of-other-spans": (lambda s: s["events"][0].update(merged=[[0, 0], [3, 3]]), r"events\[0\].merged=\[\[0, 0\], \[3, 3\]\] .*two adjacent spans"),
    "kept-slot-of-neither-span": (lambda s: s["events"][0].update(kept_slot=5), r"events\[0\].kept_slot=5"),
    "inject-record-moved": (lambda s: next(e for e in s["events"] if e["kind"] == "inject").update(blocks=[0]), r"spans=.* what the events replayed produce"),
    "spans-without-events": (lambda s: s.update(events=[]), r"what the events replayed produce"),
    "skipped-with-candidates": (lambda s: s["events"].insert(0, {"kind": "merge", "step": 0, "epoch": None, "skipped": True,
                                                                 "blocks": []}), r"skipped=True .*only when no merge candidate"),
}


@pytest.mark.parametrize("case", EVENT_EDITS)
def test_a_structure_its_events_could_not_have_produced_is_refused(tmp_path, trained, case):
    trained.save_pretrained(tmp_path)
    structure = copy.deepcopy(trained.structure)
    edit, match = EVENT_EDITS[case]
    edit(structure)
    rewrite(tmp_path, structure=structure)
    _refused(tmp_path, match)


def test_save_refuses_a_structure_its_events_do_not_produce(tmp_path):
    model = get_lor2c_model(_base(), LoR2CConfig(r=4, num_merges=1))
    model.set_structure({"num_blocks": 6, "spans": [[0, 1], *[[i, i] for i in range(2, 6)]], "owners": [0, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match="Cannot save the adapter .*what the events replayed produce.*apply_merge"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- item 10: a crafted adapter cannot overwrite the base ----------------------------------------------------


def test_modules_to_save_beyond_the_task_heads_do_not_overwrite_the_base(tmp_path):
    crafted = get_lor2c_model(_base("roberta", "cls"), LoR2CConfig(r=4, modules_to_save=["classifier", "roberta.embeddings"]))
    with torch.no_grad():
        crafted.get_base_model().roberta.embeddings.word_embeddings.weight.mul_(3.0)
    crafted.save_pretrained(tmp_path)
    _refused(tmp_path, r"modules_to_save=\['roberta.embeddings'\] are not task heads .*allow_base_overwrite=True")
    _refused(tmp_path, "are not task heads", is_trainable=True)
    loaded = LoR2CModel.from_pretrained(_base("roberta", "cls"), str(tmp_path), allow_base_overwrite=True)  # on request
    assert torch.equal(loaded.get_base_model().roberta.embeddings.word_embeddings.weight,
                       crafted.get_base_model().roberta.embeddings.word_embeddings.weight)


def test_a_flood_of_skipped_events_is_refused(tmp_path, trained):
    trained.save_pretrained(tmp_path)
    structure = copy.deepcopy(trained.structure)
    structure["events"] += [{"kind": "merge", "step": 1, "epoch": None, "skipped": True, "blocks": []}] * 200_000
    rewrite(tmp_path, structure=structure)
    _refused(tmp_path, rf"lor2c_structure is [\d,]+ characters long; expected a LoR2C structure of at most")
    structure["events"] = trained.structure["events"] + [dict(kind="merge", step=1, epoch=None, skipped=True, blocks=[])] * 4
    rewrite(tmp_path, structure=structure)
    _refused(tmp_path, r"events='8 records' is invalid: expected at most 6, one per block")


def test_more_event_records_than_the_config_schedules_are_refused(tmp_path):
    model = _adapted(variant="merged")  # 3 merges on 6 blocks, num_merges=3
    model.save_pretrained(tmp_path)
    rewrite(tmp_path, config={"num_merges": 2})
    base = _base()
    with pytest.raises(AdapterLoadError, match="holds 3 merge records, but the config allows num_merges=2"):
        LoR2CModel.from_pretrained(base, str(tmp_path))


@pytest.fixture()
def checkpoint(tmp_path):
    run = LoR2CTrainer(tiny_model("bert", num_layers=2), training_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
                       train_dataset=cls_data(8), lor2c_config=LoR2CConfig(r=4))
    run.train()
    return tmp_path / "checkpoint-1"


def _write_manifest(folder, files) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": files}), encoding="utf-8")


def test_crafted_manifests_do_not_make_a_checkpoint_complete(checkpoint, tmp_path):
    assert checkpoint_problem(str(checkpoint)) is None
    _write_manifest(checkpoint, {})
    assert "lists no trainer_state.json" in checkpoint_problem(str(checkpoint))
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the checkpoint")
    mark_complete(str(checkpoint))
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]
    manifest["../secret.txt"] = {"size": outside.stat().st_size, "sha256": "0" * 64}
    _write_manifest(checkpoint, manifest)
    assert "names '../secret.txt', which is outside the checkpoint folder" in checkpoint_problem(str(checkpoint))
    _write_manifest(checkpoint, {**manifest, "../secret.txt": None, str(outside): None})
    assert "outside the checkpoint folder" in checkpoint_problem(str(checkpoint))
    (checkpoint / MANIFEST_NAME).write_text("[" * 50_000 + "]" * 50_000)
    assert "nests its JSON more than" in checkpoint_problem(str(checkpoint))
    model = get_lor2c_model(tiny_model("bert", num_layers=2), LoR2CConfig(r=4))
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        model.load_adapter(str(checkpoint))


# --- item 12: named errors, not raw ones ---------------------------------------------------------------------


@pytest.mark.parametrize("content,match", [(b"[" * 100_000 + b"]" * 100_000, "nests its JSON more than 16 levels"),
                                           (b'{"r": 4,', "is not valid JSON"), (b'["method"]', "holds a JSON list")])
def test_auto_classes_and_loaders_name_a_malformed_config(tmp_path, trained, content, match):
    trained.save_pretrained(tmp_path)
    (tmp_path / CONFIG).write_bytes(content)
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG} {match}"):
        AutoLoR2CModelForSequenceClassification.from_pretrained(str(tmp_path))
    _refused(tmp_path, rf"{CONFIG} {match}")


def test_reslora_alpha_that_would_overflow_is_refused():
    with pytest.raises(ValueError, match=r"ResLoRAConfig.lora_alpha=1e\+308 is invalid"):
        get_reslora_model(_base(), ResLoRAConfig(lora_alpha=1e308))



# --- item 2: a base that already carries an adapter ----------------------------------------------------------


def test_a_base_already_adapted_is_refused_by_every_wrapper(tmp_path):
    _adapted("llama", "causal").save_pretrained(tmp_path)
    base = _base("llama", "causal")
    bare = _outputs(base)
    first = get_lor2c_model(base, LoR2CConfig(r=4))
    for wrap in (lambda: get_lor2c_model(base, LoR2CConfig(r=4)), lambda: get_reslora_model(base, ResLoRAConfig(r=4))):
        with pytest.raises(ValueError, match=r"already adapted by a LoR2CModel .*unload\(\)"):
            wrap()
    with pytest.raises(AdapterLoadError, match="already adapted by a LoR2CModel"):
        LoR2CModel.from_pretrained(base, str(tmp_path))
    first.unload()
    again = LoR2CModel.from_pretrained(base, str(tmp_path))  # the base is bare again: one adapter applies
    with again.disable_adapter():
        assert torch.equal(_outputs(again), bare)


def test_a_merged_model_is_not_adapted_twice():
    model = _adapted("llama", "causal")
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="already holds LoR2C connections"):
        get_lor2c_model(merged, LoR2CConfig(r=4))


# --- item 4: ResLoRA's running norms -------------------------------------------------------------------------


def _reslora(flag: str = "ms"):
    model = get_reslora_model(_base(), ResLoRAConfig(r=4, res_flag=flag, pre_num=1)).train()
    with torch.no_grad():
        for layer in model.reslora.modules():
            if hasattr(layer, "lora_B") and hasattr(layer.lora_B, "weight"):
                layer.lora_B.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("flag", ["ms", "is"])
def test_an_empty_input_leaves_the_running_norms_as_they_were(flag):
    model = _reslora(flag)
    model(input_ids=random_ids())
    norms, counts = model.reslora.input_norm.clone(), model.reslora.input_count.clone()
    try:
        model(input_ids=torch.zeros((2, 0), dtype=torch.long))  # zero tokens: the base may fail, the norms must not change
    except Exception:
        pass
    assert torch.equal(model.reslora.input_norm, norms) and torch.equal(model.reslora.input_count, counts)
    merged = model.merge_and_unload()
    assert all(bool(torch.isfinite(p).all()) for p in merged.parameters())


def test_reslora_merge_refuses_nonfinite_norms_and_changes_nothing():
    model = _reslora()
    model(input_ids=random_ids())
    model.reslora.input_norm[1, 0] = float("nan")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(RuntimeError, match="non-finite ones"):
        model.merge_and_unload()
    assert all(torch.equal(v, before[k]) for k, v in model.get_base_model().state_dict().items())


# --- item 7: OPT with LayerDrop ------------------------------------------------------------------------------


def test_layerdrop_with_merged_spans_is_refused_by_name():
    model = tiny_model("opt", layerdrop=0.5)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match=r"LayerDrop \(model.decoder.layerdrop=0.5\).*model.model.decoder.layerdrop = 0.0"):
        get_lor2c_model(model, LoR2CConfig(r=4, num_merges=1))
    with pytest.raises(ValueError, match="ResLoRA res_flag='ms'.*LayerDrop"):
        get_reslora_model(model, ResLoRAConfig(r=4, pre_num=1))
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    get_lor2c_model(model, LoR2CConfig(r=4))  # single-block connections skip with their block: nothing goes stale
    fixed = tiny_model("opt", layerdrop=0.5)
    fixed.model.decoder.layerdrop = 0.0
    get_lor2c_model(fixed, LoR2CConfig(r=4, num_merges=1))


# --- item 9: configs that cannot be honoured -----------------------------------------------------------------


def test_merges_plus_injects_equal_to_the_depth_are_refused():
    with pytest.raises(ValueError, match=r"num_merges \+ num_injects = 4 equals the 4 blocks .*<= 3"):
        get_lor2c_model(tiny_model("roberta", num_layers=4), LoR2CConfig(num_merges=3, num_injects=1))
    get_lor2c_model(tiny_model("roberta", num_layers=4), LoR2CConfig(num_injects=4))  # no merge: every block may be injected


def test_an_encoder_decoder_needs_its_blocks_named():
    import transformers as tf

    config = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    model = tf.BartForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"encoder-decoder with the block stacks \['model.encoder.layers', "
                                         r"'model.decoder.layers'\].*blocks_path"):
        get_lor2c_model(model, LoR2CConfig(r=4))
    assert get_lor2c_model(model, LoR2CConfig(r=4, blocks_path="model.encoder.layers")).blocks_path == "model.encoder.layers"


def test_zero_training_steps_are_refused_before_training(tmp_path):
    trainer = LoR2CTrainer(tiny_model("bert", num_layers=2), training_args(tmp_path, num_train_epochs=0),
                           train_dataset=cls_data(8), lor2c_config=LoR2CConfig(r=4))
    with pytest.raises(ValueError, match=r"Training has no optimizer step: num_train_epochs=0, max_steps=-1; expected"):
        trainer.train()


# --- item 13: several processes without a process group ------------------------------------------------------


def test_several_processes_without_a_process_group_are_refused(tmp_path, monkeypatch):
    args = training_args(tmp_path, max_steps=1, use_cpu=False)
    assert args.device.type == "cpu"  # devices set up before the launcher's variables appear
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 processes \(RANK=1\), but no process group.*use_cpu=True"):
        LoR2CTrainer(tiny_model("bert", num_layers=2), args, train_dataset=cls_data(8), lor2c_config=LoR2CConfig(r=4))
    assert os.listdir(tmp_path) == []


def test_a_deeply_nested_structure_in_a_state_dict_is_a_named_error():
    """DeepSpeed resumes through `state_dict()`, whose `_extra_state` carries the structure as JSON bytes."""
    model = get_lor2c_model(_base(), LoR2CConfig(r=4))
    state = model.state_dict()
    state["_extra_state"] = torch.tensor(list(b"[" * 100_000 + b"]" * 100_000), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"_extra_state\) is unreadable: _extra_state nests its JSON more than 16"):
        model.load_state_dict(state)
