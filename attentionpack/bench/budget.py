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


@torch.no_grad()
def _future_queries(model, ids: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
    """Per layer the rotated queries (1, Hq, n, d) of the last n of `ids` (a DynamicCache prefill of them all)."""
    from transformers import DynamicCache

    from ..models.registry import ModelAdapter
    from ..scoring.observation import window_queries

    out, handles = {}, []
    for idx, attn in enumerate(ModelAdapter(model).attention_modules):
        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out[idx] = window_queries(module, hidden, kwargs["position_embeddings"], n)
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(input_ids=ids[None], past_key_values=DynamicCache(config=model.config), use_cache=True,
              logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--window", type=int, default=None, help="PackConfig.window (default: the config default)")
    ap.add_argument("--queries", type=int, default=None, help="window queries the planner scores with")
    ap.add_argument("--oracle", type=int, default=0, help="also choose by the error of the next N tokens' queries "
                    "(held out, what decoding will ask: an upper bound for any prefill-time error measure)")
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
    from ..cache import budgeted

    if args.queries:
        budgeted.QUERIES = args.queries
    held_out = _future_queries(model, ids[: args.context + args.oracle], args.oracle) if args.oracle else None
    base = continuation_perplexity(model, ids, args.context, args.continuation, lambda: DynamicCache(config=model.config))
    print(f"dynamic: PPL {base.ppl:.3f}, prefill {base.prefill_s:.1f} s", flush=True)
    runs = [(p, PackConfig.preset(p)) for p in args.presets]
    extra = {} if args.window is None else {"window": args.window}
    runs += [(f"budget {f:g}", PackConfig(budget=f, **extra)) for f in args.budgets]
    if held_out:
        runs += [(f"oracle {f:g}", PackConfig(budget=f, **extra)) for f in args.budgets]
    print(f"{'config':>14} {'ratio':>6} {'bytes/dyn':>9} {'PPL':>8} {'dPPL':>7} {'prefill':>8} {'planner':>8}  choices")
    for name, cfg in runs:
        caches = []

        def fresh(cfg=cfg, oracle=name.startswith("oracle")):
            caches.append(PackedCache(model, cfg))
            if oracle:
                caches[-1].planner.held_out = held_out
            return caches[-1]

        spent["s"] = 0.0
        try:
            r = continuation_perplexity(model, ids, args.context, args.continuation, fresh)
        except ValueError as err:  # e.g. a BudgetError: too small for this prompt and window
            print(f"{name:>14} {err}", flush=True)
            continue
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
