"""Issue 13: bad input is refused by name before anything changes, damaged or mismatched files are refused as
`AdapterLoadError` naming the file, NaN/Inf stop loudly, and training arguments never carry the Hub token.

Files are damaged the way a hostile user or a crash would: fields edited in the safetensors metadata (with the
checksums recomputed, so validation itself must catch them, or left stale, so the checksum must), bytes flipped
and files truncated. Every refusal is checked to leave the model (weights, hooks, flags, outputs) as it was.
Killing real training processes is in `test_resilience_kill.py`.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

from lor2c_hf import (AdapterLoadError, CheckpointError, ConfigError, LoR2CConfig, LoR2CModel, LoR2CTrainer, NonFiniteError,
                      ResLoRAConfig, get_lor2c_model)
from lor2c_hf.training.checkpoints import MANIFEST_NAME, mark_complete
from lor2c_hf.serialization import CONFIG_DIGEST_KEY, DIGEST_KEY, config_digest, tensors_digest
from lor2c_hf.sfs import sfs_scores
from test_serialization import _adapted, _assert_unchanged, _base, _snapshot
from test_trainer import cls_data, training_args
from tiny_models import tiny_model

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"

# --- configs: every bad value refused by field ---------------------------------------------------------------

BAD_CONFIGS = [
    ("lora_alpha", float("inf")), ("lora_alpha", float("nan")), ("inject_alpha", float("inf")),
    ("inject_alpha", float("nan")), ("share_a", "yes"), ("num_merges", True), ("r", True), ("r", "8"), ("r", None),
    ("lora_alpha", "16"), ("lora_dropout", None), ("sfs_top_k", 2.0), ("inject_target_modules", [5]),
    ("modules_to_save", [""]), ("modules_to_save", 5), ("blocks_path", 3), ("schedule", ["steps"]),
]


@pytest.mark.parametrize("name,value", BAD_CONFIGS, ids=[f"{n}={v!r}" for n, v in BAD_CONFIGS])
def test_a_bad_config_value_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=rf"LoR2CConfig\.{name}=.* is invalid: expected"):
        LoR2CConfig(**{name: value})


@pytest.mark.parametrize("name,value", [("lora_alpha", float("inf")), ("r", True), ("pre_num", "4"), ("target_modules", [""])])
def test_a_bad_reslora_config_value_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=rf"ResLoRAConfig\.{name}=.* is invalid"):
        ResLoRAConfig(**{name: value})


def test_a_dict_as_lor2c_config_is_refused_before_the_model_is_wrapped(tmp_path):
    base = tiny_model("bert", num_layers=2)
    before = _snapshot(base)
    with pytest.raises(ConfigError, match=r"lor2c_config=...\) must be a LoR2CConfig or ResLoRAConfig, got a dict.*LoR2CConfig\(\*\*"):
        LoR2CTrainer(base, training_args(tmp_path), train_dataset=cls_data(8), lor2c_config={"r": 4})
    _assert_unchanged(base, before)


def test_inject_r_beyond_the_projections_is_refused_before_allocating(tmp_path):
    with pytest.raises(ConfigError, match=r"inject_r=2000000 exceeds the smallest side 32 .*1 <= inject_r <= 32"):
        get_lor2c_model(_base(), LoR2CConfig(r=4, num_injects=1, inject_r=2_000_000))
    # The same through a crafted adapter_config.json whose checksums were recomputed: refused naming the file.
    _adapted(variant="injected").save_pretrained(tmp_path)
    rewrite(tmp_path, config={"inject_r": 2_000_000})
    base = _base()
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG} does not fit this model: .*inject_r=2000000 exceeds"):
        LoR2CModel.from_pretrained(base, str(tmp_path))
    _assert_unchanged(base, before)


# --- adapter files: damaged, crafted, mismatched ------------------------------------------------------------


def rewrite(folder, structure=None, config=None, recompute: bool = True) -> None:
    """Edit a saved adapter's structure metadata and/or config fields; `recompute` keeps its checksums valid."""
    path = os.path.join(folder, WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if structure is not None:
        metadata["lor2c_structure"] = json.dumps(structure)
    if config is not None:
        with open(os.path.join(folder, CONFIG), encoding="utf-8") as f:
            data = {**json.load(f), **config}
        with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
            json.dump(data, f)
        if recompute:
            metadata[CONFIG_DIGEST_KEY] = config_digest(data)
    if recompute:
        metadata[DIGEST_KEY] = tensors_digest(tensors, metadata["lor2c_structure"], metadata["lor2c_base"])
    save_file(tensors, path, metadata=metadata)


def edited(structure: dict, case: str) -> dict:
    s = copy.deepcopy(structure)
    if case == "owner-99":
        s["owners"][0] = 99
    elif case == "owner-minus-1":
        s["owners"][-1] = -1
    elif case == "duplicated-owner":
        s["owners"][1] = s["owners"][0]
    elif case == "spans-out-of-order":
        s["spans"].reverse()
        s["owners"].reverse()
    elif case == "malformed-event":
        s["events"][0]["kind"] = "explode"
    elif case == "event-with-nan-score":
        s["events"][0]["scores"] = [float("nan")]
    elif case == "span-of-a-trillion-blocks":
        s["spans"][-1] = [s["spans"][-1][0], 10 ** 12]
    elif case == "fewer-blocks":  # covers 5 blocks consistently, but the base (and the signature) has 6
        s = {"num_blocks": 5, "spans": [[i, i] for i in range(5)], "owners": list(range(5)), "injected": [], "events": []}
    elif case == "not-an-object":
        s = [1, 2]
    return s


STRUCTURE_CASES = {
    "owner-99": "owners[0]=99", "owner-minus-1": "=-1 is invalid", "duplicated-owner": "owners[1]=",
    "spans-out-of-order": "spans in block order", "malformed-event": "events[0].kind='explode'",
    "event-with-nan-score": "events[0].scores=[nan]", "span-of-a-trillion-blocks": "1000000000000]",
    "fewer-blocks": "Structure is for 5 blocks; this model has 6", "not-an-object": "is a JSON object, got a list",
}


@pytest.fixture(scope="module")
def trained():
    return _adapted("roberta", "cls", "imlor2c")  # share_a, 2 merges, 2 injects, a trained classifier head


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_crafted_structures_are_refused_before_anything_changes(tmp_path, trained, case):
    trained.save_pretrained(tmp_path)
    rewrite(tmp_path, structure=edited(trained.structure, case))
    base = _base("roberta", "cls")
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError, match=WEIGHTS) as info:
        LoR2CModel.from_pretrained(base, str(tmp_path))
    assert STRUCTURE_CASES[case] in str(info.value)
    _assert_unchanged(base, before)  # the classifier head too: nothing is copied before the last check
    target = get_lor2c_model(_base("roberta", "cls"), LoR2CConfig.from_dict(trained.lor2c_config.to_dict())).eval()
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        target.load_adapter(str(tmp_path))
    _assert_unchanged(target, before)


