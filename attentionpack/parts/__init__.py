"""The storage contract (the bottom layer of the package): every stored form of a run of cached tokens.

A `Segment` is one stored run of tokens of one layer; its `keys` and `values` are `Part`s: `ExactPart`,
`LowRankPart` (factors at the cache dtype), `QuantizedPart` (KIVI-style codes), `QuantizedLowRankPart` (factors
with quantized coefficients). Imports nothing from the rest of the package but `rope`.
"""

from .base import BatchFn, Kind, Modality, Part, RopeFn, Segment, gather_slots, slot_log, storage_nbytes
from .exact import ExactPart
from .lowrank import Factors, LowRankPart, factor_mix, factor_scores
from .lowrank_quant import QuantizedLowRankPart
from .quant import (
    Quantized,
    QuantizedPart,
    check_quantize,
    dequantize,
    dequantize_native,
    error_bound,
    quantize,
    quantize_keys,
    quantize_values,
    quantize_widths,
)

__all__ = [
    "BatchFn",
    "ExactPart",
    "Factors",
    "Kind",
    "LowRankPart",
    "Modality",
    "Part",
    "Quantized",
    "QuantizedLowRankPart",
    "QuantizedPart",
    "RopeFn",
    "Segment",
    "dequantize",
    "dequantize_native",
    "error_bound",
    "gather_slots",
    "factor_mix",
    "factor_scores",
    "quantize",
    "quantize_keys",
    "quantize_values",
    "check_quantize",
    "quantize_widths",
    "slot_log",
    "storage_nbytes",
]
