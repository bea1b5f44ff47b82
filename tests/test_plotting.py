"""`plot_structure`: a real PNG of spans, injected blocks and the SFS timeline; clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from lor2c_hf import LoR2CConfig, get_lor2c_model, plot_structure  # noqa: E402
from lor2c_hf.plotting import INJECT_COLOR, MERGED_COLOR  # noqa: E402
from lor2c_hf.structure import Structure  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pixels_of(png_path, color: str) -> int:
    """How many pixels of the image are (close to) `color`."""
    rgb = mpimg.imread(png_path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(color))).max(-1) < 0.02).sum())


@pytest.fixture(scope="module")
def evented_model():
    model = get_lor2c_model(tiny_model("bert", num_layers=6), LoR2CConfig.for_method("imlor2c", r=4, num_merges=2, num_injects=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for b in model.lor2c.lora_B:
            b.normal_()  # non-zero B: defined SFS scores
    model.apply_merge(step=3)
    model.apply_inject(step=3)
    model.apply_merge(step=6)
    model.apply_inject(step=6)
    return model


def test_png_of_a_model_with_merges_and_injects(evented_model, tmp_path):
    s = evented_model.structure
    assert s["injected"] and any(e > b for b, e in s["spans"])  # the picture has both kinds to show
    path = plot_structure(evented_model, str(tmp_path / "structure.png"), title="imlor2c")
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE and (tmp_path / "structure.png").stat().st_size > 1000
    height, width = mpimg.imread(path).shape[:2]
    assert height > 100 and width > 100
    assert _pixels_of(path, INJECT_COLOR) > 100  # injected blocks are marked
    assert _pixels_of(path, MERGED_COLOR) > 100  # merged spans are drawn


def test_plain_structure_has_no_inject_or_merge_marks(tmp_path):
    path = plot_structure(Structure.initial(4), str(tmp_path / "plain.png"))
    assert _pixels_of(path, INJECT_COLOR) == 0 and _pixels_of(path, MERGED_COLOR) == 0


def test_structure_dict_and_object_render(evented_model, tmp_path):
    as_dict = evented_model.structure
    for name, source in (("dict.png", as_dict), ("object.png", Structure.from_dict(as_dict))):
        plot_structure(source, str(tmp_path / name))
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_bad_inputs_raise_clear_errors(tmp_path):
    target = str(tmp_path / "x.png")
    with pytest.raises(TypeError, match="model_or_structure.*LoR2CModel.*got str"):
        plot_structure("spans", target)
    with pytest.raises(ValueError, match=r"lacks \['spans'\]"):
        plot_structure({"num_blocks": 3}, target)
    overlapping = {"num_blocks": 3, "spans": [[0, 1], [1, 2]], "owners": [0, 1], "injected": [], "events": []}
    with pytest.raises(ValueError, match="not a valid LoR2C structure"):
        plot_structure(overlapping, target)
    with pytest.raises(ValueError, match=r"path='structure.svg'.*'\.png'"):
        plot_structure(Structure.initial(2), "structure.svg")
    assert not (tmp_path / "x.png").exists()


def test_model_card_shows_the_structure_picture_and_drops_it_without_matplotlib(evented_model, tmp_path, monkeypatch):
    from lor2c_hf.model_card import write_model_card

    assert write_model_card(evented_model, str(tmp_path), "me/adapter") == ["README.md", "structure.png"]
    assert (tmp_path / "structure.png").read_bytes().startswith(PNG_SIGNATURE)
    assert _pixels_of(tmp_path / "structure.png", INJECT_COLOR) > 0  # the injected blocks are drawn
    assert "![Structure" in (tmp_path / "README.md").read_text() and "](structure.png)" in (tmp_path / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # atomic writes left nothing behind

    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if the plot extra were not installed
    assert write_model_card(evented_model, str(bare), "me/adapter") == ["README.md"]
    assert "structure.png" not in (bare / "README.md").read_text() and not (bare / "structure.png").exists()
