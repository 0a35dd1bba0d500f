"""Encoders: turn a run of keys or values into one of the stored forms of `attentionpack.parts`."""

from .encode import encode_keys, encode_values, nbytes_bound, rank_rules
from .lowrank import RankRule, energy_rank, energy_ranks, factorize, spectrum_and_basis

__all__ = [
    "RankRule",
    "encode_keys",
    "encode_values",
    "energy_rank",
    "energy_ranks",
    "factorize",
    "nbytes_bound",
    "rank_rules",
    "spectrum_and_basis",
]
