"""`push_to_hub` and loading from a repo id, for real over HTTP against a local stand-in of the Hub.

The stand-in (`hub_server.py`) is reached the way users reach a Hub mirror: `HF_ENDPOINT`. `huggingface_hub`
reads its settings when it is imported, so the fixture also sets the already-read values in
`huggingface_hub.constants` (and drops transformers' shared `HfApi`, made with the endpoint of its time). By default the client runs with `HF_HUB_DISABLE_XET=1`, so the safetensors file
goes through git-LFS (batch API, PUT to the "CDN" origin, verify, `lfsFile` in the commit); the `xet-client`
case runs the default client (hf_xet installed) against a stand-in that takes every file in the commit.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers.utils.hub
import yaml
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils._runtime import is_xet_available
from safetensors.torch import load as load_safetensors

from hub_server import HubStandIn
from lor2c_hf import AdapterLoadError, LoR2CConfig, LoR2CModel, get_lor2c_model
from tiny_models import random_ids, tiny_model

REPO = "user/tiny-lor2c"
BASE_REPO = "user/tiny-roberta"
ADAPTER_PREFIXES = ("lor2c.", "lor2c_injected.")


@pytest.fixture(params=["lfs", "xet-client"])
def hub(request, tmp_path, monkeypatch):
    xet_client = request.param == "xet-client"
    with HubStandIn(tmp_path / "hub", lfs_patterns=() if xet_client else ("*.safetensors", "*.bin")) as server:
        settings = {
            "HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "0" if xet_client else "1",
            "HF_HUB_CACHE": str(tmp_path / "cache"),
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet_client)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", settings["HF_HUB_CACHE"])
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # its shared HfApi keeps the endpoint it was made with
        assert is_xet_available() == xet_client
        server.xet_client = xet_client
        yield server


def _base():
    return tiny_model("roberta", head="cls", num_layers=6, seed=0)


def _trained(base_name=BASE_REPO, seed: int = 0) -> LoR2CModel:
    """An IMLoR2C adapter after training-like updates and its events, with a trained classifier head."""
    config = LoR2CConfig.for_method("imlor2c", r=4, num_merges=2, num_injects=2, base_model_name_or_path=base_name)
    model = get_lor2c_model(_base(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(ADAPTER_PREFIXES):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.startswith("model.classifier."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.apply_merge(step=10, epoch=1.0)
    model.apply_inject(step=10, epoch=1.0)
    model.apply_merge(step=20, epoch=2.0)
    model.apply_inject(step=20, epoch=2.0)
    return model.eval()


def _outputs(model) -> torch.Tensor:
    ids = random_ids(3, 9, seed=5)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _push_base(hub: HubStandIn, tmp_path) -> None:
    """The base model on the hub too, as users' bases are (`base_model` in a card must name a Hub model)."""
    _base().save_pretrained(tmp_path / "base")
    api = HfApi(token=hub.token)
    api.create_repo(BASE_REPO)
    api.upload_folder(repo_id=BASE_REPO, folder_path=tmp_path / "base")


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _expected_trainable(model: LoR2CModel) -> int:
    """Active adapter parameters counted from the public structure, plus the classifier head."""
    connections = model.connections
    a = {id(c.lora_A): c.lora_A.numel() for c in connections}  # a shared A counts once
    total = sum(a.values()) + sum(c.lora_B.numel() for c in connections)
    for block in model.structure["injected"]:
        total += sum(p.numel() for layer in model.lor2c_injected.layers_of(block).values() for p in layer.parameters())
    return total + sum(p.numel() for p in model.get_base_model().classifier.parameters())


