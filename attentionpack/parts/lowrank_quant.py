"""Low-rank factors with quantized coefficients (and optionally a float16 or 8-bit basis).

The coefficients (B, T, r) are quantized along the tokens, every component with its own scale per group of
tokens; with keys factored after RoPE, attention scores the queries projected into the basis against the codes
(`kernels.ops`), so neither the keys nor the coefficients are rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import BatchFn, RopeFn
from .lowrank import Factors, LowRankPart
from .quant import Quantized, _bad, _check_bits_group, dequantize, dequantize_native, quantize


@dataclass
class QuantizedLowRankPart:
    """Low-rank factors with quantized coefficients and (optionally) an 8-bit basis; keys stored before RoPE and
    rotated again on use, exactly like `LowRankPart`.

    coeffs: quantization of (B, T, r) along T: every component (column) gets its own scale per group of tokens.
    The columns of C = U S scale with their singular values, so a group along r would share one scale between
    large and small components and crush the small ones; along T each column keeps its own range (the same reason
    KIVI quantizes keys per channel; tests/test_quant.py::test_coeffs_along_tokens_beats_rank checks it).
    basis: quantization of (B, r, D) along D (rows are unit vectors, similar ranges), a float16 copy, or the tensor
    itself.
    positions (B, T) int32 only for keys."""

    coeffs: Quantized
    basis: Quantized | torch.Tensor
    num_heads: int
    positions: torch.Tensor | None = None
    sample_ranks: tuple[int, ...] = ()

    @classmethod
    def from_factors(
        cls,
        factors: Factors,
        num_heads: int,
        positions: torch.Tensor | None = None,
        sample_ranks: tuple[int, ...] = (),
        coeff_bits: int = 4,
        coeff_group: int = 32,
        basis_bits: int | None = 8,
        basis_group: int = 32,
    ) -> QuantizedLowRankPart:
        """coeff_bits in (4, 8); basis_bits 8, 16 (float16) or None (keep the basis in the cache dtype)."""
        where = "QuantizedLowRankPart.from_factors"
        if coeff_bits not in (4, 8) or isinstance(coeff_bits, bool):
            _bad(where, "coeff_bits", coeff_bits, "one of (4, 8)")
        if basis_bits not in (8, 16, None) or isinstance(basis_bits, bool):
            _bad(where, "basis_bits", basis_bits, "8, 16 or None")
        if not isinstance(num_heads, int) or num_heads < 1 or factors.basis.shape[-1] % num_heads:
            _bad(where, "num_heads", num_heads, f"a positive divisor of D={factors.basis.shape[-1]}")
        _check_bits_group(where, coeff_bits, coeff_group)
        coeffs = quantize(factors.coeffs, coeff_bits, coeff_group, axis=1)  # groups along T
        if basis_bits is None:
            basis: Quantized | torch.Tensor = factors.basis
        elif basis_bits == 16:
            basis = factors.basis.to(torch.float16)
        else:
            _check_bits_group(where, basis_bits, basis_group)
            basis = quantize(factors.basis, basis_bits, basis_group, axis=2)  # groups along D
        return cls(coeffs, basis, num_heads, positions, tuple(sample_ranks))

    def float_basis(self) -> torch.Tensor:
        """The basis (B, r, D) in the dtype of the cached states."""
        if isinstance(self.basis, Quantized):
            return dequantize(self.basis)
        return self.basis.to(self.coeffs.dtype)

    def factors(self) -> Factors:
        """Dequantized factors: coeffs (B, T, r), basis (B, r, D)."""
        return Factors(
            dequantize_native(self.coeffs).transpose(1, 2), self.float_basis()
        )  # a view of the stored (B, r, T)

    def factors_as(self, dtype: torch.dtype) -> Factors:
        """Factors dequantized straight to `dtype` (the queries' or weights' dtype, whatever the cached states'):
        coeffs (B, T, r), basis (B, r, D)."""
        return Factors(dequantize_native(self.coeffs, dtype).transpose(1, 2), self.basis_as(dtype))

    def basis_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The basis (B, r, D) dequantized straight to `dtype`."""
        if isinstance(self.basis, Quantized):
            return dequantize_native(self.basis, dtype).movedim(-1, self.basis.axis)
        return self.basis.to(dtype)

    def materialize(self, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        return LowRankPart(self.factors(), self.num_heads, self.positions).materialize(start, end, rope)  # (B,H,T,d)

    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        """q (B, H, M, d) of any float dtype -> (B, H, M, T) in q's dtype."""
        return LowRankPart(self.factors_as(q.dtype), self.num_heads, self.positions).scores(q, start, end, rope)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, H, M, T) of any float dtype -> (B, H, M, d) in p's dtype."""
        return LowRankPart(self.factors_as(p.dtype), self.num_heads).mix(p)

    def tensors(self) -> list[torch.Tensor]:
        basis = self.basis.tensors() if isinstance(self.basis, Quantized) else [self.basis]
        return self.coeffs.tensors() + basis + ([self.positions] if self.positions is not None else [])

    def map_batch(self, fn: BatchFn) -> None:
        self.coeffs = self.coeffs.map_batch(fn)
        self.basis = self.basis.map_batch(fn) if isinstance(self.basis, Quantized) else fn(self.basis)
        if self.positions is not None:
            self.positions = fn(self.positions)

    def describe(self) -> dict[str, Any]:
        return {
            "codec": "lowrank_quant",
            "rank": self.coeffs.shape[2],
            "sample_ranks": list(self.sample_ranks),
            "coeff_bits": self.coeffs.bits,
            "coeff_group": self.coeffs.group_size,
            "basis_bits": self.basis.bits
            if isinstance(self.basis, Quantized)
            else 16
            if self.basis.dtype == torch.float16 and self.coeffs.dtype != torch.float16
            else None,
        }
