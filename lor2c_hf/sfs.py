"""SFS, the "shape of feature space" score of a low-rank module (SPEC §3, the paper's eq. 5).

For W = B A (d x d, rank <= r) with singular values s_1 >= ... >= s_n:
rho = (s_1 + ... + s_k) / sum(s), SFS = 1 - rho. The singular values of B A equal those of the r x r
matrix R_B R_A^T (QR of B and of A^T), so the d x d product is never formed. Always float32.

SFS is scale-free, so each A and B is first divided by its largest magnitude: weights of
1e19 or 1e-30 score exactly as weights of 1 do instead of overflowing to NaN or underflowing to "zero".
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SFSScores(NamedTuple):
    sfs: torch.Tensor  # (n,) information score, 1 - rho; 0 for an all-zero module
    rho: torch.Tensor  # (n,) share of the top-k singular values; 1 for an all-zero module
    zero: torch.Tensor  # (n,) bool, modules whose B A is exactly zero (no defined SFS)


def unit_scaled(x: torch.Tensor) -> torch.Tensor:
    """`x` divided by its largest magnitude per matrix (an all-zero matrix stays zero), then float32; the division
    is exact-ish in float32 (float64 inputs divide first, so 1e-300 does not flush to zero)."""
    x = x.detach() if x.dtype == torch.float64 else x.detach().float()
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    return (x / torch.where(peak > 0, peak, torch.ones_like(peak))).float()


def finite_modules(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) bool: module i has no NaN or Inf in its B (n, d, r) and its A (n, r, d), or in the shared A (r, d)."""
    ok = torch.isfinite(b).flatten(1).all(-1)
    a_ok = torch.isfinite(a).flatten(-2).all(-1)
    return ok & a_ok


def singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of `b @ a` for stacks a: (n, r, d) or (r, d), b: (n, d, r), descending, float32, each
    module scaled to a largest magnitude of 1 (SFS and rho do not change; the values are relative)."""
    b = unit_scaled(b)
    a = unit_scaled(a)
    r_b = torch.linalg.qr(b, mode="r").R  # (n, r, r); mode "r" skips forming Q, which is never used
    r_a = torch.linalg.qr(a.transpose(-1, -2), mode="r").R  # (n, r, r), or (r, r) once for a shared A
    if r_a.ndim == 2:
        r_a = r_a.expand(b.shape[0], *r_a.shape)
    return torch.linalg.svdvals(r_b @ r_a.transpose(-1, -2))


def sfs_scores(a: torch.Tensor, b: torch.Tensor, top_k: int = 2) -> SFSScores:
    """SFS of every module in the stacks `a` (n, r, d) or shared (r, d), and `b` (n, d, r), in one batched call."""
    sv = singular_values(a, b)
    total = sv.sum(-1)
    zero = total == 0
    rho = torch.where(zero, torch.ones_like(total), sv[:, :top_k].sum(-1) / total.clamp_min(torch.finfo(sv.dtype).tiny))
    return SFSScores(sfs=1.0 - rho, rho=rho, zero=zero)