def test_push_to_hub_sends_the_adapter_and_a_model_card(hub, tmp_path):
    _push_base(hub, tmp_path)
    model = _trained()
    url = model.push_to_hub(REPO, token=hub.token, metrics={"eval_accuracy": 0.8125, "eval_loss": 0.4321})
    commit = hub.commits(REPO)[-1]
    assert url == f"{hub.endpoint}/{REPO}/commit/{commit.oid}"

    files = hub.files(REPO)
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "structure.png"}
    assert hub.stored(REPO, "adapter_model.safetensors").lfs == (not hub.xet_client)
    assert not hub.stored(REPO, "README.md").lfs
    assert files["structure.png"].startswith(b"\x89PNG\r\n\x1a\n") and len(files["structure.png"]) > 5_000

    # The weights: real safetensors, exactly the model's adapter tensors and task head, nothing of the base.
    received = load_safetensors(files["adapter_model.safetensors"])
    expected = {k.replace("model.", "base_model.", 1) if k.startswith("model.") else k: v  # file keys
                for k, v in model.state_dict().items() if k.startswith(ADAPTER_PREFIXES + ("model.classifier.",))}
    assert received.keys() == expected.keys()
    owners = model.structure["owners"]
    retired = {f"lor2c.lora_{m}.{slot}" for m in "AB" for slot in range(len(model.lor2c.lora_B)) if slot not in owners}
    assert retired  # the merges retired slots: nothing reads them, so they are sent as zeros
    for key, value in expected.items():
        assert torch.equal(received[key], torch.zeros_like(value) if key in retired else value), key
    header_len = int.from_bytes(files["adapter_model.safetensors"][:8], "little")
    metadata = json.loads(files["adapter_model.safetensors"][8:8 + header_len])["__metadata__"]
    assert json.loads(metadata["lor2c_structure"]) == model.structure
    assert json.loads(files["adapter_config.json"]) == model.lor2c_config.to_dict()

    card = files["README.md"].decode()
    front = _front_matter(card)
    assert front["base_model"] == BASE_REPO and front["library_name"] == "lor2c-hf" and "imlor2c" in front["tags"]
    assert "imlor2c" in card and "r=4" in card and "merges=2, injects=2" in card
    assert f"Trainable parameters: {_expected_trainable(model):,d} of" in card
    assert json.dumps(model.structure["spans"]) in card and json.dumps(model.structure["injected"]) in card
    event_rows = [line for line in card.splitlines() if re.match(r"^\| (10|20) \| (merge|inject) \|", line)]
    assert len(event_rows) == 4
    assert "| eval_accuracy | 0.8125 |" in card and "| eval_loss | 0.4321 |" in card
    assert f'LoR2CModel.from_pretrained(base, "{REPO}")' in card
    assert "](structure.png)" in card  # the picture shows in the card

    # Writes carried the token to the Hub; the LFS upload went to the storage origin without it.
    writes = [r for r in hub.requests if r.origin == "hub" and r.method == "POST"]
    assert writes and all(r.authorized for r in writes)
    uploads = [r for r in hub.requests if r.origin == "cdn" and r.method == "PUT"]
    lfs_files = 2 + hub.stored(REPO, "structure.png").lfs  # base weights, adapter, and the picture if sent by LFS
    assert len(uploads) == (0 if hub.xet_client else lfs_files) and not any(r.authorized for r in uploads)


def test_from_pretrained_with_a_repo_id_downloads_and_reproduces_outputs(hub, tmp_path):
    _push_base(hub, tmp_path)
    model = _trained()
    model.push_to_hub(REPO, token=hub.token)
    hub.requests.clear()

    fresh = _base()
    loaded = LoR2CModel.from_pretrained(fresh, REPO)
    assert loaded.structure == model.structure
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert not torch.allclose(_outputs(_base()), _outputs(model), atol=1e-3)
    resolved = {r.path for r in hub.requests if r.origin == "hub" and r.method == "GET"}
    resolved |= {r.path for r in hub.requests if r.origin == "hub" and r.method == "HEAD"}
    assert f"/{REPO}/resolve/main/adapter_config.json" in resolved
    assert f"/{REPO}/resolve/main/adapter_model.safetensors" in resolved
    if not hub.xet_client:  # LFS content comes from the storage origin, without the token
        assert any(r.origin == "cdn" and r.method == "GET" for r in hub.requests)


def test_auto_loader_builds_base_and_adapter_from_hub_repo_ids_alone(hub, tmp_path):
    """One line from two Hub repos: the adapter's, and the base it names in `base_model_name_or_path`."""
    from lor2c_hf import AutoLoR2CModelForSequenceClassification

    _push_base(hub, tmp_path)
    model = _trained()
    model.push_to_hub(REPO, token=hub.token)
    loaded = AutoLoR2CModelForSequenceClassification.from_pretrained(REPO)
    assert isinstance(loaded, LoR2CModel) and loaded.structure == model.structure
    assert torch.equal(_outputs(loaded), _outputs(model))
    fetched = {r.path for r in hub.requests if r.origin == "hub" and r.method in ("GET", "HEAD")}
    assert any(p.startswith(f"/{BASE_REPO}/resolve/") and p.endswith("/config.json") for p in fetched)
    assert f"/{REPO}/resolve/main/adapter_config.json" in fetched


