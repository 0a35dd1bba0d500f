"""What rounding the exact tail's tokens costs, simulated: every decoding step's key and value are rounded (float16,
bfloat16, or 8-bit min/max quantization in groups of g channels: "q8g16", "q8g256" = one group per 256-wide head)
before they enter a `budget=f` cache's tail; the prefill is untouched. Prints the perplexity change of each mode on
the suite's windows (`suite.py`'s protocol: 2,048 prefilled + 256 teacher-forced tokens).

The experiment behind `PackConfig.tail_dtype` (docs/eval/half-tail-2026-12-06.md). Usage:
python experiments/tail_precision.py gemma3 play 3,1 none fp16 bf16 q8g16 q8g256 [--budget 0.125]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from suite import mean_nll, texts, windows  # noqa: E402

from attentionpack import PackConfig, load_model  # noqa: E402
from attentionpack.cache import tail as tail_module  # noqa: E402
from attentionpack.parts.quant import dequantize, quantize  # noqa: E402


def rounded(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "fp16":
        return x.half().to(x.dtype)
    if mode == "bf16":
        return x.bfloat16().to(x.dtype)
    if not mode.startswith("q8g"):
        raise SystemExit(f"unknown mode {mode!r}: none, fp16, bf16 or q8g<channels>")
    return dequantize(quantize(x, 8, int(mode[3:]), axis=-1)).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("text", choices=["britannica", "play", "code"])
    parser.add_argument("windows", help="comma-separated window indices of 4")
    parser.add_argument("modes", nargs="+")
    parser.add_argument("--budget", type=float, default=0.125)
    a = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(a.model)
    ids = tokenizer(texts()[a.text], return_tensors="pt", add_special_tokens=False).input_ids[0]
    spans = windows(ids, 4, 2048 + 256)
    mode = ["none"]
    append = tail_module.ExactTail.append

    def rounding_append(self, k, v, *args, **kwargs):  # a decoding step's token, rounded before it is stored
        if k.shape[-2] == 1 and mode[0] != "none":
            k, v = rounded(k, mode[0]), rounded(v, mode[0])
        return append(self, k, v, *args, **kwargs)

    tail_module.ExactTail.append = rounding_append  # type: ignore[method-assign]
    config = PackConfig(budget=a.budget, tail_dtype="model")  # the simulation rounds; the tail itself stays exact
    for w in (int(x) for x in a.windows.split(",")):
        base, _ = mean_nll(model, None, spans[w], 2048)
        cells = []
        for m in a.modes:
            mode[0] = m
            nll, _ = mean_nll(model, config, spans[w], 2048)
            cells.append(f"{m} {100 * (math.exp(nll - base) - 1):+.2f}%")
        print(f"{a.model} {a.text} w{w} budget={a.budget:g}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
