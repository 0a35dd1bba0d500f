"""`PackConfig(budget=f)` on the embedded model: bytes held, perplexity change and what the choice costs.

Protocol of `attentionpack eval` (`eval.perplexity.continuation_perplexity`): prefill `--context` Britannica
tokens through the cache, teacher-force the next `--continuation`. Per budget: bytes held after prefill over
DynamicCache's, PPL and its change against a DynamicCache, prefill seconds, and the seconds the budget planner
itself spent (candidate encodings, their errors, the knapsack); plus the encodings chosen.

Run: nice -n 19 env OMP_NUM_THREADS=1 python -m attentionpack.bench.budget --budgets 0.25 0.125
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch


def _timed_planner():
    """Wrap the planner's methods to accumulate their wall time in the returned dict."""
    from ..cache.budgeted import BudgetPlanner

    spent = {"s": 0.0}
    for name in ("note_attention", "begin", "propose", "finish"):
        orig = getattr(BudgetPlanner, name)

        def wrapped(self, *a, _orig=orig, **k):
            t0 = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                spent["s"] += time.perf_counter() - t0

        setattr(BudgetPlanner, name, wrapped)
    return spent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--window", type=int, default=None, help="PackConfig.window (default: the config default)")
    ap.add_argument("--presets", nargs="*", default=[], help="also run these presets, e.g. max")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import DynamicCache

    from .. import PackConfig, PackedCache, load_model
    from ..eval.data import britannica_text, token_ids
    from ..eval.perplexity import continuation_perplexity

    model, tok = load_model()
    ids = token_ids(tok, britannica_text(), args.context + args.continuation, "the Britannica text")
    ids = ids[: args.context + args.continuation]
    spent = _timed_planner()
    base = continuation_perplexity(model, ids, args.context, args.continuation, lambda: DynamicCache(config=model.config))
    print(f"dynamic: PPL {base.ppl:.3f}, prefill {base.prefill_s:.1f} s", flush=True)
    runs = [(p, PackConfig.preset(p)) for p in args.presets]
    extra = {} if args.window is None else {"window": args.window}
    runs += [(f"budget {f:g}", PackConfig(budget=f, **extra)) for f in args.budgets]
    print(f"{'config':>14} {'ratio':>6} {'bytes/dyn':>9} {'PPL':>8} {'dPPL':>7} {'prefill':>8} {'planner':>8}  choices")
    for name, cfg in runs:
        caches = []

        def fresh(cfg=cfg):
            caches.append(PackedCache(model, cfg))
            return caches[-1]

        spent["s"] = 0.0
        r = continuation_perplexity(model, ids, args.context, args.continuation, fresh)
        planner_s = spent["s"]
        cache = caches[-1]
        dyn = args.context * 2 * sum(layer.spec.num_kv_heads * layer.spec.head_dim for layer in cache.layers) \
            * model.dtype.itemsize
        mix = Counter(f"{layer.budget_choice[0]}/{layer.budget_choice[1]}" for layer in cache.layers
                      if layer.budget_choice)
        print(f"{name:>14} {dyn / r.bytes_after_prefill:5.2f}x {r.bytes_after_prefill / dyn:9.4f} {r.ppl:8.3f} "
              f"{100 * (r.ppl / base.ppl - 1):+6.2f}% {r.prefill_s:7.1f}s {planner_s:7.2f}s  "
              + ", ".join(f"{n}x {m}" for m, n in mix.most_common()), flush=True)


if __name__ == "__main__":
    main()
