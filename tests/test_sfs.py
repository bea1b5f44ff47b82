"""SFS scores (SPEC §3) against the singular values of the dense d x d product B @ A in float64."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lor2c_hf import LoR2CConfig, get_lor2c_model, sfs_scores
from tiny_models import tiny_model


def dense_reference(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[list[float], list[float]]:
    """(sfs, rho) of every module from torch.linalg.svdvals of the dense B @ A, in float64."""
    sfs, rho = [], []
    for i in range(b.shape[0]):
        a_i = a if a.ndim == 2 else a[i]
        sv = torch.linalg.svdvals(b[i].double() @ a_i.double())
        share = float(sv[:k].sum() / sv.sum())
        rho.append(share)
        sfs.append(1.0 - share)
    return sfs, rho


def _random(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_scores(scores, a, b, k, tol=1e-5):
    sfs, rho = dense_reference(a, b, k)
    assert scores.sfs.dtype == scores.rho.dtype == torch.float32
    assert scores.sfs.tolist() == pytest.approx(sfs, abs=tol)
    assert scores.rho.tolist() == pytest.approx(rho, abs=tol)
    assert not scores.zero.any()


@pytest.mark.parametrize("n,d,r,k", [(5, 32, 4, 2), (3, 64, 8, 3), (4, 16, 16, 1), (2, 192, 16, 2)])
def test_random_stacks_match_dense_svd(n, d, r, k):
    a, b = _random((n, r, d), seed=n), _random((n, d, r), seed=d)
    _assert_scores(sfs_scores(a, b, top_k=k), a, b, k)


def test_shared_a_matches_dense_svd():
    a, b = _random((4, 48), seed=0), _random((6, 48, 4), seed=1)
    scores = sfs_scores(a, b, top_k=2)
    assert scores.sfs.shape == (6,)
    _assert_scores(scores, a, b, 2)


def test_bfloat16_inputs_are_scored_in_float32():
    a, b = _random((3, 4, 32), seed=2, dtype=torch.bfloat16), _random((3, 32, 4), seed=3, dtype=torch.bfloat16)
    _assert_scores(sfs_scores(a, b), a, b, 2)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k(k):
    a, b = _random((3, 4, 24), seed=4), _random((3, 24, 4), seed=5)
    _assert_scores(sfs_scores(a, b, top_k=k), a, b, k)


def test_top_k_equal_to_rank_leaves_no_information():
    a, b = _random((2, 4, 24), seed=6), _random((2, 24, 4), seed=7)
    scores = sfs_scores(a, b, top_k=4)
    assert scores.rho.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert scores.sfs.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_rank_one_b_has_no_information_beyond_top_1():
    a = _random((2, 4, 24), seed=8)
    b = _random((2, 24, 1), seed=9) * _random((2, 1, 4), seed=10)  # rank 1
    scores = sfs_scores(a, b, top_k=1)
    assert scores.sfs.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    assert torch.isfinite(scores.sfs).all()


def test_scale_invariant_and_finite_for_tiny_weights():
    a, b = _random((3, 4, 32), seed=11), _random((3, 32, 4), seed=12)
    reference = sfs_scores(a, b).sfs
    tiny = sfs_scores(a, b * 1e-12).sfs
    assert torch.isfinite(tiny).all()
    torch.testing.assert_close(tiny, reference, rtol=0, atol=1e-5)


def test_zero_b_has_defined_scores():
    a = _random((3, 4, 32), seed=13)
    b = _random((3, 32, 4), seed=14)
    b[1] = 0
    scores = sfs_scores(a, b)
    assert scores.zero.tolist() == [False, True, False]
    assert scores.sfs[1].item() == 0.0 and scores.rho[1].item() == 1.0
    assert torch.isfinite(scores.sfs).all() and torch.isfinite(scores.rho).all()
    sfs, _ = dense_reference(a[[0, 2]], b[[0, 2]], 2)
    assert scores.sfs[[0, 2]].tolist() == pytest.approx(sfs, abs=1e-5)


def test_all_zero_b_at_init_scores_zero_and_logs(caplog):
    model = get_lor2c_model(tiny_model("llama", num_layers=4), LoR2CConfig(r=4, num_merges=1))
    scores = model.sfs()
    assert scores.zero.all() and (scores.sfs == 0).all() and (scores.rho == 1).all()
    with caplog.at_level(logging.INFO, logger="lor2c_hf"):
        record = model.apply_merge()
    zero_lines = [r.getMessage() for r in caplog.records if "B = 0" in r.getMessage()]
    assert len(zero_lines) == 1 and "[0, 0]" in zero_lines[0] and "[3, 3]" in zero_lines[0]
    assert not any(math.isnan(s) for s in record["scores"] + record["rho"])
    assert record["blocks"] == [0, 1]  # all tied at 0: the lowest pair goes first


# --- through the model ---------------------------------------------------------------------------------------


def _randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lor2c.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _model_reference(model, k: int) -> list[float]:
    connections = model.connections
    return [dense_reference(c.lora_A.detach(), c.lora_B.detach()[None], k)[0][0] for c in connections]


@pytest.mark.parametrize("share_a", [False, True])
def test_model_sfs_is_aligned_with_connections(share_a):
    model = get_lor2c_model(tiny_model("llama", num_layers=5), LoR2CConfig(r=4, share_a=share_a, num_merges=2))
    _randomize(model)
    model.apply_merge()
    model.apply_merge()
    assert len(model.connections) == 3
    assert model.sfs().sfs.tolist() == pytest.approx(_model_reference(model, 2), abs=1e-5)


def test_model_sfs_uses_the_configured_top_k():
    model = get_lor2c_model(tiny_model("bert", num_layers=3), LoR2CConfig(r=8, sfs_top_k=5))
    _randomize(model)
    assert model.sfs().sfs.tolist() == pytest.approx(_model_reference(model, 5), abs=1e-5)


def test_bf16_model_scores_in_float32():
    model = get_lor2c_model(tiny_model("llama", num_layers=3), LoR2CConfig(r=4)).to(torch.bfloat16)
    _randomize(model)
    assert model.connections[0].lora_B.dtype == torch.bfloat16
    scores = model.sfs()
    assert scores.sfs.dtype == torch.float32
    assert scores.sfs.tolist() == pytest.approx(_model_reference(model, 2), abs=1e-5)