def test_the_model_card_usage_snippet_runs(hub, tmp_path):
    """The card's snippet, as written, rebuilds the model from the Hub (base class, head and labels included)."""
    _push_base(hub, tmp_path)
    model = _trained()
    model.push_to_hub(REPO, token=hub.token)
    card = hub.files(REPO)["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    rebuilt = namespace["model"]
    assert isinstance(rebuilt, LoR2CModel) and type(rebuilt.get_base_model()) is type(model.get_base_model())
    assert torch.equal(_outputs(rebuilt), _outputs(model))


def test_pushing_again_commits_the_new_weights_and_keeps_the_old_revision(hub, tmp_path):
    _push_base(hub, tmp_path)
    first = _trained(seed=1)
    first.push_to_hub(REPO, token=hub.token)
    first_commit = hub.commits(REPO)[-1]
    second = _trained(seed=2)
    second.push_to_hub(REPO, token=hub.token)  # the repo exists: create_repo answers 409, the push goes on
    commits = hub.commits(REPO)
    assert len(commits) == 3  # initial .gitattributes, then one commit per push
    assert commits[-1].files["adapter_model.safetensors"] != first_commit.files["adapter_model.safetensors"]
    assert commits[-1].files["adapter_config.json"] == first_commit.files["adapter_config.json"]

    latest = LoR2CModel.from_pretrained(_base(), REPO)
    pinned = LoR2CModel.from_pretrained(_base(), REPO, revision=first_commit.oid)
    assert torch.equal(_outputs(latest), _outputs(second))
    assert torch.equal(_outputs(pinned), _outputs(first))
    assert not torch.allclose(_outputs(latest), _outputs(pinned), atol=1e-3)


@pytest.mark.parametrize("base_name", [None, "local-path"])
def test_a_base_that_is_not_on_the_hub_still_gives_a_valid_card(hub, tmp_path, base_name):
    """No base id (a model built from a config) or a local path: the card names the base class, no base_model."""
    if base_name == "local-path":
        _base().save_pretrained(tmp_path / "my-base")
        base_name = str(tmp_path / "my-base")
    model = _trained(base_name=base_name)
    model.push_to_hub(REPO, token=hub.token)  # the hub validates the card's YAML
    card = hub.files(REPO)["README.md"].decode()
    assert "base_model" not in _front_matter(card)
    assert (base_name or "RobertaForSequenceClassification") in card
    assert "from transformers import RobertaForSequenceClassification" in card and "num_labels=2" in card


def test_hub_errors_are_clear_and_change_nothing(hub):
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())
    with pytest.raises(AdapterLoadError, match=rf"{REPO}.*RepositoryNotFoundError"):
        LoR2CModel.from_pretrained(base, REPO)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()) == hooks
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

    with pytest.raises(HfHubHTTPError) as info:  # no token: the hub refuses, nothing is created
        _trained(base_name=None).push_to_hub(REPO)
    assert info.value.response.status_code == 401
    assert REPO not in hub.repos


def test_trainer_push_to_hub_sends_only_the_adapter_and_our_card_with_eval_metrics(hub, tmp_path):
    import datasets
    from transformers import TrainingArguments

    from lor2c_hf import LoR2CTrainer

    _push_base(hub, tmp_path)
    ids = random_ids(batch=16, seq=8, seed=3)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, eval_strategy="steps",
                             eval_steps=4, save_strategy="no", report_to=[], use_cpu=True, hub_model_id=REPO,
                             hub_token=hub.token, push_to_hub=False)
    trainer = LoR2CTrainer(_base(), args, train_dataset=data, eval_dataset=data,
                           lor2c_config=LoR2CConfig.for_method("mergelor2c", num_merges=1, schedule="steps",
                                                               base_model_name_or_path=BASE_REPO))
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.push_to_hub(token=hub.token)

    files = hub.files(REPO)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "structure.png"} <= set(files)
    assert "](structure.png)" in files["README.md"].decode()
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    assert hub.token.encode() not in files["training_args.bin"]  # the pickled arguments travel without the token
    card = files["README.md"].decode()
    assert "library_name: lor2c-hf" in card and "mergelor2c" in card
    assert f"| eval_loss | {eval_loss} |" in card
    received = load_safetensors(files["adapter_model.safetensors"])
    for key, value in trainer.lor2c_model.adapter_state_dict().items():
        assert torch.equal(received[key], value), key
