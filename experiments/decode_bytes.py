"""Bytes a cache holds right after a prefill and after some decoded tokens, beside what DynamicCache holds then.

On a model with sliding-window layers (Gemma 3) the two differ: the stock cache still holds the whole prompt on
those layers right after the prefill and only their last W-1 tokens once decoding. Also the most held over the
steps (as a share of what DynamicCache holds at that step) and the exact tail's share then. Usage:
python experiments/decode_bytes.py [gemma3|smollm2|PATH] [CONFIG ...] [--prefill 2048] [--steps 64]
(a CONFIG as `attentionpack eval` names it: a preset, budget-F, or pack:field=value,...).
"""

from __future__ import annotations

import argparse

import torch

from attentionpack import PackedCache, load_model
from attentionpack.eval.configs import parse_config
from attentionpack.eval.data import britannica_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3")
    parser.add_argument("configs", nargs="*", default=["balanced", "max"])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model)
    ids = tokenizer(britannica_text(), return_tensors="pt", add_special_tokens=False).input_ids
    ids = ids[:, : a.prefill + a.steps]
    for name in a.configs:
        spec = parse_config(name)
        if spec.pack is None:
            raise SystemExit(f"{name}: not a PackedCache configuration")
        cache = PackedCache(model, spec.pack)
        peak = (0.0, 0.0, 0)  # (held / DynamicCache, the exact tail's bytes / DynamicCache, step)
        with torch.inference_mode():
            model(input_ids=ids[:, : a.prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
            after_prefill = cache.nbytes(), cache.dynamic_nbytes()
            for i in range(a.prefill, a.prefill + a.steps):
                model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
                dynamic = cache.dynamic_nbytes()
                share = cache.nbytes() / dynamic
                if share > peak[0]:
                    runs = [row for layer in cache.stats()["layers"] for row in layer["runs"]]
                    tail = sum(row["bytes"] for row in runs if row["kind"] == "recent")
                    peak = (share, tail / dynamic, i + 1 - a.prefill)
        held, dynamic = cache.nbytes(), cache.dynamic_nbytes()
        print(
            f"{name}: after the prefill {after_prefill[0]:,} bytes vs DynamicCache {after_prefill[1]:,} "
            f"({after_prefill[1] / after_prefill[0]:.2f}x); after {a.steps} decoded tokens {held:,} vs {dynamic:,} "
            f"({dynamic / held:.2f}x); most held {peak[0]:.4f} of DynamicCache (after {peak[2]} tokens; the exact "
            f"tail {peak[1]:.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
