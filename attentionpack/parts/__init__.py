"""The storage contract: every stored form of a run of cached tokens (the bottom layer of the package).

`Segment` is one stored run of tokens of one layer; its `keys` and `values` are `Part`s (exact, low-rank,
quantized, quantized low-rank, tiered).
"""
from ..cache.segments import ExactPart, LowRankPart, Part, RopeFn, Segment
from ..codecs.lowrank import Factors
from ..codecs.quant import Quantized, QuantizedLowRankPart, QuantizedPart
from ..codecs.tiered import TieredLowRankPart

__all__ = ["ExactPart", "Factors", "LowRankPart", "Part", "Quantized", "QuantizedLowRankPart", "QuantizedPart",
           "RopeFn", "Segment", "TieredLowRankPart"]