def _flip_last_byte(folder) -> None:
    path = os.path.join(folder, WEIGHTS)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x10
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "metadata-byte-flipped": (lambda d, s: _edit_owner_stale(d, s), "fails its checksum"),
    "tensor-byte-flipped": (lambda d, s: _flip_last_byte(d), "fails its checksum"),
    "truncated": (lambda d, s: open(os.path.join(d, WEIGHTS), "r+b").truncate(100), "is not a readable safetensors file"),
    "config-not-json": (lambda d, s: open(os.path.join(d, CONFIG), "w").write("{\"r\": 4,"), f"{CONFIG} is not valid JSON"),
    "config-not-utf8": (lambda d, s: open(os.path.join(d, CONFIG), "wb").write(b"{\"method\": \"caf\xe9\"}"), f"{CONFIG} is not UTF-8"),
    "config-bad-value": (lambda d, s: rewrite(d, config={"r": "4"}), "LoR2CConfig.r='4' is invalid"),
    "config-edited": (lambda d, s: rewrite(d, config={"lora_dropout": 0.2}, recompute=False), "is not the config saved with"),
}


def _edit_owner_stale(folder, structure) -> None:
    """A flipped byte in the metadata: one owner changes, the checksum stays as it was written."""
    path = os.path.join(folder, WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    s = copy.deepcopy(structure)
    s["owners"][-1] ^= 1  # e.g. owners [1, 3] -> [1, 2]: a retired slot
    metadata["lor2c_structure"] = json.dumps(s)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_files_are_refused_naming_the_file(tmp_path, trained, case):
    trained.save_pretrained(tmp_path)
    damage, expected = DAMAGE[case]
    damage(str(tmp_path), trained.structure)
    base = _base("roberta", "cls")
    before = _snapshot(base)
    with pytest.raises(AdapterLoadError) as info:
        LoR2CModel.from_pretrained(base, str(tmp_path))
    assert expected in str(info.value) and str(tmp_path) in str(info.value)
    _assert_unchanged(base, before)


def test_weights_of_one_save_beside_the_config_of_another_are_refused(tmp_path, monkeypatch):
    """A save of an r=8 adapter over an r=4 one, interrupted between its two renames: new weights, old config."""
    import lor2c_hf.serialization as serialization

    _adapted(variant="merged", seed=1).save_pretrained(tmp_path)
    real = serialization.atomic_write_text
    monkeypatch.setattr(serialization, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        get_lor2c_model(_base(), LoR2CConfig(r=8)).save_pretrained(tmp_path)
    monkeypatch.setattr(serialization, "atomic_write_text", real)
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG} is not the config saved with .*{WEIGHTS}.*parts of two saves"):
        LoR2CModel.from_pretrained(_base(), str(tmp_path))


def test_a_save_removes_temporary_files_left_by_a_killed_save(tmp_path):
    (tmp_path / ".tmp-abc123").write_bytes(b"\x00" * 64)
    _adapted().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]


