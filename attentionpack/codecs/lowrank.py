"""Truncated SVD of multi-head K/V blocks: all KV heads side by side, one shared left basis per sample.

For a block M (T x D, D = H_kv * d) the right singular vectors are the eigenvectors of the Gram matrix MᵀM (D x D),
which is small, so we factor through it: M ≈ C Bᵀ with B = V_r (D x r) and C = M V_r = U_r S_r (T x r).
The squared reconstruction error is exactly the discarded energy Σ_{i>r} σ_i². The Gram matrix is formed in
float64 so small singular values keep their accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..parts import Factors


@dataclass
class RankRule:
    """How many components to keep: fixed `rank`, a `fraction` of D, or the smallest rank reaching `energy`."""

    rank: int | None = None
    fraction: float | None = None
    energy: float | None = None
    max_fraction: float = 1.0

    def choose(self, spectrum: torch.Tensor) -> int:
        """Rank for one block given its squared singular values `spectrum` (D,), descending."""
        dim = spectrum.shape[-1]
        cap = max(1, int(round(self.max_fraction * dim)))
        if self.rank is not None:
            return min(self.rank, dim)
        if self.fraction is not None:
            return max(1, min(dim, int(round(self.fraction * dim))))
        if self.energy is None:
            raise ValueError("RankRule needs one of rank, fraction or energy")
        return min(energy_rank(spectrum, self.energy), cap)


def energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} σ_i² >= energy · Σ σ_i² (at least 1). `spectrum` holds σ² descending."""
    return energy_ranks(spectrum, (energy,))[0]


def energy_ranks(spectrum: torch.Tensor, energies: Sequence[float]) -> list[int]:
    """`energy_rank` of every energy, the spectrum's cumulative sum formed once."""
    total = spectrum.sum()
    if total <= 0:
        return [1] * len(energies)
    captured = torch.cumsum(spectrum, 0) / total
    # tolerance for round-off: a threshold of 1.0 must be reachable
    wanted = torch.tensor(energies, dtype=captured.dtype, device=captured.device) - 1e-12
    return [min(int(i) + 1, spectrum.numel()) for i in torch.searchsorted(captured, wanted).tolist()]


def spectrum_and_basis(
    blocks: torch.Tensor, gram_dtype: torch.dtype = torch.float64, solve_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (B, D) descending and right singular vectors (B, D, D) of blocks (B, T, D).
    The Gram matrix is formed in `gram_dtype` (float64: small singular values stay accurate) and its eigenvectors
    solved in `solve_dtype` (float32 only where the components kept hold far more energy than its round-off)."""
    m = blocks.to(gram_dtype)
    gram = (m.transpose(1, 2) @ m).to(solve_dtype)  # (B, D, D)
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    return eigvals.flip(-1).clamp_min(0), eigvecs.flip(-1)


def score_weighting(moments: torch.Tensor) -> torch.Tensor:
    """A (B, D, D) block-diagonal L with L Lᵀ = M, from per-head query second moments M (B, H, d, d).

    For keys K (T, D) and queries q of head h, the squared score errors summed over the queries are
    tr((K - K̂)_h M_h (K - K̂)_hᵀ) = ||(K - K̂) L||²: factoring K L instead of K minimizes the error attention
    scores really make instead of the keys' own error. A small ridge (1e-4 of each head's mean eigenvalue) keeps
    L invertible when the queries span fewer than d directions."""
    b, h, d, _ = moments.shape
    m = moments.to(torch.float64)
    ridge = 1e-4 * m.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # (B, H)
    chol = torch.linalg.cholesky(
        m + ridge[..., None, None] * torch.eye(d, dtype=torch.float64, device=m.device)
    )  # (B, H, d, d)
    out = torch.zeros(b, h * d, h * d, dtype=torch.float64, device=m.device)
    for i in range(h):
        out[:, i * d : (i + 1) * d, i * d : (i + 1) * d] = chol[:, i]
    return out


def factorize(
    blocks: torch.Tensor, rule: RankRule, weighting: torch.Tensor | None = None
) -> tuple[Factors, list[int], torch.Tensor]:
    """Factor blocks (B, T, D). Returns the factors (rank = the largest per-sample rank), the per-sample ranks the
    rule chose, and the squared singular values (B, D) the rule saw.

    With `weighting` L (B, D, D) invertible, the rank-r factors minimize ||(M - M̂) L|| instead of ||M - M̂||: the
    SVD of M L gives coeffs = (M L) V_r and basis = V_rᵀ L⁻¹, so that coeffs @ basis is still the approximation of
    M itself (see `score_weighting`). The rank is still read from M's own spectrum: the weighting chooses which r
    directions to keep, not how many (the weighted spectrum is dominated by the scores' common offset, which the
    softmax ignores, and would pick far too few)."""
    x = blocks.to(torch.float64)
    spectrum, vecs = spectrum_and_basis(x)
    ranks = [rule.choose(spectrum[b]) for b in range(blocks.shape[0])]
    if weighting is not None:
        x = x @ weighting.to(torch.float64)
        _, vecs = spectrum_and_basis(x)
    r = max(ranks)
    basis64 = vecs[:, :, :r]  # (B, D, r)
    coeffs = (x @ basis64).to(blocks.dtype)  # (B, T, r)
    right = basis64.transpose(1, 2)  # (B, r, D)
    if weighting is not None:  # back from the weighted space: basis = V_rᵀ L⁻¹
        right = torch.linalg.solve_triangular(weighting.to(torch.float64), right, upper=False, left=False)
    basis = right.to(blocks.dtype).contiguous()  # (B, r, D)
    return Factors(coeffs.contiguous(), basis), ranks, spectrum