# --- non-finite values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e19, 1e-30])
def test_sfs_is_scale_free_for_huge_and_tiny_weights(scale):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, 32, generator=g), torch.randn(5, 32, 4, generator=g)
    reference = sfs_scores(a, b)
    scaled = sfs_scores(a * scale, b * scale)
    assert not scaled.zero.any() and torch.isfinite(scaled.sfs).all()
    torch.testing.assert_close(scaled.sfs, reference.sfs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_event_refuses_a_non_finite_connection_naming_its_span(value):
    model = _adapted(variant="merged")
    spans = model.structure["spans"]
    with torch.no_grad():
        model.connections[1].lora_B[0, 0] = value
    before = model.structure
    for event in (model.apply_merge, model.sfs):
        with pytest.raises(NonFiniteError, match=re.escape(f"span(s) [{spans[1]}] hold NaN or Inf")):
            event()
    assert model.structure == before


def test_save_pretrained_refuses_a_non_finite_adapter(tmp_path):
    model = _adapted(variant="merged")
    with torch.no_grad():
        model.connections[0].lora_A[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=re.escape(f"lor2c.lora_A.0 (connection span {model.structure['spans'][0]}) hold NaN")):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model.save_pretrained(tmp_path / "kept", allow_nonfinite=True)  # on request, e.g. to inspect a diverged run
    assert sorted(os.listdir(tmp_path / "kept")) == [CONFIG, WEIGHTS]


class PoisonAt(TrainerCallback):
    """Puts a NaN into the frozen word embeddings before optimizer step `step`: the loss and then the
    adapter's update go NaN at that step, as when a run diverges."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.get_base_model().base_model.embeddings.word_embeddings.weight[:, 0] = float("nan")


def test_training_stops_at_the_step_that_makes_the_adapter_non_finite(tmp_path):
    trainer = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path, max_steps=6, save_strategy="steps",
                                                                                save_steps=1),
                           train_dataset=cls_data(48), lor2c_config=LoR2CConfig(r=4), callbacks=[PoisonAt(3)])
    with pytest.raises(NonFiniteError, match=r"Training stopped at step 3: .*lor2c.lora_[AB].\d+ \(connection span \[\d, \d\]\)"
                                             r".*stop_on_nonfinite=False"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]  # nothing non-finite was saved

    unchecked = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path / "off", max_steps=4),
                             train_dataset=cls_data(48), lor2c_config=LoR2CConfig(r=4), callbacks=[PoisonAt(3)],
                             stop_on_nonfinite=False)
    unchecked.train()  # runs to the end when asked to, but will not save what it made
    with pytest.raises(NonFiniteError, match="Cannot save the adapter"):
        unchecked.save_model(str(tmp_path / "off" / "final"))


# --- resume refusals ----------------------------------------------------------------------------------------


def test_a_refused_resume_changes_nothing(tmp_path):
    """A complete-looking checkpoint (manifest rewritten) with a crafted structure: refused before any copy."""
    run = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path / "a", max_steps=2, save_strategy="steps",
                                                                          save_steps=2),
                       train_dataset=cls_data(16), lor2c_config=LoR2CConfig(r=4))
    run.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with safe_open(str(checkpoint / WEIGHTS), framework="pt") as f:
        structure = json.loads(f.metadata()["lor2c_structure"])
    rewrite(checkpoint, structure=edited(structure, "owner-99"))
    mark_complete(str(checkpoint))
    fresh = LoR2CTrainer(tiny_model("roberta", num_layers=4), training_args(tmp_path / "b", max_steps=4),
                         train_dataset=cls_data(16), lor2c_config=LoR2CConfig(r=4))
    before = _snapshot(fresh.lor2c_model)
    with pytest.raises(AdapterLoadError, match="owners"):
        fresh.train(resume_from_checkpoint=str(checkpoint))
    _assert_unchanged(fresh.lor2c_model, before)


def test_an_explicit_incomplete_checkpoint_is_refused_with_the_reason(tmp_path):
    run = LoR2CTrainer(tiny_model("bert", num_layers=2), training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
                       train_dataset=cls_data(16), lor2c_config=LoR2CConfig(r=4))
    run.train()
    os.remove(tmp_path / "checkpoint-2" / MANIFEST_NAME)
    with open(tmp_path / "checkpoint-1" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    for folder, reason in (("checkpoint-2", f"has no {MANIFEST_NAME}: its save was interrupted"),
                           ("checkpoint-1", "optimizer.pt has 10 bytes")):
        with pytest.raises(CheckpointError, match=reason):
            run.train(resume_from_checkpoint=str(tmp_path / folder))
    with pytest.raises(CheckpointError, match="checkpoint-2 cannot be resumed"):  # Trainer's pick, refused on load
        run.train(resume_from_checkpoint=True)


# --- the Hub token never reaches training_args.bin ----------------------------------------------------------


def test_training_args_bin_never_holds_the_hub_token(tmp_path):
    secret = "hf_" + "S3cr3tT0k3n" * 3
    args = training_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, hub_token=secret)
    trainer = LoR2CTrainer(tiny_model("bert", num_layers=2), args, train_dataset=cls_data(8), lor2c_config=LoR2CConfig(r=4))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in ("checkpoint-1", "final"):
        raw = (tmp_path / folder / "training_args.bin").read_bytes()
        assert secret.encode() not in raw
        loaded = torch.load(tmp_path / folder / "training_args.bin", weights_only=False)
        assert type(loaded) is type(args).__mro__[1] and loaded.hub_token is None and loaded.learning_rate == args.learning_rate
    assert trainer.args.hub_token == secret and copy.deepcopy(trainer.args).hub_token == secret  # still usable for uploads
    assert secret.encode() not in pickle.dumps(trainer.args)


# --- the long randomized sweep of damaged files (README, "Reliability") --------------------------------------


@pytest.mark.slow
def test_random_damage_is_refused_or_harmless(tmp_path, trained):
    """SWEEP_DAMAGE random flipped bytes or truncations of the weights or the config: each load is refused with
    `AdapterLoadError` before anything changes, or (a flip in JSON whitespace) loads the very same adapter."""
    from test_serialization import _outputs

    trained.save_pretrained(tmp_path / "good")
    files = {name: (tmp_path / "good" / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    expected = _outputs(trained)
    rng = random.Random(int(os.environ.get("SWEEP_SEED", "13")))
    refused = harmless = 0
    for trial in range(int(os.environ.get("SWEEP_DAMAGE", "300"))):
        name = rng.choice((WEIGHTS, WEIGHTS, CONFIG))
        data = bytearray(files[name])
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        folder = tmp_path / f"trial-{trial}"
        folder.mkdir()
        for other, content in files.items():
            (folder / other).write_bytes(bytes(data) if other == name else content)
        base = _base("roberta", "cls")
        before = _snapshot(base)
        try:
            loaded = LoR2CModel.from_pretrained(base, str(folder))
        except AdapterLoadError:
            _assert_unchanged(base, before)
            refused += 1
        else:
            assert loaded.structure == trained.structure and torch.equal(_outputs(loaded), expected), (name, trial)
            harmless += 1
    print(f"\n[sweep] damaged files tried: {trial + 1}, refused: {refused}, harmless (identical load): {harmless}")
